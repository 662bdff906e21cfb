import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lookwhen_kernels import nn_uniqueness, reference
from lookwhen_kernels.ops.nn_uniqueness import nn_uniqueness_into
from lookwhen_kernels.testing import assert_fully_written, assert_within_reference_error, poison_

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "cpu_backend")

METRICS = ["l2", "cosine"]
# (B, N, D): several query and key blocks with ragged tails, odd D, D = 1,
# two-token clips.
SHAPES = [(2, 70, 80), (1, 49, 33), (3, 2, 5), (1, 130, 16), (2, 9, 1)]
# Kernel and reference both compute in fp32 whatever the input dtype.
FLOOR = 1e-5


def _input(shape, dtype):
    return (torch.randn(shape, dtype=torch.float64) + 0.5).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("metric", METRICS)
def test_forward_matches_float64_reference(shape, dtype, metric):
    x = _input(shape, dtype)
    out = nn_uniqueness(x, metric=metric)
    assert out.dtype == torch.float32 and out.shape == shape[:2]
    oracle = reference.nn_uniqueness(x.double(), metric)
    assert_within_reference_error(out, reference.nn_uniqueness(x, metric), oracle, floor=FLOOR)


@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_brute_force_pairwise_distances(metric):
    x = _input((2, 23, 7), torch.float64)
    x[0, 5] = 0  # a zero vector has cosine 0 with everything
    if metric == "l2":
        pairwise = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    else:
        pairwise = 1 - torch.nn.functional.cosine_similarity(x[:, :, None], x[:, None, :], dim=-1, eps=1e-30)
    pairwise = pairwise + torch.diag(torch.full((23,), math.inf, dtype=torch.float64))
    torch.testing.assert_close(reference.nn_uniqueness(x, metric), pairwise.amin(dim=2).clamp_min(0))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_distance_written(metric, dtype):
    x = _input((2, 67, 40), dtype)
    out = poison_(torch.empty(2, 67))
    nn_uniqueness_into(out, x, metric)
    assert_fully_written(out, "distances")
    oracle = reference.nn_uniqueness(x.double(), metric)
    assert_within_reference_error(out, reference.nn_uniqueness(x, metric), oracle, floor=FLOOR)


@pytest.mark.parametrize("metric", METRICS)
def test_single_token_clip_is_infinitely_unique(metric):
    out = nn_uniqueness(_input((3, 1, 20), torch.float32), metric=metric)
    assert out.shape == (3, 1) and torch.isinf(out).all() and (out > 0).all()


@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4)])
def test_empty_input_gives_empty_output(shape):
    out = nn_uniqueness(torch.randn(shape))
    assert out.shape == shape[:2] and out.dtype == torch.float32


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_duplicates_are_at_distance_zero(metric, dtype):
    x = _input((2, 90, 37), dtype)
    pairs = [(0, 3, 80), (0, 11, 12), (1, 0, 89)]  # across and within key blocks
    for clip, source, copy in pairs:
        x[clip, copy] = x[clip, source]
    out = nn_uniqueness(x, metric=metric)
    for clip, source, copy in pairs:
        assert out[clip, source] == 0 and out[clip, copy] == 0
    oracle = reference.nn_uniqueness(x.double(), metric)
    assert_within_reference_error(out, reference.nn_uniqueness(x, metric), oracle, floor=FLOOR)


def test_equidistant_lattice_ties_give_the_exact_spacing():
    # Points of a 3-D integer grid (in random coordinates of a 10-d space):
    # every point has several neighbours at exactly the grid spacing.
    grid = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    x = torch.cat([grid * 0.5, torch.zeros(len(grid), 7)], dim=1)[torch.randperm(len(grid))]
    out = nn_uniqueness(x[None].contiguous())
    assert torch.equal(out, torch.full((1, len(grid)), 0.5))


def test_cosine_of_zero_vectors_follows_normalize_convention():
    x = _input((1, 40, 9), torch.float32)
    x[0, [4, 30]] = 0
    out = nn_uniqueness(x, metric="cosine")
    torch.testing.assert_close(out[0, [4, 30]], torch.ones(2), rtol=0, atol=1e-6)
    oracle = reference.nn_uniqueness(x.double(), "cosine")
    assert_within_reference_error(out, reference.nn_uniqueness(x, "cosine"), oracle, floor=FLOOR)


def test_cosine_ignores_scale():
    x = _input((1, 50, 12), torch.float32)
    scaled = x * torch.rand(1, 50, 1) * 100
    torch.testing.assert_close(nn_uniqueness(scaled, metric="cosine"), nn_uniqueness(x, metric="cosine"),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_nan_token_is_nan_and_nobodys_neighbour(metric):
    x = torch.randn(2, 7, 5)
    x[0, 2, 1] = float("nan")
    out = nn_uniqueness(x, metric=metric)
    assert out[0, 2].isnan() and out.isnan().sum() == 1
    # The others: as if the token were not there.
    rest = torch.cat([x[0, :2], x[0, 3:]])[None]
    torch.testing.assert_close(torch.cat([out[0, :2], out[0, 3:]])[None], reference.nn_uniqueness(rest, metric))
    torch.testing.assert_close(out[1:], reference.nn_uniqueness(x[1:], metric))
    # The same answer from the reference itself.
    expected = reference.nn_uniqueness(x, metric)
    assert torch.equal(expected.isnan(), out.isnan())
    torch.testing.assert_close(expected.nan_to_num(), out.nan_to_num())


def test_squares_past_float32_give_inf_and_one_finite_token_no_neighbour():
    # |x|^2 ~ 1e40 overflows float32: no score is finite, so no neighbour.
    huge = torch.randn(1, 4, 3) * 1e20
    assert torch.equal(nn_uniqueness(huge), torch.full((1, 4), float("inf")))
    assert torch.equal(reference.nn_uniqueness(huge), torch.full((1, 4), float("inf")))
    # Every other token NaN: none left to be a neighbour.
    lonely = torch.randn(1, 3, 4)
    lonely[0, 1:, 0] = float("nan")
    out = nn_uniqueness(lonely)
    assert out[0, 0] == float("inf") and out[0, 1:].isnan().all()


def test_result_carries_no_gradient():
    x = _input((1, 10, 4), torch.float32).requires_grad_(True)
    assert not nn_uniqueness(x).requires_grad


@pytest.mark.parametrize("metric", METRICS)
def test_registered_op_dispatches(metric):
    x = _input((2, 11, 6), torch.float32)
    out = torch.ops.lookwhen.nn_uniqueness(x, metric)
    torch.testing.assert_close(out, reference.nn_uniqueness(x, metric), rtol=1e-5, atol=1e-5)


def test_flop_counter_uses_registered_formula():
    batch, n_tokens, dim = 2, 13, 10
    with FlopCounterMode(display=False) as counter:
        nn_uniqueness(_input((batch, n_tokens, dim), torch.float32))
    assert counter.get_total_flops() == 2 * batch * n_tokens * n_tokens * dim


@pytest.mark.parametrize(
    "x, metric, message",
    [
        (torch.zeros(4, 8), "l2", "x: expected a 3-d"),
        (torch.zeros(1, 4, 8, dtype=torch.int32), "l2", "x: expected dtype"),
        (torch.zeros(1, 4, 8, dtype=torch.float64), "l2", "x: expected dtype"),
        (torch.zeros(1, 8, 4).transpose(1, 2), "l2", "x: expected a contiguous"),
        (torch.zeros(1, 4, 0), "l2", "x: tokens need at least one feature"),
        ([[[1.0]]], "l2", "x: expected a torch.Tensor"),
        (torch.zeros(1, 4, 8), "L2", "metric: expected one of 'l2', 'cosine'"),
        (torch.zeros(1, 4, 8), None, "metric: expected one of"),
    ],
)
def test_bad_inputs_raise_value_error(x, metric, message):
    with pytest.raises(ValueError, match=message):
        nn_uniqueness(x, metric=metric)
