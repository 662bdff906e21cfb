"""The pattern task (the label only full resolution shows) and ``bench
pareto``'s frontier (its quick run: tests/test_bench.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.experiments.pareto import TASK, frontier, summarise, window_for
from lookwhen.data.synthetic import PATTERNS, SyntheticDataset, pattern_clip, write_dataset
from lookwhen.data.video import fit_clips


def _same_clip_each_pattern(seed, **kwargs):
    return [pattern_clip(np.random.default_rng(seed), pattern=p, **kwargs) for p in range(len(PATTERNS))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_half_resolution_cannot_tell_the_patterns_apart(seed):
    """The same clip with each pattern: identical under the selector's 2x
    block mean, within 3 grey levels under the antialiased half-size resize
    (its corner pixels keep 1/64 of the pattern, the uint8 resize rounds),
    and different at full
    resolution only on the moving square."""
    clips = _same_clip_each_pattern(seed, **TASK)
    pooled = [F.avg_pool2d(c.clip.permute(0, 3, 1, 2).double(), 2) for c in clips]
    halves = [fit_clips(c.clip[None], None, TASK["size"] // 2).int() for c in clips]
    for other, pool, half in zip(clips[1:], pooled[1:], halves[1:]):
        assert torch.equal(pool, pooled[0])
        assert (half - halves[0]).abs().max() <= 3
        differs = (other.clip != clips[0].clip).any(-1)
        assert differs.any() and not (differs & ~clips[0].object_mask).any()


def test_pattern_clip_geometry():
    sample = pattern_clip(np.random.default_rng(3), **TASK)
    frames, size = TASK["frames"], TASK["size"]
    assert sample.clip.shape == (frames, size, size, 3) and sample.clip.dtype == torch.uint8
    # One 8-px token a frame, on the token grid, moving 8 px a frame.
    tokens = sample.object_tokens(8).view(frames, -1)
    assert tokens.sum(1).tolist() == [1] * frames
    steps = tokens.float().argmax(1).diff().abs()
    assert set(steps.tolist()) <= {1, size // 8}
    # The even squares of the checkerboard are base + amplitude * signs.
    ys, xs = torch.nonzero(sample.object_mask[0], as_tuple=True)
    y, x = int(ys.min()), int(xs.min())
    even, odd = sample.clip[0, y, x].int(), sample.clip[0, y, x + 1].int()
    signs = torch.tensor({"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1),
                          "white": (1, 1, 1)}[PATTERNS[sample.pattern]])
    assert torch.equal((even - odd) // (2 * TASK["amplitude"]), signs)
    assert SyntheticDataset(2, task="pattern", **TASK)[1]["label"] == SyntheticDataset(
        2, task="pattern", **TASK).sample(1).pattern


@pytest.mark.parametrize("kwargs, words", [
    (dict(size=63), "size"), (dict(object_size=5), "object_size"), (dict(speed=3), "speed"),
    (dict(visible=9, frames=8), "visible"), (dict(distractors=-1), "distractors"), (dict(amplitude=80), "amplitude"),
    (dict(pattern=4), "pattern"), (dict(align=4, speed=6), "align"), (dict(speed=40, visible=8), "room"),
])
def test_pattern_clip_refuses(kwargs, words):
    with pytest.raises(ValueError, match=words):
        pattern_clip(np.random.default_rng(0), **kwargs)


def test_pattern_dataset_and_folder(tmp_path):
    with pytest.raises(ValueError, match="n_objects"):
        SyntheticDataset(4, task="pattern", n_objects=2)
    assert SyntheticDataset(4, task="pattern").classes == PATTERNS
    pytest.importorskip("av")
    paths = write_dataset(tmp_path, 1, task="pattern", frames=2, size=16, object_size=4, visible=1)
    assert sorted(p.split("/")[-2] for p in paths) == sorted(PATTERNS)


def test_frontier_and_spread():
    points = [dict(method="a", gflops=1.0, accuracy=0.5), dict(method="b", gflops=2.0, accuracy=0.4),
              dict(method="c", gflops=3.0, accuracy=0.9), dict(method="d", gflops=0.5, accuracy=0.3),
              dict(method="e", gflops=3.0, accuracy=0.8)]
    assert [p["method"] for p in frontier(points)] == ["d", "a", "c"]
    runs = [dict(method="a", keep_ratio=0.1, accuracy=0.6), dict(method="a", keep_ratio=0.1, accuracy=0.8),
            dict(method="b", keep_ratio=None, accuracy=0.5)]
    costs = {("a", 0.1): dict(gflops=1.0, clips_per_s=10.0), ("b", None): dict(gflops=2.0, clips_per_s=5.0)}
    summary = {p["method"]: p for p in summarise(runs, costs)}
    assert summary["a"]["accuracy"] == pytest.approx(0.7) and summary["a"]["spread"] == pytest.approx(0.1)
    assert summary["a"]["seeds"] == 2 and summary["a"]["frontier"] and not summary["b"]["frontier"]


@pytest.mark.parametrize("keep, grid, window", [
    (0.05, (8, 8, 8), (1, 3)), (0.1, (8, 8, 8), (2, 3)), (0.3, (8, 8, 8), (4, 5)), (1.0, (2, 4, 6), (4, 6)),
    (0.01, (8, 8, 8), (1, 1)),
])
def test_adafocus_window_is_the_nearest_area(keep, grid, window):
    assert window_for(keep, grid) == window
