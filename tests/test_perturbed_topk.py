import math

import pytest
import torch

from lookwhen_kernels import perturbed_topk, reference, topk_tokens
from lookwhen_kernels.ops import perturbed_topk as module
from lookwhen_kernels.testing import assert_within_reference_error

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")

# 20 samples: one full block of module.SAMPLES and one partial block.
N_SAMPLES = 20


def _call(scores, k, seed, **kwargs):
    """The op under a generator seeded with ``seed``, and the noise it drew."""
    out = perturbed_topk(scores, k, generator=torch.Generator().manual_seed(seed), **kwargs)
    drawn = torch.randint(module.SEED_BOUND, (1,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    noise = module.sample_noise(drawn, scores.shape[0], kwargs.get("n_samples", 500), scores.shape[1])
    return out, noise


@pytest.mark.parametrize("batch, n, k", [(1, 1, 1), (2, 37, 5), (3, 50, 50), (2, 50, 1), (1, 40, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_reference_with_the_same_samples(batch, n, k, dtype):
    scores = torch.randn(batch, n).to(dtype)
    out, noise = _call(scores, k, 7, n_samples=N_SAMPLES, sigma=0.3)
    assert out.dtype == torch.float32 and out.shape == (batch, k, n)
    oracle = reference.perturbed_topk(scores.double(), k, noise, 0.3)
    torch.testing.assert_close(out.double(), oracle, rtol=0, atol=1e-6)
    # Every slot holds one token per sample; a token fills at most one slot.
    torch.testing.assert_close(out.sum(2), torch.ones(batch, k), rtol=0, atol=1e-5)
    assert bool((out.sum(1) <= 1 + 1e-5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_float64_monte_carlo_with_the_same_samples(dtype):
    scores = torch.randn(3, 45).to(dtype).requires_grad_(True)
    out, noise = _call(scores, 6, 11, n_samples=N_SAMPLES, sigma=0.2)
    grad = torch.randn(out.shape)
    (d_scores,) = torch.autograd.grad(out, scores, grad)
    assert d_scores.dtype == dtype
    oracle = reference.perturbed_topk_backward(grad.double(), scores.detach().double(), 6, noise, 0.2)
    same_precision = reference.perturbed_topk_backward(grad, scores.detach(), 6, noise, 0.2).to(dtype)
    assert_within_reference_error(d_scores, same_precision, oracle, factor=3.0, name="d_scores")


def test_sigma_zero_is_the_hard_top_k_with_ties_and_no_gradient():
    # Integer scores: many ties, broken towards the lower id as in topk_tokens.
    scores = torch.randint(0, 4, (3, 29)).float().requires_grad_(True)
    out, _ = _call(scores, 9, 0, n_samples=3, sigma=0.0)
    hard = topk_tokens(scores.detach(), 9).long()
    expected = torch.zeros(3, 9, 29).scatter_(2, hard[:, :, None], 1.0)
    assert torch.equal(out, expected)
    (d_scores,) = torch.autograd.grad(out, scores, torch.randn(out.shape))
    assert torch.equal(d_scores, torch.zeros_like(d_scores))


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_empty_batch(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    scores = torch.zeros(0, 7, requires_grad=True)
    out, _ = _call(scores, 3, 0, n_samples=4)
    out.sum().backward()
    assert out.shape == (0, 3, 7) and scores.grad.shape == (0, 7)


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
@pytest.mark.parametrize("sigma", [1e-20, 1e-30, 5e-324])
def test_a_vanishing_sigma_has_the_hard_top_ks_zero_gradient(monkeypatch, backend, sigma):
    # STTS returns zero at sigma <= 1e-20; 1 / sigma would blow rounding up to ~1e19.
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    scores = torch.randn(2, 31, requires_grad=True)
    out, noise = _call(scores, 5, 3, n_samples=N_SAMPLES, sigma=sigma)
    (d_scores,) = torch.autograd.grad(out, scores, torch.randn(out.shape))
    assert torch.equal(d_scores, torch.zeros_like(d_scores))
    assert torch.equal(reference.perturbed_topk_backward(torch.randn(out.shape), scores.detach(), 5, noise, sigma),
                       torch.zeros(2, 31))


def test_same_generator_same_samples_and_nothing_of_size_n_is_saved():
    scores = torch.randn(2, 33, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        first, _ = _call(scores, 4, 5, n_samples=N_SAMPLES)
    again, _ = _call(scores, 4, 5, n_samples=N_SAMPLES)
    other, _ = _call(scores, 4, 6, n_samples=N_SAMPLES)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The scores and the seed: the backward redraws the samples.
    assert sorted(saved) == [1, scores.numel()]


def test_cpu_path_draws_torch_noise_and_recomputes_it_in_backward(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores = torch.randn(2, 30, requires_grad=True)
    out, noise = _call(scores, 3, 9, n_samples=50, sigma=0.4)
    torch.testing.assert_close(out, reference.perturbed_topk(scores.detach(), 3, noise, 0.4))
    grad = torch.randn(out.shape)
    (d_scores,) = torch.autograd.grad(out, scores, grad)
    expected = reference.perturbed_topk_backward(grad, scores.detach(), 3, noise, 0.4)
    torch.testing.assert_close(d_scores, expected)


def test_gradient_estimates_the_derivative_of_the_expectation(monkeypatch):
    # Two tokens, K = 1: P(token 0 chosen) = Phi(z), z = delta / (sigma sqrt 2),
    # and each token's own indicator has derivative phi(z) / (sigma sqrt 2) in
    # its own score. STTS's estimator keeps only these own-score terms: the
    # gradient of token t's indicator reaches score t alone.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sigma, delta, n_samples = 0.5, 0.3, 40000
    scores = torch.tensor([[delta, 0.0]], requires_grad=True)
    out = perturbed_topk(scores, 1, n_samples=n_samples, sigma=sigma, generator=torch.Generator().manual_seed(1))
    z = delta / (sigma * math.sqrt(2))
    assert abs(float(out[0, 0, 0].detach()) - 0.5 * (1 + math.erf(z / math.sqrt(2)))) < 0.01
    expected = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) / (sigma * math.sqrt(2))
    for token in (0, 1):
        (d_scores,) = torch.autograd.grad(out[0, 0, token], scores, retain_graph=True)
        assert abs(float(d_scores[0, token]) - expected) < 0.05 * expected
        assert float(d_scores[0, 1 - token]) == 0.0


def test_registered_op_dispatches():
    scores = torch.randn(1, 12)
    seed = torch.tensor([3], dtype=torch.int64)
    out = torch.ops.lookwhen.perturbed_topk(scores, seed, 2, 4, 0.1)
    noise = module.sample_noise(seed, 1, 4, 12)
    torch.testing.assert_close(out.double(), reference.perturbed_topk(scores.double(), 2, noise, 0.1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: perturbed_topk(torch.zeros(4), 1), "2-d"),
        (lambda: perturbed_topk(torch.zeros(2, 4, dtype=torch.int32), 1), "dtype"),
        (lambda: perturbed_topk(torch.zeros(4, 2).t(), 1), "contiguous"),
        (lambda: perturbed_topk(torch.zeros(2, 0), 0), "at least one token"),
        (lambda: perturbed_topk(torch.zeros(1, module.MAX_TOKENS + 1), 1), "exceed"),
        (lambda: perturbed_topk(torch.zeros(2, 4), 5), "k:"),
        (lambda: perturbed_topk(torch.zeros(2, 4), True), "k:"),
        (lambda: perturbed_topk(torch.zeros(2, 4), 1, n_samples=0), "n_samples"),
        (lambda: perturbed_topk(torch.zeros(2, 4), 1, sigma=-0.1), "sigma"),
        (lambda: perturbed_topk(torch.zeros(2, 4), 1, sigma=float("inf")), "sigma"),
        (lambda: perturbed_topk(torch.zeros(2, 4), 1, generator=3), "generator"),
        (lambda: perturbed_topk(torch.tensor([[0.0, float("nan")]]), 1), "NaN"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_torch_compile_matches_eager():
    # fallback_random: the compiled graph draws its seed as eager does.
    scores = torch.randn(2, 30, requires_grad=True)
    compiled = torch.compile(lambda t: perturbed_topk(t, 3, n_samples=8, validate=False) * 2, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(4)
        out = compiled(scores)
    torch.manual_seed(4)
    eager = perturbed_topk(scores, 3, n_samples=8)
    torch.testing.assert_close(out, eager * 2, rtol=0, atol=1e-6)
    out.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
