"""LookWhere's released image model (Fuller et al., NeurIPS 2025,
antofuller/lookwhere) as the ``lookwhere-dinov2`` preset: a LookWhen model on
one frame, loading the authors' ``lookwhere_dinov2.pt``.

The file holds ``{"selector": {"backbone": ..., "head": {...}}, "extractor":
...}``: the backbones are timm ``vit_base_patch14_reg4_dinov2`` state dicts
(the selector's at depth 3 and 154 px, the extractor's at 12 blocks and the
high resolution) and the head is ``w1`` (768 -> 3072) and ``w2`` (3072 ->
16) in ``nn.Linear`` layout. Their forward, and where it lives here:

- selector: the normalised image bilinearly resized to 154 px
  (``selector_image_size``), patch embedding + ``pos_embed`` (patch tokens
  only: DINOv2 has ``no_embed_class``), ``[cls, 4 registers, patches]``
  through 3 LayerScale blocks and the final norm;
- head: ``w2(gelu(w1(norm(x))))``, 16 = 4 x 4 logits per token laid onto a
  44 x 44 map and resized bilinearly to the extractor's 37 x 37 grid
  (``score_outputs=16``; ``score_tokens`` and ``topk_tokens`` fuse it). The
  norm is the backbone's final norm, so it fills both ``selector.norm`` and
  ``selector.score_head.norm``;
- top-K over that map;
- extractor: the selected patches' embeddings (+ ``pos_embed``) after the
  selector's normed CLS and registers, as they are (``context_projection``
  off, ``extractor_cls`` off), 12 blocks and the final norm; the CLS
  position is the embedding.

The extractor's own ``cls_token`` and ``reg_token`` are in the file but never
read by that forward: they are reported as ``skipped``. Our separable
position tables take timm's table as the spatial factor with a zero
temporal factor (one frame). The authors resample the extractor's 37 x 37
table for other resolutions with their own ``interpolate_pos_encoding``,
which is not reproduced: a table that does not fit the config is refused.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from lookwhen.models.baseline import LoadReport
from lookwhen.models.lookwhen import LookWhen

PRESET = "lookwhere-dinov2"
# Their keys the forward never reads.
UNUSED = ("extractor.cls_token", "extractor.reg_token")


def flatten_checkpoint(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The nested layout -> flat keys ``selector.backbone.*``,
    ``selector.head.*`` and ``extractor.*``."""
    flat: Dict[str, torch.Tensor] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            raise ValueError(f"checkpoint: {prefix!r} is a {type(node).__name__}, expected tensors in dicts")

    walk("", checkpoint)
    return flat


def _targets(key: str):
    """Our state-dict keys for one of their flat keys (several for the
    selector's final norm; none for a key with no place)."""
    part, _, rest = key.partition(".")
    if part == "selector":
        group, _, name = rest.partition(".")
        if group == "head":
            layer, _, param = name.partition(".")
            fc = {"w1": "fc1", "w2": "fc2"}.get(layer)
            return [f"selector.score_head.{fc}.{param}"] if fc else []
        if group != "backbone":
            return []
        if name.startswith("norm."):
            return [f"selector.{name}", f"selector.score_head.{name}"]
        trunk = "selector"
    elif part == "extractor":
        name, trunk = rest, "extractor"
    else:
        return []
    if name == "pos_embed":
        return [f"{trunk}.pos_embed.spatial"]
    if name in ("cls_token", "reg_token") and trunk == "selector":
        return [f"selector.{name}"]
    if name.startswith(("patch_embed.", "blocks.", "norm.")):
        return [f"{trunk}.{name}"]
    return []


def load_lookwhere_state_dict(model: LookWhen, checkpoint: Mapping, *, strict: bool = True) -> LoadReport:
    """Copy a checkpoint in the layout of ``lookwhere_dinov2.pt`` into
    ``model`` (built from ``lookwhere-dinov2``, possibly resized). Returns
    the :class:`~lookwhen.models.baseline.LoadReport`: ``missing`` (our parameters
    the file does not give; the temporal position factors are set to zero,
    not missing), ``unexpected`` (its keys with no place here) and
    ``skipped`` (its keys the authors' forward never reads). With
    ``strict`` a missing or unexpected key raises ``ValueError`` before
    anything is copied; a shape that does not fit always does."""
    if not isinstance(model, LookWhen):
        raise ValueError(f"model: expected a LookWhen model, got {type(model).__name__}")
    cfg = model.config
    if cfg.frames != 1 or cfg.extractor_cls or cfg.context_projection or cfg.score_outputs == 1:
        raise ValueError(f"model: {cfg.name} is not LookWhere's layout (frames=1, extractor_cls and "
                         "context_projection off, r x r score outputs); build it from 'lookwhere-dinov2'")
    ours = model.state_dict()
    report = LoadReport()
    new: Dict[str, torch.Tensor] = {}
    for key, value in flatten_checkpoint(checkpoint).items():
        if key in UNUSED:
            report.skipped.append(key)
            continue
        targets = _targets(key)
        if not targets or any(t not in ours for t in targets):
            report.unexpected.append(key)
            continue
        for target in targets:
            new[target] = value[0] if target.endswith("pos_embed.spatial") and value.dim() == 3 else value
    for trunk in ("selector", "extractor"):
        new[f"{trunk}.pos_embed.temporal"] = torch.zeros_like(ours[f"{trunk}.pos_embed.temporal"])
    report.missing = sorted(set(ours) - set(new))
    wrong = [f"{key}: {list(value.shape)} for {list(ours[key].shape)}"
             for key, value in new.items() if value.shape != ours[key].shape]
    if wrong:
        raise ValueError(f"checkpoint: shapes do not fit {cfg.name}: {'; '.join(wrong[:5])}")
    if strict and not report.ok:
        raise ValueError(f"checkpoint: does not fit {cfg.name}: missing keys {report.missing[:8]}, "
                         f"unexpected keys {report.unexpected[:8]}")
    model.load_state_dict(new, strict=False)
    return report

