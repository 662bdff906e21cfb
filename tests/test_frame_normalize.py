import pytest
import torch

from lookwhen_kernels import frame_normalize, reference
from lookwhen_kernels.testing import assert_within_reference_error

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "cpu_backend")

SHAPES = [(1, 1, 1, 1), (2, 3, 7, 80), (1, 2, 49, 33), (3, 1, 197, 5), (1, 1, 70, 130)]


def _input(shape, dtype):
    # A large common offset is what breaks a naive E[x^2] - E[x]^2 variance.
    return (torch.randn(shape, dtype=torch.float64) * 3 + 5).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_float64_reference(shape, dtype):
    x = _input(shape, dtype)
    out = frame_normalize(x)
    assert out.dtype == dtype and out.shape == x.shape
    oracle = reference.frame_normalize(x.double())
    assert_within_reference_error(out, reference.frame_normalize(x), oracle)


def test_constant_frame_gives_zeros_not_nan():
    x = torch.full((1, 2, 9, 4), 3.5)
    out = frame_normalize(x)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference_gradient(dtype):
    x = _input((2, 2, 37, 80), dtype).requires_grad_(True)
    grad = torch.randn(x.shape, dtype=dtype)
    (dx,) = torch.autograd.grad(frame_normalize(x), x, grad)
    x64 = x.detach().double().requires_grad_(True)
    (oracle,) = torch.autograd.grad(reference.frame_normalize(x64), x64, grad.double())
    xr = x.detach().clone().requires_grad_(True)
    (same_precision,) = torch.autograd.grad(reference.frame_normalize(xr), xr, grad)
    assert_within_reference_error(dx, same_precision, oracle, factor=3.0, name="dx")


def test_reference_gradcheck_float64():
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.frame_normalize(t, 1e-6), (x,))


def test_registered_op_dispatches():
    x = _input((1, 2, 11, 6), torch.float32)
    out = torch.ops.lookwhen.frame_normalize(x, 1e-6)
    torch.testing.assert_close(out, reference.frame_normalize(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: frame_normalize(torch.zeros(2, 3, 4)), "4-d"),
        (lambda: frame_normalize(torch.zeros(1, 1, 4, 4, dtype=torch.int32)), "dtype"),
        (lambda: frame_normalize(torch.zeros(1, 1, 4, 4).transpose(2, 3)), "contiguous"),
        (lambda: frame_normalize(torch.zeros(1, 1, 0, 4)), "at least one token"),
        (lambda: frame_normalize(torch.zeros(1, 1, 4, 4), eps=0.0), "eps"),
        (lambda: frame_normalize([[1.0]]), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_reference_backward_formula_matches_autograd():
    x = torch.randn(2, 1, 6, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    (autograd_dx,) = torch.autograd.grad(reference.frame_normalize(x), x, grad)
    torch.testing.assert_close(reference.frame_normalize_backward(grad, x.detach()), autograd_dx)


def test_torch_compile_matches_eager():
    x = torch.randn(2, 3, 7, 80, requires_grad=True)
    compiled = torch.compile(lambda t: frame_normalize(t) * 2, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, reference.frame_normalize(x.detach()) * 2, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_variance_past_float32_gives_nan_on_every_backend():
    # Squares of 1e30 overflow float32: NaN (as LayerNorm gives), not 0.
    x = torch.randn(1, 2, 5, 3)
    x[0, 0, :, 1] *= 1e30
    out = frame_normalize(x)
    expected = reference.frame_normalize(x)
    assert out[0, 0, :, 1].isnan().all() and torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num())
