"""The native CPU backend's plumbing: which path a CPU op takes, the one
message when the library is missing, and the run-time switch. (The kernels'
results are checked by the op tests, which run against both CPU backends.)"""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import lookwhen_kernels as lk
from lookwhen_kernels import native, native_build, reference
from lookwhen_kernels import set_cpu_backend
from lookwhen_kernels.testing import assert_within_reference_error

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(native.__file__)))
needs_native = pytest.mark.skipif(not native.available(), reason=f"native CPU backend {native.status()}")


def _ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _every_op():
    clip = torch.randint(0, 256, (1, 2, 16, 16, 3), dtype=torch.uint8)
    scores = torch.randn(2, 3 * 2 * 2)
    lk.topk_tokens(scores, 5, grid=(3, 2, 2), out_grid=(3, 4, 4))
    lk.topk_tokens_budgets(scores, torch.tensor([3, 0], dtype=torch.int32))
    weight = torch.randn(8, 3, 4, 4, requires_grad=True)
    lk.gather_patch_embed(clip, torch.tensor([[0, 3]], dtype=torch.int32), weight, torch.randn(8),
                          torch.randn(32, 8), patch_size=4, mean=(0.5,) * 3, std=(0.2,) * 3).sum().backward()
    lk.nn_uniqueness(torch.randn(2, 9, 5), metric="cosine")
    x = torch.randn(2, 6, 8, requires_grad=True)
    head = [torch.ones(8), torch.zeros(8), torch.randn(12, 8), torch.randn(12), torch.randn(1, 12), torch.randn(1)]
    lk.score_tokens(x, *head).sum().backward()
    feats = torch.randn(1, 2, 5, 4, requires_grad=True)
    lk.frame_normalize(feats).sum().backward()


NATIVE_OPS = {
    "lookwhen_native::topk_tokens", "lookwhen_native::topk_tokens_budgets", "lookwhen_native::gather_patch_embed",
    "lookwhen_native::gather_patch_embed_backward",
    "lookwhen_native::nn_uniqueness", "lookwhen_native::score_tokens", "lookwhen_native::score_tokens_backward",
    "lookwhen_native::frame_normalize", "lookwhen_native::frame_normalize_backward",
}


@needs_native
def test_cpu_ops_outside_the_interpreter_run_the_native_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert NATIVE_OPS <= _ops_run(_every_op)


@needs_native
def test_reference_backend_runs_no_native_kernel():
    previous = set_cpu_backend("reference")
    try:
        assert not NATIVE_OPS & _ops_run(_every_op)
    finally:
        set_cpu_backend(previous)


def test_bad_backend_name_raises_value_error():
    with pytest.raises(ValueError, match="name: expected one of"):
        set_cpu_backend("cuda")


def test_missing_library_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.delenv("LOOKWHEN_NATIVE", raising=False)
    monkeypatch.delenv("LOOKWHEN_NATIVE_LIBRARY", raising=False)
    monkeypatch.setattr(native, "_HERE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {"loaded": None, "status": None, "warned": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.kernel("topk_tokens") is None
        assert native.kernel("nn_uniqueness") is None
    assert len(caught) == 1 and "not built" in str(caught[0].message)
    assert native.status().startswith("not built")


def test_library_built_for_another_torch_is_not_loaded(monkeypatch, tmp_path):
    # Loading it would fail on missing symbols at best: its name says the release.
    (tmp_path / "_native-torch1.0.0.so").write_bytes(b"not a library")
    monkeypatch.delenv("LOOKWHEN_NATIVE", raising=False)
    monkeypatch.delenv("LOOKWHEN_NATIVE_LIBRARY", raising=False)
    monkeypatch.setattr(native, "_HERE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {"loaded": None, "status": None, "warned": False})
    assert not native.available()
    assert native.status().startswith(f"built for torch 1.0.0, not the torch {torch.__version__} running")


def test_build_command_says_why_without_cmake(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "")
    assert native.main(["--build"]) == 1
    assert "no cmake on PATH" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("cmake") is None or not os.path.exists(os.path.join(SOURCE, "CMakeLists.txt")),
                    reason="building needs CMake and the source tree")
def test_build_for_the_running_torch_gives_a_library_it_loads(tmp_path):
    # What `python -m lookwhen_kernels.native --build` does, into a folder
    # of its own: the installed library stays untouched. The build folder is
    # reused when the install ran with this CMake and torch, else rebuilt.
    library = native_build.build(SOURCE, torch.utils.cmake_prefix_path, torch.__version__, str(tmp_path))
    assert os.path.basename(library) == native_build.library_name(torch.__version__)
    code = (f"import torch; torch.ops.load_library({library!r}); "
            "print(hasattr(torch.ops.lookwhen_native, 'topk_tokens'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_environment_variable_disables_the_backend_silently():
    code = ("import warnings, torch; warnings.simplefilter('error'); import lookwhen_kernels as lk; "
            "from lookwhen_kernels import native; assert not native.available(); "
            "lk.topk_tokens(torch.randn(2, 9), 3); print(native.status())")
    env = dict(os.environ, LOOKWHEN_NATIVE="0", TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.startswith("disabled")


@needs_native
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nn_uniqueness_across_query_strips(metric):
    # 600 tokens are three of the kernel's 256-query strips: most pairs meet
    # in the pass over the keys beyond a strip. A duplicate pair across
    # strips must come out at exactly 0.
    x = torch.randn(2, 600, 24) + 0.5
    x[0, 590] = x[0, 3]
    previous = set_cpu_backend("native")
    try:
        out = lk.nn_uniqueness(x, metric=metric)
    finally:
        set_cpu_backend(previous)
    oracle = reference.nn_uniqueness(x.double(), metric)
    assert_within_reference_error(out, reference.nn_uniqueness(x, metric), oracle, floor=1e-5)
    assert out[0, 3] == 0 and out[0, 590] == 0


def _hostile_calls():
    """Calls of the registered native ops (as anyone can make them, with no
    Python checks in front) whose arguments contradict each other: each would
    read or write outside its buffers if the op trusted them."""
    ops = torch.ops.lookwhen_native
    clip = torch.randint(0, 256, (2, 2, 16, 16, 3), dtype=torch.uint8)
    weight, bias, pos = torch.randn(8, 3, 8, 8), torch.randn(8), torch.randn(8, 8)
    embed = dict(mean=[0.5] * 3, std=[0.5] * 3, patch_size=8, downsample=1)
    packed = torch.tensor([0, 1, 2], dtype=torch.int32)
    scores = torch.randn(2, 8)
    head = [torch.ones(4), torch.zeros(4), torch.randn(6, 4), torch.zeros(6), torch.randn(1, 6), torch.zeros(1)]
    return {
        "topk k past N": (lambda: ops.topk_tokens(scores, 9, [2, 2, 2], [2, 2, 2]), "k must lie in"),
        "topk grid larger than the scores": (lambda: ops.topk_tokens(scores, 2, [2, 4, 4], [2, 4, 4]), "grid"),
        "topk upsampled past int32": (lambda: ops.topk_tokens(scores, 1, [2, 2, 2], [2, 2**16, 2**16]), "int32"),
        "budgets past the scores": (lambda: ops.topk_tokens_budgets(
            scores, torch.tensor([9, 1], dtype=torch.int32), torch.tensor([0, 9, 10], dtype=torch.int32), 10,
            [2, 2, 2], [2, 2, 2]), "outside"),
        "budgets not summing to total": (lambda: ops.topk_tokens_budgets(
            scores, torch.tensor([3, 3], dtype=torch.int32), torch.tensor([0, 3, 6], dtype=torch.int32), 2,
            [2, 2, 2], [2, 2, 2]), "total"),
        "budgets and offsets disagree": (lambda: ops.topk_tokens_budgets(
            scores, torch.tensor([3, 3], dtype=torch.int32), torch.tensor([0, 5, 6], dtype=torch.int32), 6,
            [2, 2, 2], [2, 2, 2]), "slots"),
        "short cu_seqlens": (lambda: ops.topk_tokens_budgets(
            scores, torch.tensor([3, 3], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 6,
            [2, 2, 2], [2, 2, 2]), "cu_seqlens"),
        "ids out of range": (lambda: ops.gather_patch_embed(
            clip, torch.tensor([[0, 8]] * 2, dtype=torch.int32), weight, bias, pos, cu_seqlens=None, **embed),
            "outside"),
        "negative id": (lambda: ops.gather_patch_embed(
            clip, torch.tensor([[0, -1]] * 2, dtype=torch.int32), weight, bias, pos, cu_seqlens=None, **embed),
            "outside"),
        "ids for another batch": (lambda: ops.gather_patch_embed(
            clip, torch.tensor([[0, 1]] * 3, dtype=torch.int32), weight, bias, pos, cu_seqlens=None, **embed),
            "clips"),
        "packed without offsets": (lambda: ops.gather_patch_embed(
            clip, packed, weight, bias, pos, cu_seqlens=None, **embed), "cu_seqlens"),
        "offsets past the ids": (lambda: ops.gather_patch_embed(
            clip, packed, weight, bias, pos, cu_seqlens=torch.tensor([0, 2, 9], dtype=torch.int32), **embed),
            "total"),
        "short offsets": (lambda: ops.gather_patch_embed(
            clip, packed, weight, bias, pos, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), **embed),
            "cu_seqlens"),
        "position table too short": (lambda: ops.gather_patch_embed(
            clip, None, weight, bias, pos[:3], cu_seqlens=None, **embed), "pos_embed"),
        "weight of another patch size": (lambda: ops.gather_patch_embed(
            clip, None, torch.randn(8, 3, 4, 4), bias, pos, cu_seqlens=None, **embed), "weight"),
        "backward grad of too few rows": (lambda: ops.gather_patch_embed_backward(
            torch.randn(3, 8), clip, None, embed["mean"], embed["std"], None, 8, 1), "grad"),
        "score head of another width": (lambda: ops.score_tokens(torch.randn(2, 5, 4), head[0], head[1],
                                                                 torch.randn(6, 3), *head[3:], 1e-6), "w1"),
        "score head w2 too short": (lambda: ops.score_tokens(torch.randn(2, 5, 4), *head[:4], torch.randn(1, 2),
                                                             head[5], 1e-6), "w2"),
        "score backward grad too short": (lambda: ops.score_tokens_backward(torch.randn(2, 4), torch.randn(2, 5, 4),
                                                                            *head, 1e-6), "grad"),
        "uniqueness of 2-d x": (lambda: ops.nn_uniqueness(torch.randn(5, 4), "l2"), "x must be"),
        "uniqueness of integers": (lambda: ops.nn_uniqueness(torch.ones(1, 5, 4, dtype=torch.int32), "l2"),
                                   "floating"),
        "normalize backward grad too short": (lambda: ops.frame_normalize_backward(
            torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4), 1e-6), "grad"),
    }


@needs_native
@pytest.mark.parametrize("case", sorted(_hostile_calls()))
def test_native_ops_check_their_own_contracts(case):
    call, message = _hostile_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


_VARIANT_RUN = """
import sys, torch
import lookwhen_kernels as lk
from lookwhen_kernels import native, set_cpu_backend
set_cpu_backend("native")
torch.manual_seed(0)
x = torch.randn(2, 37, 40).to(torch.bfloat16)
head = [torch.ones(40), torch.zeros(40), torch.randn(24, 40) / 6, torch.randn(24), torch.randn(1, 24), torch.randn(1)]
scores = lk.score_tokens(x, *(t.to(torch.bfloat16) for t in head))
clip = torch.randint(0, 256, (1, 2, 32, 32, 3), dtype=torch.uint8)
tokens = lk.gather_patch_embed(clip, None, torch.randn(16, 3, 4, 4).to(torch.bfloat16), torch.zeros(16).to(torch.bfloat16),
                               torch.randn(32, 16).to(torch.bfloat16), patch_size=4, mean=(0.5,) * 3, std=(0.2,) * 3,
                               downsample=2)
torch.save({"status": native.status(), "scores": scores, "tokens": tokens}, sys.argv[1])
"""


@needs_native
def test_library_variant_follows_atens_vector_capability(tmp_path):
    # The portable library and the one for ATen's own instruction set (AVX2,
    # AVX512) where the build made it: the same results up to the last bits
    # of erf and the bfloat16 GEMM's blocking.
    capability = torch.backends.cpu.get_cpu_capability()
    variant = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "")
    library = os.path.join(os.path.dirname(native.__file__), native_build.library_name(torch.__version__, variant))
    if variant and not os.path.exists(library):
        pytest.skip(f"no {variant} library in this build")
    if os.environ.get("LOOKWHEN_NATIVE_LIBRARY"):
        pytest.skip("LOOKWHEN_NATIVE_LIBRARY chooses the library")
    results = {}
    for name, env in (("own", {}), ("portable", {"ATEN_CPU_CAPABILITY": "default"})):
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _VARIANT_RUN, str(out)], check=True, env={**os.environ, **env})
        results[name] = torch.load(out)
    assert results["own"]["status"] == f"built: {library}"
    portable = native_build.library_name(torch.__version__)
    assert results["portable"]["status"].endswith(portable)
    for key in ("scores", "tokens"):
        torch.testing.assert_close(results["own"][key].float(), results["portable"][key].float(), rtol=2e-2, atol=2e-2)
