"""Compressed-domain motion: scores from the decoder's motion vectors, the
``motion`` selector, and the files that carry none. Every video is made here
with PyAV."""
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lookwhen_kernels as lk

from lookwhen.data.motion import fill_unmeasured, motion_scores, motion_selection, object_recall
from lookwhen.data.synthetic import synthetic_clip
from lookwhen.data.video import VideoError, sample_indices
from helpers import encode


def test_motion_selector_recalls_the_moving_object(tmp_path):
    """Top-K recall of the object's tokens (K = their count) at the sampled
    frames; chance is K / N, about 0.1 here."""
    rng = np.random.default_rng(1)
    grid, patch, frames = (8, 7, 7), 16, 16
    recalls, chance = [], []
    for i in range(3):
        sample = synthetic_clip(rng, frames=frames, size=112, object_size=24, speed=3.0)
        motion = motion_scores(encode(tmp_path / f"{i}.mp4", sample.clip), grid)
        assert motion.scores.shape == (8 * 49,) and motion.has_vectors.all() and motion.n_frames == frames
        truth = sample.object_tokens(patch).view(frames, -1)[sample_indices(frames, grid[0])].flatten()
        ratio = float(truth.sum()) / truth.numel()
        indices, _ = motion_selection([motion], keep_ratio=ratio)
        recalls.append(object_recall(indices, [truth]))
        chance.append(ratio)
    print(f"motion selector top-K recall {np.mean(recalls):.2f} (chance {np.mean(chance):.2f})")
    assert np.mean(recalls) > 4 * np.mean(chance)


def test_i_frames_are_marked(tmp_path):
    sample = synthetic_clip(np.random.default_rng(2), frames=12, size=64, object_size=16, speed=3.0)
    options = {"crf": "18", "preset": "medium", "bf": "0", "x264-params": "keyint=4:min-keyint=4:scenecut=0"}
    path = encode(tmp_path / "gop4.mp4", sample.clip, options=options)
    motion = motion_scores(path, (12, 4, 4))
    assert motion.has_vectors.tolist() == [t % 4 != 0 for t in range(12)]
    assert bool((motion.scores.view(12, -1)[::4] == 0).all())
    # An opened container reads the same.
    with av.open(path) as container:
        again = motion_scores(container, (12, 4, 4))
    assert torch.equal(again.scores, motion.scores)


def test_fill_unmeasured_takes_the_nearest_measured_segment():
    scores = torch.arange(8.0).view(1, 4, 2).reshape(1, 8)
    has = torch.tensor([[False, True, False, True]])
    filled = fill_unmeasured(scores, has).view(4, 2)
    assert filled.tolist() == [[2, 3], [2, 3], [2, 3], [6, 7]]


def test_intra_only_codec_is_refused(tmp_path):
    clip = synthetic_clip(np.random.default_rng(3), frames=4, size=32).clip
    path = encode(tmp_path / "intra.avi", clip, codec="mjpeg", options={}, pix_fmt="yuvj420p")
    with pytest.raises(VideoError, match="no motion vectors.*mjpeg"):
        motion_scores(path, (4, 2, 2))


def test_corrupt_and_missing_files(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="junk.mp4"):
        motion_scores(junk, (4, 2, 2))
    good = encode(tmp_path / "good.mp4", synthetic_clip(np.random.default_rng(4), frames=6, size=32).clip)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(good, "rb").read()[: 600])
    with pytest.raises(VideoError, match="cut.mp4"):
        motion_scores(cut, (4, 2, 2))
    with pytest.raises(VideoError, match="no such file"):
        motion_scores(tmp_path / "absent.mp4", (4, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        motion_scores(good, (4, 2))


def test_embed_with_the_motion_selector(tmp_path, capsys, monkeypatch):
    from safetensors import safe_open

    from lookwhen import build_model
    from lookwhen.io.checkpoint import save_checkpoint
    from lookwhen.cli import main
    from lookwhen.training.embed import embed_shards, read_shards
    from lookwhen.data.video import read_clip

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiny = dict(frames=4, image_size=64, width=32, depth=1, heads=2, selector_width=16, selector_depth=1,
                selector_heads=2, score_hidden=16, keep_ratio=0.25, context_projection=True)
    model = build_model("lookwhen-b16", **tiny, seed=5).eval()
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    rng = np.random.default_rng(5)
    moving = encode(tmp_path / "moving.mp4", synthetic_clip(rng, frames=8, size=64, object_size=16, speed=4.0).clip)
    intra = encode(tmp_path / "intra.avi", synthetic_clip(rng, frames=4, size=64).clip, codec="mjpeg", options={},
                   pix_fmt="yuvj420p")
    out = tmp_path / "e.safetensors"
    code = main(["embed", moving, intra, "--checkpoint", str(checkpoint), "--selector", "motion",
                 "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 1 and "intra.avi" in err and "no motion vectors" in err
    with safe_open(str(out), framework="pt") as handle:
        embedding, indices, scores = (handle.get_tensor(k) for k in ("embeddings", "indices", "scores"))
    motion = motion_scores(moving, model.config.grid)
    expected, _ = motion_selection([motion], model.config.keep_ratio)
    assert torch.equal(indices, expected) and scores.shape == (1, model.config.n_tokens)
    with torch.inference_mode():
        direct = model(read_clip(moving, 4, 64)[None], indices=expected, run_selector=False).embedding
    torch.testing.assert_close(embedding, direct)
    dense = main(["embed", moving, "--preset", "internvideo2-b14", "--selector", "motion", "--out", str(out)])
    assert dense == 1 and "dense model" in capsys.readouterr().err
    # A collection in shards: the same selection and embedding, the intra-only file listed as failed.
    summary = embed_shards(model, [moving, intra], str(tmp_path / "shards"), workers=0, selector="motion",
                           with_selection=True, log=lambda line: None)
    assert (summary["embedded"], summary["failed"]) == (1, 1)
    shards = read_shards(str(tmp_path / "shards"))
    assert torch.equal(shards["indices"], expected)
    torch.testing.assert_close(shards["embeddings"], direct)


def test_a_selection_from_outside_can_skip_the_selector():
    from lookwhen import build_model, count_flops

    model = build_model("lookwhen-b16", frames=2, image_size=64, width=32, depth=1, heads=2, selector_width=16,
                        selector_depth=1, selector_heads=2, score_hidden=16, context_projection=True).eval()
    clip = torch.randint(0, 256, (1, 2, 64, 64, 3), dtype=torch.uint8)
    ids = torch.tensor([[0, 3, 17]], dtype=torch.int32)
    with_selector = count_flops(model, clip, indices=ids)
    without = count_flops(model, clip, indices=ids, run_selector=False)
    assert 0 < without < with_selector
    out = model(clip, indices=ids, run_selector=False)
    assert out.scores.shape == (1, 0) and out.tokens.shape == (3, 32) and torch.equal(out.indices, ids)
    with pytest.raises(ValueError, match="run_selector"):
        model(clip, run_selector=False)


def test_motion_selection_fine_tunes_on_clips_in_memory():
    """``WithMotion`` encodes each clip as H.264 and adds its motion scores;
    they find the moving square of the pattern task, the batch carries them,
    and ``FinetuneTask(selection="motion")`` trains on their top-K without
    the selector."""
    from bench.experiments.pareto import TASK
    from lookwhen import build_model
    from lookwhen.data.datasets import collate
    from lookwhen.data.motion import WithMotion
    from lookwhen.data.synthetic import SyntheticDataset
    from lookwhen.training.finetune import FinetuneTask

    grid, keep = (8, 8, 8), 0.1
    data = WithMotion(SyntheticDataset(4, seed=3, task="pattern", **TASK), grid)
    assert data.classes == data.dataset.classes and len(data) == 4
    batch = collate([data[i] for i in range(4)])
    assert batch["motion"].shape == (4, 512) and batch["motion"].dtype == torch.float32
    assert data[0]["motion"] is data.cache[0]
    indices = lk.topk_tokens(batch["motion"], keep_ratio=keep)
    truth = [data.dataset.sample(i).object_tokens(8) for i in range(4)]
    recall = object_recall(indices, truth)
    print(f"motion top-10% recall of the moving square {recall:.2f} (chance 0.10)")
    assert recall > 0.5

    model = build_model("lookwhen-b16", frames=8, image_size=64, patch_size=8, width=32, depth=1, heads=2,
                        selector_width=32, selector_depth=1, selector_heads=2, score_hidden=16, num_classes=4)
    task = FinetuneTask(model.train(), keep_ratio=keep, selection="motion", layer_decay=1.0)
    loss, _ = task.module(batch, None)
    loss.backward()
    assert model.extractor.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.selector.parameters())
    with torch.no_grad():
        logits = model(batch["clips"], indices=indices, run_selector=False).logits
    assert torch.allclose(loss, F.cross_entropy(logits, batch["labels"], label_smoothing=0.1), atol=1e-6)
    with pytest.raises(ValueError, match="no motion scores"):
        task.module({k: v for k, v in batch.items() if k != "motion"}, None)
    with pytest.raises(ValueError, match="fixed number"):
        FinetuneTask(model, keep_range=(0.1, 0.2), selection="motion")
    with pytest.raises(ValueError, match="no validation"):
        task.validate([], torch.device("cpu"), 0)



def test_frame_field_keeps_each_cells_largest_motion():
    # FFmpeg's vector records, blocks of several sizes overlapping (as the two
    # vectors of a bi-predicted block do) and reaching past the frame; the
    # oracle paints block by block.
    from lookwhen.data.motion import CELL, INTRA_MOTION, _frame_field

    rng = np.random.default_rng(0)
    dtype = np.dtype([("source", "i4"), ("w", "u1"), ("h", "u1"), ("src_x", "i2"), ("src_y", "i2"),
                      ("dst_x", "i2"), ("dst_y", "i2"), ("flags", "u8"), ("motion_x", "i4"), ("motion_y", "i4"),
                      ("motion_scale", "u2")])
    height, width, n = 37, 53, 60
    vectors = np.zeros(n, dtype)
    sizes = rng.choice([4, 8, 16], size=(n, 2))
    vectors["w"], vectors["h"] = sizes[:, 0], sizes[:, 1]
    vectors["dst_x"], vectors["dst_y"] = rng.integers(-4, width + 4, n), rng.integers(-4, height + 4, n)
    vectors["motion_x"], vectors["motion_y"] = rng.integers(-40, 40, n), rng.integers(-40, 40, n)
    vectors["motion_scale"] = rng.choice([1, 4], n)
    field = _frame_field(vectors, height, width)
    rows, cols = -(-height // CELL), -(-width // CELL)
    expected = np.full((rows, cols), -1.0)
    for v in vectors:
        magnitude = np.float32(np.hypot(v["motion_x"], v["motion_y"]) / max(int(v["motion_scale"]), 1))
        h, w = int(v["h"]), int(v["w"])
        top, left = (int(v["dst_y"]) - h // 2) // CELL, (int(v["dst_x"]) - w // 2) // CELL
        for y in range(top, top + max(1, h // CELL)):
            for x in range(left, left + max(1, w // CELL)):
                if 0 <= y < rows and 0 <= x < cols:
                    expected[y, x] = max(expected[y, x], magnitude)
    largest = np.hypot(vectors["motion_x"], vectors["motion_y"]) / np.maximum(vectors["motion_scale"], 1)
    expected[expected < 0] = max(largest.max(), INTRA_MOTION)
    assert (expected < 0).sum() == 0 and field.dtype == np.float32
    np.testing.assert_array_equal(field, expected.astype(np.float32))
