"""LookWhen pre-training: the selector learns to predict uniqueness, the
extractor distils the teachers from the tokens the selector picks (see
:mod:`lookwhen.training.losses`), each clip of a batch with its own token budget
drawn from ``keep_range`` (the per-clip budgets path, packed varlen).

``train="selector"`` trains the selector's score path alone (the extractor
and the selector's context projection are frozen and never run), which is
all that selector pre-training needs and far cheaper.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from lookwhen.training.losses import (
    DistillHeads,
    LossWeights,
    draw_budgets,
    extractor_losses,
    selector_loss,
    total_loss,
    uniqueness_target,
)
from lookwhen.models.lookwhen import LookWhen
from lookwhen.training.targets import TargetCache
from lookwhen.training.teachers import Teachers
from lookwhen.training.engine import Task

TRAIN_PARTS = ("all", "selector")


class PretrainModule(nn.Module):
    """The trainable parts (the model and the distillation heads) and the
    step's loss. Teachers and the target cache are held outside the module's
    parameters and state: they are frozen and never saved with it."""

    def __init__(self, model: LookWhen, heads: Optional[DistillHeads], weights: LossWeights, *,
                 teachers: Optional[Teachers], cache: Optional[TargetCache]):
        super().__init__()
        if teachers is None and cache is None:
            raise ValueError("pre-training needs teachers or a target cache")
        self.model = model
        self.heads = heads
        self.weights = weights
        self.__dict__["teachers"] = teachers
        self.__dict__["cache"] = cache

    def targets(self, batch: Dict, clips: torch.Tensor):
        cfg = self.model.config
        if self.cache is not None:
            return self.cache.get(batch["indices"].tolist(), batch["views"].tolist()).to(clips.device)
        return self.teachers(clips, cfg.grid[1:])

    def forward(self, batch: Dict, budgets: Optional[torch.Tensor]):
        device = self.model.extractor.patch_embed.proj.weight.device
        clips = batch["clips"].to(device, non_blocking=True)
        targets = self.targets(batch, clips)
        uniqueness = uniqueness_target(targets.patches, self.model.config)
        if self.heads is None:
            parts = {}
            scores = self.model.selector_scores(clips)
        else:
            out = self.model(clips, budgets=budgets.to(device))
            parts = extractor_losses(out, targets, self.heads, self.model.config)
            scores = out.scores
        parts["selector"] = selector_loss(scores, uniqueness, self.weights.temperature)
        return total_loss(parts, self.weights), {name: value.detach() for name, value in parts.items()}


class PretrainTask(Task):
    def __init__(self, model: LookWhen, *, teachers: Optional[Teachers] = None, cache: Optional[TargetCache] = None,
                 weights: LossWeights = LossWeights(), keep_range: Tuple[float, float] = (0.05, 0.3),
                 train: str = "all"):
        if not isinstance(model, LookWhen):
            raise ValueError(f"pre-training needs a LookWhen model, got {type(model).__name__}")
        if train not in TRAIN_PARTS:
            raise ValueError(f"train must be one of {TRAIN_PARTS}, got {train!r}")
        low, high = keep_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"keep_range: expected 0 < low <= high <= 1, got {keep_range}")
        self.keep_range = (float(low), float(high))
        self.train = train
        self.weights = weights
        heads = None
        if train == "all":
            dims = self._target_dims(model, teachers, cache)
            # Seeded like the model: runs with the same config start alike.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(model.config.seed + 1)
                heads = DistillHeads(model.config.width, *dims)
        else:
            for parameter in [*model.extractor.parameters(), *model.selector.context_proj.parameters()]:
                parameter.requires_grad_(False)
        self.module = PretrainModule(model, heads, weights, teachers=teachers, cache=cache)
        self._model = model

    @staticmethod
    def _target_dims(model, teachers, cache) -> Tuple[int, Optional[int]]:
        """Widths of the image and video targets (the heads' outputs)."""
        if cache is not None:
            sample = cache.first()
            return sample.patches.shape[-1], None if sample.video is None else sample.video.shape[-1]
        video_dim = None
        if teachers.video is not None:
            cfg = model.config
            probe = torch.zeros((1, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
            video_dim = teachers.video(probe.to(next(teachers.video.parameters()).device)).shape[-1]
        return teachers.image.dim, video_dim

    def draw(self, generator: torch.Generator, batch: int):
        if self.train == "selector":
            return None
        return draw_budgets(generator, batch, self.keep_range, self._model.config.n_tokens)

    def model(self) -> nn.Module:
        return self._model

    def run_info(self) -> Dict:
        teachers = self.module.teachers
        return {
            "task": "pretrain",
            "model_config": self._model.config.to_dict(),
            "train": self.train,
            "keep_range": list(self.keep_range),
            "loss_weights": vars(self.weights),
            "image_teacher": None if teachers is None else teachers.image.name,
            "video_teacher": None if teachers is None or teachers.video is None else _describe(teachers.video.module),
            "target_cache": None if self.module.cache is None else self.module.cache.folder,
        }


def _describe(module: nn.Module) -> str:
    """A teacher's preset name (our models), else its class name."""
    config = getattr(module, "config", None)
    return getattr(config, "name", None) or type(module).__name__
