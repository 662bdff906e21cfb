import numpy as np
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen.data.synthetic import synthetic_clip
from lookwhen_kernels import reference
from lookwhen_kernels.testing import assert_fully_written

# Unwritten output elements show as their dtype's largest value (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _clip(batch, frames, height, width, still=()):
    """Random bytes; the frames in ``still`` repeat the frame before them."""
    clip = torch.randint(0, 256, (batch, frames, height, width, 3), dtype=torch.uint8)
    for t in still:
        clip[:, t] = clip[:, t - 1]
    return clip


def _assert_equal(out, expected):
    for name, got, want in zip(("indices", "cu_seqlens", "run_lengths"), out, expected):
        assert got.dtype == torch.int32, name
        assert_fully_written(got, name)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


# Mean absolute byte difference of random bytes is 85/255 = 1/3: thresholds
# around it keep part of every frame. Each threshold times 255 * 3p^2 (the
# byte-difference sum at the boundary) is a half-integer or has a fraction,
# so no token lies exactly on the boundary, where float rounding decides.
@pytest.mark.parametrize("shape, patch, tubelet, threshold, std", [
    ((2, 5, 28, 42), 14, 1, 44982.5 / (255 * 3 * 14 * 14), None),
    ((1, 1, 7, 7), 7, 1, 0.37, None),
    ((3, 6, 10, 15), 5, 2, 0.37, None),
    ((2, 4, 14, 21), 7, 1, 1.5, (0.229, 0.224, 0.225)),
])
def test_matches_reference(shape, patch, tubelet, threshold, std):
    clip = _clip(*shape, still=range(2, shape[1], 3))
    out = lk.static_tokens(clip, patch_size=patch, threshold=threshold, tubelet=tubelet, std=std)
    _assert_equal(out, reference.static_tokens(clip, patch_size=patch, threshold=threshold, tubelet=tubelet, std=std))
    kept = out[1][1:] - out[1][:-1]
    spatial = (shape[2] // patch) * (shape[3] // patch)
    assert bool((kept >= spatial).all())
    if shape[1] > tubelet:
        assert bool((kept < spatial * shape[1] // tubelet).all()), "the threshold should drop some tokens"


def test_static_clip_keeps_only_the_first_frame():
    clip = _clip(2, 1, 21, 14).expand(2, 6, 21, 14, 3).contiguous()
    indices, cu, runs = lk.static_tokens(clip, patch_size=7, threshold=0.01)
    assert cu.tolist() == [0, 6, 12]
    assert indices.tolist() == list(range(6)) * 2
    assert runs.tolist() == [6] * 12


def test_threshold_zero_keeps_every_token():
    clip = _clip(2, 4, 14, 14, still=[1, 2, 3])
    indices, cu, runs = lk.static_tokens(clip, patch_size=7, threshold=0)
    assert cu.tolist() == [0, 16, 32]
    assert indices.tolist() == list(range(16)) * 2
    assert runs.tolist() == [1] * 32


def test_run_lengths_count_tubelets_until_the_next_change():
    clip = torch.zeros(1, 6, 8, 16, 3, dtype=torch.uint8)
    clip[0, 2:, :, :8] = 200   # the left patch changes at frame 2 and stays
    clip[0, 5, :, 8:] = 90     # the right patch changes at frame 5
    indices, cu, runs = lk.static_tokens(clip, patch_size=8, threshold=0.1)
    # Token ids t*2 + j: left (0), right (1) of frame 0, left of 2, right of 5.
    assert indices.tolist() == [0, 1, 4, 11]
    assert runs.tolist() == [2, 5, 4, 1]
    # Tubelets of two frames: frame 3 vs frame 0 moved, frame 5 vs frame 2 moved.
    indices, _, runs = lk.static_tokens(clip, patch_size=8, threshold=0.1, tubelet=2)
    assert indices.tolist() == [0, 1, 2, 5] and runs.tolist() == [1, 2, 2, 1]


def test_moving_object_on_static_background():
    """RLT's premise: on a static background it keeps frame 0 and about the
    tokens the object covers now or covered one frame ago."""
    sample = synthetic_clip(np.random.default_rng(3), frames=6, size=56, object_size=12, speed=4.0)
    patch, frames, side = 7, 6, 8
    indices, cu, _ = lk.static_tokens(sample.clip[None], patch_size=patch, threshold=0.05)
    kept = torch.zeros(frames * side * side, dtype=torch.bool)
    kept[indices.long()] = True
    covered = sample.object_tokens(patch).view(frames, -1)
    touched = covered.clone()
    touched[1:] |= covered[:-1]
    touched[0] = True
    assert not bool((kept & ~touched.flatten()).any()), "a background token was kept"
    mostly = sample.object_tokens(patch, min_cover=0.5).view(frames, -1)[1:]
    assert bool(kept.view(frames, -1)[1:][mostly].all()), "a token the object fills was dropped"
    assert int(cu[-1]) < 0.5 * frames * side * side


def test_frames_split_across_programs(monkeypatch):
    """Frames wider than one pack program (PACK_CHUNK positions) are split;
    a small chunk puts 49 positions in 4 programs, one of them partial."""
    monkeypatch.setattr("lookwhen_kernels.ops.static_tokens.PACK_CHUNK", 16)
    clip = _clip(2, 5, 28, 28, still=[2, 4])
    out = lk.static_tokens(clip, patch_size=4, threshold=0.37)
    _assert_equal(out, reference.static_tokens(clip, patch_size=4, threshold=0.37))


def test_strided_clip_matches_contiguous():
    big = _clip(2, 4, 14, 28, still=[2])
    view = big[:, :, :, 7:21]
    assert not view.is_contiguous()
    out = lk.static_tokens(view, patch_size=7, threshold=0.3)
    _assert_equal(out, reference.static_tokens(view.contiguous(), patch_size=7, threshold=0.3))


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_empty_batch_and_registered_ops(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    indices, cu, runs = lk.static_tokens(torch.zeros(0, 2, 7, 7, 3, dtype=torch.uint8), patch_size=7, threshold=0.1)
    assert indices.numel() == 0 and runs.numel() == 0 and cu.tolist() == [0]
    clip = _clip(1, 3, 7, 14)
    keep = torch.ops.lookwhen.static_token_mask(clip, 7, 1, 0.3, [1.0, 1.0, 1.0])
    assert torch.equal(keep.bool(), reference.static_token_mask(clip, patch_size=7, threshold=0.3))


@pytest.mark.parametrize("kwargs, message", [
    ({"clip": torch.zeros(1, 2, 7, 7, 3)}, "uint8"),
    ({"clip": torch.zeros(1, 2, 7, 7, dtype=torch.uint8)}, "5-d"),
    ({"clip": torch.zeros(1, 2, 7, 7, 4, dtype=torch.uint8)}, "3 channels"),
    ({"clip": torch.zeros(1, 3, 7, 7, 3, dtype=torch.uint8), "tubelet": 2}, "multiple of tubelet"),
    ({"clip": torch.zeros(1, 0, 7, 7, 3, dtype=torch.uint8)}, "positive multiple"),
    ({"clip": torch.zeros(1, 2, 7, 9, 3, dtype=torch.uint8)}, "patch_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"tubelet": True}, "tubelet"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"std": (1.0, 0.0, 1.0)}, "std"),
    ({"std": (1.0, 1.0)}, "std"),
])
def test_bad_inputs(kwargs, message):
    args = {"clip": torch.zeros(1, 2, 7, 7, 3, dtype=torch.uint8), "patch_size": 7, "threshold": 0.1} | kwargs
    with pytest.raises(ValueError, match=message):
        lk.static_tokens(args.pop("clip"), **args)
