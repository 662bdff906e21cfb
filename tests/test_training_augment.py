"""Augmentation as configuration: RandAugment and random erasing on the
uint8 clip path (the same on every frame), Mixup and CutMix with soft
targets, and an exponential moving average of the weights; a resumed run
ends where an uninterrupted one does. The ops take their CPU path."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lookwhen import build_model
from lookwhen.cli import main
from lookwhen.data.augment import OPERATIONS, Augment
from lookwhen.data.synthetic import write_dataset
from lookwhen.io.checkpoint import save_checkpoint
from lookwhen.training.droppath import add_drop_path
from lookwhen.training.engine import EMA_FILE, MODEL_FILE, WeightAverage, read_log
from lookwhen.training.finetune import draw_mix, mix_clips
from helpers import SMALL

pytestmark = pytest.mark.usefixtures("pytorch_cpu_path")


def _clip(frames=4, size=32, seed=0):
    """A clip whose frames are all the same picture."""
    picture = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return picture.expand(frames, size, size, 3).contiguous()


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_every_operation_keeps_the_clip_uint8_and_its_frames_alike(name):
    clip = _clip().permute(0, 3, 1, 2)
    out = OPERATIONS[name](clip, 0.9, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == clip.shape
    assert all(torch.equal(out[0], frame) for frame in out[1:])


def test_randaugment_and_erasing_are_drawn_from_the_clip_generator():
    augment = Augment(randaugment=(2, 9), erase=1.0)
    clip = _clip()
    one = augment(clip, torch.Generator().manual_seed(5))
    assert torch.equal(one, augment(clip, torch.Generator().manual_seed(5)))
    assert not torch.equal(one, clip) and one.shape == clip.shape and one.dtype == torch.uint8
    assert all(torch.equal(one[0], frame) for frame in one[1:])
    assert not Augment() and torch.equal(Augment()(clip, torch.Generator()), clip)
    for bad in (dict(randaugment=(0, 9)), dict(randaugment=(2, 11)), dict(erase=1.5)):
        with pytest.raises(ValueError):
            Augment(**bad)


def test_mixup_and_cutmix_mix_clips_and_targets_alike():
    clips = torch.stack([torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.full((2, 8, 8, 3), 200, dtype=torch.uint8)])
    targets = torch.eye(2)
    draws = {"mix_lam": torch.tensor([0.75, 0.75]), "mix_cut": torch.tensor([False, True]),
             "mix_cy": torch.tensor([0.5, 0.5]), "mix_cx": torch.tensor([0.5, 0.5])}
    out, soft = mix_clips(clips, targets, draws)
    assert torch.all(out[0] == 50) and torch.allclose(soft[0], torch.tensor([0.75, 0.25]))
    # CutMix: a 4 x 4 box (area 1 - 0.75) of clip 0 in clip 1, on every frame.
    pasted = (out[1] == 0).all(-1)
    assert int(pasted[0].sum()) == 16 and torch.equal(pasted[0], pasted[1])
    assert torch.allclose(soft[1], torch.tensor([0.25, 0.75]))
    drawn = draw_mix(torch.Generator().manual_seed(0), 64, mixup=0.8, cutmix=1.0, prob=0.5, switch=0.5)
    assert torch.equal(drawn["mix_lam"], draw_mix(torch.Generator().manual_seed(0), 64, mixup=0.8, cutmix=1.0,
                                                  prob=0.5, switch=0.5)["mix_lam"])
    unmixed = drawn["mix_lam"] == 1
    assert 10 < int(unmixed.sum()) < 54 and not drawn["mix_cut"][unmixed].any()


def test_weight_average():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    average.update()
    torch.testing.assert_close(average.state["weight"], start + 1.0)
    with average.swapped_in():
        torch.testing.assert_close(model.weight, start + 1.0)
    torch.testing.assert_close(model.weight, start + 2.0)


def test_drop_path_drops_whole_clips_while_training_only():
    clips = torch.randint(0, 256, (3, 8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = build_model("lookwhen-b16", **SMALL | {"depth": 3})
    dropped = build_model("lookwhen-b16", **SMALL | {"depth": 3})
    add_drop_path(dropped, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(clips).embedding, plain.eval()(clips).embedding)
        torch.manual_seed(1)
        one = dropped.train()(clips).embedding
        torch.manual_seed(1)
        assert torch.equal(one, dropped(clips).embedding)
        # The selection is the selector's, untouched: the same tokens.
        assert torch.equal(dropped(clips).indices, plain.train()(clips).indices)
        assert not torch.allclose(dropped(clips).embedding, plain(clips).embedding)
    with pytest.raises(ValueError, match="drop_path"):
        add_drop_path(plain, 1.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    write_dataset(root / "train", 2, task="colour", frames=10, size=72, object_size=16, seed=1)
    save_checkpoint(build_model("lookwhen-b16", **SMALL | {"depth": 2}, seed=3), root / "pretrained.safetensors")
    return root


def _finetune(files, out, steps, *extra):
    # A constant learning rate: a 2-step run resumed to 3 steps is then the
    # first 2 steps of a 3-step run.
    return main(["finetune", "--data", str(files / "train"), "--init", str(files / "pretrained.safetensors"),
                 "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--stride", "1", "--save-every", "1",
                 "--randaugment", "2", "9", "--erase", "0.5", "--mixup", "0.8", "--cutmix", "1.0",
                 "--ema", "0.9", "--drop-path", "0.5", "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-steps", "0", *extra])


def test_augmented_run_with_a_weight_average_resumes_exactly(files, tmp_path, capsys):
    assert _finetune(files, tmp_path / "whole", 3) == 0
    assert _finetune(files, tmp_path / "cut", 2) == 0
    assert _finetune(files, tmp_path / "cut", 3, "--resume") == 0
    for name in (MODEL_FILE, EMA_FILE):
        whole, cut = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert all(torch.equal(whole[key], cut[key]) for key in whole), name
    model, average = load_file(tmp_path / "whole" / MODEL_FILE), load_file(tmp_path / "whole" / EMA_FILE)
    assert any(not torch.equal(model[key], average[key]) for key in model)
    assert (tmp_path / "whole" / "checkpoints" / "step-000003" / EMA_FILE).is_file()
    run = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert run["sampling"]["augment"] == {"randaugment": [2, 9], "erase": 0.5}
    assert run["mix"] == {"mixup": 0.8, "cutmix": 1.0, "prob": 1.0, "switch": 0.5}
    assert [row["step"] for row in read_log(tmp_path / "cut" / "log.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    # Other augmentations would cut other clips: not the same run.
    assert main(["finetune", "--data", str(files / "train"), "--init", str(files / "pretrained.safetensors"),
                 "--out", str(tmp_path / "whole"), "--steps", "4", "--batch-size", "2", "--stride", "1",
                 "--resume"]) == 1
    assert "another sampling (augment)" in capsys.readouterr().err


def test_activation_checkpointing_trains_the_same_weights(tmp_path):
    """Recomputed blocks (drop-path included: its masks are drawn outside
    the recomputed part) give the same step as stored activations."""
    from lookwhen.training.engine import Trainer, TrainSettings
    from lookwhen.training.finetune import FinetuneTask
    from lookwhen.data.synthetic import SyntheticDataset

    weights = {}
    for recompute in (False, True):
        model = build_model("lookwhen-b16", **SMALL | {"depth": 2}, num_classes=3)
        task = FinetuneTask(model, keep_range=(0.1, 0.3), drop_path=0.5, mixup=0.8)
        settings = TrainSettings(out=str(tmp_path / str(recompute)), steps=2, batch_size=2, lr=1e-3, progress=False,
                                 checkpoint_activations=recompute)
        Trainer(task, SyntheticDataset(4, seed=1, frames=8, size=64, object_size=16, task="colour"), settings,
                log=lambda line: None).fit()
        weights[recompute] = model.state_dict()
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(value, build_model("lookwhen-b16", **SMALL | {"depth": 2}, num_classes=3)
                               .state_dict()[key]) for key, value in weights[True].items())
