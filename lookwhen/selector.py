"""The selector: a shallow ViT on the clip scaled down by
``selector_downsample`` that scores every coarse space-time token.

Its patch embedding reads the uint8 clip straight through
``gather_patch_embed(..., downsample=2)``; its score head is one fused
``score_tokens`` call; its CLS and register tokens, projected to the
extractor's width, become context tokens in every extractor sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lookwhen_kernels as lk
from lookwhen.config import ModelConfig
from lookwhen.layers import Block, PatchEmbed, SeparablePosEmbed, init_weights


class ScoreHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear to one score per token, run as
    one ``score_tokens`` call (timm-style names so it loads like an MLP)."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, n, D]`` -> float32 scores ``[B, n]``."""
        dtype = x.dtype
        return lk.score_tokens(
            x,
            self.norm.weight.to(dtype), self.norm.bias.to(dtype),
            self.fc1.weight.to(dtype), self.fc1.bias.to(dtype),
            self.fc2.weight.to(dtype), self.fc2.bias.to(dtype),
            eps=self.norm.eps,
        )


class STTSScoreHead(nn.Module):
    """STTS's scorer (its ``PredictorLG`` plus min-max normalisation):
    LayerNorm -> Linear -> GELU; each token's first half of the features
    beside the clip-mean of the second half; Linear-GELU-Linear-GELU-Linear
    (D -> D/2 -> D/4 -> 1); scores min-max normalised to [0, 1) per clip."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc_in = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                 nn.Linear(dim // 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, n, D]`` -> float32 scores ``[B, n]`` in [0, 1)."""
        h = F.gelu(self.fc_in(self.norm(x)))
        half = h.shape[-1] // 2
        local, rest = h[..., :half], h[..., half:]
        mixed = torch.cat([local, rest.mean(dim=1, keepdim=True).expand(-1, h.shape[1], -1)], dim=-1)
        scores = self.mlp(mixed).squeeze(-1).float()
        low, high = scores.amin(dim=1, keepdim=True), scores.amax(dim=1, keepdim=True)
        return (scores - low) / (high - low + 1e-5)


class Selector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.selector_width
        frames, grid_h, grid_w = config.selector_grid
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.pos_embed = SeparablePosEmbed(frames, grid_h * grid_w, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, config.registers, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.selector_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(config.selector_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.score_head = (ScoreHead(dim, config.score_hidden, config.norm_eps) if config.score_head == "mlp"
                           else STTSScoreHead(dim, config.norm_eps))
        self.context_proj = nn.Linear(dim, config.width)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(init_weights)

    @property
    def n_prefix(self) -> int:
        return 1 + self.config.registers

    def embed(self, clip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Every coarse token of every clip, packed ``[B * n, D]``."""
        cfg = self.config
        proj = self.patch_embed.proj
        return lk.gather_patch_embed(
            clip, None, proj.weight.to(dtype), proj.bias.to(dtype), self.pos_embed.table().to(dtype),
            patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std, downsample=cfg.selector_downsample,
        )

    def encode(self, tokens: torch.Tensor):
        """``tokens [B, n, D]`` -> (token features ``[B, n, D]``, context
        tokens ``[B, 1 + registers, width]`` for the extractor)."""
        batch = tokens.shape[0]
        prefix = torch.cat([self.cls_token, self.reg_token], dim=1).to(tokens.dtype)
        x = torch.cat([prefix.expand(batch, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        context = self.context_proj(self.norm(x[:, : self.n_prefix]))
        return x[:, self.n_prefix:], context

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """float32 scores ``[B, n]`` on the coarse grid."""
        return self.score_head(features.contiguous())
