"""A picture of what LookWhen selected: the clip's frames with the kept
patches bright, beside the selector's scores as a heat-map."""
from __future__ import annotations

import math

import numpy as np
import torch

from lookwhen.models.config import ModelConfig
from lookwhen.models.selector import frame_scores
from lookwhen_kernels import upsample_scores

# Brightness of the patches the extractor never sees.
DIM = 0.3
# White columns between the frames and the heat-maps.
GAP = 8


def selection_picture(clip: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
                      config: ModelConfig) -> np.ndarray:
    """RGB picture (uint8 ``[H, W, 3]``): on the left the clip's frames in a
    grid of ``cols = ceil(sqrt(T))`` columns, the selected patches at full
    brightness and the rest dimmed; on the right, after ``GAP`` white
    columns, the selector's scores (bilinearly upsampled to the extractor's
    grid) as a heat-map in the same grid. ``H = rows * S``,
    ``W = 2 * cols * S + GAP`` for ``S``-pixel frames."""
    # matplotlib (the train extra) only for its colour map, when drawing.
    from matplotlib import colormaps

    frames, height, width, _ = clip.shape
    _, grid_h, grid_w = config.grid
    patch = config.patch_size
    selected = torch.zeros(frames * grid_h * grid_w, dtype=torch.bool)
    selected[indices.reshape(-1).long()] = True
    keep = selected.view(frames, grid_h, grid_w).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    shaded = clip.float() * torch.where(keep, 1.0, DIM)[..., None]

    per_frame = frame_scores(scores.float()[None], config)
    fine = upsample_scores(per_frame, config.score_grid, config.grid).view(frames, grid_h, grid_w)
    span = (fine.max() - fine.min()).clamp(min=1e-12)
    level = ((fine - fine.min()) / span).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    heat = torch.from_numpy(colormaps["inferno"](level.numpy())[..., :3]).float() * 255

    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    panel_w = cols * width
    picture = np.full((rows * height, 2 * panel_w + GAP, 3), 255, dtype=np.uint8)
    for t in range(frames):
        top, left = (t // cols) * height, (t % cols) * width
        picture[top: top + height, left: left + width] = shaded[t].round().byte().numpy()
        left += panel_w + GAP
        picture[top: top + height, left: left + width] = heat[t].round().byte().numpy()
    return picture
