"""Checkpoints: one safetensors file holding the weights, with the model's
config as JSON in the file's metadata (key ``"lookwhen_config"``), so a
checkpoint alone rebuilds its model. A classifier's checkpoint also holds
its label space (key ``"lookwhen_labels"``: the class names in id order, or
null for bare ids, and whether the data set is multi-label), so evaluation
maps class names and scores the way fine-tuning trained."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lookwhen.models import build_model
from lookwhen.models.config import ModelConfig

CONFIG_KEY = "lookwhen_config"
LABELS_KEY = "lookwhen_labels"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def save_checkpoint(model: torch.nn.Module, path: Union[str, os.PathLike], *, labels: Optional[Dict] = None,
                    state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """``labels``: ``{"classes": [...] or None, "multi_label": bool}`` (see the module docstring).
    ``state``: the weights to store, when the model's own are not whole
    tensors (sharded by FSDP); default ``model.state_dict()``."""
    state = model.state_dict() if state is None else state
    # safetensors stores each tensor on its own: contiguous, on the CPU.
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    metadata = {CONFIG_KEY: model.config.to_json()}
    if labels is not None:
        metadata[LABELS_KEY] = json.dumps(labels)
    save_file(tensors, os.fspath(path), metadata=metadata)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in
    name order): what pins a run's records to the weights that made them."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _metadata(path: str) -> Dict[str, str]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a safetensors file ({error})") from None


def read_labels(path: Union[str, os.PathLike]) -> Optional[Dict]:
    """The label space a checkpoint was fine-tuned with, ``None`` if it holds none."""
    path = os.fspath(path)
    text = _metadata(path).get(LABELS_KEY)
    if text is None:
        return None
    try:
        labels = json.loads(text)
        classes, multi_label = labels["classes"], labels["multi_label"]
    except (ValueError, TypeError, KeyError):
        raise CheckpointError(f"{path}: bad label space in the checkpoint: {text[:200]!r}") from None
    if not isinstance(multi_label, bool) or classes is not None and not (
            isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: bad label space in the checkpoint: {text[:200]!r}")
    return {"classes": classes, "multi_label": multi_label}


def read_config(path: Union[str, os.PathLike]) -> ModelConfig:
    path = os.fspath(path)
    metadata = _metadata(path)
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without a lookwhen config (not saved by save_checkpoint)")
    try:
        return ModelConfig.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: bad config in the checkpoint: {error}") from None


def load_checkpoint(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """Rebuild the model saved by :func:`save_checkpoint`, weights included.
    The config is checked against the file's tensor shapes on the meta device
    first, so a config that does not fit allocates nothing."""
    config = read_config(path)
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build_model(config).state_dict().items()}
    with safe_open(os.fspath(path), framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        shapes = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes:", shapes))
                 if keys]
        raise CheckpointError(f"{os.fspath(path)}: weights do not fit the config ({'; '.join(parts)})")
    model = build_model(config)
    tensors = load_file(os.fspath(path))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{os.fspath(path)}: weights do not fit the config: {reason[:300]}") from None
    return model.to(device)
