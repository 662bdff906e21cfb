"""Pre-training: data, teachers and their cache, losses, the engine (resume,
accumulation, data parallel), learning on synthetic clips and the CLI.

The ops take their CPU path here (``TRITON_INTERPRET=0``): training runs
many steps, and the kernels are tested op by op elsewhere.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from lookwhen import build_model, get_config
from lookwhen.cli import main
from lookwhen.data.datasets import DatasetError, Sampling, SkipReport, VideoDataset, collate
from lookwhen.training.losses import (
    DistillHeads,
    LossWeights,
    draw_budgets,
    extractor_losses,
    selector_loss,
    uniqueness_target,
)
from lookwhen.training.pretrain import PretrainTask
from lookwhen.data.synthetic import DIRECTIONS, SyntheticDataset, selector_recall, synthetic_clip, write_dataset
from lookwhen.io.checkpoint import weights_fingerprint
from lookwhen.training.targets import (
    TargetCache,
    WithTargets,
    cache_fingerprint,
    cached_keys,
    dequantize_rows,
    merge_rank_indexes,
    quantize_rows,
    write_cache,
)
from lookwhen.training.teachers import ImageTeacher, TeacherTargets, Teachers, VideoTeacher
from lookwhen.training.engine import Terminated, Trainer, TrainSettings, lr_factor, read_log
from helpers import SMALL

SET = [f"{k}={v}" for k, v in SMALL.items()]
TEACHER = dict(name="vit_tiny_patch16_224", image_size=64, depth=2)


pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    data = root / "data"
    write_dataset(data, 2, frames=10, size=72, object_size=16, seed=3)
    (data / "up" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = timm.create_model(TEACHER["name"], pretrained=False, num_classes=0,
                                    img_size=TEACHER["image_size"], depth=TEACHER["depth"])
    weights = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    torch.save({"model": teacher.state_dict()}, root / "teacher.pt")
    return {"root": root, "data": str(data), "weights": str(weights), "weights_pt": str(root / "teacher.pt"),
            "teacher": teacher.eval()}


def _teachers(files):
    return Teachers(ImageTeacher(TEACHER["name"], files["weights"], image_size=TEACHER["image_size"],
                                 depth=TEACHER["depth"]))


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# The selector loss is a softmax over scores, blind to a shift of all of
# them: the score head's output bias gets a gradient of rounding noise only,
# which Adam scales up to full steps, so two equivalent runs differ there.
SHIFT_ONLY = "score_head.fc2.bias"


# Data -------------------------------------------------------------------------------
def test_folder_dataset_samples_clips_deterministically(files):
    sampling = Sampling(frames=8, size=64, stride=1)
    dataset = VideoDataset(files["data"], sampling=sampling, seed=5)
    assert dataset.classes == sorted(DIRECTIONS)
    assert len(dataset) == 2 * len(DIRECTIONS) + 1
    sample = dataset[0]
    assert sample["clip"].shape == (8, 64, 64, 3) and sample["clip"].dtype == torch.uint8
    assert sample["label"] == 0 and sample["skipped"] == []
    again = VideoDataset(files["data"], sampling=sampling, seed=5)[0]["clip"]
    assert torch.equal(sample["clip"], again)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["clip"], sample["clip"])  # another view: another crop or start
    evaluation = VideoDataset(files["data"], sampling=Sampling(frames=8, size=64, train=False))
    assert torch.equal(evaluation[0]["clip"], evaluation[0]["clip"])


def test_bad_video_is_skipped_and_reported(files):
    dataset = VideoDataset(files["data"], sampling=Sampling(frames=8, size=64))
    broken = next(i for i, entry in enumerate(dataset.items) if entry.path.endswith("broken.mp4"))
    sample = dataset[broken]
    assert sample["index"] != broken and sample["skipped"][0][0].endswith("broken.mp4")
    lines = []
    report = SkipReport(lines.append)
    report.add(sample["skipped"])
    report.add(sample["skipped"])
    assert len(lines) == 1 and "broken.mp4" in lines[0]
    assert "skipped 2 reads" in report.end_epoch(0) and report.end_epoch(1) is None


def test_manifest_dataset_and_unreadable_datasets(files, tmp_path):
    data = files["data"]
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\nleft/0000.mp4,7\ndown/0001.mp4,3\n")
    dataset = VideoDataset(manifest, root=data, sampling=Sampling(frames=4, size=32))
    assert [entry.label for entry in dataset.items] == [7, 3]
    assert dataset[1]["label"] == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("up/broken.mp4,0\nmissing.mp4,1\n")
    with pytest.raises(DatasetError, match="none of its 2 videos can be read"):
        VideoDataset(bad, root=data)
    with pytest.raises(DatasetError, match="no videos found"):
        VideoDataset(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
    (tmp_path / "labels.csv").write_text("a.mp4,x\nb.mp4,3\n")
    with pytest.raises(DatasetError, match="labels.csv:2: label '3' is a class id, but other lines give class names"):
        VideoDataset(tmp_path / "labels.csv")


def test_loader_workers_and_distributed_sampler(files):
    dataset = VideoDataset(files["data"], sampling=Sampling(frames=4, size=32), seed=1)
    serial = [dataset[i]["clip"] for i in range(4)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    batches = [b for _, b in zip(range(2), loader)]
    assert all(torch.equal(a, b) for a, b in zip(serial, torch.cat([b["clips"] for b in batches])))
    shares = [set(torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=r, drop_last=True))
              for r in (0, 1)]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == len(dataset) - 1


# Teachers and the cache -----------------------------------------------------------------
def test_image_teacher_matches_timm_per_frame(files):
    teacher = ImageTeacher(TEACHER["name"], files["weights_pt"], image_size=64, depth=2)
    assert not any(p.requires_grad for p in teacher.parameters())
    clip = synthetic_clip(np.random.default_rng(0), frames=3, size=64).clip[None]
    patches, frames = teacher(clip, (4, 4))
    assert patches.shape == (1, 3, 16, 192) and frames.shape == (1, 3, 192)
    x = (clip[0].permute(0, 3, 1, 2).float() / 255 - teacher.mean) / teacher.std
    with torch.no_grad():
        tokens = files["teacher"].forward_features(x)
    torch.testing.assert_close(patches[0], tokens[:, 1:])
    torch.testing.assert_close(frames[0], tokens[:, 0])
    coarse, _ = teacher(clip, (2, 2))  # resampled to another grid
    torch.testing.assert_close(coarse[0, 0, 0], tokens[0, 1:].view(4, 4, -1)[:2, :2].mean((0, 1)))


def test_image_teacher_refuses_weights_that_do_not_fit(files, tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        ImageTeacher(TEACHER["name"], files["weights"], image_size=64, depth=3)
    with pytest.raises(ValueError, match="no such weights file"):
        ImageTeacher(TEACHER["name"], tmp_path / "none.pt")
    with pytest.raises(ValueError, match="Unknown model"):
        ImageTeacher("no_such_model", files["weights"])


def test_video_teacher_resamples_the_clip():
    dense = build_model("internvideo2-b14", frames=2, image_size=28, width=16, depth=1, heads=2, pool_heads=2)
    teacher = VideoTeacher(dense)
    clip = torch.randint(0, 256, (2, 6, 56, 56, 3), dtype=torch.uint8)
    out = teacher(clip)
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_target_cache_round_trip_resume_and_fingerprint(files, tmp_path):
    dataset = VideoDataset(files["data"], sampling=Sampling(frames=4, size=32), views=2)
    fingerprint = cache_fingerprint(dataset, (4, 4, 4), ["t"])
    made = {(i, v): TeacherTargets(torch.randn(4, 16, 8), torch.randn(4, 8), torch.randn(5))
            for i in range(3) for v in range(2)}
    first = list(made.items())[:4]
    write_cache(tmp_path, ((i, v, t) for (i, v), t in first), fingerprint, 2, shard_size=3)
    rest = [(k, t) for k, t in made.items() if k not in dict(first)]
    assert write_cache(tmp_path, ((i, v, t) for (i, v), t in rest), fingerprint, 2, shard_size=3) == 2
    cache = TargetCache.for_dataset(tmp_path, dataset, (4, 4, 4))
    got = cache.get([2, 0], [1, 0])
    torch.testing.assert_close(got.patches[0], made[(2, 1)].patches.half().float())
    torch.testing.assert_close(got.video[1], made[(0, 0)].video)
    other = VideoDataset(files["data"], sampling=Sampling(frames=4, size=32, stride=2))
    with pytest.raises(ValueError, match="other clips or teachers"):
        TargetCache.for_dataset(tmp_path, other, (4, 4, 4))


def test_target_cache_written_by_two_ranks(files, tmp_path):
    """Each rank writes its own shards and partial index; a restart counts
    them as done; the merge makes one index that reads back every key."""
    dataset = VideoDataset(files["data"], sampling=Sampling(frames=4, size=32), views=1)
    fingerprint = cache_fingerprint(dataset, (4, 4, 4), ["t"])
    made = {(i, 0): TeacherTargets(torch.randn(4, 16, 8), torch.randn(4, 8), None) for i in range(5)}
    keys = sorted(made)
    for rank in (0, 1):
        mine = keys[rank::2]
        assert write_cache(tmp_path, ((i, v, made[(i, v)]) for i, v in mine), fingerprint, 1, shard_size=2,
                           rank=rank, world=2) == len(mine)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.rank0.json", "index.rank1.json", "shard-r0-00000.safetensors",
                     "shard-r0-00001.safetensors", "shard-r1-00000.safetensors"]
    assert sorted(cached_keys(tmp_path, fingerprint)) == [f"{i}/0" for i in range(5)]
    merge_rank_indexes(tmp_path, fingerprint, 1)
    assert not list(tmp_path.glob("index.rank*"))
    cache = TargetCache.for_dataset(tmp_path, dataset, (4, 4, 4))
    got = cache.get([4, 1], [0, 0])
    torch.testing.assert_close(got.frames[0], made[(4, 0)].frames)
    torch.testing.assert_close(got.patches[1], made[(1, 0)].patches.half().float())


def test_int8_rows_round_trip_within_half_a_step():
    x = torch.randn(3, 5, 77, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    x[0, 0] = 0  # a zero row
    x[1, 1, 3] = 1e4  # one outlier sets its row's step
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (3, 5)
    back = dequantize_rows(q, scale).double()
    step = scale.double()[..., None]
    assert ((back - x).abs() <= step / 2 + 1e-3 * step).all()
    assert torch.equal(back[0, 0], torch.zeros(77, dtype=torch.float64))
    assert q.abs().max() == 127
    # Strided input, one element, and an empty batch.
    torch.testing.assert_close(dequantize_rows(*quantize_rows(x.transpose(0, 1))), back.transpose(0, 1).float())
    one, one_scale = quantize_rows(torch.tensor([[-2.5]]))
    assert one.item() == -127 and dequantize_rows(one, one_scale).item() == pytest.approx(-2.5, rel=1e-3)
    assert quantize_rows(torch.zeros(0, 8))[0].shape == (0, 8)
    for bad in (float("nan"), float("inf")):
        x[2, 2, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            quantize_rows(x)


def test_int8_target_cache_read_by_the_loader(files, tmp_path):
    """``patch_format="int8"``: half the bytes, the patch targets back to
    within half a step per token, the rest exact; the form is pinned; the
    loader's workers read the targets (``WithTargets``) into the batch."""
    dataset = VideoDataset(files["data"], sampling=Sampling(frames=4, size=32), views=1)
    fingerprint = cache_fingerprint(dataset, (4, 4, 4), ["t"])
    made = {i: TeacherTargets(torch.randn(4, 16, 64), torch.randn(4, 8), torch.randn(5)) for i in range(len(dataset))}
    entries = [(i, 0, t) for i, t in made.items()]
    write_cache(tmp_path / "fp16", entries, fingerprint, 1)
    write_cache(tmp_path / "int8", entries, fingerprint, 1, patch_format="int8")
    sizes = [sum(f.stat().st_size for f in (tmp_path / form).glob("*.safetensors")) for form in ("fp16", "int8")]
    assert sizes[1] < 0.7 * sizes[0]
    cache = TargetCache.for_dataset(tmp_path / "int8", dataset, (4, 4, 4))
    assert cache.patch_format == "int8" and TargetCache(tmp_path / "fp16", fingerprint).patch_format == "fp16"
    got = cache.get([1, 0], [0, 0])
    step = made[1].patches.abs().amax(-1, keepdim=True) / 127
    assert ((got.patches[0] - made[1].patches).abs() <= step * 0.501).all()
    torch.testing.assert_close(got.frames[1], made[0].frames)
    torch.testing.assert_close(got.video[0], made[1].video)
    with pytest.raises(ValueError, match="holds int8 patch targets, not fp16"):
        write_cache(tmp_path / "int8", entries, fingerprint, 1)
    with pytest.raises(ValueError, match="patch_format"):
        write_cache(tmp_path / "other", entries, fingerprint, 1, patch_format="bf16")

    wrapped = WithTargets(dataset, cache)
    assert len(wrapped) == len(dataset) and wrapped.views == dataset.views
    loader = torch.utils.data.DataLoader(wrapped, batch_size=2, num_workers=2, collate_fn=collate)
    batch = next(iter(loader))
    expected = cache.get(batch["indices"].tolist(), batch["views"].tolist())
    assert set(batch["targets"]) == {"patches", "frames", "video"}
    for name in ("patches", "frames", "video"):
        assert torch.equal(batch["targets"][name], getattr(expected, name))
    model = build_model("lookwhen-b16", **{**SMALL, "frames": 4, "image_size": 32})
    task = PretrainTask(model, cache=cache, train="selector")
    from_batch = task.module.targets(batch, batch["clips"])
    assert torch.equal(from_batch.patches, expected.patches)


# Losses -----------------------------------------------------------------------------
def test_uniqueness_target_is_high_on_the_moving_object(files):
    teacher = _teachers(files)
    config = build_model("lookwhen-b16", **SMALL).config
    samples = [synthetic_clip(np.random.default_rng(i), frames=8, size=64, object_size=16) for i in range(4)]
    patches, _ = teacher.image(torch.stack([s.clip for s in samples]), config.grid[1:])
    target = uniqueness_target(patches, config)
    assert target.shape == (4, config.n_selector_tokens)
    for sample, row in zip(samples, target):
        truth = sample.object_tokens(16)
        assert row[truth].mean() > 3 * row[~truth].mean()


def test_uniqueness_target_follows_the_score_layout():
    """With a frame stride the target is the mean over each selector frame's
    frames; with r x r logits it is the finer map in the scores' layout."""
    patches = torch.randn(2, 8, 64, 16)
    base = build_model("lookwhen-b16", **SMALL).config
    per_frame = uniqueness_target(patches, base).view(2, 8, 4, 4)
    strided = uniqueness_target(patches, get_config(base, selector_frame_stride=2))
    torch.testing.assert_close(strided.view(2, 4, 4, 4), per_frame.view(2, 4, 2, 4, 4).mean(2))
    sub = uniqueness_target(patches, get_config(base, score_outputs=4))
    assert sub.shape == (2, 8 * 4 * 4, 4)
    # Logit a*2 + b of token (t, i, j) is the distance averaged over cell (t, 2i + a, 2j + b) of the 8 x 8 grid.
    fine = uniqueness_target(patches, get_config(base, selector_downsample=1)).view(2, 8, 8, 8)
    t, i, j, a, b = 3, 1, 2, 1, 0
    assert torch.allclose(sub[:, t * 16 + i * 4 + j, a * 2 + b], fine[:, t, 2 * i + a, 2 * j + b])


def test_selector_loss_is_kl_with_its_minimum_at_the_target():
    target = torch.rand(3, 50) * 4
    z = (target - target.mean(1, keepdim=True)) / target.std(1, unbiased=False, keepdim=True)
    assert selector_loss(z / 0.5, target, temperature=0.5).abs() < 1e-5
    assert selector_loss(torch.zeros(3, 50), target) > 0.01
    per_clip = torch.stack([selector_loss(torch.randn(1, 50), target[i: i + 1]) for i in range(3)])
    assert per_clip.min() >= 0


def test_extractor_losses_are_means_over_clips_and_heads_stay_out_of_the_model():
    model = build_model("lookwhen-b16", **SMALL)
    heads = DistillHeads(32, 12, 6)
    assert not any(k.startswith("heads") for k in model.state_dict())
    clips = torch.randint(0, 256, (3, 8, 64, 64, 3), dtype=torch.uint8)
    targets = TeacherTargets(torch.randn(3, 8, 64, 12), torch.randn(3, 8, 12), torch.randn(3, 6))
    budgets = torch.tensor([5, 1, 40], dtype=torch.int32)
    parts = extractor_losses(model(clips, budgets=budgets), targets, heads, model.config)
    assert set(parts) == {"video", "image_video", "frame", "patch"}
    singles = [extractor_losses(model(clips[i: i + 1], budgets=budgets[i: i + 1]),
                                TeacherTargets(*(t[i: i + 1] for t in (targets.patches, targets.frames, targets.video))),
                                heads, model.config) for i in range(3)]
    for name, value in parts.items():
        torch.testing.assert_close(value, torch.stack([s[name] for s in singles]).mean(), rtol=1e-4, atol=1e-6)
    sum(parts.values()).backward()
    assert model.extractor.patch_embed.proj.weight.grad is not None and heads.patch.weight.grad is not None


def test_budgets_and_schedule():
    budgets = draw_budgets(torch.Generator().manual_seed(0), 1000, (0.05, 0.3), 200)
    assert budgets.dtype == torch.int32 and int(budgets.min()) == 10 and int(budgets.max()) == 60
    factors = [lr_factor(s, 10, 100, 0.01) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.01, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


# The engine -------------------------------------------------------------------------
def _synthetic_run(out, files, *, steps=4, batch_size=4, accumulate=1, resume=False, train="all"):
    model = build_model("lookwhen-b16", **SMALL)
    task = PretrainTask(model, teachers=_teachers(files), keep_range=(0.05, 0.5), train=train)
    dataset = SyntheticDataset(8, seed=4, frames=8, size=64, object_size=16)
    settings = TrainSettings(out=str(out), steps=steps, batch_size=batch_size, accumulate=accumulate, lr=1e-3,
                             save_every=2, resume=resume, progress=False)
    return model, task, Trainer(task, dataset, settings, log=lambda line: None)


def _whole_run(files, out, steps=5):
    _, task, trainer = _synthetic_run(out, files, steps=steps)
    trainer.fit()
    return _params(task.module)


def _stop_before(trainer, step, stop):
    """Call ``stop()`` when optimiser step ``step`` begins (raise an
    interrupt, send a signal)."""
    original = trainer.optimizer.step

    def patched(*args, **kwargs):
        if trainer.position.step == step - 1:
            stop()
        return original(*args, **kwargs)

    trainer.optimizer.step = patched


def _interrupt():
    raise KeyboardInterrupt


def _assert_resumes_to(files, out, expected, steps=5):
    _, task, trainer = _synthetic_run(out, files, steps=steps, resume=True)
    trainer.fit()
    for key, value in _params(task.module).items():
        assert torch.equal(value, expected[key]), key


def _interrupted_run(files, tmp_path, step):
    """The parameters of a whole 5-step run, and the same run in ``cut``
    interrupted (Ctrl-C) when step ``step`` begins."""
    expected = _whole_run(files, tmp_path / "whole")
    _, _, trainer = _synthetic_run(tmp_path / "cut", files, steps=5)
    _stop_before(trainer, step, _interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    return expected


def test_resume_after_interrupt_equals_an_uninterrupted_run(files, tmp_path):
    expected = _interrupted_run(files, tmp_path, 4)
    assert open(tmp_path / "cut" / "checkpoints" / "latest").read() == "step-000003"
    with pytest.raises(ValueError, match="already holds a run"):
        _synthetic_run(tmp_path / "cut", files, steps=5)[2].fit()
    _assert_resumes_to(files, tmp_path / "cut", expected)
    log = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5]


class _RunsCode:
    """A pickle that would create ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_reads_no_code_and_no_path_outside_the_run(files, tmp_path):
    _, _, trainer = _synthetic_run(tmp_path / "run", files, steps=2)
    trainer.fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    marker = tmp_path / "ran"
    torch.save({"module": _RunsCode(marker)}, checkpoints / "step-000002" / "train-state.pt")
    # The pointer names a folder outside the run: ignored, only step-N folders are read.
    outside = tmp_path / "elsewhere"
    shutil.copytree(checkpoints / "step-000002", outside)
    (checkpoints / "latest").write_text(str(outside))
    lines = []
    _, _, trainer = _synthetic_run(tmp_path / "run", files, steps=3, resume=True)
    trainer.log = lines.append
    with pytest.raises(ValueError, match="none of the 1 checkpoints"):
        trainer.fit()
    assert not marker.exists()
    assert "step-000002 is unreadable (UnpicklingError" in lines[0]


def test_resume_falls_back_to_the_newest_intact_checkpoint(files, tmp_path):
    expected = _interrupted_run(files, tmp_path, 5)
    state = tmp_path / "cut" / "checkpoints" / "step-000004" / "train-state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    _assert_resumes_to(files, tmp_path / "cut", expected)
    assert [row["step"] for row in read_log(tmp_path / "cut" / "log.jsonl")] == [1, 2, 3, 4, 5]


def test_sigterm_saves_at_the_end_of_the_step_and_resume_continues(files, tmp_path):
    expected = _whole_run(files, tmp_path / "whole")
    _, _, trainer = _synthetic_run(tmp_path / "cut", files, steps=5)
    _stop_before(trainer, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Terminated, match="step 3"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-000003"
    _assert_resumes_to(files, tmp_path / "cut", expected)


def test_resume_keeps_the_data_position_and_refuses_another_run(files, tmp_path):
    _, _, trainer = _synthetic_run(tmp_path / "run", files, steps=3)
    trainer.fit()  # 2 steps of 4 clips per epoch: step 3 is 4 clips into epoch 1
    _, _, trainer = _synthetic_run(tmp_path / "run", files, steps=4, accumulate=2, resume=True)
    trainer.restore(trainer.latest_checkpoint())
    assert (trainer.position.epoch, trainer.position.micro, trainer.micro) == (1, 2, 2)
    trainer.fit()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["accumulate"] == 1 and run["resumes"] == [{"step": 3, "changed": {"steps": 4,
                                                                                             "accumulate": 2}}]
    model, _, _ = _synthetic_run(tmp_path / "other", files)
    assert run["initial_weights"] == weights_fingerprint(model) and len(run["initial_weights"]) == 64
    with pytest.raises(ValueError, match="batch size is 4, not 8"):
        _synthetic_run(tmp_path / "run", files, steps=6, batch_size=8, resume=True)[2].fit()
    model = build_model("lookwhen-b16", **(SMALL | {"depth": SMALL["depth"] + 1}))
    task = PretrainTask(model, teachers=_teachers(files), keep_range=(0.05, 0.5))
    settings = TrainSettings(out=str(tmp_path / "run"), steps=6, batch_size=4, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"another model config \(depth\)"):
        Trainer(task, SyntheticDataset(8, seed=4, frames=8, size=64, object_size=16), settings,
                log=lambda line: None).fit()


def test_accumulation_matches_one_big_batch(files, tmp_path):
    _, whole, trainer = _synthetic_run(tmp_path / "a", files, steps=2, batch_size=4)
    trainer.fit()
    _, split, trainer = _synthetic_run(tmp_path / "b", files, steps=2, batch_size=4, accumulate=2)
    trainer.fit()
    for key, value in _params(split.module).items():
        if not key.endswith(SHIFT_ONLY):
            torch.testing.assert_close(value, _params(whole.module)[key], rtol=1e-4, atol=1e-5, msg=key)
    # AdamW (and clipping) hide a uniform scale of the gradients in the
    # parameters: the loss and the gradient norm before clipping do not.
    for one, two in zip(read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")):
        for key in ("loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), (one["step"], key)


def test_two_ranks_with_half_the_batch_equal_one_process_with_ddp_or_fsdp(files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(files["data"], data, ignore=shutil.ignore_patterns("broken.mp4"))
    common = ["pretrain", "--data", str(data), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--stride", "1",
              "--image-teacher", TEACHER["name"], "--image-teacher-weights", files["weights"],
              "--image-teacher-size", "64", "--image-teacher-arg", "depth=2", "--set", *SET]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    runs = {"ddp": ["--ema", "0.5"], "fsdp": ["--fsdp", "--checkpoint-activations", "--ema", "0.5"]}
    for port, (name, extra) in zip((29517, 29518), runs.items()):
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "lookwhen", *common, "--out", str(tmp_path / name), *extra]
        done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        # Every parameter of pre-training gets a gradient: DDP need not search.
        assert "find_unused_parameters=True" not in done.stderr
    # Sharded weights, recomputed blocks: the same steps as DDP's.
    # The weight average too, sharded as the weights are.
    for file in ("model.safetensors", "model-ema.safetensors"):
        fsdp, ddp = load_file(tmp_path / "fsdp" / file), load_file(tmp_path / "ddp" / file)
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=f"{file}: {key}")
    # A sharded run resumes its average from the checkpoint's whole tensors.
    before = load_file(tmp_path / "fsdp" / "model-ema.safetensors")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "lookwhen", *common, "--steps", "4", "--resume", "--out", str(tmp_path / "fsdp"), *runs["fsdp"]]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = load_file(tmp_path / "fsdp" / "model-ema.safetensors")
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert set(two) == set(one)
    for key in one:
        if not key.endswith(SHIFT_ONLY):
            # The all-reduce sums in another order than one process does, and
            # AdamW divides by sqrt(v): a weight whose gradient is near zero
            # carries that 1e-7 noise up to ~1e-5 in 3 steps of lr 1e-3 (steps
            # move weights by ~3e-3).
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-5, msg=key)
    assert json.load(open(tmp_path / "ddp" / "run.json"))["world_size"] == 2


def test_selector_recall_reads_the_frames_a_strided_selector_sees():
    """With ``selector_frame_stride`` 2 the selector's grid holds frames 0,
    2, 4, ...: a score map equal to the objects' tokens on those frames has
    recall 1, and the brief event's frames outside them are not counted."""
    model = build_model("lookwhen-b16", **{**SMALL, "selector_frame_stride": 2}).eval()
    samples = [SyntheticDataset(8, seed=5, frames=8, size=64, object_size=12, visible=3).sample(i) for i in range(8)]
    truth = [s.object_tokens(16, frame_stride=2) for s in samples]
    assert truth[0].shape == (model.config.n_selector_tokens,)
    torch.testing.assert_close(truth[0], samples[0].object_tokens(16).view(8, -1)[::2].flatten())
    model.selector_scores = lambda clips: torch.stack(truth).float()
    assert selector_recall(model, samples) == 1.0
    model.selector_scores = lambda clips: 1 - torch.stack(truth).float()
    assert selector_recall(model, samples) == 0.0


def test_selector_learns_to_find_the_moving_objects(files, tmp_path):
    """Selector pre-training on synthetic clips: recall of the objects'
    tokens goes from chance to far above it in a few dozen steps."""
    clip_args = dict(frames=8, size=64, object_size=16)
    model = build_model("lookwhen-b16", **{**SMALL, "selector_depth": 2})
    held_out = [SyntheticDataset(16, seed=99, **clip_args).sample(i) for i in range(16)]
    before = selector_recall(model.eval(), held_out)
    task = PretrainTask(model.train(), teachers=_teachers(files), train="selector",
                        weights=LossWeights(selector=1.0))
    settings = TrainSettings(out=str(tmp_path), steps=100, batch_size=8, lr=2e-3, save_every=1000, progress=False)
    Trainer(task, SyntheticDataset(96, seed=1, **clip_args), settings, log=lambda line: None).fit()
    after = selector_recall(model.eval(), held_out)
    chance = np.mean([float(s.object_tokens(16).float().mean()) for s in held_out])
    print(f"recall before {before:.3f}, after {after:.3f}, chance {chance:.3f}")
    assert before < chance + 0.15 and after > 0.7 and after > before + 0.3, (before, after, chance)
    assert not any(p.requires_grad for p in model.extractor.parameters())


# The command ------------------------------------------------------------------------
def test_pretrain_command_with_a_corrupt_file_checkpoint_resume_and_plot(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", files["data"], "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--save-every", "2", "--stride", "1", "--image-teacher", TEACHER["name"],
            "--image-teacher-weights", files["weights"], "--image-teacher-size", "64",
            "--image-teacher-arg", "depth=2", "--plot", str(tmp_path / "loss.png"), "--set", *SET]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("broken.mp4: not a readable video") == 1 and "reads of unreadable videos (1 so far" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-000002", "step-000003"]
    run = json.load(open(out / "run.json"))
    assert run["model_config"]["frames"] == 8 and run["settings"]["steps"] == 3
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and {"selector", "patch", "frame"} <= set(rows[0]["losses"])
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    assert main(args) == 1 and "pass --resume" in capsys.readouterr().err
    assert main([*args[:6], "5", *args[7:], "--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4, 5]
    state = load_file(out / "model.safetensors")
    assert not any(k.startswith("heads") for k in state)


def test_cache_targets_then_pretrain_from_the_cache(files, tmp_path, capsys):
    teacher_args = ["--image-teacher", TEACHER["name"], "--image-teacher-weights", files["weights"],
                    "--image-teacher-size", "64", "--image-teacher-arg", "depth=2"]
    data = ["--data", files["data"], "--stride", "1", "--set", *SET]
    cache = tmp_path / "cache"
    assert main(["cache-targets", *data, *teacher_args, "--out", str(cache), "--views", "2",
                 "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "cached teacher targets of 16 clips" in out and "1 unreadable" in out
    assert main(["cache-targets", *data, *teacher_args, "--out", str(cache), "--views", "2"]) == 0
    assert "of 0 clips (16 already there)" in capsys.readouterr().out
    assert main(["pretrain", *data, "--targets", str(cache), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "2"]) == 0
    assert main(["pretrain", "--data", files["data"], "--set", *SET, "--targets", str(cache), "--out",
                 str(tmp_path / "other"), "--steps", "2"]) == 1
    assert "other clips or teachers" in capsys.readouterr().err
    # Under torchrun the two ranks share the work: the same targets.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "lookwhen", "cache-targets", *data, *teacher_args, "--out", str(tmp_path / "ranks"), "--views", "2",
           "--shard-size", "4"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: cached teacher targets of 8 clips" in done.stdout
    assert "rank 1: cached teacher targets of 8 clips" in done.stdout
    one, two = (json.load(open(folder / "index.json"))["shards"] for folder in (cache, tmp_path / "ranks"))
    assert sorted(one) == sorted(two) and not list((tmp_path / "ranks").glob("index.rank*"))
    for key in one:
        for part in ("patches", "frames"):
            a = load_file(cache / one[key])[f"{key}/{part}"]
            assert torch.equal(a, load_file(tmp_path / "ranks" / two[key])[f"{key}/{part}"]), key


def test_pretrain_command_reports_bad_input(files, tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--steps", "1"]) == 1
    assert "no such folder or manifest" in capsys.readouterr().err
    assert main(["pretrain", "--data", files["data"], "--out", str(tmp_path / "o"), "--steps", "1",
                 "--set", *SET]) == 1
    assert "--image-teacher" in capsys.readouterr().err
    assert main(["pretrain", "--data", files["data"], "--out", str(tmp_path / "o"), "--steps", "1",
                 "--set", "depth=x"]) == 1
    assert "expected an integer" in capsys.readouterr().err
