"""Activation checkpointing for training, added to a model from the
outside (the saved model and its parameter names stay as they are): each
transformer block's forward keeps only its input and recomputes the rest
during the backward pass, trading a second forward of every block for the
memory of its activations. Without gradients (evaluation, validation) the
blocks run as they are. PyTorch's non-reentrant checkpoint restores the RNG
state for the recomputation, and drop-path draws its masks in the block's
pre-hook, outside the recomputed part: both passes see the same masks."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lookwhen.models.layers import Block


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute every block of ``model`` in the backward pass; returns how
    many blocks that is."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.forward = _recomputed(block.forward)
    return len(blocks)


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
