"""The seed-selection ops through their Triton kernels on a GPU, in fp16 and
bf16 (which the interpreter cannot run), against the references. Skipped
without CUDA; ``.ci/gpu`` runs them (``pytest -m cuda``)."""
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen_kernels import reference
from lookwhen_kernels.ops.perturbed_topk import SEED_BOUND, sample_noise

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.usefixtures("poisoned_allocations"),
]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbed_topk_forward_and_backward(dtype):
    scores = torch.randn(3, 784, device="cuda").to(dtype).requires_grad_(True)
    out = lk.perturbed_topk(scores, 78, n_samples=64, sigma=0.05, generator=torch.Generator("cuda").manual_seed(1))
    seed = torch.randint(SEED_BOUND, (1,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    noise = sample_noise(seed, 3, 64, 784)
    oracle = reference.perturbed_topk(scores.detach().double(), 78, noise, 0.05)
    # The GPU may fuse the perturbation into an FMA: a rare sample may swap
    # two near-equal tokens (two entries off by 1 / n).
    assert (out.double() - oracle).abs().gt(1e-6).sum() <= 4 * 2
    grad = torch.randn(out.shape, device="cuda")
    (d_scores,) = torch.autograd.grad(out, scores, grad)
    expected = reference.perturbed_topk_backward(grad.double(), scores.detach().double(), 78, noise, 0.05)
    assert float((d_scores.double() - expected).abs().max()) <= 0.05 * float(expected.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_windows_frames_budgets(dtype):
    grid, out_grid = (16, 7, 7), (16, 14, 14)
    scores = torch.randint(-3, 4, (4, 784), device="cuda").to(dtype)
    assert torch.equal(lk.select_windows(scores, 7, grid=grid), reference.select_windows(scores, (7, 7), grid=grid,
                                                                                         out_grid=grid))
    assert torch.equal(lk.select_frames(scores, 5, grid=grid, out_grid=out_grid),
                       reference.select_frames(scores, 5, grid=grid, out_grid=out_grid))
    fine = lk.select_windows(scores, 7, grid=grid, out_grid=out_grid)
    assert fine.shape == (4, 16 * 49) and bool((fine[:, 1:] > fine[:, :-1]).all())
    budgets = lk.budgets_from_scores(scores, mass=0.9, grid=grid, out_grid=out_grid)
    expected = reference.budgets_from_scores(scores, mass=0.9, min_k=1, max_k=3136, grid=grid, out_grid=out_grid)
    assert bool(((budgets - expected).abs() <= 1).all())
