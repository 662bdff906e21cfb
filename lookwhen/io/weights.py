"""Weight files other than our checkpoints: any state dict on disk, and the
released models our presets reproduce (InternVideo2-B/14, LookWhere)
rebuilt from their files. Nothing is ever downloaded."""
from __future__ import annotations

import os
from typing import Dict, Mapping

import torch
from safetensors.torch import load_file

from lookwhen.models import build_model
from lookwhen.models.baseline import load_internvideo2_state_dict
from lookwhen.models.lookwhere import PRESET as LOOKWHERE_PRESET, load_lookwhere_state_dict


# Wrappers around a state dict: timm/our trainers ("model"), Lightning
# ("state_dict"), DeepSpeed's mp_rank_*_model_states.pt ("module", what
# InternVideo2's fine-tuning scripts save).
STATE_DICT_WRAPPERS = ("model", "state_dict", "module")


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (``weights_only``;
    the wrappers of :data:`STATE_DICT_WRAPPERS`, nested or not, and DDP's
    ``module.`` prefix are unwrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a bad file
            raise ValueError(f"{path}: not a safetensors or torch state-dict file ({error})") from None
        unwrapped = True
        while unwrapped and isinstance(state, Mapping):
            unwrapped = False
            for key in STATE_DICT_WRAPPERS:
                if isinstance(state.get(key), Mapping):
                    state, unwrapped = state[key], True
                    break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_internvideo2(path, config="internvideo2-b14", *, strict: bool = True, **overrides):
    """An InternVideo2 model from an official checkpoint file (safetensors or
    torch state dict; ``{"model": ...}`` and ``module.`` wrappers are
    unwrapped): ``(model, report)``. The classifier is kept when
    ``num_classes`` (an override) matches the checkpoint's."""
    model = build_model(config, **overrides)
    report = load_internvideo2_state_dict(model, load_state_dict_file(path), strict=strict)
    return model, report


def load_lookwhere(path, *, strict: bool = True, **overrides):
    """LookWhere's released model from ``lookwhere_dinov2.pt`` (a
    ``torch.save`` file, read with ``weights_only=True``): ``(model,
    report)``. ``overrides`` resize the preset (``keep_ratio``, ...)."""
    model = build_model(LOOKWHERE_PRESET, **overrides)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return model, load_lookwhere_state_dict(model, checkpoint, strict=strict)
