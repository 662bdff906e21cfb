import pytest
import torch

from lookwhen_kernels import gather_tokens, reference, scatter_tokens
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops import gather_tokens as gather_module
from lookwhen_kernels.testing import assert_fully_written, poison_, random_lengths

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")

# Pure data movement: every result must equal the reference bit for bit.


def _fixed(batch, n, k):
    """[B, K] ids, unique per clip and deliberately not sorted."""
    return torch.stack([torch.randperm(n)[:k] for _ in range(batch)]).to(torch.int32)


def _packed(batch, n, include=(0,)):
    lengths = random_lengths(batch, n, include=include)
    indices = torch.cat([torch.randperm(n)[:length] for length in lengths]).to(torch.int32)
    return indices, cu_seqlens_from_lengths(lengths)


SELECTIONS = [
    # (B, N, D, K or None for packed)
    (1, 1, 1, 1),
    (3, 50, 80, 7),
    (2, 33, 130, 33),
    (4, 50, 80, None),
    (1, 9, 300, None),
    (6, 17, 5, None),
]


def _selection(batch, n, k):
    if k is not None:
        return _fixed(batch, n, k), None
    return _packed(batch, n, include=(0, n) if batch > 1 else (n,))


@pytest.mark.parametrize("batch, n, dim, k", SELECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_and_scatter_match_reference(batch, n, dim, k, dtype):
    indices, cu_seqlens = _selection(batch, n, k)
    x = torch.randn(batch, n, dim).to(dtype)
    packed = gather_tokens(x, indices, cu_seqlens)
    assert packed.shape == (indices.numel(), dim) and packed.dtype == dtype
    assert torch.equal(packed, reference.gather_tokens(x, indices, cu_seqlens))
    rows = torch.randn(indices.numel(), dim).to(dtype)
    spread = scatter_tokens(rows, indices, n, cu_seqlens)
    assert spread.shape == (batch, n, dim)
    assert torch.equal(spread, reference.scatter_tokens(rows, indices, n, cu_seqlens))
    # Zeros everywhere nothing was selected (finite inputs, so no NaN left over).
    assert int((spread != 0).any(dim=2).sum()) == indices.numel()
    assert torch.equal(gather_tokens(spread, indices, cu_seqlens), rows)


def test_gather_writes_every_output_element():
    for k in (5, None):
        indices, cu_seqlens = _selection(3, 40, k)
        x = torch.randn(3, 40, 70)
        out = poison_(torch.empty(indices.numel(), 70))
        gather_module.move_rows(x, out, indices, cu_seqlens, 40, scatter=False)
        assert_fully_written(out)
        assert torch.equal(out, reference.gather_tokens(x, indices, cu_seqlens))


def test_scatter_touches_only_selected_rows():
    indices, cu_seqlens = _packed(4, 30)
    out = poison_(torch.empty(4, 30, 9))
    rows = torch.randn(indices.numel(), 9)
    gather_module.move_rows(rows, out, indices, cu_seqlens, 30, scatter=True)
    expected = reference.scatter_tokens(rows, indices, 30, cu_seqlens)
    selected = reference.scatter_tokens(torch.ones(indices.numel(), 1), indices, 30, cu_seqlens).bool()[..., 0]
    assert torch.equal(out[selected], expected[selected])
    assert bool(torch.isnan(out[~selected]).all())


def test_empty_selections():
    x = torch.randn(2, 6, 4)
    assert gather_tokens(x, torch.zeros(2, 0, dtype=torch.int32)).shape == (0, 4)
    empty, cu_seqlens = torch.zeros(0, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    assert gather_tokens(x, empty, cu_seqlens).shape == (0, 4)
    assert torch.equal(scatter_tokens(torch.zeros(0, 4), empty, 6, cu_seqlens), torch.zeros(2, 6, 4))


@pytest.mark.parametrize("k", [6, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_reference(k, dtype):
    indices, cu_seqlens = _selection(3, 20, k)
    x = torch.randn(3, 20, 24).to(dtype).requires_grad_(True)
    grad = torch.randn(indices.numel(), 24).to(dtype)
    (dx,) = torch.autograd.grad(gather_tokens(x, indices, cu_seqlens), x, grad)
    xr = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.gather_tokens(xr, indices, cu_seqlens), xr, grad)
    assert torch.equal(dx, expected)

    rows = torch.randn(indices.numel(), 24).to(dtype).requires_grad_(True)
    grad = torch.randn(3, 20, 24).to(dtype)
    (drows,) = torch.autograd.grad(scatter_tokens(rows, indices, 20, cu_seqlens), rows, grad)
    rr = rows.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.scatter_tokens(rr, indices, 20, cu_seqlens), rr, grad)
    assert torch.equal(drows, expected)


def test_double_backward_goes_through_the_adjoint():
    indices, cu_seqlens = _packed(2, 10)
    x = torch.randn(2, 10, 3, requires_grad=True)
    grad = torch.randn(indices.numel(), 3, requires_grad=True)
    (dx,) = torch.autograd.grad(gather_tokens(x, indices, cu_seqlens), x, grad, create_graph=True)
    (dgrad,) = torch.autograd.grad(dx, grad, torch.ones_like(dx))
    assert torch.equal(dgrad, torch.ones(indices.numel(), 3))


def test_reference_gradcheck_float64():
    indices, cu_seqlens = _packed(3, 5)
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.gather_tokens(t, indices, cu_seqlens), (x,))
    rows = torch.randn(indices.numel(), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.scatter_tokens(t, indices, 5, cu_seqlens), (rows,))


def test_registered_ops_dispatch():
    indices, cu_seqlens = _packed(3, 12)
    x = torch.randn(3, 12, 8)
    packed = torch.ops.lookwhen.gather_tokens(x, indices, cu_seqlens)
    assert torch.equal(packed, reference.gather_tokens(x, indices, cu_seqlens))
    spread = torch.ops.lookwhen.scatter_tokens(packed, indices, 12, cu_seqlens)
    assert torch.equal(spread, reference.scatter_tokens(packed, indices, 12, cu_seqlens))


def test_torch_compile_matches_eager():
    indices, cu_seqlens = _packed(3, 12)
    x = torch.randn(3, 12, 8, requires_grad=True)
    compiled = torch.compile(lambda t: gather_tokens(t, indices, cu_seqlens) * 2, fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, reference.gather_tokens(x.detach(), indices, cu_seqlens) * 2)
    out.sum().backward()
    assert torch.equal(x.grad, reference.scatter_tokens(torch.full_like(out, 2.0), indices, 12, cu_seqlens))


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


X = torch.zeros(2, 5, 3)
IDX = _i32(0, 4, 1, 2)
CU = _i32(0, 2, 4)
ROWS = torch.zeros(4, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: gather_tokens([[1.0]], IDX, CU), "x: expected a torch.Tensor"),
        (lambda: gather_tokens(torch.zeros(10, 3), IDX, CU), "x: expected a 3-d"),
        (lambda: gather_tokens(X.long(), IDX, CU), "x: expected dtype"),
        (lambda: gather_tokens(torch.zeros(2, 3, 5).transpose(1, 2), IDX, CU), "x: expected a contiguous"),
        (lambda: gather_tokens(X, IDX.long(), CU), "indices: expected dtype int32"),
        (lambda: gather_tokens(X, IDX.to("meta"), CU), "indices: expected a tensor on cpu"),
        (lambda: gather_tokens(X, _i32(0, 9, 4, 9, 1, 9, 2, 9)[::2], CU), "indices: expected a contiguous"),
        (lambda: gather_tokens(X, IDX.reshape(2, 2), CU), "indices: expected packed"),
        (lambda: gather_tokens(X, IDX), r"indices: expected \[B, K\]"),
        (lambda: gather_tokens(X, IDX.reshape(2, 2, 1)), r"indices: expected \[B, K\]"),
        (lambda: gather_tokens(X, IDX.reshape(1, 4)), "indices: describes 1 clips but x has 2"),
        (lambda: gather_tokens(X, _i32(0, 5, 1, 2), CU), r"indices: token ids must lie in \[0, 5\)"),
        (lambda: gather_tokens(X, _i32(0, -1, 1, 2), CU), r"indices: token ids must lie in \[0, 5\)"),
        (lambda: gather_tokens(X, _i32(3, 3, 1, 2), CU), "indices: token ids must be unique within each clip"),
        (lambda: gather_tokens(X, _i32(1, 1, 0, 2).reshape(2, 2)), "unique within each clip"),
        (lambda: gather_tokens(X, IDX, CU.long()), "cu_seqlens: expected dtype int32"),
        (lambda: gather_tokens(X, IDX, CU.to("meta")), "cu_seqlens: expected a tensor on cpu"),
        (lambda: gather_tokens(X, IDX, CU[None]), "cu_seqlens: expected a 1-d"),
        (lambda: gather_tokens(X, IDX, _i32(0, 9, 2, 9, 4)[::2]), "cu_seqlens: expected a contiguous"),
        (lambda: gather_tokens(X, IDX, _i32()), "cu_seqlens: expected at least one element"),
        (lambda: gather_tokens(X, IDX, _i32(0, 4)), "cu_seqlens: describes 1 clips but x has 2"),
        (lambda: gather_tokens(X, IDX, _i32(0, 2, 3)), "cu_seqlens: last offset is 3 but the packed tensor has 4"),
        (lambda: gather_tokens(X, IDX, _i32(1, 2, 4)), "cu_seqlens: must start at 0"),
        (lambda: gather_tokens(X, IDX, _i32(0, 5, 4)), "cu_seqlens: must be non-decreasing"),
        (lambda: scatter_tokens([[1.0]], IDX, 5, CU), "packed: expected a torch.Tensor"),
        (lambda: scatter_tokens(torch.zeros(4, 3, 1), IDX, 5, CU), "packed: expected a 2-d"),
        (lambda: scatter_tokens(ROWS.double(), IDX, 5, CU), "packed: expected dtype"),
        (lambda: scatter_tokens(torch.zeros(3, 4).t(), IDX, 5, CU), "packed: expected a contiguous"),
        (lambda: scatter_tokens(torch.zeros(5, 3), IDX, 5, CU), r"packed: expected shape \[4, \*\]"),
        (lambda: scatter_tokens(ROWS, IDX, -1, CU), "n_tokens: expected a non-negative int"),
        (lambda: scatter_tokens(ROWS, IDX, 5.0, CU), "n_tokens: expected a non-negative int"),
        (lambda: scatter_tokens(ROWS, IDX, 4, CU), r"indices: token ids must lie in \[0, 4\)"),
        (lambda: scatter_tokens(ROWS, _i32(2, 2, 0, 1), 5, CU), "unique within each clip"),
        (lambda: scatter_tokens(ROWS, IDX, 5, _i32(0, 3)), "cu_seqlens: last offset is 3"),
        (lambda: scatter_tokens(ROWS, IDX.to("meta"), 5, CU), "indices: expected a tensor on cpu"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
