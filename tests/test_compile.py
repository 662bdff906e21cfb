"""torch.compile(fullgraph=True) over every op and the whole LookWhen model,
forward and backward, checked against eager numerically (not only for
finiteness). On CPU the compiled graph is Inductor over the reference path;
eager runs the Triton kernels in the interpreter, so the two are independent
implementations. Shapes are tiny: compiling is the slow part on CPU.
"""
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen import build_model
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.testing import magnitude_floor
from helpers import MICRO

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _run(fn, inputs, grad_seed=0):
    """Outputs of ``fn(*inputs)`` and the gradients of a fixed random
    projection of them with respect to the floating inputs."""
    leaves = _leaves(inputs)
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(grad_seed)
    # lse is -inf for a query without keys: no gradient path, kept out of the loss.
    terms = [(torch.where(torch.isfinite(o), o, 0.0).float() * torch.randn(o.shape, generator=generator)).sum()
             for o in outputs if o.requires_grad]
    if not terms:
        return outputs, ()
    wrt = [t for t in leaves if t.requires_grad]
    return outputs, torch.autograd.grad(sum(terms), wrt, allow_unused=True, materialize_grads=True)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=magnitude_floor(expected.double(), 1e-5))


def _assert_compiled_matches_eager(fn, inputs):
    torch._dynamo.reset()
    eager_out, eager_grads = _run(fn, inputs)
    compiled_out, compiled_grads = _run(torch.compile(fn, fullgraph=True), inputs)
    for eager, compiled in zip(eager_out + eager_grads, compiled_out + compiled_grads):
        _close(compiled, eager)


def test_topk_tokens_keep_ratio_with_upsampling():
    """Issue 11's third reproduction: the op's checks read data while tracing."""
    scores = torch.randn(2, 2 * 3 * 3)
    _assert_compiled_matches_eager(
        lambda s: lk.topk_tokens(s, keep_ratio=0.1, grid=(2, 3, 3), out_grid=(2, 6, 6)), [scores]
    )


def test_topk_tokens_fixed_k_and_budgets():
    scores = torch.randn(3, 20)
    budgets = torch.tensor([4, 0, 20], dtype=torch.int32)
    _assert_compiled_matches_eager(lambda s: lk.topk_tokens(s, 5), [scores])
    _assert_compiled_matches_eager(lambda s, b: lk.topk_tokens_budgets(s, b, total=24, max_seqlen=20)[:2], [scores, budgets])


def test_score_tokens():
    dim, hidden = 8, 12
    inputs = [torch.randn(2, 5, dim), torch.randn(dim), torch.randn(dim), torch.randn(hidden, dim) / 3,
              torch.randn(hidden), torch.randn(1, hidden) / 3, torch.randn(1)]
    _assert_compiled_matches_eager(lk.score_tokens, inputs)


def test_gather_patch_embed_fixed_and_budgets():
    clip = torch.randint(0, 256, (2, 2, 8, 8, 3), dtype=torch.uint8)
    params = [torch.randn(6, 3, 4, 4) / 4, torch.randn(6), torch.randn(8, 6)]
    indices = torch.tensor([[0, 3, 7], [1, 2, 6]], dtype=torch.int32)
    _assert_compiled_matches_eager(
        lambda *p: lk.gather_patch_embed(clip, indices, *p, patch_size=4, mean=MEAN, std=STD), params
    )
    packed, cu = torch.tensor([5, 0, 1, 7], dtype=torch.int32), cu_seqlens_from_lengths([1, 3])
    _assert_compiled_matches_eager(
        lambda *p: lk.gather_patch_embed(clip, packed, *p, patch_size=4, mean=MEAN, std=STD, cu_seqlens=cu), params
    )


def test_gather_and_scatter_tokens():
    x = torch.randn(2, 6, 5)
    indices, cu = torch.tensor([4, 1, 0, 5, 2], dtype=torch.int32), cu_seqlens_from_lengths([2, 3])
    _assert_compiled_matches_eager(lambda t: lk.gather_tokens(t, indices, cu), [x])
    _assert_compiled_matches_eager(lambda p: lk.scatter_tokens(p, indices, 6, cu), [torch.randn(5, 5)])


def test_varlen_attention_with_lse():
    lengths = [3, 0, 6]
    q, k, v = torch.randn(9, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    cu = cu_seqlens_from_lengths(lengths)
    _assert_compiled_matches_eager(
        lambda *t: lk.varlen_attention(*t, cu, cu, 6, 6, return_lse=True), [q, k, v]
    )


def test_nn_uniqueness_and_frame_normalize():
    x = torch.randn(2, 7, 5)
    for metric in ("l2", "cosine"):
        _assert_compiled_matches_eager(lambda t: lk.nn_uniqueness(t, metric=metric), [x])
    _assert_compiled_matches_eager(lk.frame_normalize, [torch.randn(2, 2, 5, 3)])


TINY = MICRO


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_whole_lookwhen_forward_and_backward(mode):
    torch._dynamo.reset()
    model = build_model("lookwhen-b16", **TINY)
    model.train(mode == "train")
    clip = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.set_grad_enabled(mode == "train"):
        eager, got = model(clip), compiled(clip)
    assert torch.equal(got.indices, eager.indices)
    for key in ("embedding", "tokens", "scores", "pooled"):
        _close(getattr(got, key), getattr(eager, key))
    if mode == "train":
        params = [p for p in model.parameters() if p.requires_grad]
        for name, key in (("eager", eager), ("compiled", got)):
            loss = key.embedding.square().sum() + key.pooled.sum() + key.scores.sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            if name == "eager":
                expected = grads
        # A parameter's gradient sums over every token, clip and layer, in
        # another order in each graph: fp32 rounding grows with that sum
        # (seen: 1.8e-3 on gradients of magnitude 117 under torch 2.11), so
        # the floor is 1e-4 of the gradient's magnitude rather than 1e-5.
        for param_grad, expected_grad in zip(grads, expected):
            torch.testing.assert_close(param_grad, expected_grad, rtol=1e-4,
                                       atol=magnitude_floor(expected_grad.double(), 1e-4))
