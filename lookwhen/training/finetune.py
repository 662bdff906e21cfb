"""Fine-tuning for classification, on the training engine.

- A classifier on the embedding (the model's ``num_classes`` head),
  cross-entropy with label smoothing; for a multi-label data set (Charades:
  a clip holds several actions, or none) binary cross-entropy with logits,
  one independent yes/no per class, without smoothing. The data set decides
  (:attr:`lookwhen.data.datasets.Annotations.multi_label`). AdamW with **layer-wise learning-rate
  decay** (the usual ViT recipe: block ``i`` of ``L`` learns at
  ``decay ** (L - i)`` times the rate, the embeddings and the selector at
  ``decay ** (L + 1)``, the final norm and the head at the full rate).
- LookWhen keeps a fixed ratio of its tokens or draws a budget per clip from
  a range each step; ``selection="random"`` replaces the selector's choice by
  uniformly random tokens (the control that shows what selection is worth);
  ``window=(h, w)`` keeps, per frame, the window of tokens where the
  selector's scores sum highest (Uni-AdaFocus's one patch per frame);
  ``selection="perturbed"`` trains with STTS's differentiable top-K, so the
  selector learns from the task loss alone: sigma decays linearly from
  ``sigma`` (0.05) to 0 over ``sigma_steps`` training forwards (STTS: the
  whole run, steps x accumulation; ``finetune --sigma-decay`` gives a
  fraction of it), the forwards after it train on the hard top-K, and
  evaluation (the saved model) uses the hard top-K. ``selection="motion"``
  keeps the tokens that move fastest by the codec's motion vectors
  (:mod:`lookwhen.data.motion`), which the data set gives with each clip
  (:class:`~lookwhen.data.motion.WithMotion`); the selector does not run.
- **Mixup and CutMix** (``mixup``/``cutmix``: the Beta distributions'
  alpha, 0 off; timm's recipe): with probability ``mix_prob`` a clip is
  mixed with its partner in the micro-batch (the batch reversed), by
  Mixup (a weighted sum of the two clips, weight ``lam ~ Beta(alpha,
  alpha)``) or CutMix (a box of area ``1 - lam`` pasted from the partner on
  every frame, ``lam`` recomputed from the box as clipped to the frame),
  CutMix with probability ``mix_switch`` when both are on; the targets are
  mixed alike (soft targets: cross-entropy against the mixture, or binary
  cross-entropy for multi-label data). The draws are per clip, from the
  engine's generator, so a resumed run mixes the same clips. The mixed
  clip is rounded back to uint8, the model's input.
- ``drop_path``: stochastic depth on the extractor's (or the dense
  model's) blocks, at most ``drop_path`` at the last block
  (:mod:`lookwhen.training.droppath`).
- ``linear_probe``: the selector and the extractor are frozen, the head alone
  trains (the papers' LP rows). :func:`embed_for_probe` embeds the
  training videos once (resumable shards, each video's centre clip), and
  the probe trains on those embeddings (:class:`EmbeddingDataset`), with no
  decoding or model forward per step.
- **Cross-resolution distillation** (ResKD): with a teacher model that sees
  the clip at a higher resolution, the loss is ``(1 - alpha) * CE(student,
  labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``;
  the data are sampled at the teacher's resolution and the student's input is
  the same clip resized down to its own. Dense students (the baseline at 112
  px from the same at 224 px) and LookWhen students both work.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lookwhen_kernels as lk
from lookwhen.data.video import fit_clips
from lookwhen.io.checkpoint import load_checkpoint
from lookwhen.models import build_model
from lookwhen.models.config import get_config
from lookwhen.models.lookwhen import LookWhen
from lookwhen.training.droppath import add_drop_path
from lookwhen.training.engine import Task
from lookwhen.training.embed import embed_shards, read_shards
from lookwhen.training.evaluate import classifier_of, evaluate, logits_of
from lookwhen.training.losses import draw_budgets

SELECTIONS = ("selector", "random", "perturbed", "motion")


def sigma_decay_steps(fraction: float, forwards: int) -> int:
    """The training forwards over which sigma decays: ``fraction`` of the
    run's ``forwards`` (steps x accumulation), at least one."""
    return max(1, round(fraction * forwards))


def random_selection(generator: torch.Generator, batch: int, n_tokens: int, k: int) -> torch.Tensor:
    """int32 ``[batch, k]``: ``k`` distinct token ids per clip, uniformly at
    random, ascending (the selection contract)."""
    noise = torch.rand((batch, n_tokens), generator=generator)
    return lk.topk_tokens(noise, k)


def layer_id(name: str, depth: int) -> int:
    """Layer of a LookWhen or dense-model parameter for layer-wise decay:
    0 for the embeddings and the selector, ``i + 1`` for block ``i``,
    ``depth + 1`` for the final norm, the pooling head and the classifier."""
    block = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if name.startswith("selector.") or not block and re.search(r"(patch_embed|pos_embed|cls_token)", name):
        return 0
    if block:
        return int(block.group(1)) + 1
    return depth + 1


_HEAD = ("head.weight", "head.bias")
# The per-clip draws of Mixup and CutMix (:func:`draw_mix`).
MIX_KEYS = ("mix_lam", "mix_cut", "mix_cy", "mix_cx")


def draw_mix(generator: torch.Generator, batch: int, *, mixup: float, cutmix: float, prob: float,
             switch: float) -> Dict[str, torch.Tensor]:
    """Per clip: ``mix_lam`` (the clip's own share; 1: not mixed), ``mix_cut``
    (CutMix rather than Mixup) and the box centre ``mix_cy``, ``mix_cx`` as
    fractions of the frame."""
    # torch's Beta has no generator argument; NumPy's, seeded from ours, does.
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    mixed = torch.rand(batch, generator=generator) < prob
    cut = torch.rand(batch, generator=generator) < switch if mixup > 0 and cutmix > 0 else torch.full(
        (batch,), cutmix > 0)
    alpha = np.where(cut.numpy(), cutmix or 1.0, mixup or 1.0)
    lam = torch.from_numpy(rng.beta(alpha, alpha)).float()
    return {"mix_lam": torch.where(mixed, lam, torch.ones(batch)), "mix_cut": cut & mixed,
            "mix_cy": torch.rand(batch, generator=generator), "mix_cx": torch.rand(batch, generator=generator)}


def mix_clips(clips: torch.Tensor, targets: torch.Tensor, draws: Dict[str, torch.Tensor]):
    """Mixup and CutMix of uint8 ``clips [B, T, H, W, 3]`` with their partners
    (the batch reversed) and of float ``targets [B, C]`` alike."""
    partner_clips, partner_targets = clips.flip(0), targets.flip(0)
    lam = draws["mix_lam"].clone()
    height, width = clips.shape[2:4]
    out = clips.clone()
    for b in range(len(clips)):
        if bool(draws["mix_cut"][b]):
            side = float((1 - lam[b]).sqrt())
            cy, cx = float(draws["mix_cy"][b]) * height, float(draws["mix_cx"][b]) * width
            top, bottom = (max(0, min(height, round(cy + sign * side * height / 2))) for sign in (-1, 1))
            left, right = (max(0, min(width, round(cx + sign * side * width / 2))) for sign in (-1, 1))
            out[b, :, top:bottom, left:right] = partner_clips[b, :, top:bottom, left:right]
            lam[b] = 1 - (bottom - top) * (right - left) / (height * width)
        elif lam[b] < 1:
            out[b] = (lam[b] * clips[b].float() + (1 - lam[b]) * partner_clips[b].float()).round().to(torch.uint8)
    weight = lam.to(targets.dtype)[:, None]
    return out, weight * targets + (1 - weight) * partner_targets


def finetune_model(num_classes: int, *, preset: str = "lookwhen-b16", init: Optional[str] = None,
                   overrides: Optional[Dict] = None) -> nn.Module:
    """The model to fine-tune: ``preset`` (random), or the weights of the
    checkpoint ``init`` with its config given ``num_classes`` (a new
    classifier when the count differs); ``overrides`` change the config
    either way (a ``num_classes`` among them wins)."""
    overrides = {"num_classes": num_classes, **(overrides or {})}
    if init is None:
        return build_model(preset, **overrides)
    source = load_checkpoint(init)
    model = build_model(get_config(source.config, **overrides))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(_HEAD)
             or model.state_dict()[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = [k for k in missing if not k.endswith(_HEAD)]
    if new or unexpected:
        raise ValueError(f"{init}: its weights do not fit the fine-tuning config "
                         f"(missing {new[:3]}, unexpected {unexpected[:3]})")
    return model


class EmbeddingDataset(torch.utils.data.Dataset):
    """Embeddings computed once, ``float [N, D]``, with their labels (class
    ids, or multi-hot rows), as training samples (``embeddings`` in place of
    a clip): what a linear probe trains on."""

    def __init__(self, embeddings: torch.Tensor, labels: Sequence):
        if len(embeddings) != len(labels):
            raise ValueError(f"{len(embeddings)} embeddings and {len(labels)} labels")
        self.embeddings, self.labels = embeddings, list(labels)

    def __len__(self) -> int:
        return len(self.embeddings)

    def set_epoch(self, epoch: int) -> None:
        """The embeddings do not change between epochs."""

    def __getitem__(self, index: int) -> Dict:
        return {"embeddings": self.embeddings[index], "label": self.labels[index], "index": index, "view": 0,
                "skipped": []}


# Videos per shard of the probe's embeddings (a restart redoes at most one).
PROBE_SHARD_SIZE = 1000


def embed_for_probe(model: nn.Module, entries, folder: str, *, keep_ratio: Optional[float] = None,
                    batch_size: int = 8, workers: int = 2, device: torch.device = torch.device("cpu"),
                    decoder: str = "auto", rank: int = 0, world: int = 1, progress=None, log=print) -> Dict:
    """Embed each entry's video once with the frozen ``model`` (its centre
    clip; LookWhen at ``keep_ratio``) into resumable shards under
    ``folder`` (:func:`lookwhen.training.embed.embed_shards`, pinned to the
    weights: a restart embeds only what is missing); unreadable videos are
    left out and logged. Under ``torchrun`` each rank embeds its share:
    wait for every rank before :func:`read_probe_embeddings`."""
    windowed = [e.path for e in entries if e.start is not None or e.end is not None]
    if windowed:
        raise ValueError(f"the linear probe embeds whole videos, but {len(windowed)} entries cut a time window "
                         f"(first: {windowed[0]})")
    return embed_shards(model, [e.path for e in entries], folder, shard_size=PROBE_SHARD_SIZE,
                        batch_size=batch_size, workers=workers, keep_ratio=keep_ratio, device=device, rank=rank,
                        world=world, decoder=decoder, progress=progress, log=log)


def read_probe_embeddings(entries, folder: str, *, num_classes: int, multi_label: bool = False) -> EmbeddingDataset:
    """The shards :func:`embed_for_probe` wrote, with the entries' labels."""
    label_of = {e.path: e.label for e in entries}
    stored = read_shards(folder)
    if not stored["videos"]:
        raise ValueError(f"{folder}: no video could be embedded")
    labels = []
    for path in stored["videos"]:
        label = label_of[path]
        if multi_label:
            row = torch.zeros(num_classes)
            row[list(label)] = 1.0
            label = row
        labels.append(label)
    return EmbeddingDataset(stored["embeddings"].float(), labels)


class FinetuneModule(nn.Module):
    def __init__(self, model: nn.Module, *, keep_ratio: Optional[float], label_smoothing: float,
                 teacher: Optional[nn.Module], temperature: float, alpha: float,
                 perturbed: Optional[Tuple[float, int, int]] = None, multi_label: bool = False, window=None,
                 motion: bool = False):
        super().__init__()
        self.model = model
        self.motion = motion
        self.multi_label = multi_label
        # (sigma at the start, training forwards over which it decays to 0,
        # samples); the forwards seen so far are state, so a resumed run
        # continues the schedule.
        self.perturbed = perturbed
        if perturbed is not None:
            self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))
        self.keep_ratio = keep_ratio
        self.window = window
        self.label_smoothing = label_smoothing
        self.temperature = temperature
        self.alpha = alpha
        # Frozen and never saved with the student.
        self.__dict__["teacher"] = teacher

    def forward(self, batch: Dict, draws: Optional[Dict]):
        device = next(self.model.parameters()).device
        labels = batch["labels"].to(device)
        if "embeddings" in batch:  # a linear probe on cached embeddings (EmbeddingDataset)
            logits = classifier_of(self.model)(batch["embeddings"].to(device)).float()
            return self._task_loss(logits, labels)
        clips = batch["clips"].to(device, non_blocking=True)
        draws = {k: v.to(device) for k, v in (draws or {}).items()}
        mix = {k: draws.pop(k) for k in MIX_KEYS if k in draws}
        selection = draws or ({"window": self.window} if self.window is not None
                              else {} if self.keep_ratio is None else {"keep_ratio": self.keep_ratio})
        if self.motion:
            if "motion" not in batch:
                raise ValueError("selection='motion': the batches carry no motion scores (give the data set "
                                 "through lookwhen.data.motion.WithMotion)")
            scores = batch["motion"].to(device, torch.float32).contiguous()
            selection = {"indices": lk.topk_tokens(scores, keep_ratio=self.keep_ratio), "run_selector": False}
        if self.perturbed is not None and self.training:
            sigma = self.sigma()
            # Past the decay the hard top-K's own path gives the same tokens
            # without embedding every candidate.
            if sigma > 0:
                selection["sigma"] = sigma
                selection["n_samples"] = self.perturbed[2]
            self.forwards += 1
        num_classes = self.model.config.num_classes
        if self.multi_label and labels.shape[-1] != num_classes:
            raise ValueError(f"multi-label targets of shape {list(labels.shape)} for {num_classes} classes: the "
                             "data set's classes and the model's differ")
        if mix:
            soft = labels.float() if self.multi_label else F.one_hot(labels, num_classes).float()
            clips, labels = mix_clips(clips, soft, mix)
        student_clips = fit_clips(clips, self.model.config.frames, self.model.config.image_size)
        logits = logits_of(self.model, student_clips, **selection).float()
        if self.teacher is None:
            return self._task_loss(logits, labels)
        task, _ = self._task_loss(logits, labels)
        parts = {"task": task}
        with torch.no_grad():
            teacher_clips = fit_clips(clips, self.teacher.config.frames, self.teacher.config.image_size)
            target = logits_of(self.teacher, teacher_clips).float()
        t = self.temperature
        parts["distill"] = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target / t, -1),
                                    log_target=True, reduction="batchmean") * t * t
        loss = (1 - self.alpha) * parts["task"] + self.alpha * parts["distill"]
        return loss, {k: v.detach() for k, v in parts.items()}

    def _task_loss(self, logits: torch.Tensor, labels: torch.Tensor):
        if self.multi_label:
            task = F.binary_cross_entropy_with_logits(logits, labels.float())
        else:
            task = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return task, {"task": task.detach()}

    def sigma(self) -> float:
        """The perturbed top-K's noise level at this point of the run."""
        start, total, _ = self.perturbed
        return start * max(0.0, 1.0 - int(self.forwards) / total)


class FinetuneTask(Task):
    def __init__(self, model: nn.Module, *, keep_ratio: Optional[float] = None,
                 keep_range: Optional[Tuple[float, float]] = None, selection: str = "selector",
                 linear_probe: bool = False, layer_decay: float = 0.75, label_smoothing: float = 0.1,
                 teacher: Optional[nn.Module] = None, temperature: float = 4.0, alpha: float = 0.5,
                 sigma: float = 0.05, sigma_steps: Optional[int] = None, n_samples: int = 500,
                 multi_label: bool = False, classes: Optional[Sequence[str]] = None, mixup: float = 0.0,
                 cutmix: float = 0.0, mix_prob: float = 1.0, mix_switch: float = 0.5, drop_path: float = 0.0,
                 window=None):
        config = model.config
        if not config.num_classes:
            raise ValueError(f"{config.name}: fine-tuning needs a classifier (num_classes > 0)")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        lookwhen = isinstance(model, LookWhen)
        if not lookwhen and (keep_ratio is not None or keep_range is not None or window is not None
                             or selection != "selector"):
            raise ValueError(f"{config.name} is a dense model: it keeps every token")
        if keep_ratio is not None and keep_range is not None:
            raise ValueError("keep_ratio and keep_range: give one or the other")
        if window is not None and (keep_ratio is not None or keep_range is not None or selection != "selector"):
            raise ValueError("window: the selector's scores place one window per frame (no keep_ratio, keep_range "
                             f"or selection={selection!r})")
        if keep_range is not None and not 0 < keep_range[0] <= keep_range[1] <= 1:
            raise ValueError(f"keep_range: expected 0 < low <= high <= 1, got {keep_range}")
        if selection in ("random", "perturbed", "motion") and keep_range is not None:
            raise ValueError(f"selection={selection!r} keeps a fixed number of tokens per clip: use keep_ratio")
        if selection == "perturbed":
            if not sigma >= 0 or sigma_steps is None or sigma_steps < 1 or n_samples < 1:
                raise ValueError(f"selection='perturbed' needs sigma >= 0, sigma_steps >= 1 and n_samples >= 1, "
                                 f"got {sigma}, {sigma_steps} and {n_samples}")
            if linear_probe:
                raise ValueError("selection='perturbed' trains the selector: not with linear_probe")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if mixup < 0 or cutmix < 0 or not 0 <= mix_prob <= 1 or not 0 <= mix_switch <= 1:
            raise ValueError(f"need mixup >= 0, cutmix >= 0 and mix_prob, mix_switch in [0, 1], got {mixup}, "
                             f"{cutmix}, {mix_prob} and {mix_switch}")
        if classes is not None and len(classes) != config.num_classes:
            raise ValueError(f"{len(classes)} class names for a classifier of {config.num_classes} classes")
        if teacher is not None:
            if multi_label:
                raise ValueError("distillation matches softmax distributions: not for a multi-label data set")
            if teacher.config.num_classes != config.num_classes:
                raise ValueError(f"the teacher has {teacher.config.num_classes} classes, the student "
                                 f"{config.num_classes}")
            if not 0 <= alpha <= 1 or not temperature > 0:
                raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {alpha} and {temperature}")
            teacher.eval().requires_grad_(False)
        if linear_probe:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.startswith(("extractor.head.", "head.")))
        if drop_path:
            add_drop_path(model, drop_path)
        self.lookwhen = lookwhen
        self.window = window
        self.keep_ratio = None if not lookwhen or window is not None else \
            keep_ratio if keep_ratio is not None else config.keep_ratio
        self.keep_range = keep_range
        self.selection = selection
        self.linear_probe = linear_probe
        self.layer_decay = layer_decay
        self.perturbed = (float(sigma), int(sigma_steps), int(n_samples)) if selection == "perturbed" else None
        self.module = FinetuneModule(model, keep_ratio=self.keep_ratio, label_smoothing=label_smoothing,
                                     teacher=teacher, temperature=temperature, alpha=alpha,
                                     perturbed=self.perturbed, multi_label=multi_label, window=window,
                                     motion=selection == "motion")
        self._model = model
        self.distilled = teacher is not None
        self.labels = {"classes": None if classes is None else list(classes), "multi_label": multi_label}
        self.drop_path = float(drop_path)
        self.mix = dict(mixup=float(mixup), cutmix=float(cutmix), prob=float(mix_prob), switch=float(mix_switch))

    def draw(self, generator: torch.Generator, batch: int):
        draws = {}
        if self.mix["mixup"] > 0 or self.mix["cutmix"] > 0:
            draws.update(draw_mix(generator, batch, **self.mix))
        if self.lookwhen:
            n_tokens = self._model.config.n_tokens
            if self.keep_range is not None:
                draws["budgets"] = draw_budgets(generator, batch, self.keep_range, n_tokens)
            elif self.selection == "random":
                draws["indices"] = random_selection(generator, batch, n_tokens,
                                                    self._model.config.tokens_kept(self.keep_ratio))
        return draws or None

    def lr_scale(self, name: str) -> float:
        depth = self._model.config.depth
        local = name[len("model."):] if name.startswith("model.") else name
        return self.layer_decay ** (depth + 1 - layer_id(local.removeprefix("extractor."), depth))

    def model(self) -> nn.Module:
        return self._model

    def run_info(self) -> Dict:
        return {"task": "finetune", "model_config": self._model.config.to_dict(), "keep_ratio": self.keep_ratio,
                "keep_range": self.keep_range, "window": self.window, "selection": self.selection,
                "perturbed": self.perturbed,
                "linear_probe": self.linear_probe,
                "layer_decay": self.layer_decay, "distilled": self.distilled, "labels": self.labels, "mix": self.mix,
                "drop_path": self.drop_path}

    def label_space(self) -> Dict:
        return self.labels

    def unused_parameters(self, forwards: int) -> bool:
        # A hard top-K passes no gradient to the selector's score head (it
        # runs under no grad); the perturbed top-K does, until sigma reaches
        # 0. A dense model and a linear probe use every trainable parameter.
        if not self.lookwhen or self.linear_probe:
            return False
        if self.perturbed is not None:
            start, decay, _ = self.perturbed
            return start == 0 or decay < forwards
        return True

    def validate(self, entries, device: torch.device, workers: int) -> Dict[str, float]:
        """Top-1 and top-5 (mAP for multi-label data) of each held-out
        video's centre clip, at the keep ratio the run trains with."""
        if self.selection == "motion":
            raise ValueError("selection='motion' has no validation on video files (their clips come without "
                             "motion scores): train without held-out entries")
        result = evaluate(self._model, entries, keep_ratio=self.keep_ratio, window=self.window, batch_size=8,
                          workers=workers, device=device, multi_label=self.labels["multi_label"])
        return {"mAP": result.mAP} if result.mAP is not None else {"top1": result.top1, "top5": result.top5}
