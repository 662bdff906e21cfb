"""The dense baseline: an InternVideo2-B-shaped video ViT that looks at every
token (the model LookWhen's speed is measured against).

Plain PyTorch on purpose: the clip is normalised in float, cut into patches by
a strided conv, every token plus CLS goes through the same :class:`Block` as
LookWhen's extractor with ``scaled_dot_product_attention``, and an
attention-pooling head turns the tokens into one embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lookwhen.config import ModelConfig
from lookwhen.layers import Block, PatchEmbed, SeparablePosEmbed, check_clip, compute_dtype, init_weights


class AttentionPool(nn.Module):
    """InternVideo2's pooling head: the mean token, as a query, attends over
    all tokens; one output token per clip."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        x = self.norm(x)
        q = self.q(x.mean(1, keepdim=True)).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        kv = self.kv(x).view(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.reshape(batch, dim))


class DenseBaseline(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "dense":
            raise ValueError(f"config {config.name!r} is a {config.kind} config, not a dense one")
        self.config = config
        frames, grid_h, grid_w = config.grid
        dim = config.width
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = SeparablePosEmbed(frames, grid_h * grid_w, dim)
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, config.norm_eps) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.pool = AttentionPool(dim, config.pool_heads, config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else None
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)
        # (x / 255 - mean) / std as one multiply-add per pixel.
        std = torch.tensor(config.std)
        self.register_buffer("pixel_scale", (1.0 / (255.0 * std)).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", (-torch.tensor(config.mean) / std).view(3, 1, 1), persistent=False)

    def forward_features(self, clip: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens ``[B, 1 + N, D]`` (CLS first)."""
        check_clip(clip, self.config)
        batch, frames, height, width, _ = clip.shape
        frames_chw = clip.permute(0, 1, 4, 2, 3).reshape(batch * frames, 3, height, width)
        pixels = torch.addcmul(self.pixel_shift, frames_chw.to(self.pixel_scale.dtype), self.pixel_scale)
        patches = self.patch_embed.proj(pixels)
        dtype = compute_dtype(self.cls_token)
        x = patches.flatten(2).transpose(1, 2).reshape(batch, -1, self.config.width)
        x = x.to(dtype) + self.pos_embed.table().to(dtype)
        x = torch.cat([self.cls_token.to(dtype).expand(batch, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """Video embedding ``[B, width]``. The classifier, when configured, is
        ``self.head`` applied to it."""
        return self.pool(self.forward_features(clip))
