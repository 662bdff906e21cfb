import math

import pytest
import torch

from lookwhen_kernels import keep_ratio_to_k, reference, topk_tokens, topk_tokens_budgets
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.ops.topk_tokens import launch as topk_launch
from lookwhen_kernels.testing import assert_fully_written, poison_

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations", "cpu_backend")


def _assert_top_k_lower_id_ties(indices, scores, k):
    """Independent of the reference: ascending unique ids, everything scoring
    above the K-th value taken, and the K-th value's ties filled by lowest id."""
    assert indices.dtype == torch.int32 and indices.numel() == k
    ids = indices.long()
    assert bool((ids[1:] > ids[:-1]).all()), "ids not strictly ascending"
    if k == 0:
        return
    values = scores.double()
    kth = values.sort(descending=True).values[k - 1]
    above = torch.nonzero(values > kth).flatten()
    tied = torch.nonzero(values == kth).flatten()[: k - above.numel()]
    assert torch.equal(ids, torch.cat([above, tied]).sort().values)


def _selection_violation(indices, fine):
    """How far a selection is from a true top-K of ``fine``: the best score
    left out minus the worst score taken (<= 0 for an exact top-K)."""
    taken = torch.zeros(fine.numel(), dtype=torch.bool)
    taken[indices.long()] = True
    if taken.all() or not taken.any():
        return 0.0
    return max(0.0, float(fine[~taken].max() - fine[taken].min()))


def _assert_upsampled_top_k(indices, scores, k, grid, out_grid):
    """Upsampled scores are rounded, so near-equal fine scores may swap: the
    kernel's selection may miss a true top-K of the float64 upsampling by at
    most twice what the same-precision reference's selection misses by, plus
    a few fp32 ulps."""
    oracle = reference.upsample_scores(scores.double(), grid, out_grid)
    same_precision = reference.topk_tokens(scores, k, grid=grid, out_grid=out_grid)
    assert indices.shape == same_precision.shape
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, float(oracle.abs().max()))
    for b in range(scores.shape[0]):
        ids = indices[b].long()
        assert bool((ids[1:] > ids[:-1]).all()) and (ids.numel() == 0 or 0 <= ids[0] <= ids[-1] < oracle.shape[1])
        bound = 2 * _selection_violation(same_precision[b], oracle[b]) + floor
        assert _selection_violation(indices[b], oracle[b]) <= bound


@pytest.mark.parametrize("batch, n, k", [(1, 1, 1), (3, 50, 1), (2, 50, 50), (4, 97, 13), (2, 50, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fixed_k_matches_reference(batch, n, k, dtype):
    scores = torch.randn(batch, n).to(dtype)
    out = topk_tokens(scores, k)
    assert out.shape == (batch, k)
    assert torch.equal(out, reference.topk_tokens(scores.double(), k))
    for b in range(batch):
        _assert_top_k_lower_id_ties(out[b], scores[b], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ties_go_to_the_lower_id(dtype):
    # Few distinct values (with -0.0 next to +0.0) make ties at the K-th value.
    values = torch.tensor([-1.0, -0.0, 0.0, 2.0])
    scores = values[torch.randint(0, 4, (5, 61))].to(dtype)
    for k in (1, 7, 30, 60):
        out = topk_tokens(scores, k)
        assert torch.equal(out, reference.topk_tokens(scores, k))
        for b in range(scores.shape[0]):
            _assert_top_k_lower_id_ties(out[b], scores[b], k)


def test_all_equal_scores_take_the_first_ids():
    out = topk_tokens(torch.full((3, 40), 0.5), 9)
    assert torch.equal(out, torch.arange(9, dtype=torch.int32).expand(3, 9))


def test_infinite_scores_without_upsampling():
    scores = torch.randn(2, 30)
    scores[:, ::3] = float("-inf")
    scores[0, 7] = float("inf")
    out = topk_tokens(scores, 25)
    assert torch.equal(out, reference.topk_tokens(scores, 25))


@pytest.mark.parametrize(
    "grid, out_grid",
    [((1, 7, 7), (1, 14, 14)), ((2, 3, 5), (2, 7, 9)), ((1, 1, 1), (1, 3, 2)), ((3, 4, 4), (3, 5, 3))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_upsampled_selection_is_top_k(grid, out_grid, dtype):
    scores = torch.randn(3, math.prod(grid)).to(dtype)
    n_out = math.prod(out_grid)
    for k in sorted({1, n_out // 3, n_out}):
        _assert_upsampled_top_k(topk_tokens(scores, k, grid=grid, out_grid=out_grid), scores, k, grid, out_grid)


def test_exact_2x_upsampling_matches_reference_with_ties():
    # Integer scores and the 1/4, 3/4 weights of 2x upsampling are exact in
    # every precision, so ties are real and the selection must be identical.
    grid, out_grid = (2, 3, 4), (2, 6, 8)
    scores = torch.randint(0, 3, (3, math.prod(grid))).float()
    for k in (1, 20, 96):
        out = topk_tokens(scores, k, grid=grid, out_grid=out_grid)
        fine = reference.upsample_scores(scores.double(), grid, out_grid)
        assert torch.equal(out, reference.topk_tokens(scores.double(), k, grid=grid, out_grid=out_grid))
        for b in range(scores.shape[0]):
            _assert_top_k_lower_id_ties(out[b], fine[b], k)


def test_real_shape_784_to_3136_keep_ten_percent():
    grid, out_grid = (16, 7, 7), (16, 14, 14)
    scores = torch.randn(2, 784)
    out = topk_tokens(scores, keep_ratio=0.1, grid=grid, out_grid=out_grid)
    assert out.shape == (2, 314)
    _assert_upsampled_top_k(out, scores, 314, grid, out_grid)


def test_grid_without_out_grid_does_not_upsample():
    scores = torch.randn(2, 3 * 5 * 7)
    assert torch.equal(topk_tokens(scores, 11, grid=(3, 5, 7)), reference.topk_tokens(scores, 11))


@pytest.mark.parametrize("upsample", [False, True])
def test_budgets_match_reference(upsample):
    grid, out_grid = ((2, 3, 5), (2, 7, 9)) if upsample else ((1, 1, 45), (1, 1, 45))
    scores = torch.randn(5, 30 if upsample else 45)
    n_out = math.prod(out_grid)
    budgets = torch.tensor([0, n_out, 1, *torch.randint(0, n_out + 1, (2,)).tolist()], dtype=torch.int32)
    kwargs = {"grid": grid, "out_grid": out_grid} if upsample else {}
    indices, cu_seqlens, _ = topk_tokens_budgets(scores, budgets, **kwargs)
    ref_indices, ref_cu = reference.topk_tokens_budgets(scores, budgets, **kwargs)
    assert torch.equal(cu_seqlens, ref_cu) and indices.shape == ref_indices.shape
    for b, count in enumerate(budgets.tolist()):
        clip = indices[cu_seqlens[b]:cu_seqlens[b + 1]]
        if upsample:
            _assert_upsampled_top_k(clip[None], scores[b:b + 1], count, grid, out_grid)
        else:
            _assert_top_k_lower_id_ties(clip, scores[b], count)


def test_budgets_all_zero_and_empty_batch():
    indices, cu_seqlens, _ = topk_tokens_budgets(torch.randn(3, 8), torch.zeros(3, dtype=torch.int32))
    assert indices.shape == (0,) and torch.equal(cu_seqlens, torch.zeros(4, dtype=torch.int32))
    assert topk_tokens(torch.randn(0, 8), 3).shape == (0, 3)


@pytest.mark.parametrize("ratio, n_out, expected", [(0.1, 3136, 314), (0.25, 10, 2), (1e-9, 49, 1), (1.0, 49, 49)])
def test_keep_ratio_rounding(ratio, n_out, expected):
    # 0.25 * 10 = 2.5 rounds half to even (Python's round).
    assert keep_ratio_to_k(ratio, n_out) == expected


def test_keep_ratio_counts_fine_tokens():
    scores = torch.randn(2, 12)
    out = topk_tokens(scores, keep_ratio=0.3, grid=(1, 3, 4), out_grid=(1, 5, 7))
    k = keep_ratio_to_k(0.3, 35)
    assert out.shape == (2, k)
    _assert_upsampled_top_k(out, scores, k, (1, 3, 4), (1, 5, 7))


@pytest.mark.parametrize("upsample", [False, True])
def test_every_output_element_written(upsample):
    grid, out_grid = ((1, 5, 5), (1, 9, 9)) if upsample else ((1, 1, 25), (1, 1, 25))
    scores = torch.randn(4, 25)
    out = poison_(torch.empty(4, 17, dtype=torch.int32))
    topk_launch.select_into(scores, out, grid, out_grid, k=17)
    assert_fully_written(out)
    budgets = _i32(3, 0, math.prod(out_grid), 1)
    cu_seqlens = cu_seqlens_from_lengths(budgets)
    packed = poison_(torch.empty(int(budgets.sum()), dtype=torch.int32))
    topk_launch.select_into(scores, packed, grid, out_grid, budgets=budgets, offsets=cu_seqlens)
    assert_fully_written(packed)


def test_registered_ops_dispatch():
    scores = torch.randn(2, 12)
    out = torch.ops.lookwhen.topk_tokens(scores, 5, [1, 3, 4], [1, 5, 7])
    assert torch.equal(out, topk_tokens(scores, 5, grid=(1, 3, 4), out_grid=(1, 5, 7)))
    budgets = torch.tensor([2, 7], dtype=torch.int32)
    cu_seqlens = cu_seqlens_from_lengths(budgets)
    packed = torch.ops.lookwhen.topk_tokens_budgets(scores, budgets, cu_seqlens, 9, [1, 1, 12], [1, 1, 12])
    assert torch.equal(packed, topk_tokens_budgets(scores, budgets)[0])


def test_cpu_path_takes_the_reference_for_bf16(monkeypatch):
    # Outside the interpreter CPU tensors take the reference (and bf16, which
    # the interpreter cannot run, is accepted).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores = torch.randn(2, 12).bfloat16()
    out = topk_tokens(scores, 4, grid=(1, 3, 4), out_grid=(1, 6, 8))
    assert torch.equal(out, reference.topk_tokens(scores, 4, grid=(1, 3, 4), out_grid=(1, 6, 8)))


def _nan_scores():
    scores = torch.randn(2, 12)
    scores[1, 3] = float("nan")
    return scores


def _inf_scores():
    scores = torch.randn(2, 12)
    scores[0, 0] = float("-inf")
    return scores


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


S = torch.zeros(2, 12)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: topk_tokens([[1.0]], 1), "scores: expected a torch.Tensor"),
        (lambda: topk_tokens(torch.zeros(12), 1), "scores: expected a 2-d"),
        (lambda: topk_tokens(torch.zeros(2, 12, dtype=torch.float64), 1), "scores: expected dtype"),
        (lambda: topk_tokens(torch.zeros(2, 0), keep_ratio=0.5), "scores: expected at least one token"),
        (lambda: topk_tokens(torch.zeros(12, 2).t(), 1), "scores: expected a contiguous"),
        (lambda: topk_tokens(_nan_scores(), 1), "scores: contain NaN"),
        (lambda: topk_tokens(_nan_scores(), 1, grid=(1, 3, 4), out_grid=(1, 6, 8)), "scores: contain non-finite"),
        (lambda: topk_tokens(_inf_scores(), 1, grid=(1, 3, 4), out_grid=(1, 6, 8)), "scores: contain non-finite"),
        (lambda: topk_tokens(S, 13), r"k: expected an int in \[0, 12\]"),
        (lambda: topk_tokens(S, -1), "k: expected"),
        (lambda: topk_tokens(S, 2.0), "k: expected"),
        (lambda: topk_tokens(S, True), "k: expected"),
        (lambda: topk_tokens(S, 49, grid=(1, 3, 4), out_grid=(1, 6, 8)), r"k: expected an int in \[0, 48\]"),
        (lambda: topk_tokens(S), "give exactly one, got none"),
        (lambda: topk_tokens(S, 1, keep_ratio=0.5), "give exactly one"),
        (lambda: topk_tokens(S, keep_ratio=0.0), r"keep_ratio: expected a float in \(0, 1\]"),
        (lambda: topk_tokens(S, keep_ratio=1.5), "keep_ratio"),
        (lambda: topk_tokens(S, keep_ratio=float("nan")), "keep_ratio"),
        (lambda: topk_tokens(S, keep_ratio="0.5"), "keep_ratio"),
        # 2^16 clips of 2^15 + 1 ids each: past int32 (meta: nothing is allocated).
        (lambda: topk_tokens(torch.empty(2**16, 2**16, device="meta"), 2**15 + 1, validate=False),
         "output ids"),
        (lambda: topk_tokens_budgets(S, _i32(1, 1, 1)), r"budgets: expected shape \[2\]"),
        (lambda: topk_tokens_budgets(S, torch.ones(2, dtype=torch.int64)), "budgets: expected dtype int32"),
        (lambda: topk_tokens_budgets(S, _i32(1, 1)[None]), "budgets: expected a 1-d"),
        (lambda: topk_tokens_budgets(S, _i32(1, 1, 1, 1)[::2]), "budgets: expected a contiguous"),
        (lambda: topk_tokens_budgets(S, torch.ones(2, dtype=torch.int32, device="meta")), "budgets: expected a tensor on cpu"),
        (lambda: topk_tokens_budgets(S, _i32(-1, 1)), r"budgets: every budget must lie in \[0, 12\]"),
        (lambda: topk_tokens_budgets(S, _i32(13, 1)), "budgets: every budget"),
        (lambda: topk_tokens_budgets(S, _i32(1, 49), grid=(1, 3, 4), out_grid=(1, 6, 8)), r"in \[0, 48\]"),
        (lambda: topk_tokens(S, 1, grid=(1, 3, 5)), "grid: T.h.w = 15 does not match the 12"),
        (lambda: topk_tokens(S, 1, grid=(3, 4)), "grid: expected three positive ints"),
        (lambda: topk_tokens(S, 1, grid=(1, 0, 12)), "grid: expected three positive ints"),
        (lambda: topk_tokens(S, 1, grid=(1.0, 3, 4)), "grid: expected three positive ints"),
        (lambda: topk_tokens(S, 1, out_grid=(1, 6, 8)), "out_grid: needs grid"),
        (lambda: topk_tokens(S, 1, grid=(1, 3, 4), out_grid=(2, 3, 8)), "out_grid: must keep the 1 frames"),
        (lambda: topk_tokens(S, 1, grid=(1, 3, 4), out_grid=(1, 6, -8)), "out_grid: expected three positive ints"),
        (lambda: topk_tokens(torch.zeros(2, 3, 4), 1), "grid: 3-d scores"),
        (lambda: topk_tokens(torch.zeros(2, 3, 3), 1, grid=(1, 1, 3)), "scores: the last dimension must be r.r"),
        (lambda: topk_tokens(torch.zeros(2, 3, 0), 1, grid=(1, 1, 3)), "scores: the last dimension must be r.r"),
        (lambda: topk_tokens(torch.zeros(2, 3, 4), 1, grid=(1, 2, 2)), "grid: T.h.w = 4 does not match the 3 tokens"),
        (lambda: topk_tokens(torch.zeros(2, 3, 4), 13, grid=(1, 1, 3)), r"k: expected an int in \[0, 12\]"),
        (lambda: topk_tokens(torch.zeros(2, 4, 3).transpose(1, 2), 1, grid=(1, 1, 3)), "scores: expected a contiguous"),
        (lambda: topk_tokens(torch.zeros(2, 3, 4, 1), 1, grid=(1, 1, 3)), "scores: expected a 2-d .* or 3-d"),
        (lambda: topk_tokens(_nan_scores().view(2, 3, 4), 1, grid=(1, 1, 3)), "scores: contain non-finite"),
        (lambda: topk_tokens(_inf_scores().view(2, 3, 4), 1, grid=(1, 1, 3)), "scores: contain non-finite"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_clips_past_the_register_limit_run_the_looped_kernel():
    """Past MAX_TOKENS fine tokens the clip streams through a key buffer in
    chunks; ties across chunk boundaries still go to the lower ids."""
    scores = torch.randint(0, 50, (2, 9000)).float()  # many ties
    for k in (0, 1, 700, 9000):
        assert torch.equal(topk_tokens(scores, k), reference.topk_tokens(scores, k))
    budgets = torch.tensor([4500, 0], dtype=torch.int32)
    indices, _, _ = topk_tokens_budgets(scores, budgets)
    assert torch.equal(indices, reference.topk_tokens_budgets(scores, budgets)[0])


def test_looped_kernel_selects_what_the_register_kernel_does(monkeypatch):
    """Upsampled, with ties, over several chunks: the looped kernel (forced
    by lowering the limit) against the one-block kernel, bit for bit."""
    scores = torch.randn(3, 2 * 10 * 12).round(decimals=1)
    grids = {"grid": (2, 10, 12), "out_grid": (2, 20, 24)}
    budgets = torch.tensor([100, 0, 960], dtype=torch.int32)
    expected = [topk_tokens(scores, 97, **grids), topk_tokens_budgets(scores, budgets, **grids)[0]]
    monkeypatch.setattr(topk_launch, "MAX_TOKENS", 100)
    monkeypatch.setattr(topk_launch, "CHUNK", 128)
    looped = [topk_tokens(scores, 97, **grids), topk_tokens_budgets(scores, budgets, **grids)[0]]
    for a, b in zip(looped, expected):
        assert torch.equal(a, b)


# Sub-grid scores [B, n, r*r] (LookWhere's head): LookWhere's 11 x 11 x 16
# on a 37 x 37 grid, the map itself (no resize), an odd r, one coarse token.
SUB_GRID_CASES = [((1, 11, 11), 4, (1, 37, 37)), ((2, 3, 5), 2, None), ((2, 3, 4), 3, (2, 7, 5)),
                  ((1, 1, 1), 2, (1, 3, 3))]


def test_sub_grid_map_layout():
    """Logit a*r + b of token (t, i, j) sits at (t, i*r + a, j*r + b)."""
    frames, h, w, r = 2, 3, 2, 3
    scores = torch.randn(1, frames * h * w, r * r)
    fine = reference.sub_grid_map(scores, (frames, h, w)).view(frames, h * r, w * r)
    for t in range(frames):
        for y in range(h * r):
            for x in range(w * r):
                token = t * h * w + (y // r) * w + x // r
                assert fine[t, y, x] == scores[0, token, (y % r) * r + x % r]


@pytest.mark.parametrize("grid, r, out_grid", SUB_GRID_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sub_grid_scores_select_as_their_map(grid, r, out_grid, dtype):
    """The fused rearrangement selects exactly what the 2-d kernel selects on
    the materialised map, and that is a top-K of the float64 upsampling."""
    scores = torch.randn(3, math.prod(grid), r * r).to(dtype)
    map_grid = (grid[0], grid[1] * r, grid[2] * r)
    flat = reference.sub_grid_map(scores, grid).contiguous()
    n_out = math.prod(out_grid or map_grid)
    for k in sorted({1, n_out // 3, n_out}):
        out = topk_tokens(scores, k, grid=grid, out_grid=out_grid)
        assert torch.equal(out, topk_tokens(flat, k, grid=map_grid, out_grid=out_grid or map_grid))
        _assert_upsampled_top_k(out, scores, k, grid, out_grid or map_grid)
    budgets = torch.tensor([0, 1, n_out], dtype=torch.int32)
    indices, cu, _ = topk_tokens_budgets(scores, budgets, grid=grid, out_grid=out_grid)
    assert torch.equal(cu, cu_seqlens_from_lengths(budgets))
    assert torch.equal(indices, topk_tokens_budgets(flat, budgets, grid=map_grid, out_grid=out_grid or map_grid)[0])


def test_sub_grid_ties_match_reference_exactly():
    # Integer logits and 2x resizing weights are exact: real ties, lower id wins.
    grid, r, out_grid = (2, 3, 4), 2, (2, 12, 16)
    scores = torch.randint(0, 3, (2, math.prod(grid), r * r)).float()
    fine = reference.upsample_scores(scores.double(), grid, out_grid)
    for k in (1, 50, 384):
        out = topk_tokens(scores, k, grid=grid, out_grid=out_grid)
        assert torch.equal(out, reference.topk_tokens(scores.double(), k, grid=grid, out_grid=out_grid))
        for b in range(scores.shape[0]):
            _assert_top_k_lower_id_ties(out[b], fine[b], k)


def test_sub_grid_scores_in_the_looped_kernel(monkeypatch):
    scores = torch.randn(2, 2 * 5 * 6, 4).round(decimals=1)
    grids = {"grid": (2, 5, 6), "out_grid": (2, 20, 24)}
    expected = topk_tokens(scores, 97, **grids)
    _assert_upsampled_top_k(expected, scores, 97, grids["grid"], grids["out_grid"])
    monkeypatch.setattr(topk_launch, "MAX_SUB_GRID_TOKENS", 100)
    monkeypatch.setattr(topk_launch, "CHUNK", 128)
    assert torch.equal(topk_tokens(scores, 97, **grids), expected)


def test_budgets_that_contradict_total_under_validate_false_stay_inside_the_output(cpu_backend):
    """A budget past the tokens and a total under the budgets' sum, unchecked
    with validate=False: the native kernel checks them itself; the Triton
    kernels write only inside the ``total`` slots."""
    scores = torch.randn(2, 8)
    budgets = torch.tensor([9, 3], dtype=torch.int32)
    if cpu_backend == "native":
        with pytest.raises(ValueError, match="not at the total 4"):
            topk_tokens_budgets(scores, budgets, total=4, max_seqlen=8, validate=False)
        return
    indices, _, _ = topk_tokens_budgets(scores, budgets, total=4, max_seqlen=8, validate=False)
    assert indices.tolist() == [0, 1, 2, 3]
