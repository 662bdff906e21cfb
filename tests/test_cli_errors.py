"""Every failure of the command line is one line: ``lookwhen <command>:
error: ...`` (after argparse's usage line for bad arguments, or a
``skipped`` line per unreadable video) and a non-zero exit, never a
traceback. The walk below runs the CLI in-process through
bad files, bad values and impossible requests; an exception escaping
``main`` fails the test with its traceback."""
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from lookwhen import build_model
from lookwhen.cli import main
from lookwhen.data.synthetic import write_dataset
from lookwhen.io.checkpoint import save_checkpoint
from helpers import SMALL

pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    write_dataset(root / "data", 1, frames=4, size=32, object_size=8, seed=1)
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a video\n")
    (root / "junk.safetensors").write_bytes(b"\x00" * 64)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    save_file({"x": torch.zeros(2)}, str(root / "bare.safetensors"))
    model = build_model("lookwhen-b16", **SMALL)
    save_checkpoint(model, root / "model.safetensors")
    save_checkpoint(build_model("lookwhen-b16", **SMALL, num_classes=3), root / "classifier.safetensors")
    (root / "run").mkdir()
    return root


def _cases(root):
    data, model = str(root / "data"), str(root / "model.safetensors")
    train = ["--data", data, "--steps", "1", "--batch-size", "1", "--set", *[f"{k}={v}" for k, v in SMALL.items()]]
    return {
        "embed: no such video": ["embed", str(root / "missing.mp4"), "--out", str(root / "e.npy"), "--checkpoint",
                                 model],
        "embed: a text file": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--checkpoint", model],
        "embed: output kind": ["embed", str(root / "notes.txt"), "--out", str(root / "e.txt")],
        "embed: no such checkpoint": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--checkpoint",
                                      str(root / "missing.safetensors")],
        "embed: junk checkpoint": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--checkpoint",
                                   str(root / "junk.safetensors")],
        "embed: checkpoint without config": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"),
                                             "--checkpoint", str(root / "bare.safetensors")],
        "embed: keep ratio 0": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--keep-ratio", "0"],
        "embed: keep ratio text": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--keep-ratio",
                                   "most"],
        "embed: no GPU": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--device", "cuda:3"],
        "embed: bad device": ["embed", str(root / "notes.txt"), "--out", str(root / "e.npy"), "--device", "tpu"],
        "embed: binary manifest": ["embed", "--manifest", str(root / "binary.bin"), "--out-dir", str(root / "o")],
        "embed: no such manifest": ["embed", "--manifest", str(root / "missing.txt"), "--out-dir", str(root / "o")],
        "embed: output folder is a file": ["embed", "--manifest", str(root / "notes.txt"), "--out-dir",
                                           str(root / "notes.txt"), "--checkpoint", model],
        "show: no such video": ["show", str(root / "missing.mp4"), "--out", str(root / "s.png")],
        "show: unwritable output": ["show", str(root / "notes.txt"), "--out", "/proc/lookwhen/s.png",
                                    "--checkpoint", model],
        "info: keep ratio past 1": ["info", "--keep-ratio", "1.5"],
        "info: no such preset": ["info", "--preset", "vit-giant"],
        "pretrain: no such data": ["pretrain", "--data", str(root / "missing"), "--out", str(root / "p"),
                                   "--steps", "1", "--image-teacher", "vit_small_patch16_224"],
        "pretrain: empty data folder": ["pretrain", "--data", str(root / "empty"), "--out", str(root / "p"),
                                        "--steps", "1", "--image-teacher", "vit_small_patch16_224"],
        "pretrain: zero steps": ["pretrain", *train, "--out", str(root / "p"), "--steps", "0"],
        "pretrain: config value": ["pretrain", *train, "--out", str(root / "p"), "--set", "width=wide"],
        "pretrain: config field": ["pretrain", *train, "--out", str(root / "p"), "--set", "wings=2"],
        "pretrain: no teacher": ["pretrain", *train, "--out", str(root / "p")],
        "pretrain: unknown teacher": ["pretrain", *train, "--out", str(root / "p"), "--image-teacher",
                                      "no_such_model_in_timm"],
        "pretrain: teacher weights missing": ["pretrain", *train, "--out", str(root / "p"), "--image-teacher",
                                              "vit_small_patch16_224", "--image-teacher-weights",
                                              str(root / "missing.pt")],
        "pretrain: video teacher junk": ["pretrain", *train, "--out", str(root / "p"), "--image-teacher",
                                         "vit_small_patch16_224", "--video-teacher", str(root / "junk.safetensors")],
        "pretrain: resume nothing": ["pretrain", *train, "--out", str(root / "run"), "--image-teacher",
                                     "vit_small_patch16_224", "--resume"],
        "pretrain: no such target cache": ["pretrain", *train, "--out", str(root / "p"), "--targets",
                                           str(root / "missing")],
        "pretrain: junk init": ["pretrain", "--data", data, "--steps", "1", "--out", str(root / "p"), "--init",
                                str(root / "junk.safetensors"), "--image-teacher", "vit_small_patch16_224"],
        "finetune: no such data": ["finetune", "--data", str(root / "missing"), "--out", str(root / "f"),
                                   "--steps", "1"],
        "finetune: keep ratio past 1": ["finetune", *train, "--out", str(root / "f"), "--keep-ratio", "2"],
        "finetune: junk distillation teacher": ["finetune", *train, "--out", str(root / "f"), "--distill-from",
                                                str(root / "junk.safetensors")],
        "evaluate: no such checkpoint": ["evaluate", "--data", data, "--checkpoint",
                                         str(root / "missing.safetensors")],
        "evaluate: no classifier": ["evaluate", "--data", data, "--checkpoint", model],
        "evaluate: views": ["evaluate", "--data", data, "--checkpoint", str(root / "classifier.safetensors"),
                            "--views", "0x3"],
        "evaluate: views text": ["evaluate", "--data", data, "--checkpoint", str(root / "classifier.safetensors"),
                                 "--views", "many"],
        "evaluate: json unwritable": ["evaluate", "--data", data, "--checkpoint",
                                     str(root / "classifier.safetensors"), "--json", "/proc/lookwhen/e.json"],
        "cache-targets: no teacher": ["cache-targets", "--data", data, "--out", str(root / "c")],
        "cache-targets: no such data": ["cache-targets", "--data", str(root / "missing"), "--out", str(root / "c"),
                                        "--image-teacher", "vit_small_patch16_224"],
    }


CASES = sorted(_cases(pathlib.Path("/")))


@pytest.mark.parametrize("case", CASES)
def test_every_failure_is_one_line(files, case, capsys):
    argv = _cases(files)[case]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{case}: exit status {code}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    command = argv[0]
    assert lines and lines[-1].startswith(f"lookwhen {command}: error: "), err
    # Before it, at most one line per unreadable input ("skipped ...").
    assert all(line.startswith(f"lookwhen {command}: skipped ") for line in lines[:-1]), err
