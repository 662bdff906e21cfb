"""docs/training.md's "First run" commands, as written there but at the
smallest settings (one video per class, two steps of two clips), run
in-process: the section keeps working as the code changes."""
import json
import os
import re
import shlex
import subprocess

import pytest

from lookwhen.cli import main
from lookwhen.training.embed import read_shards

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")
SMALLEST = [(r"--steps \d+", "--steps 2"), (r"--batch-size \d+", "--batch-size 2"),
            (r"(write_dataset as w; w\('data/train', |w\('data/val', )\d+", r"\g<1>1")]


def first_run_commands():
    text = open(DOCS, encoding="utf-8").read()
    block = re.search(r"<!-- first-run[^\n]*-->\n```bash\n(.*?)\n```", text, re.S)
    assert block, "docs/training.md has no first-run block"
    commands = block.group(1).replace("\\\n", "")
    for pattern, replacement in SMALLEST:
        commands, count = re.subn(pattern, replacement, commands)
        assert count, f"the first-run block no longer matches {pattern!r}"
    return [line for line in commands.splitlines() if line.strip()]


@pytest.mark.usefixtures("pytorch_cpu_path")
def test_first_run_section_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in first_run_commands():
        argv = shlex.split(command)
        if argv[0] == "python":
            assert argv[1] == "-c"
            exec(compile(argv[2], "<first run>", "exec"), {})
        elif argv[0] == "lookwhen":
            assert main(argv[1:]) == 0, command
        else:
            subprocess.run(["bash", "-c", command], check=True)
    assert json.loads((tmp_path / "val.json").read_text())["videos"] == 3
    shards = read_shards("emb")
    assert len(shards["videos"]) == 3 and shards["embeddings"].shape == (3, 64) and "indices" in shards
