"""Transformer building blocks shared by the selector, the extractor and the
dense baseline.

Parameter names follow timm's ``VisionTransformer`` (``norm1``, ``attn.qkv``,
``attn.q_norm``, ``attn.k_norm``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``, ``patch_embed.proj``) so a timm state
dict maps onto them key for key (see :mod:`lookwhen.models.timm_weights`); the
block options (norm, qkv bias, qk-norm, LayerScale, MLP activation) cover
timm's ViTs, DINOv2 and InternVideo2.
A :class:`Block` runs either on a dense batch ``[B, L, D]`` (attention through
``scaled_dot_product_attention``) or on packed tokens ``[total, D]`` with
``cu_seqlens`` (attention through ``lookwhen_kernels.varlen_attention``).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from timm.layers import Mlp, trunc_normal_

import lookwhen_kernels as lk
from lookwhen.models.config import MLP_ACTS, NORMS, QK_NORMS


def compute_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype the ops should see: autocast's when it is on for the
    tensor's device, the parameters' otherwise (custom ops are not autocast,
    so the model casts their floating inputs itself)."""
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose output keeps the input's dtype under autocast
    (the weight is cast to it, as InternVideo2's fused RMSNorm runs in the
    model's dtype): PyTorch's fused kernel needs one dtype, and the custom
    attention op needs q, k and v in one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class LayerScale(nn.Module):
    """timm's ``LayerScale`` (parameter ``gamma``), multiplied in float32 and
    returned in the input's dtype, as InternVideo2's is (its
    ``force_fp32``): under autocast the residual stream keeps the compute
    dtype instead of being promoted to float32 by the parameter."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.gamma.float()).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """LayerNorm (timm's ViTs, DINOv2) or RMSNorm (InternVideo2); both keep
    their parameters under ``weight`` (and ``bias`` for LayerNorm), as the
    checkpoints do."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm: expected one of {NORMS}, got {kind!r}")


def block_options(config) -> dict:
    """The :class:`Block` keyword arguments a config asks for."""
    return dict(norm=config.norm, qkv_bias=config.qkv_bias, qk_norm=config.qk_norm,
                layer_scale=config.layer_scale, mlp_act=config.mlp_act)


class Attention(nn.Module):
    """Multi-head self-attention. ``qk_norm="width"`` normalises queries and
    keys over the whole width before the heads are split (InternVideo2's
    ``q_norm``/``k_norm``, weights ``[dim]``); ``"head"`` normalises each
    head (timm's, weights ``[head_dim]``)."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, qk_norm: str = "none",
                 norm: str = "layernorm", eps: float = 1e-6):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm: expected one of {QK_NORMS}, got {qk_norm!r}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_norm != "none":
            size = dim if qk_norm == "width" else self.head_dim
            self.q_norm = make_norm(norm, size, eps)
            self.k_norm = make_norm(norm, size, eps)
        self.proj = nn.Linear(dim, dim)

    def _normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if self.qk_norm == "head":
            return norm(x)
        return norm(x.flatten(-2)).view(x.shape)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        *lead, dim = x.shape
        q, k, v = self.qkv(x).view(*lead, 3, self.heads, self.head_dim).unbind(-3)
        if self.qk_norm != "none":
            # Under autocast a LayerNorm answers in float32; the op takes one dtype.
            q, k = self._normed(q, self.q_norm).to(v.dtype), self._normed(k, self.k_norm).to(v.dtype)
        if cu_seqlens is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.proj(out.transpose(1, 2).reshape(*lead, dim))
        out = lk.varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, validate=False)
        return self.proj(out.reshape(*lead, dim))


class Block(nn.Module):
    """Pre-norm transformer block under timm's parameter names. Options (the
    defaults are timm's plain ViT-B): ``norm`` (``"layernorm"`` or
    ``"rmsnorm"``, for the block's norms and the qk-norms), ``qkv_bias``,
    ``qk_norm`` (see :class:`Attention`), ``layer_scale`` (the initial value
    of timm's ``ls1.gamma``/``ls2.gamma``, e.g. 1e-5 for InternVideo2 and
    DINOv2; 0 for none) and ``mlp_act`` (``"gelu"``, or ``"gelu_tanh"``, the
    tanh approximation InternVideo2's fused MLP computes)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6, *,
                 norm: str = "layernorm", qkv_bias: bool = True, qk_norm: str = "none",
                 layer_scale: float = 0.0, mlp_act: str = "gelu"):
        super().__init__()
        if mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act: expected one of {MLP_ACTS}, got {mlp_act!r}")
        if layer_scale < 0:
            raise ValueError(f"layer_scale: expected an initial value >= 0 (0: none), got {layer_scale}")
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm=norm, eps=eps)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = make_norm(norm, dim, eps)
        act = nn.GELU if mlp_act == "gelu" else functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        x = x + self.ls1(self.attn(self.norm1(x), cu_seqlens, max_seqlen))
        return x + self.ls2(self.mlp(self.norm2(x)))


class CastCache:
    """A module's parameters cast to the compute dtype, kept between
    inference calls: in bf16 a fresh cast is a full read and write of each
    weight per forward, work the matrix units make a visible share. Where
    autograd records (or under compile or a FLOP counter) every call casts
    afresh, so gradients flow to the parameters."""

    def __init__(self):
        self._entry = None

    def get(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        if all(t.dtype == dtype for t in tensors) or not untracked_eager(*tensors):
            return tuple(t.to(dtype) for t in tensors)
        key = (tuple(tensor_state(t) for t in tensors), dtype)
        if self._entry is None or self._entry[0] != key:
            # Normal tensors even under inference_mode, as the position table.
            with torch.inference_mode(False), torch.no_grad():
                self._entry = (key, tuple(t.to(dtype) for t in tensors))
        return self._entry[1]

    def clear(self) -> None:
        self._entry = None


class PatchEmbed(nn.Module):
    """Holds the patch projection under timm's name. LookWhen passes its
    weight to ``gather_patch_embed``; the dense baseline runs it as a conv."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self._cast = CastCache()

    def weights(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The projection's weight and bias in ``dtype`` (:class:`CastCache`)."""
        return self._cast.get((self.proj.weight, self.proj.bias), dtype)

    def _apply(self, fn, recurse=True):
        self._cast.clear()
        return super()._apply(fn, recurse)


class SeparablePosEmbed(nn.Module):
    """Learned temporal ``[T, D]`` plus spatial ``[h*w, D]`` embeddings; the
    ``[T*h*w, D]`` table in token order (``n = t*h*w + i*w + j``) is built
    per call while gradients flow to the factors, and kept between calls in
    inference (building it is a full-size write per forward, several per cent
    of a sparse model's CPU time)."""

    def __init__(self, frames: int, spatial: int, dim: int):
        super().__init__()
        self.temporal = nn.Parameter(torch.zeros(frames, dim))
        self.spatial = nn.Parameter(torch.zeros(spatial, dim))
        trunc_normal_(self.temporal, std=0.02)
        trunc_normal_(self.spatial, std=0.02)
        self._table = None

    def _build(self) -> torch.Tensor:
        return (self.temporal[:, None, :] + self.spatial[None, :, :]).flatten(0, 1)

    def table(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The table, in ``dtype`` when given (the cast kept with it)."""
        dtype = self.temporal.dtype if dtype is None else dtype
        if not untracked_eager(self.temporal, self.spatial):
            return self._build().to(dtype)
        key = (*(tensor_state(p) for p in (self.temporal, self.spatial)), dtype)
        if self._table is None or self._table[0] != key:
            # A normal tensor even under inference_mode, so that later
            # autograd-recorded calls may use it.
            with torch.inference_mode(False), torch.no_grad():
                self._table = (key, self._build().to(dtype))
        return self._table[1]

    def _apply(self, fn, recurse=True):
        self._table = None
        return super()._apply(fn, recurse)


def tensor_state(tensor: torch.Tensor):
    """What identifies a tensor's current values for a cache: its storage,
    its version counter (bumped by in-place writes; inference tensors have
    none, and cannot be written outside inference mode) and its dtype."""
    version = -1 if tensor.is_inference() else tensor._version
    return (id(tensor), tensor.data_ptr(), version, tensor.dtype, tensor.device)


def untracked_eager(*tensors: torch.Tensor) -> bool:
    """True when autograd records nothing about ``tensors`` and the call runs
    eagerly on real data (not under ``torch.compile``, a FLOP counter or fake
    tensors): where a cached or differently computed value is safe to use."""
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return not tracked and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


def init_weights(module: nn.Module) -> None:
    """timm's ViT initialisation for linear layers (LayerNorms and convs keep
    PyTorch's defaults, as in timm)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_clip(clip, config) -> None:
    """The models' input boundary: a uint8 ``[B, T, H, W, 3]`` clip of the
    configured size."""
    if not isinstance(clip, torch.Tensor):
        raise ValueError(f"clip: expected a torch.Tensor, got {type(clip).__name__}")
    if clip.dtype != torch.uint8:
        raise ValueError(f"clip: expected dtype uint8 (raw pixels), got {clip.dtype}")
    expected = (config.frames, config.image_size, config.image_size, 3)
    if clip.dim() != 5 or tuple(clip.shape[1:]) != expected:
        raise ValueError(
            f"clip: expected shape [B, {', '.join(map(str, expected))}] for {config.name}, "
            f"got {list(clip.shape)}"
        )
    if clip.shape[0] == 0:
        raise ValueError("clip: the batch is empty")
