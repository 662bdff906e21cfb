"""LookWhen pre-training: the selector learns to predict uniqueness, the
extractor distils the teachers from the tokens the selector picks (see
:mod:`lookwhen.training.losses`), each clip of a batch with its own token budget
drawn from ``keep_range`` (the per-clip budgets path, packed varlen).

``train="selector"`` trains the selector's score path alone (the extractor
and the selector's context projection are frozen and never run), which is
all that selector pre-training needs and far cheaper.

Validation (:meth:`PretrainTask.validate`) on held-out videos' centre clips:
the selector's recall of the most unique tokens (the K best-scored tokens
against the K most unique by the teacher, K the model's keep ratio of the
scores; chance is the keep ratio) and, for single-label data, a
leave-one-out k-nearest-neighbour top-1 of the embeddings (cosine, k = 10,
neighbours weighted by ``exp(similarity / 0.07)`` as in DINO's probe).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lookwhen.data.datasets import Entry, collate_list

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
from lookwhen.training.targets import TargetCache, targets_of_batch
from lookwhen.training.teachers import Teachers
from lookwhen.training.engine import Task
from lookwhen.training.evaluate import ViewDataset

KNN_NEIGHBOURS = 10
KNN_TEMPERATURE = 0.07

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
        if "targets" in batch:  # read by the loader's workers (WithTargets)
            return targets_of_batch(batch["targets"]).to(clips.device)
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

    def unused_parameters(self, forwards: int) -> bool:
        # The score path alone leaves the selector's final norm (which feeds
        # the extractor's context) without a gradient.
        return self.train == "selector"

    def validate(self, entries: Sequence[Entry], device: torch.device, workers: int) -> Dict[str, float]:
        model = self._model.eval()
        cfg = model.config
        teachers = self.module.teachers
        loader = torch.utils.data.DataLoader(ViewDataset(entries, cfg.frames, cfg.image_size, (1, 1)), batch_size=8,
                                             num_workers=workers, collate_fn=collate_list)
        recalls: List[float] = []
        embeddings, labels = [], []
        for samples in loader:
            samples = [s for s in samples if s["views"] is not None]
            if not samples:
                continue
            clips = torch.cat([s["views"] for s in samples]).to(device)
            out = model(clips)
            if teachers is not None:
                recalls += uniqueness_recall(out.scores, uniqueness_target(teachers(clips, cfg.grid[1:]).patches, cfg),
                                             cfg.keep_ratio)
            embeddings.append(out.embedding.float().cpu())
            labels += [s["label"] for s in samples]
        if not embeddings:
            raise ValueError(f"none of the {len(entries)} validation videos could be read")
        metrics = {}
        if recalls:
            metrics["recall"] = sum(recalls) / len(recalls)
        if all(isinstance(label, int) for label in labels) and len(labels) > 1:
            metrics["knn_top1"] = knn_top1(torch.cat(embeddings), torch.tensor(labels))
        return metrics

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


def uniqueness_recall(scores: torch.Tensor, uniqueness: torch.Tensor, keep_ratio: float) -> List[float]:
    """Per clip, the share of the K most unique tokens among the K
    best-scored (``[B, n]`` or ``[B, n, r*r]`` each; K = ``keep_ratio`` of n)."""
    scores, uniqueness = scores.float().flatten(1), uniqueness.float().flatten(1)
    k = max(1, round(keep_ratio * scores.shape[1]))
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    wanted = uniqueness.topk(k, dim=1).indices
    return (chosen.gather(1, wanted).sum(1).float() / k).tolist()


def knn_top1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out k-NN top-1 over ``embeddings [N, D]`` with ``labels [N]``."""
    features = torch.nn.functional.normalize(embeddings.float(), dim=1)
    similarity = features @ features.T
    similarity.fill_diagonal_(-float("inf"))
    nearest, index = similarity.topk(min(KNN_NEIGHBOURS, len(labels) - 1), dim=1)
    votes = torch.zeros(len(labels), int(labels.max()) + 1)
    votes.scatter_add_(1, labels[index], (nearest / KNN_TEMPERATURE).exp())
    return float((votes.argmax(1) == labels).float().mean())
