"""Pre-training targets and losses, built on the ops.

Selector: the target is each token's **uniqueness**, the distance to its
nearest neighbour among all tokens of the clip (space and time) in the image
teacher's feature space (``nn_uniqueness``), computed on the extractor's
token grid and averaged onto the selector's coarse grid. The loss is the KL
divergence from ``softmax(standardised target / temperature)`` to
``softmax(scores)``, per clip (LookWhere's map loss, weight 0.1).
Standardising the target per clip makes the temperature mean the same thing
for any teacher, whose feature scale is arbitrary.

Extractor: distillation through training-only projection heads
(:class:`DistillHeads`; they are not part of the inference model):

- ``video``: the CLS embedding -> the video teacher's embedding;
- ``image_video``: the CLS embedding -> the image teacher's clip token (its
  per-frame global tokens averaged over time);
- ``frame``: per frame, the mean of that frame's selected token features ->
  the image teacher's global token of the frame, **normalised over time**
  (each channel standardised over the clip's frames: what changes within
  the video);
- ``patch``: every selected token -> the image teacher's patch feature at
  that token, **normalised per frame** (``frame_normalize``), gathered by id
  (``gather_tokens``).

Every regression target is standardised (per vector, or by the
normalisation above) and compared by mean squared error. Every loss is a mean
over clips of a per-clip value, so data-parallel ranks with equal shares of a
batch average to the loss of the whole batch.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import lookwhen_kernels as lk
from lookwhen_kernels.layout import packed_batch_ids
from lookwhen_kernels import keep_ratio_to_k
from lookwhen.models.config import ModelConfig
from lookwhen.models.lookwhen import LookWhenOutput
from lookwhen.training.teachers import TeacherTargets


@dataclass(frozen=True)
class LossWeights:
    selector: float = 0.1
    video: float = 1.0
    image_video: float = 1.0
    frame: float = 1.0
    patch: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("selector", "video", "image_video", "frame", "patch"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def uniqueness_target(patches: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Image-teacher patch features ``[B, T, h*w, D]`` on the extractor's
    grid -> float32 uniqueness in the layout of the selector's scores:
    ``[B, n_selector_tokens]``, or ``[B, n_selector_tokens, r*r]`` with
    ``score_outputs`` = r*r (nearest-neighbour L2 distance over the clip,
    block-averaged in space and over each selector frame's frames to the
    score map, ``config.score_map_grid``)."""
    grid = config.grid
    map_grid = config.score_map_grid
    distance = lk.nn_uniqueness(patches.flatten(1, 2).contiguous())
    batch = distance.shape[0]
    volume = distance.float().view(batch, *grid)
    if map_grid[0] != grid[0]:
        volume = F.adaptive_avg_pool3d(volume[:, None], map_grid)[:, 0]
    elif map_grid != grid:
        volume = F.adaptive_avg_pool2d(volume, map_grid[1:])
    r = math.isqrt(config.score_outputs)
    if r == 1:
        return volume.reshape(batch, -1)
    # The inverse of the sub-grid layout: (t, i*r + a, j*r + b) -> [token (t, i, j), a*r + b].
    return rearrange(volume, "b t (i a) (j c) -> b (t i j) (a c)", a=r, c=r)


def _standardise(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(dim=dim, keepdim=True)
    return (x - mean) / (x.var(dim=dim, unbiased=False, keepdim=True) + eps).sqrt()


def selector_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over clips of ``KL(softmax(z(target) / temperature) || softmax(scores))``,
    each softmax over all of a clip's scores (``[B, n]`` or ``[B, n, r*r]``)."""
    goal = F.log_softmax(_standardise(target.float().flatten(1)) / temperature, dim=-1)
    return F.kl_div(F.log_softmax(scores.float().flatten(1), dim=-1), goal, log_target=True, reduction="batchmean")


def _per_clip_mse(prediction: torch.Tensor, target: torch.Tensor, clip_of_row: torch.Tensor,
                  batch: int) -> torch.Tensor:
    """Mean over clips of each clip's mean squared error over its rows
    (clips with no rows do not count)."""
    error = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    sums = error.new_zeros(batch).index_add(0, clip_of_row, error)
    counts = torch.bincount(clip_of_row, minlength=batch).to(error.dtype)
    present = counts > 0
    return (sums[present] / counts[present]).mean() if bool(present.any()) else error.sum() * 0


class DistillHeads(nn.Module):
    """Linear projections from the extractor's width to each teacher's
    width; training-only. A head exists only where its target does (no
    ``video`` head without a video teacher)."""

    def __init__(self, width: int, image_dim: int, video_dim: Optional[int] = None):
        super().__init__()
        self.image_video = nn.Linear(width, image_dim)
        self.frame = nn.Linear(width, image_dim)
        self.patch = nn.Linear(width, image_dim)
        self.video = nn.Linear(width, video_dim) if video_dim else None


def extractor_losses(out: LookWhenOutput, targets: TeacherTargets, heads: DistillHeads,
                     config: ModelConfig) -> Dict[str, torch.Tensor]:
    """The distillation losses (unweighted) of one batch."""
    batch = out.embedding.shape[0]
    frames, grid_h, grid_w = config.grid
    indices = out.indices.reshape(-1)
    rows = packed_batch_ids(out.cu_seqlens, out.tokens.shape[0])
    losses = {}
    if heads.video is not None and targets.video is not None:
        losses["video"] = F.mse_loss(heads.video(out.embedding).float(), _standardise(targets.video))
    clip_token = _standardise(targets.frames.mean(dim=1))
    losses["image_video"] = F.mse_loss(heads.image_video(out.embedding).float(), clip_token)

    # Per (clip, frame): the mean of the selected tokens of that frame.
    slot = rows * frames + torch.div(indices, grid_h * grid_w, rounding_mode="floor").long()
    sums = out.tokens.new_zeros(batch * frames, out.tokens.shape[1]).index_add(0, slot, out.tokens)
    counts = torch.bincount(slot, minlength=batch * frames)
    seen = counts > 0
    frame_mean = sums[seen] / counts[seen, None].to(sums.dtype)
    over_time = lk.frame_normalize(targets.frames[:, None].contiguous())[:, 0].reshape(batch * frames, -1)
    clip_of_slot = torch.arange(batch * frames, device=slot.device) // frames
    losses["frame"] = _per_clip_mse(heads.frame(frame_mean), over_time[seen], clip_of_slot[seen], batch)

    per_frame = lk.frame_normalize(targets.patches.contiguous()).flatten(1, 2)
    if out.indices.dim() == 2:
        wanted = lk.gather_tokens(per_frame, out.indices)
    else:
        wanted = lk.gather_tokens(per_frame, out.indices, out.cu_seqlens)
    losses["patch"] = _per_clip_mse(heads.patch(out.tokens), wanted, rows, batch)
    return losses


def draw_budgets(generator: torch.Generator, batch: int, keep_range: Tuple[float, float], n_tokens: int,
                 ) -> torch.Tensor:
    """int32 ``[batch]`` token budgets, uniform over the whole numbers
    between ``keep_range`` (keep ratios) times ``n_tokens``."""
    low, high = (keep_ratio_to_k(r, n_tokens) for r in keep_range)
    return torch.randint(low, high + 1, (batch,), generator=generator, dtype=torch.int32)


def total_loss(parts: Dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in parts.items())
