"""``varlen_attention`` against the ways to do without it.

Every provider takes the same packed inputs ``q [total, H, Dh]``, ``k, v
[total, H_kv, Dh]`` and returns the packed output ``[total, H, Dh]``:

- ``varlen_attention``: the op (Triton on a GPU; on a CPU without the
  interpreter, its PyTorch reference path, as the model runs it there).
- ``sdpa_padded``: pad to ``[B, H, L_max, Dh]``, ``scaled_dot_product_attention``
  with a key-padding mask, unpad: what a model without varlen attention does.
  The pad/unpad copies are O(total) next to the O(B * L_max^2) attention.
- ``sdpa_loop``: one ``scaled_dot_product_attention`` call per sequence.
- ``xformers_blockdiag``: xformers' ``memory_efficient_attention`` with a
  ``BlockDiagonalMask`` (when xformers is importable).
- ``flash_attn_varlen``: FlashAttention's ``flash_attn_varlen_func`` (when
  importable, on CUDA, fp16/bf16).

With ``window_size`` (FlashAttention's ``(left, right)``; causal is ``(-1,
0)``) every provider applies the same local mask (xformers is left out).

``python -m bench ops --kernels varlen_attention`` times them at the models'
shapes (add ``--lengths`` for any other set of sequences).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import lookwhen_kernels as lk
from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_inputs(lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, *, device, dtype, seed: int = 0):
    """Packed ``q, k, v`` for self-attention over sequences of ``lengths``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    return tuple(
        torch.randn(total, h, head_dim, generator=generator).to(device=device, dtype=dtype)
        for h in (heads, kv_heads, kv_heads)
    )


def build_providers(lengths: Sequence[int], heads: int, kv_heads: int, *, device, dtype,
                    window_size: Tuple[int, int] = (-1, -1)) -> Dict[str, Provider]:
    """Name -> ``fn(q, k, v) -> out [total, H, Dh]`` for self-attention over
    sequences of ``lengths``; the op first."""
    window_size = tuple(window_size)
    local = window_size != (-1, -1)
    device = torch.device(device)
    lengths = [int(n) for n in lengths]
    cu = cu_seqlens_from_lengths(lengths, device=device)
    longest = max(lengths, default=0)
    gqa = heads != kv_heads
    starts = cu.tolist()
    # Padded layout: row r of the packed tensor sits at [batch_of[r], pos_of[r]].
    batch_of = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device), output_size=sum(lengths))
    pos_of = torch.arange(sum(lengths), device=device) - cu[:-1].long()[batch_of]
    # An empty sequence keeps one (padding) key so its padding queries do not
    # produce NaN; they are cut off anyway.
    key_mask = (torch.arange(longest, device=device)[None, :]
                < torch.tensor(lengths, device=device).clamp(min=1)[:, None])[:, None, None, :]
    if local:
        # Self-attention: bottom-right and top-left alignment agree, so the
        # padded layout takes the same window. Padding queries keep key 0, so
        # that no row of the padded batch is empty (NaN).
        padding_query = (torch.arange(longest, device=device)[None, :]
                         >= torch.tensor(lengths, device=device)[:, None])[:, None, :, None]
        first_key = torch.arange(longest, device=device) == 0
        key_mask = key_mask & reference.attention_mask(longest, longest, window_size, device) \
            | padding_query & first_key

    def ours(q, k, v):
        return lk.varlen_attention(q, k, v, cu, cu, longest, longest, window_size=window_size, validate=False)

    def padded(q, k, v):
        def pad(t):
            out = t.new_zeros((len(lengths), longest) + tuple(t.shape[1:]))
            out[batch_of, pos_of] = t
            return out.transpose(1, 2)

        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask, enable_gqa=gqa)
        return out.transpose(1, 2)[batch_of, pos_of]

    def loop(q, k, v):
        outs = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), enable_gqa=gqa,
                attn_mask=reference.attention_mask(b - a, b - a, window_size, device) if local else None,
            ).transpose(0, 1)
            for a, b in zip(starts[:-1], starts[1:]) if b > a
        ]
        return torch.cat(outs) if outs else q.new_empty(q.shape)

    providers: Dict[str, Provider] = {"varlen_attention": ours, "sdpa_padded": padded, "sdpa_loop": loop}
    xformers = None if local else _xformers_provider(lengths, heads, kv_heads)
    if xformers is not None:
        providers["xformers_blockdiag"] = xformers
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_provider(cu, longest, window_size)
        if flash is not None:
            providers["flash_attn_varlen"] = flash
    return providers


def _xformers_provider(lengths, heads, kv_heads) -> Optional[Provider]:
    try:
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError:
        return None
    bias = BlockDiagonalMask.from_seqlens(list(lengths))
    group = heads // kv_heads

    def blockdiag(q, k, v):
        total, _, head_dim = q.shape
        # Grouped-query heads in xformers' [B, M, G, H, K] layout, kv broadcast over the group.
        shape = (1, total, kv_heads, group, head_dim)
        out = memory_efficient_attention(
            q.view(shape), k[None, :, :, None].expand(shape), v[None, :, :, None].expand(shape), attn_bias=bias
        )
        return out.reshape(q.shape)

    return blockdiag


def _flash_attn_provider(cu, longest, window_size) -> Optional[Provider]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, window_size=window_size)
