"""The static GPU report: every kernel compiles for sm_90 and sm_80 without
spills, and the GEMM-shaped kernels use the tensor cores."""
import json
import os
import subprocess
import sys

import pytest

from lookwhen_kernels.inspect import Row

GEMM_KERNELS = (
    "score_tokens_fwd",
    "gather_patch_embed_fwd",
    "gather_patch_embed_bwd",
    "varlen_attention_fwd",
    "varlen_attention_dkdv",
    "varlen_attention_dq",
)


def _env_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lookwhen_kernels.inspect", "--json", str(out)],
        env=_env_without_interpreter(), capture_output=True, text=True, timeout=1200,
    )
    return proc, json.loads(out.read_text()) if out.exists() else []


def test_every_kernel_builds_without_spills(report):
    proc, rows = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rows and all(r["ok"] and r["spill_bytes"] == 0 for r in rows)
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    assert "kernel builds ok" in proc.stdout


@pytest.mark.parametrize("kernel", GEMM_KERNELS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gemm_kernels_use_hgmma_on_hopper(report, kernel, dtype):
    _, rows = report
    hopper = [r for r in rows if r["kernel"].startswith(kernel) and dtype in r["kernel"] and r["arch"] == "sm_90"]
    assert hopper, f"no sm_90 {dtype} build of {kernel} in the report"
    assert all(r["tensor_core_instructions"] > 0 for r in hopper)


def test_a_spilling_or_tensor_core_free_build_fails_the_report():
    assert not Row("k", "sm_90", 100, spill_bytes=8, shared_bytes=0, tensor_core_instructions=0).ok
    assert not Row("k", "sm_90", 100, 0, 0, tensor_core_instructions=0, tensor_cores_required=True).ok
    assert not Row("k", "sm_80", error="CompilationError").ok
    assert Row("k", "sm_90", 100, 0, 0, tensor_core_instructions=4, tensor_cores_required=True).ok


def test_refuses_to_run_under_the_interpreter():
    env = _env_without_interpreter() | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "lookwhen_kernels.inspect"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


def test_a_build_over_the_shared_memory_limit_fails_the_report():
    over_ampere = 170 * 1024  # fits sm_90's 227 KB, not sm_80's 163 KB
    assert not Row("k", "sm_80", 100, 0, over_ampere, tensor_core_instructions=0).ok
    assert Row("k", "sm_90", 100, 0, over_ampere, tensor_core_instructions=0).ok
    assert not Row("k", "sm_90", 100, 0, 228 * 1024, tensor_core_instructions=0).ok
    assert "shared memory" in Row("k", "sm_80", 100, 0, over_ampere, tensor_core_instructions=0).failure
