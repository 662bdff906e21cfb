import math

import pytest
import torch

from lookwhen_kernels import reference, select_frames, select_windows

# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _window_sums(fine, out_grid, window):
    """Every window's float64 sum ``[B, T, rows, cols]`` (an oracle independent
    of the summation order)."""
    frames, height, width = out_grid
    planes = fine.double().reshape(-1, frames, 1, height, width)
    kernel = torch.ones(1, 1, *window, dtype=torch.float64)
    return torch.nn.functional.conv2d(planes.flatten(0, 1), kernel).reshape(fine.shape[0], frames, -1)


@pytest.mark.parametrize("grid, window", [((1, 1, 1), (1, 1)), ((3, 5, 7), (2, 3)), ((2, 4, 4), (4, 4)),
                                          ((2, 6, 9), (1, 9))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_windows_match_reference(grid, window, dtype):
    scores = torch.randn(3, grid[0] * grid[1] * grid[2]).to(dtype)
    out = select_windows(scores, window, grid=grid)
    assert out.dtype == torch.int32 and out.shape == (3, grid[0] * window[0] * window[1])
    assert torch.equal(out, reference.select_windows(scores, window, grid=grid, out_grid=grid))
    ids = out.long()
    assert bool((ids[:, 1:] > ids[:, :-1]).all())


def test_window_ties_go_to_the_lowest_top_left_index():
    # Integer scores sum exactly: every window of a constant frame ties, and
    # two equal peaks tie between their windows.
    scores = torch.zeros(2, 2 * 5 * 6)
    scores[1, 2 * 6 + 4] = scores[1, 4 * 6 + 1] = 1.0
    out = select_windows(scores, 2, grid=(2, 5, 6))
    assert out[0].tolist() == [0, 1, 6, 7, 30, 31, 36, 37]
    # Frame 0 of clip 1: the peak at (2, 4) is in windows from (1, 3); the one
    # at (4, 1) only from (3, 0): (1, 3) is first in row-major order.
    assert out[1, :4].tolist() == [9, 10, 15, 16]


def test_windows_on_upsampled_scores_pick_a_best_fine_window():
    grid, out_grid, window = (2, 3, 4), (2, 7, 9), (3, 4)
    scores = torch.randn(2, 24)
    out = select_windows(scores, window, grid=grid, out_grid=out_grid)
    sums = _window_sums(reference.upsample_scores(scores.double(), grid, out_grid), out_grid, window)
    starts = out.long().reshape(2, 2, -1)[:, :, 0] % (7 * 9)
    chosen = sums.gather(2, ((starts // 9) * (9 - 4 + 1) + starts % 9)[:, :, None]).squeeze(2)
    assert bool((chosen >= sums.max(2).values - 1e-5).all())
    same = reference.select_windows(scores, window, grid=grid, out_grid=out_grid)
    assert out.shape == same.shape


def _adafocus_frames(weights, n_frames):
    """Uni-AdaFocus's ``policy_sample_indices`` at evaluation (thresholds at
    the middles, no random offsets), one clip, written from its algorithm:
    the first step of the cumulative policy reaching each threshold, the
    quantile interpolated in it, floored, overlaps pushed forward, capped."""
    frames = len(weights)
    integrated = [0.0]
    for weight in weights:
        integrated.append(integrated[-1] + weight)
    integrated[-1] = 1.0
    chosen = []
    for i in range(n_frames):
        threshold = (i + 0.5) / n_frames
        first = next(j for j, value in enumerate(integrated) if value >= threshold)
        c = min(max(first, 1), frames) - 1
        x1, x2, y1, y2 = c / frames, (c + 1) / frames, integrated[c], integrated[c + 1]
        chosen.append(math.floor((x2 * (threshold - y1) - x1 * (threshold - y2)) / (y2 - y1) * frames))
    for i in range(1, n_frames):
        if chosen[i] <= chosen[i - 1]:
            chosen[i] = chosen[i - 1] + 1
    return [min(frame, frames - n_frames + i) for i, frame in enumerate(chosen)]


def _frames_of(ids, n_frames, plane):
    return (ids.long().reshape(ids.shape[0], n_frames, plane)[:, :, 0] // plane).tolist()


@pytest.mark.parametrize("frames, n_frames, expected", [
    (16, 8, [1, 3, 5, 7, 9, 11, 13, 15]), (16, 4, [2, 6, 10, 14]), (10, 3, [1, 5, 8]), (5, 5, [0, 1, 2, 3, 4]),
    (7, 1, [3]),
])
def test_flat_scores_spread_the_frames_over_the_clip(frames, n_frames, expected):
    for scores in (torch.zeros(2, frames * 6), torch.full((2, frames * 6), 7.5, dtype=torch.float16)):
        out = select_frames(scores, n_frames, grid=(frames, 2, 3))
        assert _frames_of(out, n_frames, 6) == [expected] * 2


@pytest.mark.parametrize("grid, n_frames, temperature", [((16, 2, 2), 8, 1.0), ((16, 3, 3), 4, 0.3),
                                                          ((9, 1, 2), 5, 2.0), ((4, 3, 3), 0, 1.0)])
def test_frames_match_adafocus_sampling_on_peaked_policies(grid, n_frames, temperature):
    frames, h, w = grid
    scores = torch.randn(6, frames * h * w) * 2
    scores[:3, : h * w] += 4  # policies peaked at the start, and elsewhere
    scores[3:, -h * w:] += 4
    out = select_frames(scores, n_frames, grid=grid, temperature=temperature)
    assert out.shape == (6, n_frames * h * w) and out.dtype == torch.int32
    assert torch.equal(out, reference.select_frames(scores, n_frames, grid=grid, out_grid=grid,
                                                    temperature=temperature))
    weights = torch.softmax(scores.double().reshape(6, frames, -1).mean(2) / temperature, dim=1)
    assert _frames_of(out, n_frames, h * w) == [_adafocus_frames(row.tolist(), n_frames) for row in weights]


def test_frames_on_the_fine_grid_and_composed_with_windows():
    grid, out_grid = (6, 3, 4), (6, 6, 8)
    scores = torch.randn(2, 72)
    coarse = select_frames(scores, 3, grid=grid)
    fine = select_frames(scores, 3, grid=grid, out_grid=out_grid)
    assert torch.equal(fine.reshape(2, 3, -1)[:, :, 0] // 48, coarse.reshape(2, 3, -1)[:, :, 0] // 12)
    local = select_windows(scores.gather(1, coarse.long()), 3, grid=(3, 3, 4), out_grid=(3, 6, 8))
    ids = fine.gather(1, local.long())
    assert ids.shape == (2, 27) and bool((ids[:, 1:] > ids[:, :-1]).all())
    # Every composed window lies in a chosen frame, one per frame.
    assert torch.equal(ids.reshape(2, 3, 9)[:, :, 0] // 48, fine.reshape(2, 3, -1)[:, :, 0] // 48)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: select_windows(torch.zeros(2, 12), 2, grid=None), "grid"),
        (lambda: select_windows(torch.zeros(2, 12), 2, grid=(1, 3, 5)), "T\\*h\\*w"),
        (lambda: select_windows(torch.zeros(2, 12), 4, grid=(1, 3, 4)), "does not fit"),
        (lambda: select_windows(torch.zeros(2, 12), (1, 0), grid=(1, 3, 4)), "window"),
        (lambda: select_windows(torch.zeros(2, 12), 1, grid=(1, 3, 4), out_grid=(2, 3, 4)), "frames"),
        (lambda: select_windows(torch.tensor([[0.0, float("inf")]]), 1, grid=(1, 1, 2)), "non-finite"),
        (lambda: select_windows(torch.zeros(4, 3).t(), 1, grid=(1, 1, 4)), "contiguous"),
        (lambda: select_frames(torch.zeros(2, 12), 3, grid=(2, 2, 3)), "n_frames"),
        (lambda: select_frames(torch.zeros(2, 12, dtype=torch.int64), 1, grid=(2, 2, 3)), "dtype"),
        (lambda: select_frames(torch.tensor([[float("nan"), 0.0]]), 1, grid=(2, 1, 1)), "non-finite"),
        (lambda: select_frames(torch.zeros(2, 12), 1, grid=(2, 2, 3), temperature=0.0), "temperature"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_cpu_path_is_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores = torch.randn(2, 3 * 4 * 5)
    assert torch.equal(select_windows(scores, (2, 3), grid=(3, 4, 5)),
                       reference.select_windows(scores, (2, 3), grid=(3, 4, 5), out_grid=(3, 4, 5)))
    assert torch.equal(torch.ops.lookwhen.select_frames(scores, 2, [3, 4, 5], [3, 4, 5]),
                       reference.select_frames(scores, 2, grid=(3, 4, 5), out_grid=(3, 4, 5)))


def test_torch_compile_matches_eager():
    scores = torch.randn(2, 30)
    windows = torch.compile(lambda t: select_windows(t, 2, grid=(2, 3, 5), validate=False), fullgraph=True)
    frames = torch.compile(lambda t: select_frames(t, 1, grid=(2, 3, 5), validate=False), fullgraph=True)
    assert torch.equal(windows(scores), select_windows(scores, 2, grid=(2, 3, 5)))
    assert torch.equal(frames(scores), select_frames(scores, 1, grid=(2, 3, 5)))
