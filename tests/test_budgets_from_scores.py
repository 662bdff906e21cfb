import pytest
import torch

from lookwhen_kernels import budgets_from_scores, reference, topk_tokens_budgets

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _assert_smallest_k(budgets, fine, mass, min_k, max_k):
    """Independent of the reference: the float64 mass of each clip's top-K
    reaches ``mass`` and that of its top-(K-1) does not, up to fp32 rounding
    (clamped budgets excepted)."""
    probs = torch.softmax(fine.double(), dim=1).sort(dim=1, descending=True).values
    cumulative = torch.nn.functional.pad(torch.cumsum(probs, dim=1), (1, 0))
    for b, k in enumerate(budgets.tolist()):
        assert min_k <= k <= max_k
        if min_k < k:
            assert float(cumulative[b, k - 1]) < mass + 1e-5
        if k < max_k:
            assert float(cumulative[b, k]) >= mass - 1e-5


@pytest.mark.parametrize("batch, n", [(1, 1), (3, 50), (2, 97)])
@pytest.mark.parametrize("mass", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_budgets_are_the_smallest_k_reaching_the_mass(batch, n, mass, dtype):
    scores = (torch.randn(batch, n) * 2).to(dtype)
    budgets = budgets_from_scores(scores, mass=mass)
    assert budgets.dtype == torch.int32 and budgets.shape == (batch,)
    _assert_smallest_k(budgets, scores, mass, 1, n)
    same = reference.budgets_from_scores(scores, mass=mass, min_k=1, max_k=n)
    assert bool(((budgets - same).abs() <= 1).all())


def test_ties_and_exact_cases():
    scores = torch.zeros(4, 40)
    scores[1, 7] = 30.0                 # one dominant token: K = 1
    scores[2, :10] = 30.0               # ten tied dominant tokens: K = 9 of them reach 0.9
    scores[3] = torch.arange(40.0) * 0  # uniform: ceil(0.9 * 40) = 36
    budgets = budgets_from_scores(scores, mass=0.9)
    assert budgets.tolist() == [36, 1, 9, 36]
    assert torch.equal(budgets, reference.budgets_from_scores(scores, mass=0.9, min_k=1, max_k=40))


def test_clamps_and_empty_budgets_feed_the_packed_top_k():
    scores = torch.zeros(3, 30)
    scores[0, 3] = 40.0
    budgets = budgets_from_scores(scores, mass=0.9, min_k=0, max_k=20)
    assert budgets.tolist() == [1, 20, 20]
    assert budgets_from_scores(scores, mass=0.9, min_k=4, max_k=20).tolist() == [4, 20, 20]
    zero = budgets_from_scores(scores, mass=0.9, min_k=0, max_k=0)
    indices, cu_seqlens, _ = topk_tokens_budgets(scores, zero)
    assert indices.numel() == 0 and cu_seqlens.tolist() == [0, 0, 0, 0]


def test_budgets_count_upsampled_fine_tokens():
    grid, out_grid = (2, 3, 4), (2, 6, 8)
    scores = torch.randn(3, 24) * 3
    budgets = budgets_from_scores(scores, mass=0.8, grid=grid, out_grid=out_grid)
    fine = reference.upsample_scores(scores.double(), grid, out_grid)
    _assert_smallest_k(budgets, fine, 0.8, 1, 96)


def test_temperature_sharpens_the_softmax():
    scores = torch.randn(2, 60)
    cold = budgets_from_scores(scores, mass=0.9, temperature=0.25)
    _assert_smallest_k(cold, scores / 0.25, 0.9, 1, 60)
    assert bool((cold <= budgets_from_scores(scores, mass=0.9)).all())
    assert torch.equal(cold, reference.budgets_from_scores(scores, mass=0.9, min_k=1, max_k=60, temperature=0.25))


def test_concentrated_clips_get_fewer_tokens():
    scores = torch.randn(2, 64) * 0.1
    scores[0, 5] += 8.0
    scores[1, [3, 20, 41, 60]] += 8.0
    small, several = budgets_from_scores(scores, mass=0.9).tolist()
    assert small < several


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_infinite_scores_hold_all_the_mass_in_equal_shares(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    inf = float("inf")
    scores = torch.tensor([[inf, 0.0, 0.0, 0.0],  # one +inf: all the mass
                           [inf, 3.0, inf, inf],  # three share it: 0.9 needs all three
                           [-inf, 2.0, -inf, 1.0],  # -inf holds nothing
                           [-inf, -inf, -inf, -inf]])  # even shares: 0.9 of 4 needs 4
    budgets = budgets_from_scores(scores, mass=0.9)
    assert budgets.tolist() == [1, 3, 2, 4]
    assert torch.equal(budgets, reference.budgets_from_scores(scores, mass=0.9, min_k=1, max_k=4))


def test_cpu_path_is_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores = torch.randn(3, 33)
    assert torch.equal(budgets_from_scores(scores, mass=0.7),
                       reference.budgets_from_scores(scores, mass=0.7, min_k=1, max_k=33))


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: budgets_from_scores(torch.zeros(2, 4), mass=0.0), "mass"),
        (lambda: budgets_from_scores(torch.zeros(2, 4), mass=1.5), "mass"),
        (lambda: budgets_from_scores(torch.zeros(2, 4), mass=0.9, min_k=3, max_k=2), "min_k"),
        (lambda: budgets_from_scores(torch.zeros(2, 4), mass=0.9, max_k=5), "max_k"),
        (lambda: budgets_from_scores(torch.zeros(2, 4), mass=0.9, min_k=-1), "min_k"),
        (lambda: budgets_from_scores(torch.zeros(2, 0), mass=0.9), "at least one token"),
        (lambda: budgets_from_scores(torch.zeros(4), mass=0.9), "2-d"),
        (lambda: budgets_from_scores(torch.zeros(2, 4), mass=0.9, temperature=0.0), "temperature"),
        (lambda: budgets_from_scores(torch.tensor([[float("nan"), 0.0]]), mass=0.9), "NaN"),
        (lambda: budgets_from_scores(torch.zeros(1, 4), mass=0.9, grid=(1, 2, 2), out_grid=(1, 100, 100)), "exceed"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_torch_compile_matches_eager():
    scores = torch.randn(3, 40)
    compiled = torch.compile(lambda t: budgets_from_scores(t, mass=0.8, validate=False), fullgraph=True)
    assert torch.equal(compiled(scores), budgets_from_scores(scores, mass=0.8))
