"""FlashAttention 2's Python interface over :func:`varlen_attention`.

``from lookwhen_kernels import flash_attn_varlen_func`` in place of ``from
flash_attn import flash_attn_varlen_func``: the six functions keep
FlashAttention 2's names, positional order, defaults and return convention
(``out``, or ``(out, softmax_lse, S_dmask)`` with ``return_attn_probs=True``;
``softmax_lse`` is ``[H, total_q]`` for varlen calls and ``[B, H, L]`` for
padded ones). They run wherever the op runs: CUDA (Triton kernels), CPU
(ATen per sequence), and CPU under ``TRITON_INTERPRET=1``.

Differences, each a ``ValueError`` rather than a silent change:

- ``dropout_p`` must be 0 (no in-kernel dropout RNG).
- ``return_attn_probs=True`` returns ``S_dmask=None``: FlashAttention fills it
  only for dropout, which is not supported.
- ``block_table`` (paged KV cache) must be ``None``.
- Queries that see no key get ``lse = -inf`` (FlashAttention writes ``+inf``
  there); the output is 0 in both.
"""
from __future__ import annotations

import torch

from lookwhen_kernels.ops.attention import dense_attention, varlen_attention


def _check_unsupported(dropout_p: float, block_table=None) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: attention dropout is not supported (no in-kernel RNG), got {dropout_p}")
    if block_table is not None:
        raise ValueError("block_table: paged KV caches are not supported")


def _unpack(packed: torch.Tensor, name: str, count: int, dim: int):
    if not isinstance(packed, torch.Tensor) or packed.dim() <= dim or packed.shape[dim] != count:
        shape = list(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{name}: expected {count} packed tensors along dim {dim}, got {shape}")
    return packed.unbind(dim)


def _result(result, return_attn_probs: bool):
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, None


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):
    """``q [total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]``, int32
    ``cu_seqlens [B+1]``; returns ``out [total_q, H, Dh]`` (and ``lse [H,
    total_q]``, ``None`` with ``return_attn_probs``). See
    :func:`lookwhen_kernels.varlen_attention` for the arguments."""
    _check_unsupported(dropout_p, block_table)
    result = varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=return_attn_probs, validate=False,
    )
    return _result(result, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False,
):
    """``kv [total_k, 2, H_kv, Dh]``; otherwise :func:`flash_attn_varlen_func`."""
    k, v = _unpack(kv, "kv", 2, 1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )


def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``qkv [total, 3, H, Dh]`` (unbound without a copy: the kernels take
    the packed row stride); otherwise :func:`flash_attn_varlen_func`."""
    q, k, v = _unpack(qkv, "qkv", 3, 1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs,
    )


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``q [B, Lq, H, Dh]``, ``k, v [B, Lk, H_kv, Dh]``; returns ``out [B, Lq,
    H, Dh]`` (and ``lse [B, H, Lq]``, ``None`` with ``return_attn_probs``)."""
    _check_unsupported(dropout_p)
    result = dense_attention(
        q, k, v, softmax_scale=softmax_scale, return_lse=return_attn_probs, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
    )
    return _result(result, return_attn_probs)


def flash_attn_kvpacked_func(
    q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):
    """``kv [B, Lk, 2, H_kv, Dh]``; otherwise :func:`flash_attn_func`."""
    k, v = _unpack(kv, "kv", 2, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False,
):
    """``qkv [B, L, 3, H, Dh]``; otherwise :func:`flash_attn_func`."""
    q, k, v = _unpack(qkv, "qkv", 3, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)
