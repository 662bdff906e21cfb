"""Every op, every tensor argument and every upstream gradient in the layouts
PyTorch hands out (storage offsets, strided and transposed views, stride-0
expansions): each is handled, giving what the op gives on a contiguous copy,
or refused with a ``ValueError`` that names the argument. Nothing is read out
of bounds (the NaN-poisoned allocations show unwritten outputs)."""
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.testing import layout_variants

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_same(actual, expected, what):
    for a, e in zip(_as_tuple(actual), _as_tuple(expected)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, equal_nan=False, msg=what)


def _check_arguments(call, args):
    """``call(**args)`` with each tensor argument in each layout."""
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            continue
        # Changing the values of an index or offset tensor makes it invalid.
        for kind, view in layout_variants(value, expand=value.is_floating_point()):
            expected = call(**{**args, name: view.contiguous()})
            try:
                actual = call(**{**args, name: view})
            except ValueError as error:
                assert str(error).startswith(f"{name}:"), f"{name} ({kind}): {error}"
                assert kind != "offset", f"{name}: a contiguous tensor at an offset was refused: {error}"
                continue
            _assert_same(actual, expected, f"{name} ({kind})")


def _check_gradients(call, args, differentiable):
    """Upstream gradients of every output in each layout (handled: none of
    them is the op's choice), against the same gradient made contiguous."""
    leaves = {name: args[name].detach().clone().requires_grad_(True) for name in differentiable}
    outputs = _as_tuple(call(**{**args, **leaves}))
    for index, output in enumerate(outputs):
        if not output.requires_grad:
            continue
        for kind, view in layout_variants(torch.randn(output.shape, dtype=output.dtype)):
            def grads(grad):
                return torch.autograd.grad(output, list(leaves.values()), grad, retain_graph=True,
                                           allow_unused=True, materialize_grads=True)
            _assert_same(grads(view), grads(view.contiguous()), f"gradient of output {index} ({kind})")


def _score_args():
    dim, hidden = 8, 12
    return dict(x=torch.randn(2, 5, dim), norm_weight=torch.randn(dim), norm_bias=torch.randn(dim),
                w1=torch.randn(hidden, dim) / 3, b1=torch.randn(hidden), w2=torch.randn(1, hidden) / 3,
                b2=torch.randn(1))


def test_score_tokens():
    args = _score_args()
    _check_arguments(lk.score_tokens, args)
    _check_gradients(lk.score_tokens, args, list(args))


def test_topk_tokens():
    args = dict(scores=torch.randn(3, 16), k=4)
    _check_arguments(lk.topk_tokens, args)
    _check_arguments(lambda **a: lk.topk_tokens_budgets(**a, grid=(1, 2, 2), out_grid=(1, 4, 4))[:2],
                     dict(scores=torch.randn(3, 4), budgets=torch.tensor([3, 0, 16], dtype=torch.int32)))


@pytest.mark.parametrize("selection", ["fixed", "budgets"])
def test_gather_patch_embed(selection):
    if selection == "fixed":
        indices, cu = torch.tensor([[0, 3, 7], [6, 2, 1]], dtype=torch.int32), None
    else:
        indices, cu = torch.tensor([5, 0, 1, 7], dtype=torch.int32), cu_seqlens_from_lengths([1, 3])
    args = dict(clip=torch.randint(0, 256, (2, 2, 8, 8, 3), dtype=torch.uint8), indices=indices,
                weight=torch.randn(6, 3, 4, 4) / 4, bias=torch.randn(6), pos_embed=torch.randn(8, 6), cu_seqlens=cu)

    def call(**a):
        return lk.gather_patch_embed(**a, patch_size=4, mean=MEAN, std=STD)

    _check_arguments(call, args)
    _check_gradients(call, args, ["weight", "bias", "pos_embed"])


@pytest.mark.parametrize("packed", [False, True])
def test_gather_and_scatter_tokens(packed):
    if packed:
        selection = dict(indices=torch.tensor([4, 1, 0, 5, 2], dtype=torch.int32),
                         cu_seqlens=cu_seqlens_from_lengths([2, 3]))
    else:
        selection = dict(indices=torch.tensor([[4, 1], [0, 5]], dtype=torch.int32), cu_seqlens=None)
    rows = selection["indices"].numel()
    gather = dict(x=torch.randn(2, 6, 5), **selection)
    _check_arguments(lk.gather_tokens, gather)
    _check_gradients(lk.gather_tokens, gather, ["x"])
    scatter = dict(packed=torch.randn(rows, 5), n_tokens=6, **selection)
    _check_arguments(lk.scatter_tokens, scatter)
    _check_gradients(lk.scatter_tokens, scatter, ["packed"])


@pytest.mark.parametrize("max_seqlens", [{}, {"max_seqlen_q": 6, "max_seqlen_k": 6}])
def test_varlen_attention(max_seqlens):
    cu = cu_seqlens_from_lengths([2, 0, 6])
    args = dict(q=torch.randn(8, 4, 16), k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16),
                cu_seqlens_q=cu, cu_seqlens_k=cu.clone())

    def call(**a):
        return lk.varlen_attention(**a, **max_seqlens, return_lse=True)

    _check_arguments(call, args)
    _check_gradients(call, args, ["q", "k", "v"])


def test_dense_attention():
    args = dict(q=torch.randn(2, 3, 2, 16), k=torch.randn(2, 4, 1, 16), v=torch.randn(2, 4, 1, 16))
    _check_arguments(lk.dense_attention, args)
    _check_gradients(lk.dense_attention, args, list(args))


def test_nn_uniqueness():
    _check_arguments(lk.nn_uniqueness, dict(x=torch.randn(2, 7, 5)))


def test_frame_normalize():
    args = dict(x=torch.randn(2, 2, 5, 3))
    _check_arguments(lk.frame_normalize, args)
    _check_gradients(lk.frame_normalize, args, ["x"])


def _launch_grids(monkeypatch, run):
    """The grid of every kernel launch ``run()`` makes, as 3-tuples."""
    from triton.runtime import interpreter

    grids = []
    original = interpreter.GridExecutor.__call__

    def recording(self, *args, **kwargs):
        grid = self.grid(dict(zip(self.arg_names, args)) | kwargs) if callable(self.grid) else self.grid
        grids.append((self.fn.__name__, tuple(grid) + (1,) * (3 - len(grid))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", recording)
    run()
    monkeypatch.undo()
    return grids


@pytest.mark.parametrize("op", ["varlen_attention", "nn_uniqueness"])
def test_no_grid_axis_but_the_first_grows_with_the_batch(monkeypatch, op):
    """CUDA caps grid axes 1 and 2 at 65,535 programs: a batch on them fails
    past 65,535 sequences, so launches flatten it onto axis 0."""
    def run(batch):
        if op == "nn_uniqueness":
            return lambda: lk.nn_uniqueness(torch.randn(batch, 3, 4))
        lengths = [3] * batch
        q = torch.randn(3 * batch, 2, 16, requires_grad=True)
        cu = cu_seqlens_from_lengths(lengths)
        return lambda: lk.varlen_attention(q, q, q, cu).sum().backward()

    small, large = _launch_grids(monkeypatch, run(2)), _launch_grids(monkeypatch, run(5))
    assert [name for name, _ in small] == [name for name, _ in large] and small
    for (name, a), (_, b) in zip(small, large):
        assert a[1:] == b[1:], f"{name}: grid {a} -> {b}"


def test_counts_past_int32_offsets_are_refused():
    """Kernels index with int32 where a count fits it; meta tensors have the
    sizes without the memory."""
    big = 2**31
    with pytest.raises(ValueError, match="^x: the element count of one clip"):
        lk.nn_uniqueness(torch.empty(1, 2**20, 2**11, device="meta"))
    with pytest.raises(ValueError, match="^x: the element count of one frame"):
        lk.frame_normalize(torch.empty(1, 1, 2**21, 2**10, device="meta"))
    indices = torch.empty(big, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="^indices: the number of selected rows"):
        lk.gather_tokens(torch.empty(1, 4, 2, device="meta"), indices,
                         torch.zeros(2, dtype=torch.int32, device="meta"), validate=False)
    meta = dict(device="meta")
    with pytest.raises(ValueError, match="^indices: the number of output rows"):
        lk.gather_patch_embed(torch.empty(1, 1, 4, 4, 3, dtype=torch.uint8, **meta), indices.view(1, big),
                              torch.empty(2, 3, 4, 4, **meta), torch.empty(2, **meta), torch.empty(1, 2, **meta),
                              patch_size=4, mean=MEAN, std=STD, validate=False)
    budgets = torch.empty(1, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="^budgets: the sum of the budgets"):
        lk.topk_tokens_budgets(torch.empty(1, 8, device="meta"), budgets, total=big, max_seqlen=8, validate=False)
