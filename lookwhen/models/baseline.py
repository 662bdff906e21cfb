"""The dense baseline: InternVideo2-B/14 (OpenGVLab/InternVideo,
``InternVideo2/single_modality/models/internvideo2.py``,
``internvideo2_base_patch14_224``), the model LookWhen's speed is measured
against, and the default video teacher of pre-training.

The preset ``internvideo2-b14`` is that architecture: 8 frames of 224 px cut
into 14-px patches one frame deep (8 x 16 x 16 = 2048 tokens) plus a CLS
token, one joint ``[1 + N, D]`` position table (initialised as their 3-D
sin-cos, a quarter of the width for time), 12 blocks 768 wide with 12 heads,
RMSNorm, no qkv bias, RMS qk-norm over the whole width, LayerScale (1e-5),
the tanh GELU of their fused MLP, no final norm, and their attention-pooling
head: the mean of all tokens as the one query of a 16-head cross-attention
(``clip_projector``: LayerNorms on query, keys and values, biased q/k/v)
followed by ``fc_norm``; ``head`` (a classifier, when configured) is applied
to that embedding by the caller. Random initialisation is theirs too: CLS
``trunc_normal(0.02)``, output projections shrunk with depth.

Parameter names are theirs, so their checkpoints load key for key
(:func:`load_internvideo2_state_dict`; from a file,
:func:`lookwhen.io.weights.load_internvideo2`); only the patch projection differs in
shape (their ``Conv3d`` with a one-frame kernel is our ``Conv2d``).

Attention runs through ``lookwhen_kernels.varlen_attention`` by default
(``attention="kernels"``), like LookWhen's extractor, so that the two are
compared on the same kernels: a batch of clips is a packed set of
equal-length sequences, and :meth:`DenseBaseline.forward_packed` runs the
same trunk and pooling over any packed token set (kept tokens only, one
sequence per clip). ``attention="sdpa"`` runs PyTorch's
``scaled_dot_product_attention`` on dense ``[B, L, D]`` batches instead.
Other configs (``norm``, ``pos_embed="separable"``, ``final_norm``, ...)
give plain-ViT variants, which is what timm image weights load into
(:mod:`lookwhen.models.timm_weights`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

import lookwhen_kernels as lk
from lookwhen.models.config import ModelConfig
from lookwhen.models.layers import (
    Block,
    PatchEmbed,
    SeparablePosEmbed,
    block_options,
    check_clip,
    compute_dtype,
    init_weights,
    make_norm,
)
from lookwhen_kernels.layout import lengths_from_cu_seqlens, packed_batch_ids, segment_sum

# InternVideo2's pooling head uses PyTorch's default LayerNorm epsilon.
POOL_EPS = 1e-5


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[M, dim]``: sines then cosines of ``positions`` at the frequencies
    ``10000 ** (-i / (dim / 2))`` (MAE's table), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, frames: int, side: int) -> torch.Tensor:
    """InternVideo2's 3-D sin-cos table ``[frames * side * side, dim]`` in
    token order (``n = t*side*side + i*side + j``): the first quarter of the
    width encodes the frame ``t``, the remaining three quarters are a 2-D
    table whose first half encodes the column ``j`` and second half the row
    ``i`` (their meshgrid puts the width axis first)."""
    temporal_dim = dim // 4
    spatial_dim = dim - temporal_dim
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    spatial = torch.cat([sincos_1d(spatial_dim // 2, cols.flatten()), sincos_1d(spatial_dim // 2, rows.flatten())], 1)
    temporal = sincos_1d(temporal_dim, torch.arange(frames))
    return torch.cat([temporal[:, None, :].expand(-1, side * side, -1),
                      spatial[None, :, :].expand(frames, -1, -1)], dim=2).reshape(-1, dim)


class CrossAttention(nn.Module):
    """InternVideo2's ``CrossAttention`` under its names: bias-free
    ``q``/``k``/``v`` projections with separate ``q_bias``/``k_bias``/
    ``v_bias`` and an output ``proj``."""

    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)


class AttentionPool(nn.Module):
    """InternVideo2's ``clip_projector``: the mean token of each sequence
    (CLS included), LayerNormed, is the one query; keys and values are the
    tokens through their own LayerNorms. One embedding per sequence."""

    def __init__(self, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = nn.LayerNorm(dim, eps=POOL_EPS)
        self.norm1_k = nn.LayerNorm(dim, eps=POOL_EPS)
        self.norm1_v = nn.LayerNorm(dim, eps=POOL_EPS)
        self.cross_attn = CrossAttention(dim, heads, out_dim)

    def _project(self, mean, x):
        attn = self.cross_attn
        q, k, v = attn.q(self.norm1_q(mean)), attn.k(self.norm1_k(x)), attn.v(self.norm1_v(x))
        # The biases in the products' dtype: under autocast float32 parameters
        # would promote the attention's inputs.
        return q + attn.q_bias.to(q.dtype), k + attn.k_bias.to(k.dtype), v + attn.v_bias.to(v.dtype)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        """``x [B, L, D]`` (SDPA), or packed ``[total, D]`` with
        ``cu_seqlens``/``max_seqlen`` (varlen attention, one query per
        sequence) -> ``[B, out_dim]``."""
        heads = self.cross_attn.heads
        if cu_seqlens is None:
            batch, length, dim = x.shape
            q, k, v = self._project(x.mean(1, keepdim=True), x)
            q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.cross_attn.proj(out.reshape(batch, dim))
        total, dim = x.shape
        batch = cu_seqlens.numel() - 1
        lengths = lengths_from_cu_seqlens(cu_seqlens)
        seq_of_row = packed_batch_ids(cu_seqlens, total)
        # A GEMM, not index_add_: the same sums on every run.
        mean = (segment_sum(x, seq_of_row, batch) / lengths.clamp(min=1)[:, None]).to(x.dtype)
        q, k, v = self._project(mean, x)
        one_each = torch.arange(batch + 1, device=x.device, dtype=torch.int32)
        out = lk.varlen_attention(q.view(batch, heads, -1), k.view(total, heads, -1), v.view(total, heads, -1),
                                  one_each, cu_seqlens, max_seqlen_q=1, max_seqlen_k=max_seqlen, validate=False)
        return self.cross_attn.proj(out.reshape(batch, dim))


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
        if config.pos_embed == "joint":
            table = sincos_3d(dim, frames, grid_h)
            self.pos_embed = nn.Parameter(torch.cat([table.new_zeros(1, dim), table])[None].float())
        else:
            self.pos_embed = SeparablePosEmbed(frames, grid_h * grid_w, dim)
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, config.norm_eps, **block_options(config))
            for _ in range(config.depth)
        )
        self.norm = make_norm(config.norm, dim, config.norm_eps) if config.final_norm else None
        self.clip_projector = AttentionPool(dim, config.pool_heads, dim)
        self.fc_norm = nn.LayerNorm(dim, eps=POOL_EPS)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else None
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        # InternVideo2's initialisation: each block's output projections
        # shrink with depth, by 1 / sqrt(2 * layer), layers counted from 1.
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
        # (x / 255 - mean) / std as one multiply-add per pixel.
        std = torch.tensor(config.std)
        self.register_buffer("pixel_scale", (1.0 / (255.0 * std)).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_shift", (-torch.tensor(config.mean) / std).view(3, 1, 1), persistent=False)

    def embed(self, clip: torch.Tensor) -> torch.Tensor:
        """Every clip's sequence before the blocks, ``[B, 1 + N, D]``: CLS
        first, then the patch tokens in token order, position embedding
        added. A subset of its rows, packed, is what :meth:`forward_packed`
        takes."""
        check_clip(clip, self.config)
        batch = clip.shape[0]
        frames_chw = rearrange(clip, "b t h w c -> (b t) c h w")
        pixels = torch.addcmul(self.pixel_shift, frames_chw.to(self.pixel_scale.dtype), self.pixel_scale)
        patches = self.patch_embed.proj(pixels)
        dtype = compute_dtype(self.cls_token)
        x = rearrange(patches, "(b t) d h w -> b (t h w) d", b=batch).to(dtype)
        cls = self.cls_token.to(dtype).expand(batch, -1, -1)
        if isinstance(self.pos_embed, SeparablePosEmbed):
            return torch.cat([cls, x + self.pos_embed.table(dtype)], dim=1)
        return torch.cat([cls, x], dim=1) + self.pos_embed.to(dtype)

    def trunk(self, x: torch.Tensor, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """The blocks (and the final norm, where the config has one) on a
        dense ``[B, L, D]`` batch or on packed ``[total, D]`` sequences."""
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen)
        return x if self.norm is None else self.norm(x)

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Packed token sets -> video embeddings ``[B, width]``. ``x [total,
        D]``: already embedded rows (of :meth:`embed`, any subset per clip,
        the CLS row included where wanted); ``cu_seqlens`` int32 ``[B+1]``
        delimits each clip's rows and ``max_seqlen`` bounds their count (the
        caller vouches for both, as with ``varlen_attention``). Attention,
        trunk and pooling head alike, runs through the kernels; the pooling
        query is each sequence's mean row."""
        tokens = self.trunk(x, cu_seqlens, max_seqlen)
        return self.fc_norm(self.clip_projector(tokens, cu_seqlens, max_seqlen))

    def _packed_layout(self, x: torch.Tensor):
        batch, length, dim = x.shape
        cu_seqlens = torch.arange(batch + 1, device=x.device, dtype=torch.int32) * length
        return x.reshape(batch * length, dim), cu_seqlens, length

    def forward_features(self, clip: torch.Tensor) -> torch.Tensor:
        """The trunk's tokens ``[B, 1 + N, D]`` (CLS first)."""
        x = self.embed(clip)
        if self.config.attention == "sdpa":
            return self.trunk(x)
        packed, cu_seqlens, length = self._packed_layout(x)
        return self.trunk(packed, cu_seqlens, length).view(x.shape)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """Video embedding ``[B, width]`` (``fc_norm`` of the pooled token).
        The classifier, when configured, is ``self.head`` applied to it."""
        x = self.embed(clip)
        if self.config.attention == "sdpa":
            return self.fc_norm(self.clip_projector(self.trunk(x)))
        return self.forward_packed(*self._packed_layout(x))


# The official checkpoint layout ------------------------------------------------------------------
_CLASSIFIER = ("head.weight", "head.bias")


@dataclass
class LoadReport:
    """What loading a state dict did: ``missing`` (our keys the checkpoint
    lacks), ``unexpected`` (its keys with no place in the model),
    ``skipped`` (its classifier, left out because the model has none of
    that shape)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def load_internvideo2_state_dict(model: DenseBaseline, state_dict: Mapping[str, torch.Tensor], *,
                                 strict: bool = True) -> LoadReport:
    """Load an official InternVideo2 (single-modality) state dict into a
    dense baseline built with the matching config (``internvideo2-b14`` for
    ``internvideo2_base_patch14_224``). Keys are theirs; the patch
    projection's one-frame ``Conv3d`` kernel ``[D, 3, 1, p, p]`` becomes our
    ``Conv2d`` ``[D, 3, p, p]``. A classifier of another size (or none in the
    model) is skipped. Returns the :class:`LoadReport`; with ``strict`` a
    missing or unexpected key raises ``ValueError`` (after nothing was
    copied), and a shape that does not fit always does."""
    if not isinstance(model, DenseBaseline):
        raise ValueError(f"model: expected a DenseBaseline, got {type(model).__name__}")
    ours = model.state_dict()
    theirs = dict(state_dict)
    proj = theirs.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 5:
        if proj.shape[2] != 1:
            raise ValueError(f"state_dict: 'patch_embed.proj.weight' has a tubelet of {proj.shape[2]} frames; "
                             "only one-frame patches (tubelet 1) are supported")
        theirs["patch_embed.proj.weight"] = proj[:, :, 0]
    report = LoadReport()
    for key in _CLASSIFIER:
        if key in theirs and (key not in ours or ours[key].shape != theirs[key].shape):
            report.skipped.append(key)
            del theirs[key]
    report.missing = sorted(set(ours) - set(theirs))
    report.unexpected = sorted(set(theirs) - set(ours))
    wrong = [f"{key}: {list(theirs[key].shape)} for {list(ours[key].shape)}"
             for key in sorted(set(ours) & set(theirs)) if theirs[key].shape != ours[key].shape]
    if wrong:
        raise ValueError(f"state_dict: shapes do not fit {model.config.name}: {'; '.join(wrong[:5])}")
    if strict and not report.ok:
        raise ValueError(f"state_dict: does not fit {model.config.name}: missing keys {report.missing[:8]}, "
                         f"unexpected keys {report.unexpected[:8]}")
    model.load_state_dict({k: v for k, v in theirs.items() if k in ours}, strict=False)
    return report

