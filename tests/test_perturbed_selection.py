"""LookWhen with STTS's differentiable top-K (``sigma``), the STTS score
head, and ``finetune --selection perturbed``. The ops take their CPU path."""
import pytest
import torch

from lookwhen import build_model
from lookwhen.models.config import get_config
from lookwhen.training.finetune import FinetuneTask
from lookwhen.models.selector import STTSScoreHead
from lookwhen.data.synthetic import SyntheticDataset
from lookwhen.training.engine import Trainer, TrainSettings
from helpers import TINY as BASE

TINY = dict(BASE, frames=4, depth=1, num_classes=3)


pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


def _clip(batch=2):
    return torch.randint(0, 256, (batch, 4, 64, 64, 3), dtype=torch.uint8)


@pytest.mark.parametrize("head", ["mlp", "stts"])
def test_sigma_zero_is_the_hard_top_k_and_noise_trains_the_score_head(head):
    model = build_model("lookwhen-b16", **TINY, score_head=head, seed=1)
    clip = _clip()
    hard, soft = model(clip), model(clip, sigma=0.0)
    assert torch.equal(hard.indices, soft.indices)
    torch.testing.assert_close(soft.logits, hard.logits, rtol=0, atol=1e-6)
    model(clip, sigma=0.0).logits.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.selector.score_head.parameters())
    model.zero_grad()
    model(clip, sigma=0.05, n_samples=40).logits.sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.selector.score_head.parameters())


def test_stts_head_scores_are_min_max_normalised_per_clip():
    head = STTSScoreHead(16, 1e-6)
    scores = head(torch.randn(3, 10, 16))
    assert scores.dtype == torch.float32 and scores.shape == (3, 10)
    assert torch.allclose(scores.amin(1), torch.zeros(3)) and bool((scores.amax(1) < 1).all())
    assert scores.amax(1).min() > 0.99
    # The clip-mean half: one token's features change every token's score.
    x = torch.randn(1, 10, 16)
    y = x.clone()
    y[0, 0] = torch.randn(16)
    assert not torch.allclose(head(x)[0, 1:], head(y)[0, 1:])


def test_config_refuses_an_unknown_head():
    with pytest.raises(ValueError, match="score_head"):
        get_config("lookwhen-b16", score_head="conv")
    assert get_config("lookwhen-b16").score_head == "mlp"


def test_sigma_refuses_other_selections():
    model = build_model("lookwhen-b16", **TINY)
    with pytest.raises(ValueError, match="sigma"):
        model(_clip(), budgets=[3, 4], sigma=0.05)


def test_finetune_perturbed_decays_sigma_and_resumes_the_schedule(tmp_path):
    model = build_model("lookwhen-b16", **TINY, seed=2)
    task = FinetuneTask(model, keep_ratio=0.25, selection="perturbed", sigma=0.05, sigma_steps=4, n_samples=20)
    module = task.module
    assert module.sigma() == pytest.approx(0.05)
    data = SyntheticDataset(8, frames=4, size=64, task="colour")
    settings = TrainSettings(out=str(tmp_path / "run"), steps=2, batch_size=2, lr=1e-3, save_every=1, progress=False)
    before = [p.detach().clone() for p in model.selector.score_head.parameters()]
    Trainer(task, data, settings, log=lambda line: None).fit()
    assert int(module.forwards) == 2 and module.sigma() == pytest.approx(0.025)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.selector.score_head.parameters()))
    # A resumed run restores the forwards seen, so the schedule continues.
    again = FinetuneTask(build_model("lookwhen-b16", **TINY, seed=2), keep_ratio=0.25, selection="perturbed",
                         sigma=0.05, sigma_steps=4, n_samples=20)
    resumed = TrainSettings(out=str(tmp_path / "run"), steps=4, batch_size=2, lr=1e-3, save_every=1, progress=False,
                            resume=True)
    Trainer(again, data, resumed, log=lambda line: None).fit()
    assert int(again.module.forwards) == 4 and again.module.sigma() == 0.0
    # Past the decay a training forward takes the hard top-K's own path (no candidate embedding).
    batch = {"clips": torch.stack([data[i]["clip"] for i in range(2)]), "labels": torch.tensor([0, 1])}
    def no_soft_tokens(*args, **kwargs):
        raise AssertionError("the soft selection ran at sigma 0")
    again.model()._soft_tokens = no_soft_tokens
    again.module.train()(batch, None)
    assert int(again.module.forwards) == 5
    # Evaluation (eval mode) takes the hard top-K and leaves the schedule alone.
    again.module.eval()
    again.module(batch, None)
    assert int(again.module.forwards) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(selection="perturbed"), "sigma_steps"),
    (dict(selection="perturbed", sigma_steps=5, keep_range=(0.1, 0.2)), "fixed number"),
    (dict(selection="perturbed", sigma_steps=5, sigma=-1.0), "sigma"),
    (dict(selection="perturbed", sigma_steps=5, linear_probe=True), "linear_probe"),
])
def test_finetune_perturbed_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneTask(build_model("lookwhen-b16", **TINY), **kwargs)
