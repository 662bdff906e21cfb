"""Stochastic depth (drop-path) for fine-tuning, added to a model from the
outside: a training-time regulariser, not part of the inference model or its
config, so checkpoints and the models' code stay as they are.

Each residual branch of a transformer block (attention, MLP) is dropped for
a whole clip with probability ``p`` and kept branches are scaled by
``1 / (1 - p)`` (timm's ``DropPath``), only while the model trains. ``p``
rises linearly from 0 at the first block to ``rate`` at the last (timm's
``drop_path_rate`` schedule). The extractor's blocks take packed token sets
(``[total, D]`` with ``cu_seqlens``): a clip's mask covers its own rows. The
selector's blocks are left alone: dropping there would change which tokens
are selected. The masks come from torch's global generator, which
checkpoints save, so a resumed run drops the same branches.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from lookwhen.models.layers import Block


def add_drop_path(model: nn.Module, rate: float) -> None:
    """Drop-path on every block of ``model`` outside its selector."""
    if not 0 <= rate < 1:
        raise ValueError(f"drop_path must lie in [0, 1), got {rate}")
    blocks = [m for name, m in model.named_modules() if isinstance(m, Block) and not name.startswith("selector.")]
    for i, block in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        if p > 0:
            _drop_branches(block, p)


def _drop_branches(block: Block, p: float) -> None:
    masks: Dict[str, Optional[torch.Tensor]] = {}

    def draw(module, args):
        x, cu_seqlens = args[0], args[1] if len(args) > 1 else None
        for branch in ("ls1", "ls2"):
            masks[branch] = None
            if module.training:
                clips = x.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
                keep = (torch.rand(clips, device=x.device) >= p).to(x.dtype) / (1 - p)
                masks[branch] = (keep.view(-1, *[1] * (x.ndim - 1)) if cu_seqlens is None else
                                 keep.repeat_interleave(cu_seqlens.diff().long(), output_size=x.shape[0])[:, None])

    def drop(branch):
        return lambda module, args, output: output if masks[branch] is None else output * masks[branch]

    block.register_forward_pre_hook(draw)
    block.ls1.register_forward_hook(drop("ls1"))
    block.ls2.register_forward_hook(drop("ls2"))
