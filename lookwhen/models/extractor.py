"""The extractor: a ViT-B/16 trunk that only sees the selected tokens.

Tokens stay packed (``[total, D]`` plus ``cu_seqlens``) from the gather that
embeds them to the last block, so clips with different budgets share one
batch without padding.
"""
from __future__ import annotations

import torch
from torch import nn

import lookwhen_kernels as lk
from lookwhen.models.config import ModelConfig
from lookwhen.models.layers import Block, PatchEmbed, SeparablePosEmbed, block_options, init_weights, make_norm


class Extractor(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.width
        frames, grid_h, grid_w = config.grid
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.pos_embed = SeparablePosEmbed(frames, grid_h * grid_w, dim)
        # Without a CLS of its own the selector's CLS leads each sequence.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.extractor_cls else None
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, config.norm_eps, **block_options(config))
            for _ in range(config.depth)
        )
        self.norm = make_norm(config.norm, dim, config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)

    def embed(self, clip, indices, cu_seqlens, dtype: torch.dtype) -> torch.Tensor:
        """Patch embeddings of the selected tokens, packed ``[total, D]``. The
        selection comes from ``topk_tokens``: no value checks (host reads)."""
        cfg = self.config
        weight, bias = self.patch_embed.weights(dtype)
        return lk.gather_patch_embed(
            clip, indices, weight, bias, self.pos_embed.table(dtype),
            patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std, cu_seqlens=cu_seqlens, validate=False,
        )

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Packed sequences ``[total, D]`` -> final-normed features, same layout."""
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen)
        return self.norm(x)
