"""Mapping between timm ``VisionTransformer`` state dicts (for example
``vit_base_patch16_224`` saved to a local file) and our ViT trunks: the
LookWhen extractor and a dense baseline configured as a plain ViT
(``pos_embed="separable"``, ``final_norm=True`` and the block options
timm's ViT has; the ``internvideo2-b14`` preset itself loads InternVideo2's
own checkpoints, :func:`lookwhen.models.baseline.load_internvideo2_state_dict`).
Nothing is ever downloaded.

Key by key: ``patch_embed.proj.*``, ``blocks.<i>.*`` (``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and
``norm.*`` are identical. Two differ:

- timm's ``pos_embed [1, 1 + h*w, D]`` holds a CLS row and a spatial table.
  The spatial rows become ``pos_embed.spatial`` (resampled bicubically by
  timm's ``resample_abs_pos_embed`` when the grids differ) and
  ``pos_embed.temporal`` is zero, so every frame sees timm's embedding. The
  CLS row is only ever added to the CLS token, so it is folded into
  ``cls_token``; exporting writes the folded token and a zero CLS row, which
  gives the same function.
- ``head.*`` is taken when the trunk has a classifier of the same shape and
  left out otherwise; timm's ``fc_norm`` (identity for ViT-B) must be absent.

Parts timm has no counterpart for keep their initialisation: the dense
baseline's attention-pooling head (``clip_projector.*``, ``fc_norm.*``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed

_CLASSIFIER = ("head.weight", "head.bias")


def _check_plain_vit(trunk: nn.Module) -> None:
    if "pos_embed.temporal" not in trunk.state_dict():
        raise ValueError(f"trunk: {trunk.config.name} has a joint position table (pos_embed='joint', "
                         "InternVideo2's), which a timm image ViT does not describe; build it with "
                         "pos_embed='separable'")


def _trunk_keys(trunk: nn.Module) -> List[str]:
    """Our state-dict keys that come straight from timm's."""
    keys = []
    for key in trunk.state_dict():
        if key.startswith(("patch_embed.", "blocks.", "norm.")):
            keys.append(key)
        elif key in _CLASSIFIER:
            keys.append(key)
    return keys


def load_timm_state_dict(trunk: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Copy a timm ViT state dict into ``trunk`` (``model.extractor`` of a
    LookWhen, or a ``DenseBaseline``). Returns the timm keys that were left
    out (a classifier of another size). Raises ``ValueError`` on a missing key,
    an unknown key, or a shape that does not fit."""
    _check_plain_vit(trunk)
    ours = trunk.state_dict()
    dim = ours["cls_token"].shape[-1]
    grid_h = grid_w = trunk.config.image_size // trunk.config.patch_size
    new: Dict[str, torch.Tensor] = {}
    for key in _trunk_keys(trunk):
        if key not in state_dict:
            if key in _CLASSIFIER:
                continue
            raise ValueError(f"state_dict: missing key {key!r}")
        new[key] = state_dict[key]
    if "pos_embed" not in state_dict or "cls_token" not in state_dict:
        raise ValueError("state_dict: expected 'cls_token' and 'pos_embed' (a timm VisionTransformer)")
    pos = state_dict["pos_embed"]
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise ValueError(f"state_dict: 'pos_embed' must be [1, 1 + h*w, {dim}], got {list(pos.shape)}")
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"state_dict: 'pos_embed' has {pos.shape[1]} rows, not 1 + a square grid")
    spatial = pos[:, 1:]
    if side != grid_h:
        spatial = resample_abs_pos_embed(spatial, [grid_h, grid_w], [side, side], num_prefix_tokens=0)
    new["pos_embed.spatial"] = spatial[0]
    new["pos_embed.temporal"] = torch.zeros_like(ours["pos_embed.temporal"])
    new["cls_token"] = state_dict["cls_token"] + pos[:, :1]

    left_out = []
    for key in _CLASSIFIER:
        if key in state_dict and (key not in ours or ours[key].shape != state_dict[key].shape):
            new.pop(key, None)
            left_out.append(key)
    unknown = sorted(set(state_dict) - set(new) - {"pos_embed"} - set(left_out))
    if unknown:
        raise ValueError(f"state_dict: keys with no place in the trunk: {unknown[:5]}")
    for key, value in new.items():
        if value.shape != ours[key].shape:
            raise ValueError(
                f"state_dict: {key!r} has shape {list(value.shape)}, the trunk needs {list(ours[key].shape)}"
            )
    trunk.load_state_dict(new, strict=False)
    return left_out


def timm_state_dict(trunk: nn.Module) -> Dict[str, torch.Tensor]:
    """The trunk as a timm ``VisionTransformer`` state dict (one frame: timm
    has no temporal embedding, so a non-zero one is refused)."""
    _check_plain_vit(trunk)
    ours = trunk.state_dict()
    if bool(ours["pos_embed.temporal"].any()):
        raise ValueError(
            "trunk: its temporal position embedding is not zero, which a timm image ViT cannot represent"
        )
    out = {key: ours[key].clone() for key in _trunk_keys(trunk)}
    spatial = ours["pos_embed.spatial"]
    out["pos_embed"] = torch.cat([spatial.new_zeros(1, spatial.shape[1]), spatial])[None].clone()
    out["cls_token"] = ours["cls_token"].clone()
    return out
