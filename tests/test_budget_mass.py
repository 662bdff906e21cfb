"""``lookwhen embed --budget-mass``: per-clip budgets from the selector's
scores (budgets_from_scores), in the single-file and the sharded paths."""
import pytest
import torch
from safetensors import safe_open

import lookwhen_kernels as lk
from lookwhen.training.embed import embed_shards, read_shards
from lookwhen.data.video import read_clip
from lookwhen import build_model
from lookwhen.io.checkpoint import save_checkpoint
from lookwhen.models.selector import frame_scores
from helpers import TINY as BASE, make_video, run


TINY = dict(BASE, frames=4, depth=1, registers=4)

pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget_mass")
    model = build_model("lookwhen-b16", **TINY, seed=5)
    save_checkpoint(model, root / "tiny.safetensors")
    return {"checkpoint": str(root / "tiny.safetensors"), "model": model.eval(),
            "videos": [make_video(root / "a.mp4", 30, 80, 60), make_video(root / "b.mp4", 9, 64, 48),
                       make_video(root / "c.mp4", 2, 64, 64)]}


def _expected(model, paths, mass, temperature=1.0):
    clips = torch.stack([read_clip(p, 4, 64) for p in paths])
    with torch.no_grad():
        out = model(clips, budget_mass=mass, budget_temperature=temperature)
        scores = model.selector_scores(clips)
    cfg = model.config
    # The model's own layout: each selector frame's scores stand for the frames up to the next one.
    budgets = lk.budgets_from_scores(frame_scores(scores, cfg), mass=mass, temperature=temperature,
                                     grid=cfg.score_grid, out_grid=cfg.grid)
    return out, budgets


def test_embed_budget_mass_stores_packed_ids_and_their_budgets(files, capsys, tmp_path):
    out_file = tmp_path / "e.safetensors"
    videos = files["videos"]
    code, stdout, err = run(capsys, "embed", *videos, "--checkpoint", files["checkpoint"], "--batch-size", "2",
                            "--budget-mass", "0.5", "--with-selection", "--out", str(out_file))
    assert code == 0, err
    out, budgets = _expected(files["model"], videos, 0.5)
    assert torch.equal(out.cu_seqlens.diff(), budgets)
    with safe_open(str(out_file), "pt") as handle:
        assert torch.equal(handle.get_tensor("budgets"), budgets)
        assert torch.equal(handle.get_tensor("indices"), out.indices)
        torch.testing.assert_close(handle.get_tensor("embeddings"), out.embedding, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 1e-6])
def test_sharded_embedding_with_budget_mass(files, tmp_path, temperature):
    """A sharper softmax (temperature below 1) reaches the mass with fewer
    tokens; the shards hold the model's own budgets either way."""
    videos = files["videos"]
    summary = embed_shards(files["model"], videos, str(tmp_path), shard_size=2, batch_size=2, workers=0,
                           budget_mass=0.5, budget_temperature=temperature, with_selection=True,
                           log=lambda line: None)
    assert summary["embedded"] == 3
    table = read_shards(str(tmp_path))
    out, budgets = _expected(files["model"], videos, 0.5, temperature)
    assert torch.equal(table["budgets"], budgets) and torch.equal(table["indices"], out.indices)
    if temperature != 1.0:
        assert (budgets < _expected(files["model"], videos, 0.5)[1]).all()


def test_embed_budget_temperature(files, capsys, tmp_path):
    out_file = tmp_path / "t.safetensors"
    code, _, err = run(capsys, "embed", *files["videos"][:2], "--checkpoint", files["checkpoint"], "--batch-size",
                       "2", "--budget-mass", "0.5", "--budget-temperature", "1e-6", "--with-selection",
                       "--out", str(out_file))
    assert code == 0, err
    with safe_open(str(out_file), "pt") as handle:
        assert torch.equal(handle.get_tensor("budgets"), _expected(files["model"], files["videos"][:2], 0.5, 1e-6)[1])
    with pytest.raises(ValueError, match="budget_temperature"):
        files["model"](torch.zeros(1, 4, 64, 64, 3, dtype=torch.uint8), budget_temperature=0.5)
    with pytest.raises(ValueError, match="budget_temperature"):
        embed_shards(files["model"], files["videos"][:1], str(tmp_path / "shards"), budget_temperature=0.5)


@pytest.mark.parametrize("argv, message", [
    (["--budget-mass", "0.9", "--keep-ratio", "0.2"], "not both"),
    (["--budget-mass", "0.9", "--preset", "internvideo2-b14"], "dense model"),
    (["--budget-temperature", "0.5"], "only with --budget-mass"),
])
def test_bad_budget_mass_gives_one_line(files, capsys, tmp_path, argv, message):
    checkpoint = [] if "--preset" in argv else ["--checkpoint", files["checkpoint"]]
    code, _, err = run(capsys, "embed", files["videos"][0], *checkpoint, *argv, "--out", str(tmp_path / "x.npy"))
    assert code == 1 and len(err) == 1 and message in err[0]


def test_budget_mass_out_of_range_is_a_usage_error(files, capsys, tmp_path):
    code, _, err = run(capsys, "embed", files["videos"][0], "--budget-mass", "1.5", "--out", str(tmp_path / "x.npy"))
    assert code == 2 and "must lie in (0, 1]" in err[-1]
