"""The prepared GPU check, ``.ci/gpu``, where it can be checked without a GPU."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: .ci/gpu would run for real")
def test_gpu_script_without_a_gpu_says_so_in_one_line_and_exits_3(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, OUT=str(tmp_path)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout.strip().count("\n") == 0 and "no NVIDIA GPU" in proc.stdout
    assert (tmp_path / "gpu.log").read_text() == proc.stdout
