"""Every op through its Triton kernels on a GPU, in fp16 and bf16 (which the
interpreter cannot run), against the float64 references, forward and
backward, plus the whole model. Skipped without CUDA; ``.ci/gpu`` runs them
(``pytest -m cuda``)."""
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen import build_model
from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.testing import assert_fully_written, assert_within_reference_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.usefixtures("poisoned_allocations"),
]
DTYPES = [torch.float16, torch.bfloat16]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _cuda(tensors, dtype=None):
    return [t.cuda() if dtype is None or not t.is_floating_point() else t.to("cuda", dtype) for t in tensors]


def _compare(kernel_fn, reference_fn, inputs, dtype, differentiable, name, factor=2.0, grad_factor=3.0):
    """The kernel against the float64 oracle, bounded by the same-precision
    reference's error (forward, then the gradient of a random projection)."""
    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(i in differentiable) for i, t in enumerate(tensors)]
        out = fn(*leaves)
        return leaves, out

    low = _cuda(inputs, dtype)
    oracle_in = [t.double() if t.is_floating_point() else t for t in _cuda(inputs)]
    results = [run(kernel_fn, low), run(reference_fn, low), run(reference_fn, oracle_in)]
    (leaves_k, out_k), (leaves_s, out_s), (leaves_o, out_o) = results
    assert_fully_written(out_k, name)
    assert_within_reference_error(out_k, out_s, out_o, factor=factor, name=name)
    if not differentiable:
        return
    grad = torch.randn(out_k.shape, device="cuda", dtype=torch.float64)
    grads = []
    for leaves, out in ((leaves_k, out_k), (leaves_s, out_s), (leaves_o, out_o)):
        wrt = [leaves[i] for i in differentiable]
        grads.append(torch.autograd.grad(out, wrt, grad.to(out.dtype), materialize_grads=True))
    for i, (gk, gs, go) in enumerate(zip(*grads)):
        assert_within_reference_error(gk, gs, go, factor=grad_factor, name=f"{name} d{differentiable[i]}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_tokens(dtype):
    dim, hidden = 96, 192
    inputs = [torch.randn(3, 50, dim), torch.randn(dim), torch.randn(dim), torch.randn(hidden, dim) / 10,
              torch.randn(hidden), torch.randn(1, hidden) / 10, torch.randn(1)]
    _compare(lk.score_tokens, reference.score_tokens, inputs, dtype, list(range(7)), "score_tokens")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_patch_embed(dtype):
    clip = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8).cuda()
    indices = torch.stack([torch.randperm(64)[:20].sort().values for _ in range(2)]).int().cuda()

    def kernel(w, b, p):
        return lk.gather_patch_embed(clip, indices, w, b, p, patch_size=16, mean=MEAN, std=STD)

    def ref(w, b, p):
        return reference.gather_patch_embed(clip, indices, w, b, p, patch_size=16, mean=MEAN, std=STD)

    params = [torch.randn(128, 3, 16, 16) / 16, torch.randn(128), torch.randn(64, 128)]
    _compare(kernel, ref, params, dtype, [0, 1, 2], "gather_patch_embed")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_scatter_tokens(dtype):
    lengths = [5, 0, 17]
    cu = cu_seqlens_from_lengths(lengths).cuda()
    indices = torch.cat([torch.randperm(40)[:n] for n in lengths]).int().cuda()
    _compare(lambda x: lk.gather_tokens(x, indices, cu), lambda x: reference.gather_tokens(x, indices, cu),
             [torch.randn(3, 40, 72)], dtype, [0], "gather_tokens", factor=0.0)
    _compare(lambda p: lk.scatter_tokens(p, indices, 40, cu), lambda p: reference.scatter_tokens(p, indices, 40, cu),
             [torch.randn(22, 72)], dtype, [0], "scatter_tokens", factor=0.0)


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention(dtype, head_dim):
    lengths = [1, 300, 0, 1100, 17]
    cu = cu_seqlens_from_lengths(lengths).cuda()
    heads, kv_heads = 8, 1 if head_dim != 256 else 2
    inputs = [torch.randn(sum(lengths), heads, head_dim), torch.randn(sum(lengths), kv_heads, head_dim),
              torch.randn(sum(lengths), kv_heads, head_dim)]
    _compare(lambda q, k, v: lk.varlen_attention(q, k, v, cu),
             lambda q, k, v: reference.varlen_attention(q, k, v, cu, cu)[0], inputs, dtype, [0, 1, 2],
             "varlen_attention")


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_nn_uniqueness_frame_normalize(dtype):
    scores = torch.randn(4, 784).cuda()
    ids = lk.topk_tokens(scores.to(dtype), keep_ratio=0.1, grid=(16, 7, 7), out_grid=(16, 14, 14))
    expected = reference.topk_tokens(scores.to(dtype), 314, grid=(16, 7, 7), out_grid=(16, 14, 14))
    assert torch.equal(ids, expected)
    x = torch.randn(2, 300, 96)
    _compare(lambda t: lk.nn_uniqueness(t), lambda t: reference.nn_uniqueness(t, "l2"), [x], dtype, [],
             "nn_uniqueness")
    _compare(lk.frame_normalize, lambda t: reference.frame_normalize(t, 1e-6), [torch.randn(2, 4, 49, 96)], dtype,
             [0], "frame_normalize")


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_forward_and_backward(dtype):
    model = build_model("lookwhen-b16", frames=4, image_size=64, width=128, depth=2, heads=2, selector_width=64, context_projection=True,
                        selector_depth=1, selector_heads=1, score_hidden=64, registers=2).cuda()
    clip = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8).cuda()
    with torch.autocast("cuda", dtype=dtype):
        out = model(clip)
    assert torch.isfinite(out.embedding).all()
    (out.embedding.float().square().sum() + out.scores.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32 = model(clip)
    assert torch.equal(out.indices, fp32.indices) or (out.indices != fp32.indices).float().mean() < 0.05
    torch.testing.assert_close(out.embedding.float(), fp32.embedding, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("patch, tubelet, std", [(14, 1, STD), (16, 2, None)])
def test_static_tokens_and_rlt(patch, tubelet, std):
    from lookwhen.models.rlt import RLTDense

    clip = torch.randint(0, 256, (3, 8, 224, 224, 3), dtype=torch.uint8)
    clip[:, 1:, :, :112] = clip[:, :1, :, :112]  # a static left half
    # Thresholds that put no patch exactly on the boundary (see test_static_tokens).
    threshold = 1.37 if std else 65280.5 / (255 * 3 * patch * patch)
    out = lk.static_tokens(clip.cuda(), patch_size=patch, threshold=threshold, tubelet=tubelet, std=std)
    expected = reference.static_tokens(clip, patch_size=patch, threshold=threshold, tubelet=tubelet, std=std)
    for name, got, want in zip(("indices", "cu_seqlens", "run_lengths"), out, expected):
        assert_fully_written(got, name)
        assert torch.equal(got.cpu(), want), name
    base = build_model("internvideo2-b14", frames=8, width=128, depth=2, heads=2, pool_heads=2).cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        dense, everything = base(clip[:2].cuda()), RLTDense(base, threshold=0.0)(clip[:2].cuda())
    torch.testing.assert_close(everything.embedding.float(), dense.float(), rtol=0.05, atol=0.05)
