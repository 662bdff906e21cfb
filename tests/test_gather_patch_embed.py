import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from torch.utils.flop_counter import FlopCounterMode

from lookwhen_kernels import gather_patch_embed, reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops.gather_patch_embed import forward_into, window_grad_into
from lookwhen_kernels.testing import assert_fully_written, assert_within_reference_error, poison_

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "cpu_backend")

MEAN, STD = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)

# (batch, frames, height, width, patch, dim, downsample, selection)
CASES = [
    (2, 2, 32, 48, 16, 80, 1, "fixed"),  # ViT-B/16 patches
    (1, 1, 16, 16, 4, 33, 1, "one"),  # B = T = K = 1
    (2, 1, 12, 20, 4, 80, 1, "all"),  # K = N, shuffled
    (2, 2, 24, 16, 4, 33, 2, "dense"),  # the selector's path
    (3, 2, 16, 24, 4, 80, 1, "budgets"),  # per-clip budgets, one of them 0
    (2, 1, 64, 32, 16, 48, 2, "budgets"),
    (1, 3, 8, 12, 4, 16, 1, "dense"),
]


def _n_tokens(frames, height, width, patch, downsample):
    return frames * (height // (patch * downsample)) * (width // (patch * downsample))


def _problem(batch, frames, height, width, patch, dim, downsample, selection, dtype):
    """A random clip, parameters and selection; weights large enough that the
    GEMM's rounding, not the output's, is what the tolerance sees."""
    clip = torch.randint(0, 256, (batch, frames, height, width, 3), dtype=torch.uint8)
    n = _n_tokens(frames, height, width, patch, downsample)
    weight = (torch.randn(dim, 3, patch, patch) / patch).to(dtype)
    bias = torch.randn(dim).to(dtype)
    pos = torch.randn(n, dim).to(dtype)
    cu = None
    if selection == "fixed":
        indices = torch.stack([torch.randperm(n)[: min(5, n)].sort().values for _ in range(batch)])
    elif selection == "one":
        indices = torch.randint(0, n, (batch, 1))
    elif selection == "all":
        indices = torch.stack([torch.randperm(n) for _ in range(batch)])
    elif selection == "dense":
        indices = None
    else:  # budgets, with repeated ids (the pos_embed gradient must add them up)
        lengths = [int(torch.randint(1, n + 1, ())) for _ in range(batch)]
        lengths[1] = 0
        indices = torch.cat([torch.randint(0, n, (length,)) for length in lengths])
        cu = cu_seqlens_from_lengths(lengths)
    if indices is not None:
        indices = indices.to(torch.int32).contiguous()
    options = dict(patch_size=patch, mean=MEAN, std=STD, cu_seqlens=cu, downsample=downsample)
    return clip, indices, (weight, bias, pos), options


def _double(params):
    return [p.detach().double() for p in params]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_float64_reference(case, dtype):
    clip, indices, params, options = _problem(*case, dtype)
    out = gather_patch_embed(clip, indices, *params, **options)
    oracle = reference.gather_patch_embed(clip, indices, *_double(params), **options)
    assert out.dtype == dtype and out.shape == oracle.shape
    assert_within_reference_error(out, reference.gather_patch_embed(clip, indices, *params, **options), oracle)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]])
def test_forward_writes_every_output_element(case):
    clip, indices, params, options = _problem(*case, torch.float16)
    expected = reference.gather_patch_embed(clip, indices, *params, **options)
    out = poison_(torch.empty_like(expected))
    mean, std = options["mean"], options["std"]
    forward_into(out, clip, indices, *params, mean, std, options["cu_seqlens"], options["patch_size"],
                  options["downsample"])
    assert_fully_written(out)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_backward_kernel_writes_every_element(case):
    clip, indices, params, options = _problem(*case, torch.float32)
    dim, patch, downsample = params[0].shape[0], options["patch_size"], options["downsample"]
    rows = clip.shape[0] * params[2].shape[0] if indices is None else indices.numel()
    g = poison_(torch.empty(3 * patch * patch * downsample, dim))
    window_grad_into(g, torch.randn(rows, dim), clip, indices, options["cu_seqlens"], patch, downsample)
    assert_fully_written(g)


@pytest.mark.parametrize("downsample, patch", [(1, 16), (2, 4)])
def test_dense_path_matches_timm_patch_embed(downsample, patch):
    batch, frames, height, width, dim = 2, 2, 32 * downsample, 48 * downsample, 40
    clip, _, (weight, bias, pos), options = _problem(
        batch, frames, height, width, patch, dim, downsample, "dense", torch.float32
    )
    out = gather_patch_embed(clip, None, weight, bias, pos, **options)

    frames_nchw = clip.reshape(-1, height, width, 3).permute(0, 3, 1, 2).float() / 255
    if downsample > 1:
        frames_nchw = torch.nn.functional.avg_pool2d(frames_nchw, downsample)
    normalised = (frames_nchw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    embed = PatchEmbed((height // downsample, width // downsample), patch, 3, dim)
    with torch.no_grad():
        embed.proj.weight.copy_(weight)
        embed.proj.bias.copy_(bias)
        expected = embed(normalised).reshape(batch, -1, dim) + pos
    torch.testing.assert_close(out, expected.reshape(-1, dim), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference_gradients(case, dtype):
    clip, indices, params, options = _problem(*case, dtype)
    params = [p.requires_grad_(True) for p in params]
    out = gather_patch_embed(clip, indices, *params, **options)
    grad = torch.randn(out.shape).to(dtype)
    kernel = torch.autograd.grad(out, params, grad)
    same = [p.detach().clone().requires_grad_(True) for p in params]
    same_precision = torch.autograd.grad(reference.gather_patch_embed(clip, indices, *same, **options), same, grad)
    exact = [p.requires_grad_(True) for p in _double(params)]
    oracle = torch.autograd.grad(reference.gather_patch_embed(clip, indices, *exact, **options), exact, grad.double())
    for name, k, s, o in zip(("d_weight", "d_bias", "d_pos_embed"), kernel, same_precision, oracle):
        assert k.dtype == dtype
        assert_within_reference_error(k, s, o, name=name)


@pytest.mark.parametrize("downsample, selection", [(1, "fixed"), (2, "budgets"), (2, "dense")])
def test_reference_gradcheck_float64(downsample, selection):
    clip, indices, params, options = _problem(2, 2, 8 * downsample, 4 * downsample, 4, 3, downsample, selection,
                                              torch.float64)
    params = [p.requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(lambda *p: reference.gather_patch_embed(clip, indices, *p, **options), params)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]])
def test_reference_backward_formula_matches_autograd(case):
    clip, indices, params, options = _problem(*case, torch.float64)
    params = [p.requires_grad_(True) for p in params]
    out = reference.gather_patch_embed(clip, indices, *params, **options)
    grad = torch.randn_like(out)
    autograd = torch.autograd.grad(out, params, grad)
    formula = reference.gather_patch_embed_backward(grad, clip, indices, **options)
    for a, f in zip(autograd, formula):
        torch.testing.assert_close(f, a)


def test_empty_budgets_give_empty_output_and_zero_gradients():
    clip, _, params, options = _problem(3, 1, 8, 8, 4, 16, 1, "dense", torch.float32)
    params = [p.requires_grad_(True) for p in params]
    options["cu_seqlens"] = cu_seqlens_from_lengths([0, 0, 0])
    out = gather_patch_embed(clip, torch.empty(0, dtype=torch.int32), *params, **options)
    assert out.shape == (0, 16)
    grads = torch.autograd.grad(out, params, torch.empty_like(out))
    for g, p in zip(grads, params):
        assert g.shape == p.shape and not g.any()


def test_mean_and_std_accept_tensors():
    clip, indices, params, options = _problem(*CASES[0], torch.float32)
    as_lists = gather_patch_embed(clip, indices, *params, **options)
    options.update(mean=torch.tensor(MEAN), std=torch.tensor(STD))
    torch.testing.assert_close(gather_patch_embed(clip, indices, *params, **options), as_lists)


def test_registered_op_dispatches():
    clip, indices, params, options = _problem(*CASES[4], torch.float32)
    out = torch.ops.lookwhen.gather_patch_embed(
        clip, indices, *params, MEAN, STD, options["cu_seqlens"], options["patch_size"], options["downsample"]
    )
    torch.testing.assert_close(out, reference.gather_patch_embed(clip, indices, *params, **options),
                               rtol=1e-5, atol=1e-4)


def test_flop_counter_counts_the_gemms():
    clip, indices, params, options = _problem(*CASES[0], torch.float32)
    params = [p.requires_grad_(True) for p in params]
    with FlopCounterMode(display=False) as counter:
        out = gather_patch_embed(clip, indices, *params, **options)
        out.sum().backward()
    dim, patch = params[0].shape[0], options["patch_size"]
    gemm = 2 * indices.numel() * dim * 3 * patch * patch
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.lookwhen.gather_patch_embed] == gemm
    assert counts[torch.ops.lookwhen.gather_patch_embed_backward] == gemm


def test_torch_compile_matches_reference():
    clip, indices, params, options = _problem(3, 2, 16, 24, 4, 24, 2, "budgets", torch.float32)
    params = [p.requires_grad_(True) for p in params]
    compiled = torch.compile(lambda *p: gather_patch_embed(clip, indices, *p, **options) * 2, fullgraph=True)
    out = compiled(*params)
    expected = reference.gather_patch_embed(clip, indices, *_double(params), **options) * 2
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def _bad_call(**changes):
    clip, indices, (weight, bias, pos), options = _problem(2, 2, 8, 8, 4, 16, 1, "fixed", torch.float32)
    args = dict(clip=clip, indices=indices, weight=weight, bias=bias, pos_embed=pos) | options
    args.update(changes)
    return lambda: gather_patch_embed(
        args.pop("clip"), args.pop("indices"), args.pop("weight"), args.pop("bias"), args.pop("pos_embed"), **args
    )


_PACKED = torch.zeros(3, dtype=torch.int32)
BAD = [
    (dict(clip=torch.zeros(2, 2, 8, 8, 3)), "clip: expected dtype uint8"),
    (dict(clip=torch.zeros(2, 8, 8, 3, dtype=torch.uint8)), "clip: expected a 5-d"),
    (dict(clip=torch.zeros(2, 2, 8, 8, 4, dtype=torch.uint8)), "clip: expected 3 channels"),
    (dict(clip=torch.zeros(2, 2, 8, 3, 8, dtype=torch.uint8).transpose(3, 4)), "clip: expected a contiguous"),
    (dict(clip=torch.zeros(2, 2, 8, 10, 3, dtype=torch.uint8)), "clip: H and W must be divisible"),
    (dict(clip=torch.zeros(2, 2, 12, 12, 3, dtype=torch.uint8), downsample=2), "clip: H and W must be divisible"),
    (dict(downsample=3), "downsample"),
    (dict(patch_size=0), "patch_size"),
    (dict(indices=torch.zeros(2, 3, dtype=torch.int64)), "indices: expected dtype int32"),
    (dict(indices=torch.zeros(2, 3, 1, dtype=torch.int32)), r"indices: expected \[B, K\]"),
    (dict(indices=torch.zeros(3, 3, dtype=torch.int32)), r"indices: expected shape \[2, \*\]"),
    (dict(indices=torch.full((2, 3), 8, dtype=torch.int32)), r"indices: token ids must lie in \[0, 8\)"),
    (dict(indices=torch.full((2, 3), -1, dtype=torch.int32)), "indices: token ids must lie"),
    (dict(indices=_PACKED), "cu_seqlens: required"),
    (dict(indices=_PACKED, cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32)), "cu_seqlens: last offset"),
    (dict(indices=_PACKED, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens: expected 3 offsets"),
    (dict(indices=_PACKED, cu_seqlens=torch.tensor([0, 3, 3])), "cu_seqlens: expected dtype int32"),
    (dict(indices=_PACKED, cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32)), "cu_seqlens: must be non-dec"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), "cu_seqlens: only meaningful"),
    (dict(indices=None, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), "cu_seqlens: only meaningful"),
    (dict(weight=torch.zeros(16, 3, 4, 4, dtype=torch.float64)), "weight: expected dtype"),
    (dict(weight=torch.zeros(16, 3, 2, 2)), r"weight: expected shape \[16, 3, 4, 4\]"),
    (dict(weight=torch.zeros(16, 1, 4, 4)), r"weight: expected shape"),
    (dict(weight=torch.zeros(16, 48)), "weight: expected a 4-d"),
    (dict(bias=torch.zeros(15)), r"bias: expected shape \[16\]"),
    (dict(bias=torch.zeros(16, dtype=torch.float16)), "bias: expected dtype float32"),
    (dict(pos_embed=torch.zeros(9, 16)), r"pos_embed: expected shape \[8, 16\]"),
    (dict(pos_embed=torch.zeros(8, 16, dtype=torch.float16)), "pos_embed: expected dtype float32"),
    (dict(mean=[0.5, 0.5]), "mean: expected 3 values"),
    (dict(mean=torch.zeros(3, 1)), "mean: expected 3 values"),
    (dict(mean="abc"), "mean: expected a sequence"),
    (dict(std=[0.5, 0.0, 0.5]), "std: every value must be positive"),
    (dict(std=[0.5, 0.5, 0.5, 0.5]), "std: expected 3 values"),
    (dict(clip=[[0]]), "clip: expected a torch.Tensor"),
    (dict(bias=torch.zeros(16, device="meta")), "bias: expected a tensor on cpu"),
    (dict(pos_embed=torch.zeros(8, 16, device="meta")), "pos_embed: expected a tensor on cpu"),
    (dict(weight=torch.zeros(16, 3, 4, 4, device="meta")), "weight: expected a tensor on cpu"),
    (dict(indices=torch.zeros(2, 3, dtype=torch.int32, device="meta")), "indices: expected a tensor on cpu"),
    (dict(indices=_PACKED, cu_seqlens=torch.zeros(3, dtype=torch.int32, device="meta")),
     "cu_seqlens: expected a tensor on cpu"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(**changes)()


def test_ids_out_of_range_under_validate_false_read_nothing(cpu_backend):
    """validate=False skips the host read of the ids: the native kernels
    still check them (on the host), the Triton kernels read nothing for such
    a row (it holds the kernel's folded bias)."""
    clip, indices, params, options = _problem(2, 2, 32, 48, 16, 80, 1, "fixed", torch.float32)
    n = params[2].shape[0]
    indices[0, 1], indices[1, 3] = n, -7
    if cpu_backend == "native":
        with pytest.raises(ValueError, match="outside"):
            gather_patch_embed(clip, indices, *params, **options, validate=False)
        return
    out = gather_patch_embed(clip, indices, *params, **options, validate=False).view(2, -1, 80)
    bad = torch.zeros(2, indices.shape[1], dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    # No pixels, no position: what is left is the same constant row.
    assert torch.equal(out[bad][0], out[bad][1]) and out[bad].isfinite().all()
    good = gather_patch_embed(clip, indices.clamp(0, n - 1), *params, **options).view(2, -1, 80)
    assert torch.equal(out[~bad], good[~bad])


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_zero_width_embedding(monkeypatch, path):
    """D = 0: an empty row per token on every path (the kernels' backend of
    the fixture, and the PyTorch reference outside the interpreter)."""
    if path == "pytorch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr("lookwhen_kernels.ops._common._CPU_BACKEND", "reference")
    clip = torch.randint(0, 256, (2, 1, 16, 16, 3), dtype=torch.uint8)
    weight = torch.zeros(0, 3, 8, 8, requires_grad=True)
    bias, pos = torch.zeros(0, requires_grad=True), torch.zeros(4, 0, requires_grad=True)
    out = gather_patch_embed(clip, torch.tensor([[0, 3], [1, 2]], dtype=torch.int32), weight, bias, pos,
                             patch_size=8, mean=MEAN, std=STD)
    assert out.shape == (4, 0)
    out.sum().backward()
    assert weight.grad.shape == weight.shape and pos.grad.shape == pos.shape
