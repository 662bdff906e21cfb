"""The selector: a shallow ViT on the clip scaled down by
``selector_downsample`` that scores every coarse space-time token.

Its patch embedding reads the uint8 clip straight through
``gather_patch_embed(..., downsample=2)`` (every ``selector_frame_stride``-th
frame); its score head is one fused ``score_tokens`` call with one or r*r
outputs per token; its CLS and register tokens, projected to the extractor's
width (or as they are), become context tokens in every extractor sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import lookwhen_kernels as lk
from lookwhen.models.config import ModelConfig
from lookwhen.models.layers import Block, PatchEmbed, SeparablePosEmbed, block_options, init_weights, make_norm


class ScoreHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear to ``outputs`` scores per token
    (1, or LookWhere's r*r sub-token logits), run as one ``score_tokens``
    call (timm-style names so it loads like an MLP)."""

    def __init__(self, dim: int, hidden: int, eps: float, outputs: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, n, D]`` -> float32 scores ``[B, n]`` (one output) or
        ``[B, n, r*r]``."""
        dtype = x.dtype
        return lk.score_tokens(
            x,
            self.norm.weight.to(dtype), self.norm.bias.to(dtype),
            self.fc1.weight.to(dtype), self.fc1.bias.to(dtype),
            self.fc2.weight.to(dtype), self.fc2.bias.to(dtype),
            eps=self.norm.eps,
        )


def frame_scores(scores: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Selector scores ``[B, n]`` (or ``[B, n, r*r]``) -> the same on
    ``config.score_grid``: each selector frame's scores repeated for the
    ``selector_frame_stride`` frames it stands for (what ``topk_tokens``
    takes, with ``grid=config.score_grid, out_grid=config.grid``)."""
    stride = config.selector_frame_stride
    if stride == 1:
        return scores
    per_frame = scores.view(scores.shape[0], config.selector_grid[0], -1, *scores.shape[2:])
    return per_frame.repeat_interleave(stride, dim=1).flatten(1, 2)


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
            Block(dim, config.selector_heads, config.mlp_ratio, config.norm_eps, **block_options(config))
            for _ in range(config.selector_depth)
        )
        self.norm = make_norm(config.norm, dim, config.norm_eps)
        self.score_head = (ScoreHead(dim, config.score_hidden, config.norm_eps, config.score_outputs)
                           if config.score_head == "mlp" else STTSScoreHead(dim, config.norm_eps))
        self.context_proj = nn.Linear(dim, config.width) if config.context_projection else nn.Identity()
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(init_weights)

    @property
    def n_prefix(self) -> int:
        return 1 + self.config.registers

    def embed(self, clip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Every coarse token of every clip, packed ``[B * n, D]``."""
        cfg = self.config
        if cfg.selector_frame_stride > 1:
            # A uint8 copy of the frames the selector sees (1/stride of the
            # clip): the op reads contiguous clips.
            clip = clip[:, :: cfg.selector_frame_stride].contiguous()
        if cfg.selector_image_size:
            return self._embed_resized(clip, dtype)
        weight, bias = self.patch_embed.weights(dtype)
        return lk.gather_patch_embed(
            clip, None, weight, bias, self.pos_embed.table(dtype),
            patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std, downsample=cfg.selector_downsample,
        )

    def _embed_resized(self, clip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """LookWhere's selector input: each frame normalised, bilinearly
        resized (``align_corners=False``, no antialiasing) to
        ``selector_image_size`` and patch-embedded. The resize is not a
        block mean, so this path builds float frames (at the clip's size,
        then the selector's) instead of reading pixels in the op."""
        cfg = self.config
        batch = clip.shape[0]
        mean = torch.tensor(cfg.mean, device=clip.device, dtype=torch.float32)
        std = torch.tensor(cfg.std, device=clip.device, dtype=torch.float32)
        pixels = rearrange((clip.float() / 255 - mean) / std, "b t h w c -> (b t) c h w")
        size = cfg.selector_image_size
        small = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        tokens = F.conv2d(small.to(dtype), *self.patch_embed.weights(dtype), stride=cfg.patch_size)
        tokens = rearrange(tokens, "(b t) d h w -> b (t h w) d", b=batch)
        return (tokens + self.pos_embed.table(dtype)).flatten(0, 1)

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
        """float32 scores on the selector's grid: ``[B, n]``, or ``[B, n,
        r*r]`` with ``score_outputs`` = r*r."""
        return self.score_head(features.contiguous())

