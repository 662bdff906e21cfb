import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lookwhen_kernels import reference, score_tokens
from lookwhen_kernels.ops.score_tokens import score_tokens_into
from lookwhen_kernels.testing import DEFAULT_FLOOR, assert_fully_written, assert_within_reference_error, poison_

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "cpu_backend")

# (B, n, D, hidden): several row blocks, D and hidden over several chunks with
# ragged tails, odd D, a single token, a tiny layer.
SHAPES = [(2, 70, 80, 130), (1, 49, 33, 64), (1, 1, 80, 40), (3, 5, 5, 17), (1, 65, 16, 200)]


def _input(shape, dtype):
    # A common offset is what breaks a naive E[x^2] - E[x]^2 variance.
    return (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)


def _head(dim, hidden, dtype, *, flat_w2=False, outputs=1):
    """(norm_weight, norm_bias, w1, b1, w2, b2) at trained-network scales."""
    params = (
        1 + 0.3 * torch.randn(dim),
        0.2 * torch.randn(dim),
        torch.randn(hidden, dim) / dim**0.5,
        0.2 * torch.randn(hidden),
        torch.randn(hidden if flat_w2 else outputs, *(() if flat_w2 else (hidden,))) / hidden**0.5,
        0.2 * torch.randn(outputs),
    )
    return tuple(p.to(dtype) for p in params)


def _double(tensors):
    return tuple(t.double() for t in tensors)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_float64_reference(shape, dtype):
    batch, n_tokens, dim, hidden = shape
    x = _input((batch, n_tokens, dim), dtype)
    params = _head(dim, hidden, dtype)
    out = score_tokens(x, *params)
    assert out.dtype == torch.float32 and out.shape == (batch, n_tokens)
    oracle = reference.score_tokens(x.double(), *_double(params))
    # The score is float32 whatever the input, so the floor follows the input
    # precision: with one token the reference's own error can be tiny by luck.
    assert_within_reference_error(out, reference.score_tokens(x, *params), oracle, floor=DEFAULT_FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_score_written(dtype):
    x = _input((2, 67, 40), dtype)
    params = _head(40, 150, dtype)
    out = poison_(torch.empty(2, 67))
    score_tokens_into(out, x, *params, 1e-6)
    assert_fully_written(out, "scores")
    oracle = reference.score_tokens(x.double(), *_double(params))
    # The score is float32 whatever the input, so the floor follows the input
    # precision: with one token the reference's own error can be tiny by luck.
    assert_within_reference_error(out, reference.score_tokens(x, *params), oracle, floor=DEFAULT_FLOOR[dtype])


# R outputs per token (LookWhere's r x r head): R = 16 (4 x 4), an odd R
# that pads the output tile, R = 2; odd D and hidden, a row tail.
@pytest.mark.parametrize("shape, outputs", [((2, 70, 80, 130), 16), ((1, 5, 33, 17), 3), ((1, 1, 8, 40), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_several_outputs_per_token(shape, outputs, dtype, cpu_backend):
    batch, n_tokens, dim, hidden = shape
    x = _input((batch, n_tokens, dim), dtype)
    params = _head(dim, hidden, dtype, outputs=outputs)
    out = poison_(torch.empty(batch, n_tokens, outputs))
    score_tokens_into(out, x, *params, 1e-6)
    assert_fully_written(out, "scores")
    oracle = reference.score_tokens(x.double(), *_double(params))
    assert oracle.shape == (batch, n_tokens, outputs)
    assert_within_reference_error(out, reference.score_tokens(x, *params), oracle, floor=DEFAULT_FLOOR[dtype])
    public = score_tokens(x, *params)
    assert public.shape == (batch, n_tokens, outputs) and public.dtype == torch.float32
    # The native backend has no several-outputs kernel: there the public op runs the reference.
    expected = reference.score_tokens(x, *params) if cpu_backend == "native" else out
    torch.testing.assert_close(public, expected, rtol=0, atol=0)
    # Output r of the head is the one-output head with row r of w2.
    one = score_tokens(x, *params[:4], params[4][1:2].contiguous(), params[5][1:2].contiguous())
    torch.testing.assert_close(one, out[..., 1], rtol=1e-5, atol=1e-3 if dtype == torch.float16 else 1e-5)


def test_several_outputs_backward_and_flops():
    x = _input((2, 9, 20), torch.float32)
    params = _head(20, 24, torch.float32, outputs=16)
    grad = torch.randn(2, 9, 16)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    kernel = torch.autograd.grad(score_tokens(*leaves), leaves, grad)
    doubles = [t.detach().double().requires_grad_(True) for t in (x, *params)]
    oracle = torch.autograd.grad(reference.score_tokens(*doubles), doubles, grad.double())
    closed = reference.score_tokens_backward(grad.double(), *(t.detach() for t in doubles))
    for k, o, c in zip(kernel, oracle, closed):
        assert k.shape == o.shape
        torch.testing.assert_close(c, o)
        torch.testing.assert_close(k.double(), o, rtol=1e-4, atol=1e-5)
    with FlopCounterMode(display=False) as counter:
        score_tokens(x, *params)
    assert counter.get_total_flops() == 2 * 2 * 9 * (20 * 24 + 24 * 16)


def test_flat_w2_and_eps_are_honoured():
    x = _input((1, 9, 24), torch.float32)
    params = _head(24, 32, torch.float32, flat_w2=True)
    assert params[4].shape == (32,)
    out = score_tokens(x, *params, eps=0.5)
    torch.testing.assert_close(out, reference.score_tokens(x, *params, 0.5), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, reference.score_tokens(x, *params, 1e-6), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("batch, n_tokens", [(0, 5), (2, 0)])
def test_empty_batch_gives_empty_scores(batch, n_tokens):
    out = score_tokens(torch.randn(batch, n_tokens, 8), *_head(8, 16, torch.float32))
    assert out.shape == (batch, n_tokens) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference_gradients(dtype):
    x = _input((2, 37, 33), dtype)
    params = _head(33, 70, dtype, flat_w2=dtype == torch.float32)
    grad = torch.randn(2, 37)
    names = ("x", "norm_weight", "norm_bias", "w1", "b1", "w2", "b2")

    def grads(fn, tensors, g):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        return torch.autograd.grad(fn(*leaves), leaves, g)

    kernel = grads(score_tokens, (x, *params), grad)
    oracle = grads(reference.score_tokens, _double((x, *params)), grad.double())
    same_precision = grads(reference.score_tokens, (x, *params), grad)
    for name, k, o, s in zip(names, kernel, oracle, same_precision):
        assert k.dtype == dtype
        assert_within_reference_error(k, s, o, name=f"d{name}")


def test_reference_gradcheck_float64():
    x = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(p.double().requires_grad_(True) for p in _head(5, 4, torch.float32))
    assert torch.autograd.gradcheck(lambda *t: reference.score_tokens(*t, 1e-6), (x, *params))


@pytest.mark.parametrize("flat_w2", [False, True])
def test_reference_backward_formula_matches_autograd(flat_w2):
    inputs = tuple(t.requires_grad_(True) for t in _double((_input((2, 4, 6), torch.float32),
                                                             *_head(6, 5, torch.float32, flat_w2=flat_w2))))
    grad = torch.randn(2, 4, dtype=torch.float64)
    autograd = torch.autograd.grad(reference.score_tokens(*inputs), inputs, grad)
    closed_form = reference.score_tokens_backward(grad, *(t.detach() for t in inputs))
    for a, c in zip(autograd, closed_form):
        assert a.shape == c.shape
        torch.testing.assert_close(c, a)


def test_registered_op_dispatches():
    x = _input((1, 11, 20), torch.float32)
    params = _head(20, 24, torch.float32)
    out = torch.ops.lookwhen.score_tokens(x, *params, 1e-6)
    torch.testing.assert_close(out, reference.score_tokens(x, *params), rtol=1e-5, atol=1e-5)


def test_flop_counter_uses_registered_formula():
    batch, n_tokens, dim, hidden = 2, 7, 12, 20
    x = _input((batch, n_tokens, dim), torch.float32)
    with FlopCounterMode(display=False) as counter:
        score_tokens(x, *_head(dim, hidden, torch.float32))
    assert counter.get_total_flops() == 2 * batch * n_tokens * (dim * hidden + hidden)


def test_torch_compile_matches_eager():
    x = _input((2, 7, 20), torch.float32).requires_grad_(True)
    params = tuple(p.requires_grad_(True) for p in _head(20, 24, torch.float32))
    compiled = torch.compile(lambda *t: score_tokens(*t) * 2, fullgraph=True)
    out = compiled(x, *params)
    torch.testing.assert_close(out, reference.score_tokens(x.detach(), *params) * 2, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (x, *params))
    expected = reference.score_tokens_backward(torch.full((2, 7), 2.0), x.detach(), *(p.detach() for p in params))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _good():
    return (_input((1, 4, 8), torch.float32), *_head(8, 16, torch.float32))


def _with(position, value):
    args = list(_good())
    args[position] = value
    return args


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (_with(0, torch.zeros(4, 8)), {}, "x: expected a 3-d"),
        (_with(0, torch.zeros(1, 4, 8, dtype=torch.int32)), {}, "x: expected dtype"),
        (_with(0, torch.zeros(1, 4, 8, dtype=torch.float64)), {}, "x: expected dtype"),
        (_with(0, torch.zeros(1, 8, 4).transpose(1, 2)), {}, "x: expected a contiguous"),
        (_with(0, torch.zeros(1, 4, 0)), {}, "x: tokens need at least one feature"),
        (_with(0, [[1.0]]), {}, "x: expected a torch.Tensor"),
        (_with(1, torch.ones(9)), {}, r"norm_weight: expected shape \[8\]"),
        (_with(2, torch.ones(8, dtype=torch.float16)), {}, "norm_bias: expected dtype float32"),
        (_with(3, torch.ones(16, 9)), {}, r"w1: expected shape \[16, 8\]"),
        (_with(3, torch.ones(16)), {}, "w1: expected a 2-d"),
        (_with(3, torch.ones(0, 8)), {}, "w1: the hidden layer needs at least one unit"),
        (_with(3, torch.ones(8, 16).T), {}, "w1: expected a contiguous"),
        (_with(4, torch.ones(15)), {}, r"b1: expected shape \[16\]"),
        (_with(5, torch.ones(2, 16)), {}, r"b2: expected shape \[2\]"),
        (_with(5, torch.ones(1, 15)), {}, r"w2: expected shape \[R, 16\] \(R >= 1 outputs\) or \[16\]"),
        (_with(5, torch.ones(0, 16)), {}, r"w2: expected shape \[R, 16\]"),
        (_with(5, torch.ones(2, 2, 16)), {}, r"w2: expected shape \[R, 16\]"),
        (_with(6, torch.ones(())), {}, r"b2: expected shape \[1\]"),
        (_with(6, torch.ones(1, device="meta")), {}, "b2: expected a tensor on cpu"),
        (_with(6, 0.5), {}, "b2: expected a torch.Tensor"),
        (list(_good()), {"eps": 0.0}, "eps: expected a positive float"),
    ],
)
def test_bad_inputs_raise_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        score_tokens(*args, **kwargs)


def test_nan_and_overflowing_tokens_give_nan_on_every_backend():
    # A NaN feature, and a token whose squares overflow float32 (LayerNorm's
    # variance is inf): that token's score is NaN, the others are untouched.
    x = torch.randn(2, 5, 24)
    x[0, 1, 3] = float("nan")
    x[1, 4] *= 1e30
    params = _head(24, 40, torch.float32)
    out = score_tokens(x, *params)
    expected = reference.score_tokens(x, *params)
    bad = torch.zeros(2, 5, dtype=torch.bool)
    bad[0, 1] = bad[1, 4] = True
    assert torch.equal(out.isnan(), bad) and torch.equal(expected.isnan(), bad)
    torch.testing.assert_close(out[~bad], expected[~bad], rtol=1e-4, atol=1e-5)
