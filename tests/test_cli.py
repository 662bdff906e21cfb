"""The ``lookwhen`` command end to end on generated videos.

Commands run in-process through ``lookwhen.cli.main`` (one test goes through
the installed console script). The ops take their CPU path here
(``TRITON_INTERPRET=0``): the commands are plumbing, and the real-size
presets would take minutes in the interpreter.
"""
import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lookwhen import build_model
from lookwhen.io.checkpoint import save_checkpoint
from lookwhen.models.picture import DIM, GAP
from lookwhen.data.video import read_clip
from helpers import TINY as BASE, make_video, run

TINY = dict(BASE, frames=4, depth=1, registers=4)


pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_model("lookwhen-b16", **TINY, seed=5)
    checkpoint = root / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    bad = root / "bad.mp4"
    bad.write_text("not a video")
    return {
        "checkpoint": str(checkpoint),
        "model": model.eval(),
        "videos": [make_video(root / "a.mp4", 30, 80, 60), make_video(root / "b.webm", 9, 51, 67, "vp9"),
                   make_video(root / "c.mp4", 2, 64, 64)],
        "bad": str(bad),
        "root": root,
    }


@pytest.mark.parametrize("decoder, workers", [("pyav", "2"), ("decord", "0")])
def test_embed_npy_skips_bad_files_and_keeps_the_rest(files, capsys, tmp_path, decoder, workers):
    """Decoded in worker processes or in this one, by either decoder: the
    same embeddings, in order, as the clips read here."""
    out = tmp_path / "e.npy"
    a, b, c = files["videos"]
    code, stdout, err = run(capsys, "embed", a, files["bad"], b, c, "--checkpoint", files["checkpoint"],
                            "--batch-size", "2", "--decoder", decoder, "--workers", workers, "--out", str(out))
    assert code == 1
    assert [line for line in err if files["bad"] in line] == [f"lookwhen embed: skipped {files['bad']}: "
                                                              "not a readable video (unknown format, or the "
                                                              "file is truncated or corrupt)"]
    assert "wrote 3 embeddings" in stdout and "1 videos skipped" in stdout
    table = np.load(out)
    model = files["model"]
    clips = torch.stack([read_clip(p, 4, 64) for p in (a, b, c)])
    with torch.no_grad():
        expected = model(clips).embedding
    np.testing.assert_allclose(table, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_embed_safetensors_with_the_real_preset(files, capsys, tmp_path):
    """No checkpoint: the default preset, randomly initialised, says so in one line."""
    out = tmp_path / "e.safetensors"
    video = files["videos"][0]
    code, stdout, err = run(capsys, "embed", video, "--keep-ratio", "0.2", "--out", str(out))
    assert code == 0
    assert err == ["lookwhen: no --checkpoint: lookwhen-b16 weights are randomly initialised (seed 0)"]
    with safe_open(str(out), "pt") as handle:
        assert handle.get_tensor("embeddings").shape == (1, 768)
        assert handle.get_tensor("indices").shape == (1, round(0.2 * 3136))
        assert handle.get_tensor("scores").shape == (1, 392)
        meta = handle.metadata()
    assert json.loads(meta["videos"]) == [video] and json.loads(meta["failed"]) == []


def test_show_writes_the_picture(files, capsys, tmp_path):
    out = tmp_path / "selection.png"
    video = files["videos"][1]
    code, stdout, err = run(capsys, "show", video, "--checkpoint", files["checkpoint"], "--out", str(out))
    assert code == 0 and err == []
    picture = np.asarray(Image.open(out).convert("RGB"))
    frames, size = TINY["frames"], TINY["image_size"]
    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    assert picture.shape == (rows * size, 2 * cols * size + GAP, 3)
    assert f"({2 * cols * size + GAP}x{rows * size})" in stdout
    # Left panel: selected patches untouched, the rest dimmed.
    clip = read_clip(video, frames, size)
    with torch.no_grad():
        chosen = files["model"](clip[None]).indices[0].long()
    grid = size // 16
    keep = torch.zeros(frames * grid * grid, dtype=torch.bool)
    keep[chosen] = True
    keep = keep.view(frames, grid, grid).repeat_interleave(16, 1).repeat_interleave(16, 2)
    expected = torch.where(keep[..., None], clip.float(), (clip.float() * DIM).round()).byte()
    for t in range(frames):
        top, left = (t // cols) * size, (t % cols) * size
        assert np.array_equal(picture[top: top + size, left: left + size], expected[t].numpy())
    assert (picture[:, cols * size: cols * size + GAP] == 255).all()


def test_info_reports_flops_of_both_models(capsys):
    code, stdout, err = run(capsys, "info")
    assert code == 0 and err == []
    rows = {line.split()[0]: line for line in stdout.splitlines()}
    assert "GFLOPs/clip  GMACs/clip" in stdout
    gflops = {name: float(rows[name].split()[-2]) for name in ("lookwhen-b16", "internvideo2-b14")}
    for name, value in gflops.items():
        assert float(rows[name].split()[-1]) == pytest.approx(value / 2, abs=0.06)
    assert "314 (0.1) + 6 context" in rows["lookwhen-b16"]
    assert "108.0M" in rows["lookwhen-b16"] and "38.8" in rows["lookwhen-b16"].split()[-1]
    assert "3136 (selector 392)" in rows["lookwhen-b16"] and "2048 + CLS" in rows["internvideo2-b14"]
    ratio = float(re.search(r"FLOPs ratio internvideo2-b14 / lookwhen-b16: ([\d.]+)x", stdout).group(1))
    assert ratio == pytest.approx(gflops["internvideo2-b14"] / gflops["lookwhen-b16"], rel=0.01)
    assert ratio > 5


@pytest.mark.parametrize("argv, code, message", [
    ([], 2, "the following arguments are required"),
    (["embed", "--out", "x.npy"], 2, "the following arguments are required: VIDEO"),
    (["info", "--preset", "vit-huge"], 2, "invalid choice"),
    (["show", "{video}", "--preset", "internvideo2-b14", "--out", "x.png"], 2, "invalid choice"),
    (["embed", "{video}", "--keep-ratio", "1.5", "--out", "x.npy"], 2, "must lie in (0, 1]"),
    (["embed", "{video}", "--keep-ratio", "lots", "--out", "x.npy"], 2, "not a number"),
    (["embed", "{video}", "--batch-size", "0", "--out", "x.npy"], 2, "at least 1"),
    (["embed", "{video}", "--preset", "lookwhen-b16", "--checkpoint", "{checkpoint}", "--out", "x.npy"], 2,
     "not allowed with"),
    (["embed", "{video}", "--out", "x.txt"], 1, "expected a file ending in .npy or .safetensors"),
    (["embed", "{video}", "--out", "/no/such/folder/x.npy"], 1, "does not exist"),
    (["embed", "{video}", "--preset", "internvideo2-b14", "--keep-ratio", "0.1", "--out", "x.npy"], 1,
     "dense model"),
    (["embed", "{video}", "--device", "cuda", "--out", "x.npy"], 1, "CUDA is not available"),
    (["embed", "{video}", "--device", "toaster", "--out", "x.npy"], 1, "unknown device"),
    (["embed", "{video}", "--checkpoint", "{root}/none.safetensors", "--out", "x.npy"], 1, "no such checkpoint"),
    (["embed", "{video}", "--checkpoint", "{bad}", "--out", "x.npy"], 1, "not a safetensors file"),
    (["show", "{root}/missing.mp4", "--checkpoint", "{checkpoint}", "--out", "x.png"], 1, "no such file"),
    (["show", "{bad}", "--checkpoint", "{checkpoint}", "--out", "x.png"], 1, "not a readable video"),
    (["show", "{video}", "--checkpoint", "{checkpoint}", "--out", "x.jpg"], 1, "expected a file ending in .png"),
])
def test_bad_input_gives_one_line(files, capsys, tmp_path, monkeypatch, argv, code, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    names = {"video": files["videos"][0], "checkpoint": files["checkpoint"], "bad": files["bad"],
             "root": str(files["root"])}
    got_code, stdout, err = run(capsys, *[a.format(**names) for a in argv])
    assert got_code == code
    assert len(err) == 1 and message in err[0] and err[0].startswith("lookwhen")
    assert "Traceback" not in stdout and not list(tmp_path.iterdir())


def test_embed_with_no_readable_video_writes_nothing(files, capsys, tmp_path):
    out = tmp_path / "e.npy"
    code, stdout, err = run(capsys, "embed", files["bad"], str(tmp_path / "gone.mp4"),
                            "--checkpoint", files["checkpoint"], "--out", str(out))
    assert code == 1 and not out.exists()
    assert len(err) == 3 and "none of the 2 videos could be read" in err[-1]


def test_console_script():
    # The script pip installed beside this interpreter: a venv's bin/ is on
    # PATH only when the venv is activated.
    script = shutil.which("lookwhen", path=sysconfig.get_path("scripts")) or shutil.which("lookwhen")
    assert script is not None, "the `lookwhen` console script is not installed"
    result = subprocess.run([script, "info", "--keep-ratio", "7"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lookwhen info: error: argument --keep-ratio: must lie in (0, 1], got 7.0"
    ]


_HEAVY = ("timm", "lookwhen_kernels", "torch._inductor")


def _modules_after(code: str) -> list:
    probe = code + f"\nimport sys\nprint([m for m in {_HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return eval(out.strip().splitlines()[-1])


def test_import_lookwhen_is_lazy():
    # The public names are imported on first use (PEP 562); they still work.
    assert _modules_after("import lookwhen, lookwhen.models") == []
    import lookwhen
    import lookwhen.models
    assert set(lookwhen.__all__) <= set(dir(lookwhen))
    assert "build_model" in dir(lookwhen.models) and lookwhen.build_model is lookwhen.models.build_model


def test_help_imports_no_heavy_modules():
    code = ("import sys, runpy\nsys.argv = ['lookwhen', '--help']\n"
            "try:\n    runpy.run_module('lookwhen', run_name='__main__')\nexcept SystemExit:\n    pass")
    assert _modules_after(code) == []
