"""Fine-tuning, ResKD distillation, evaluation and sharded embedding, on
videos the tests make. The ops take their CPU path (``TRITON_INTERPRET=0``)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from lookwhen import build_model
from lookwhen.io.checkpoint import load_checkpoint, save_checkpoint
from lookwhen.cli import main
from lookwhen.training.embed import read_shards
from lookwhen.training.evaluate import spatial_crops, view_indices
from lookwhen.training.finetune import FinetuneTask, layer_id, random_selection
from lookwhen.data.synthetic import SyntheticDataset, write_dataset
from lookwhen.training.engine import Trainer, TrainSettings
from helpers import SMALL as BASE

# The light preset's selector layout (every frame, projected context): the
# learning test below widens the extractor alone.
SMALL = dict(BASE, depth=2, context_projection=True)
SET = [f"{k}={v}" for k, v in SMALL.items()]
DENSE = ["frames=4", "image_size=32", "patch_size=8", "width=32", "depth=1", "heads=2", "pool_heads=2"]
DENSE_CONFIG = {key: int(value) for key, value in (item.split("=") for item in DENSE)}


pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = root / "data"
    write_dataset(data, 2, frames=10, size=72, object_size=16, seed=7)
    (data / "left" / "broken.mp4").write_bytes(b"not a video at all")
    pretrained = build_model("lookwhen-b16", **SMALL, seed=3)
    save_checkpoint(pretrained, root / "pretrained.safetensors")
    return {"root": root, "data": str(data), "pretrained": str(root / "pretrained.safetensors")}


def test_layer_wise_decay_and_random_selection():
    assert layer_id("patch_embed.proj.weight", 12) == 0 and layer_id("selector.blocks.1.norm1.weight", 12) == 0
    assert layer_id("blocks.3.attn.qkv.weight", 12) == 4 and layer_id("head.weight", 12) == 13
    model = build_model("lookwhen-b16", **SMALL, num_classes=3)
    task = FinetuneTask(model, layer_decay=0.5)
    assert task.lr_scale("model.extractor.head.weight") == 1.0
    assert task.lr_scale("model.extractor.blocks.1.mlp.fc1.weight") == 0.5
    assert task.lr_scale("model.selector.cls_token") == 0.125
    trainer_lrs = {g["lr"] for g in Trainer(task, SyntheticDataset(4, frames=8, size=64), TrainSettings(
        out="unused", steps=1, batch_size=2, lr=1.0)).optimizer.param_groups}
    assert trainer_lrs == {1.0, 0.5, 0.25, 0.125}
    ids = random_selection(torch.Generator().manual_seed(0), 3, 50, 7)
    assert ids.shape == (3, 7) and ids.dtype == torch.int32
    assert all(len(set(row.tolist())) == 7 and row.tolist() == sorted(row.tolist()) for row in ids)
    with pytest.raises(ValueError, match="num_classes"):
        FinetuneTask(build_model("lookwhen-b16", **SMALL))


def test_external_selection_reaches_the_extractor():
    model = build_model("lookwhen-b16", **SMALL, num_classes=4).eval()
    clips = torch.randint(0, 256, (2, 8, 64, 64, 3), dtype=torch.uint8)
    ids = torch.tensor([[0, 5, 9], [1, 2, 500]], dtype=torch.int32)
    out = model(clips, indices=ids)
    assert torch.equal(out.indices, ids) and out.tokens.shape == (6, 32) and out.logits.shape == (2, 4)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(clips, indices=torch.tensor([[0, 512], [1, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="keep_ratio and indices: give one way of choosing tokens, not both"):
        model(clips, keep_ratio=0.1, indices=ids)


@pytest.mark.parametrize("extra", [{}, dict(score_outputs=4)])
def test_window_selection_is_the_best_window_of_each_frame(extra):
    """``window=(h, w)``: per frame, the window whose (upsampled) scores sum
    highest, what ``select_windows`` gives on the same scores, and the
    fine-tuning task and evaluation pass it on."""
    import lookwhen_kernels as lk
    from lookwhen.models.lookwhen import _score_map
    from lookwhen.models.selector import frame_scores
    from lookwhen.training.evaluate import logits_of

    model = build_model("lookwhen-b16", **SMALL, **extra, num_classes=4).eval()
    cfg = model.config
    clips = torch.randint(0, 256, (3, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(clips, window=(2, 3))
        score_map, map_grid = _score_map(frame_scores(out.scores, cfg), cfg)
    expected = lk.select_windows(score_map, (2, 3), grid=map_grid, out_grid=cfg.grid)
    assert torch.equal(out.indices, expected) and out.indices.shape == (3, cfg.frames * 6)
    # Each frame's ids: one 2 x 3 block of that frame's grid.
    _, h, w = cfg.grid
    frame, row, col = out.indices[0].long() // (h * w), out.indices[0].long() % (h * w) // w, out.indices[0].long() % w
    for t in range(cfg.frames):
        mine = frame == t
        assert mine.sum() == 6 and row[mine].max() - row[mine].min() == 1 and col[mine].max() - col[mine].min() == 2
    with pytest.raises(ValueError, match="keep_ratio and window"):
        model(clips, keep_ratio=0.1, window=2)
    with pytest.raises(ValueError, match="window"):
        FinetuneTask(model, window=2, selection="random")
    with pytest.raises(ValueError, match="dense model"):
        FinetuneTask(build_model("internvideo2-b14", **DENSE_CONFIG, num_classes=4), window=2)
    task = FinetuneTask(model.train(), window=(2, 3))
    assert task.keep_ratio is None and task.run_info()["window"] == (2, 3)
    batch = {"clips": clips, "labels": torch.tensor([0, 1, 2])}
    loss, _ = task.module(batch, None)
    loss.backward()
    assert model.extractor.head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), clips, window=(2, 3)), out.logits)


def test_rlt_fine_tunes_the_dense_model():
    """RLT's tokens through the dense model's head: logits of every clip and
    a gradient on the baseline's weights."""
    from lookwhen.models.rlt import RLTDense
    from lookwhen.training.evaluate import logits_of

    dense = build_model("internvideo2-b14", **DENSE_CONFIG, num_classes=3)
    model = RLTDense(dense)
    clips = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    clips[1, 1:] = clips[1, 0]
    logits = logits_of(model, clips)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    task = FinetuneTask(model.train())
    loss, _ = task.module({"clips": clips, "labels": torch.tensor([0, 2])}, None)
    loss.backward()
    assert dense.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_finetune_learns_the_colour_of_the_moving_object(tmp_path):
    """A small model fine-tuned from scratch at keep ratio 0.25 beats chance
    (1/3) by far on held-out clips."""
    from bench.experiments.train import accuracy

    clip_args = dict(frames=8, size=64, object_size=16, task="colour")
    model = build_model("lookwhen-b16", **{**SMALL, "width": 64}, num_classes=3)
    task = FinetuneTask(model, keep_ratio=0.25, layer_decay=1.0, label_smoothing=0.0)
    settings = TrainSettings(out=str(tmp_path), steps=100, batch_size=16, lr=1e-3, save_every=1000, progress=False)
    Trainer(task, SyntheticDataset(1600, seed=1, **clip_args), settings, log=lambda line: None).fit()
    held_out = [SyntheticDataset(48, seed=2, **clip_args).sample(i) for i in range(48)]
    score = accuracy(model, held_out, 0.25, torch.device("cpu"), task="colour")
    print(f"held-out accuracy {score:.3f}")
    assert score > 0.75, score


def test_finetune_command_from_a_checkpoint_and_linear_probe(files, tmp_path, capsys):
    common = ["finetune", "--data", files["data"], "--steps", "2", "--batch-size", "2", "--stride", "1"]
    assert main([*common, "--init", files["pretrained"], "--out", str(tmp_path / "ft"), "--keep-range", "0.1", "0.3",
                 "--plot", str(tmp_path / "ft.png")]) == 0
    assert "fine-tuned lookwhen-b16 (4 classes)" in capsys.readouterr().out
    tuned = load_checkpoint(tmp_path / "ft" / "model.safetensors")
    assert tuned.config.num_classes == 4 and os.path.getsize(tmp_path / "ft.png") > 1000
    source = load_checkpoint(files["pretrained"])
    assert main([*common, "--init", files["pretrained"], "--out", str(tmp_path / "lp"), "--linear-probe"]) == 0
    probe = load_checkpoint(tmp_path / "lp" / "model.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(probe.state_dict()[key], value), key
    assert main([*common, "--init", files["pretrained"], "--out", str(tmp_path / "rnd"), "--selection", "random",
                 "--keep-ratio", "0.2"]) == 0
    assert main([*common, "--init", files["pretrained"], "--out", str(tmp_path / "bad"), "--selection",
                 "random", "--keep-range", "0.1", "0.2"]) == 1
    assert "fixed number of tokens" in capsys.readouterr().err


def test_linear_probe_trains_on_embeddings_computed_once(files, tmp_path, capsys, monkeypatch):
    """``--linear-probe`` embeds every training video once into
    ``<out>/embeddings`` and trains the head on those: no model forward per
    step, a resumed run embeds nothing again, and the head is what AdamW
    made of the stored embeddings."""
    import lookwhen.training.embed as embed
    import lookwhen.training.finetune as finetune
    from lookwhen.data.datasets import Entry, collate

    def no_forward(*args, **kwargs):
        raise AssertionError("the probe ran the model on clips during training")

    common = ["finetune", "--data", files["data"], "--batch-size", "2", "--init", files["pretrained"],
              "--linear-probe", "--out", str(tmp_path / "lp"), "--lr", "1e-2", "--warmup-steps", "0"]
    monkeypatch.setattr(finetune, "logits_of", no_forward)
    assert main([*common, "--steps", "3"]) == 0
    stored = read_shards(str(tmp_path / "lp" / "embeddings"))
    assert len(stored["videos"]) == 8 and stored["embeddings"].shape[0] == 8  # the broken file left out
    assert "broken" in capsys.readouterr().err
    # The stored embeddings are the frozen model's.
    again, _, _ = embed.embed_files(load_checkpoint(files["pretrained"]), stored["videos"][:2])
    torch.testing.assert_close(again.tensors(False, False)["embeddings"], stored["embeddings"][:2])
    monkeypatch.setattr(embed, "embed_batch", no_forward)
    assert main([*common, "--steps", "6", "--resume"]) == 0
    probe = load_checkpoint(tmp_path / "lp" / "model.safetensors")
    data = finetune.read_probe_embeddings([Entry(p, 0) for p in stored["videos"]], str(tmp_path / "lp" / "embeddings"),
                                          num_classes=4)
    batch = collate([data[i] for i in range(len(data))])
    assert batch["embeddings"].shape == (8, probe.config.width) and "clips" not in batch
    with pytest.raises(ValueError, match="time window"):
        finetune.embed_for_probe(probe, [Entry(stored["videos"][0], 0, 0.5, 1.0)], str(tmp_path / "w"))
    assert main([*common[:-6], "--out", str(tmp_path / "bad"), "--steps", "1", "--mixup", "0.8"]) == 1
    assert "not with --mixup" in capsys.readouterr().err


def test_finetune_command_perturbed_with_a_hard_phase(files, tmp_path):
    """``--sigma-decay 0.5``: sigma reaches 0 halfway; the run's record says
    so, and the score head trained (only the perturbed top-K reaches it)."""
    out = tmp_path / "stts"
    assert main(["finetune", "--data", files["data"], "--steps", "4", "--batch-size", "2", "--stride", "1",
                 "--init", files["pretrained"], "--out", str(out), "--selection", "perturbed", "--sigma", "0.1",
                 "--sigma-decay", "0.5", "--samples", "8", "--keep-ratio", "0.2"]) == 0
    assert json.load(open(out / "run.json"))["perturbed"] == [0.1, 2, 8]
    tuned, source = load_checkpoint(out / "model.safetensors"), load_checkpoint(files["pretrained"])
    head = [k for k in source.state_dict() if k.startswith("selector.score_head.")]
    assert head and any(not torch.equal(tuned.state_dict()[k], source.state_dict()[k]) for k in head)
    with pytest.raises(SystemExit) as usage:
        main(["finetune", "--data", files["data"], "--steps", "4", "--out", str(tmp_path / "bad"),
              "--selection", "perturbed", "--sigma-decay", "0"])
    assert usage.value.code == 2


def test_reskd_distills_a_low_resolution_student(files, tmp_path, capsys):
    teacher = build_model("internvideo2-b14", **{k.split("=")[0]: int(k.split("=")[1]) for k in DENSE},
                          num_classes=4)
    teacher = build_model(teacher.config.__class__(**{**teacher.config.to_dict(), "image_size": 64}))
    save_checkpoint(teacher, tmp_path / "teacher.safetensors")
    args = ["finetune", "--data", files["data"], "--steps", "2", "--batch-size", "2", "--stride", "1",
            "--distill-from", str(tmp_path / "teacher.safetensors"), "--distill-temperature", "2"]
    assert main([*args, "--preset", "internvideo2-b14", "--set", *DENSE, "--out", str(tmp_path / "dense")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "dense" / "log.jsonl")]
    assert set(rows[0]["losses"]) == {"task", "distill"} and rows[0]["losses"]["distill"] > 0
    assert main([*args, "--set", *SET[:1], "image_size=32", "patch_size=8", "width=32", "depth=1", "heads=2",
                 "selector_width=16", "context_projection=true", "selector_depth=1", "selector_heads=2", "score_hidden=16",
                 "--out", str(tmp_path / "lw")]) == 0
    assert main([*args, "--preset", "internvideo2-b14", "--set", *DENSE, "num_classes=3",
                 "--out", str(tmp_path / "wrong")]) == 1
    assert "classes" in capsys.readouterr().err


def test_views_cover_the_video():
    assert view_indices(40, 4, 2) == [2, 7, 12, 17, 22, 27, 32, 37]
    frames = torch.arange(2 * 20 * 60 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 20, 60, 3)
    crops = spatial_crops(frames, 20, 3)
    assert crops.shape == (3, 2, 20, 20, 3)
    assert torch.equal(crops[0], frames[:, :, :20]) and torch.equal(crops[2], frames[:, :, 40:])
    assert torch.equal(crops[1], frames[:, :, 20:40])


def test_evaluate_command_is_reproducible(files, tmp_path, capsys):
    model = build_model("lookwhen-b16", **SMALL, num_classes=4, seed=1)
    save_checkpoint(model, tmp_path / "m.safetensors")
    args = ["evaluate", "--data", files["data"], "--checkpoint", str(tmp_path / "m.safetensors"),
            "--views", "2x3", "--keep-ratio", "0.2", "--batch-size", "5"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr()
    assert "top-1" in out.out and "GMACs/view" in out.out and "broken.mp4" in out.err
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    first, second = json.load(open(tmp_path / "a.json")), json.load(open(tmp_path / "b.json"))
    assert first["top1"] == second["top1"] and first["top5"] == second["top5"]
    assert first["videos"] == 8 and first["views_per_video"] == 6 and len(first["failures"]) == 1
    assert 0 <= first["top1"] <= first["top5"] == 1.0  # 4 classes: the top five hold every class
    assert first["gmacs_per_view"] == pytest.approx(first["gflops_per_view"] / 2)
    assert (first["keep_ratio"], first["tokens_kept"]) == (0.2, model.config.tokens_kept(0.2))
    # Two ranks, each scoring half the videos: the same figures.
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29519", "-m", "lookwhen", *args, "--json", str(tmp_path / "ranks.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("top-1") == 1
    ranks = json.load(open(tmp_path / "ranks.json"))
    for key in ("top1", "top5", "videos", "failures"):
        assert ranks[key] == first[key], key
    # Without --keep-ratio the model runs at its own, and says so.
    assert main([*args[:-4], "--batch-size", "5", "--json", str(tmp_path / "c.json")]) == 0
    own = json.load(open(tmp_path / "c.json"))
    assert own["keep_ratio"] == model.config.keep_ratio and "0.25 (" in capsys.readouterr().out


def _manifest(files, tmp_path):
    videos = sorted(os.path.join(d, f) for d, _, fs in os.walk(files["data"]) for f in fs)
    manifest = tmp_path / "videos.txt"
    manifest.write_text("".join(f"{v}\n" for v in videos))
    return manifest, videos


def test_embed_manifest_killed_and_restarted_equals_an_uninterrupted_run(files, tmp_path):
    manifest, videos = _manifest(files, tmp_path)
    model = build_model("lookwhen-b16", frames=16, image_size=224, depth=4, seed=2)
    save_checkpoint(model, tmp_path / "m.safetensors")
    command = [sys.executable, "-m", "lookwhen", "embed", "--manifest", str(manifest), "--checkpoint",
               str(tmp_path / "m.safetensors"), "--shard-size", "2", "--batch-size", "1", "--workers", "0",
               "--with-selection"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    whole = subprocess.run([*command, "--out-dir", str(tmp_path / "whole")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 1, whole.stderr  # one unreadable video
    assert "embedded 8 videos" in whole.stdout and "1 unreadable" in whole.stdout

    cut = tmp_path / "cut"
    process = subprocess.Popen([*command, "--out-dir", str(cut)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "shard-00000.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards = sorted(p for p in os.listdir(cut) if p.endswith(".safetensors"))
    assert 1 <= len(shards) < 5, shards
    again = subprocess.run([*command, "--out-dir", str(cut)], env=env, capture_output=True, text=True, timeout=600)
    assert f"({len(shards)} already done)" in again.stdout, again.stdout + again.stderr
    expected, got = read_shards(str(tmp_path / "whole")), read_shards(str(cut))
    assert got["videos"] == expected["videos"] and len(got["videos"]) == 8
    for key in ("embeddings", "indices", "scores"):
        assert torch.equal(got[key], expected[key]), key
    failed = [p for p in os.listdir(cut) if p.endswith(".failed.tsv")]
    assert len(failed) == 1 and "broken.mp4" in open(cut / failed[0]).read()
    with safe_open(str(cut / "shard-00000.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["videos"]) == videos[:2]


def test_embed_manifest_refuses_another_run_in_the_same_folder(files, tmp_path, capsys):
    manifest, _ = _manifest(files, tmp_path)
    model = build_model("lookwhen-b16", **SMALL, seed=2)
    save_checkpoint(model, tmp_path / "m.safetensors")
    args = ["embed", "--manifest", str(manifest), "--checkpoint", str(tmp_path / "m.safetensors"), "--out-dir",
            str(tmp_path / "out"), "--shard-size", "4", "--workers", "1"]
    assert main(args) == 1
    # Run again, every shard done: still the exit status of a run with failures.
    assert main(args) == 1 and "1 unreadable" in capsys.readouterr().out
    assert main([*args[:-4], "--shard-size", "3", "--workers", "1"]) == 1
    assert "another run" in capsys.readouterr().err
    binary = tmp_path / "video.mp4"
    binary.write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe" * 8)
    assert main(["embed", "--manifest", str(binary), "--checkpoint", str(tmp_path / "m.safetensors"), "--out-dir",
                 str(tmp_path / "o2")]) == 1
    assert f"{binary}: not a text manifest" in capsys.readouterr().err
    # Another checkpoint of the same config: other weights, refused.
    with torch.no_grad():
        model.extractor.norm.weight.add_(1.0)
    save_checkpoint(model, tmp_path / "m.safetensors")
    assert main(args) == 1
    assert "another run (differs in weights)" in capsys.readouterr().err
    assert main(["embed", "--manifest", str(manifest), "--out", "x.npy"]) == 1
