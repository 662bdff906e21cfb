"""Watching and checking a run: progress lines in a log file, throughput,
data-wait share and MFU in log.jsonl and TensorBoard, validation every N
steps, checkpoints that hold the weights once, and DistributedDataParallel's
unused-parameter search only where a task needs it. The ops take their CPU
path (``TRITON_INTERPRET=0``)."""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from lookwhen import build_model
from lookwhen.cli import main
from lookwhen.data.datasets import collate
from lookwhen.data.synthetic import SyntheticDataset, write_dataset
from lookwhen.io.checkpoint import save_checkpoint
from lookwhen.training.engine import MODEL_FILE, STATE_FILE, read_log
from lookwhen.training.finetune import FinetuneTask
from lookwhen.training.pretrain import PretrainTask, knn_top1, uniqueness_recall
from lookwhen.training.teachers import ImageTeacher, Teachers
from helpers import SMALL

SET = [f"{k}={v}" for k, v in SMALL.items()]

pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    write_dataset(root / "train", 2, task="colour", frames=10, size=72, object_size=16, seed=1)
    write_dataset(root / "val", 1, task="colour", frames=10, size=72, object_size=16, seed=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, depth=2)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(root / "teacher.safetensors"))
    save_checkpoint(build_model("lookwhen-b16", **SMALL, seed=3), root / "pretrained.safetensors")
    return root


def _teacher_args(files):
    return ["--image-teacher", "vit_tiny_patch16_224", "--image-teacher-weights", str(files / "teacher.safetensors"),
            "--image-teacher-size", "64", "--image-teacher-arg", "depth=2"]


def _finetune(files, out, *extra):
    return main(["finetune", "--data", str(files / "train"), "--init", str(files / "pretrained.safetensors"),
                 "--out", str(out), "--steps", "3", "--batch-size", "2", "--stride", "1", "--save-every", "2",
                 *extra])


def test_a_logged_run_reports_progress_throughput_mfu_and_validation(files, tmp_path, capsys):
    """Every step's row has clips/s, the data-wait share and MFU; steps 2
    and 3 (--val-every 2, and the end) validate; stderr, not a terminal,
    gets plain progress lines; validating and watching change no weight."""
    assert _finetune(files, tmp_path / "plain") == 0
    capsys.readouterr()
    assert _finetune(files, tmp_path / "watched", "--log-every", "2", "--peak-tflops", "0.5",
                     "--val-manifest", str(files / "val"), "--val-every", "2") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"]
    assert "clips/s" in lines[0] and "data wait" in lines[0] and "MFU" in lines[0] and "val top1" in lines[0]
    rows = read_log(tmp_path / "watched" / "log.jsonl")
    for row in rows:
        assert row["clips_per_s"] > 0 and 0 <= row["data_wait"] <= 1 and row["flops"] > 1e6
        assert row["mfu"] == pytest.approx(row["flops"] / row["step_s"] / 0.5e12)
    assert [sorted(row.get("val", {})) for row in rows] == [[], ["top1", "top5"], ["top1", "top5"]]
    assert 0 <= rows[-1]["val"]["top1"] <= 1
    watched, plain = load_file(tmp_path / "watched" / MODEL_FILE), load_file(tmp_path / "plain" / MODEL_FILE)
    assert all(torch.equal(watched[key], plain[key]) for key in plain)


def test_tensorboard_holds_the_losses_throughput_and_validation(files, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(files / "train"), *_teacher_args(files), "--set", *SET,
                 "--out", str(out), "--steps", "2", "--batch-size", "2", "--stride", "1", "--tensorboard",
                 "--val-manifest", str(files / "val")]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/selector", "loss/patch", "optim/lr", "perf/clips_per_s", "perf/data_wait",
            "val/recall", "val/knn_top1"} <= tags
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2]
    assert [event.step for event in events.Scalars("val/recall")] == [2]
    row = read_log(out / "log.jsonl")[-1]
    assert events.Scalars("loss/total")[-1].value == pytest.approx(row["loss"])
    assert 0 <= row["val"]["recall"] <= 1 and 0 <= row["val"]["knn_top1"] <= 1


def test_validation_metrics():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.0, 0.1, 0.2, 0.3]])
    assert uniqueness_recall(scores, scores, 0.5) == [1.0, 1.0]
    assert uniqueness_recall(scores, -scores, 0.5) == [0.0, 0.0]
    assert uniqueness_recall(scores, torch.tensor([[1.0, 0, 0, 2], [0, 0, 1, 2]]), 0.5) == [0.5, 1.0]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    clusters = torch.eye(2)[labels] + 0.01 * torch.randn(6, 2)
    assert knn_top1(clusters, labels) == 1.0
    assert knn_top1(clusters, torch.tensor([0, 1, 0, 1, 0, 1])) < 0.5


def test_train_state_holds_the_weights_once(files, tmp_path):
    """The train state references model.safetensors instead of holding the
    model's weights again; resuming reads both (tests/test_training.py
    checks that a resumed run ends bit for bit where an uninterrupted one does)."""
    assert _finetune(files, tmp_path / "run") == 0
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    state = torch.load(folder / STATE_FILE, weights_only=True)
    weights = load_file(folder / MODEL_FILE)
    assert "module" not in state and state["model_file"] == MODEL_FILE and state["model_prefix"] == "model."
    assert not {key.removeprefix("model.") for key in state["module_rest"]} & set(weights)
    assert main(["finetune", "--data", str(files / "train"), "--init", str(files / "pretrained.safetensors"),
                 "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "2", "--stride", "1",
                 "--resume"]) == 0


def test_unused_parameter_search_only_where_a_step_leaves_some_unused(files):
    """What each task declares matches what a step does: the parameters
    that require a gradient and get none."""
    teachers = Teachers(ImageTeacher("vit_tiny_patch16_224", str(files / "teacher.safetensors"), image_size=64,
                                     depth=2), None)
    batch = collate([SyntheticDataset(2, seed=1, frames=8, size=64, object_size=16, task="colour")[i]
                     for i in range(2)])
    dense = dict(frames=8, image_size=32, patch_size=8, width=32, depth=1, heads=2, pool_heads=2, num_classes=3)
    tasks = {
        "pretrain": PretrainTask(build_model("lookwhen-b16", **SMALL), teachers=teachers),
        "pretrain selector": PretrainTask(build_model("lookwhen-b16", **SMALL), teachers=teachers, train="selector"),
        "finetune": FinetuneTask(build_model("lookwhen-b16", **SMALL, num_classes=3)),
        "random": FinetuneTask(build_model("lookwhen-b16", **SMALL, num_classes=3), selection="random",
                               keep_ratio=0.25),
        "linear probe": FinetuneTask(build_model("lookwhen-b16", **SMALL, num_classes=3), linear_probe=True),
        "perturbed": FinetuneTask(build_model("lookwhen-b16", **SMALL, num_classes=3), selection="perturbed",
                                  keep_ratio=0.25, sigma_steps=2, n_samples=4),
        "dense": FinetuneTask(build_model("internvideo2-b14", **dense)),
    }
    declared, found = {}, {}
    for name, task in tasks.items():
        loss, _ = task.module(batch, task.draw(torch.Generator().manual_seed(0), 2))
        loss.backward()
        found[name] = any(p.requires_grad and p.grad is None for p in task.module.parameters())
        declared[name] = task.unused_parameters(forwards=2)
    assert declared == found
    # Past sigma's decay the perturbed run trains on the hard top-K.
    assert tasks["perturbed"].unused_parameters(forwards=3)


def test_watch_options_report_bad_input(files, tmp_path, capsys):
    assert _finetune(files, tmp_path / "a", "--val-every", "2") == 1
    assert "--val-every" in capsys.readouterr().err
    for flag, value in (("--peak-tflops", "0"), ("--log-every", "0")):
        with pytest.raises(SystemExit):
            _finetune(files, tmp_path / "b", flag, value)
        assert flag in capsys.readouterr().err
