"""References of attention over packed sequences (FlashAttention's varlen
contract, with its score modifiers), forward and backward."""
from __future__ import annotations

import torch

from lookwhen_kernels.ops._common import work_dtype


def _attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [..., H, Lq, Dh]``, ``k [..., H_kv, Lk, Dh]`` -> ``[..., H, Lq]``
    natural-log sum-exp of the scaled scores, in at least float32."""
    work = work_dtype(q.dtype)
    kv_heads = k.shape[-3]
    grouped = q.to(work).unflatten(-3, (kv_heads, q.shape[-3] // kv_heads))
    scores = grouped @ k.to(work).unsqueeze(-3).transpose(-1, -2) * scale
    return torch.logsumexp(scores, dim=-1).flatten(-3, -2)


def _unit_stride_rows(*tensors):
    """The tensors with a unit last stride: ATen's CPU flash-attention
    kernels read each row as contiguous whatever its stride says."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``q [B, H, Lq, Dh]``, ``k, v [B, H_kv, Lk, Dh]`` with ``Lk > 0`` ->
    ``out`` like ``q`` and ``lse [B, H, Lq]``.

    On CPU this is ATen's fused flash-attention kernel (what
    ``scaled_dot_product_attention`` runs there): it shares kv heads natively
    and returns lse for free, but its lse carries no gradient. Elsewhere SDPA
    and an explicit logsumexp."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_unit_stride_rows(q, k, v), 0.0, False,
                                                                          scale=scale)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, _attention_lse(q, k, scale)


def _propagate_nan(out, lse, q, k, v, cu_seqlens_q, cu_seqlens_k):
    """FlashAttention's NaN semantics on the fused CPU kernel's results (which
    hide a NaN): a NaN in a query row, or in a key its query sees, makes that
    query's output and lse NaN; a NaN in column ``d`` of a value it sees,
    its output's column ``d``. A query without keys reads nothing and stays
    0 / -inf. Inputs without NaN (the CPU models' every call) pass through:
    one scan each, no masks built."""
    # A sum is NaN whenever an element is (and rarely otherwise: +inf and
    # -inf, which the full check below then clears): one vectorised pass, 5-7x
    # cheaper than isnan().any() on bfloat16, whose scan was ~10% of LookWhen's
    # bfloat16 CPU forward.
    if not any(bool(torch.isnan(t.sum(dtype=torch.float32))) for t in (q, k, v)):
        return out, lse
    group = q.shape[1] // k.shape[1]
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    seq_of_row = torch.repeat_interleave(torch.arange(lengths_q.numel(), device=q.device), lengths_q)

    def any_in_sequence(bad):  # [total_k, H_kv, ...] -> [total_q, H, ...]: over the query's keys
        counts = torch.cat([bad.new_zeros((1, *bad.shape[1:]), dtype=torch.long), bad.long().cumsum(0)])
        per_seq = counts[cu_seqlens_k[1:].long()] - counts[cu_seqlens_k[:-1].long()]
        return (per_seq > 0).repeat_interleave(group, dim=1)[seq_of_row]

    has_keys = (cu_seqlens_k[1:] - cu_seqlens_k[:-1] > 0)[seq_of_row][:, None]
    score_nan = (q.isnan().any(-1) | any_in_sequence(k.isnan().any(-1))) & has_keys
    out_nan = score_nan[..., None] | (any_in_sequence(v.isnan()) & has_keys[..., None])
    return (torch.where(out_nan, float("nan"), out),
            torch.where(score_nan.transpose(0, 1), float("nan"), lse))


def _attention_segments(cu_seqlens_q, cu_seqlens_k):
    """Row slices ``(q rows, k rows)`` of every sequence, and the common
    ``(Lq, Lk)`` when all sequences share non-zero lengths (else ``None``)."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    segments = [(slice(a, b), slice(c, d)) for a, b, c, d in zip(starts_q, starts_q[1:], starts_k, starts_k[1:])]
    shapes = {(rq.stop - rq.start, rk.stop - rk.start) for rq, rk in segments}
    uniform = shapes.pop() if len(shapes) == 1 else None
    return segments, uniform if uniform is not None and min(uniform) > 0 else None


def attention_mask(len_q: int, len_k: int, window_size=(-1, -1), device=None) -> torch.Tensor:
    """``bool [Lq, Lk]``, True where query ``i`` may see key ``j``. Queries
    are aligned to the bottom-right of the score matrix (query ``i`` sits at
    key position ``i + Lk - Lq``, as in FlashAttention >= 2.1); ``window_size
    = (left, right)`` keeps keys from ``left`` before to ``right`` after that
    position, ``-1`` meaning unbounded (causal is ``(-1, 0)``)."""
    rel = torch.arange(len_k, device=device)[None, :] - torch.arange(len_q, device=device)[:, None] - (len_k - len_q)
    left, right = window_size
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    return allowed


def _score_mods(scores, window_size, softcap, slopes):
    """Scaled scores ``[..., H, Lq, Lk]`` -> FlashAttention's modified scores
    (soft cap, then ALiBi bias with ``slopes [..., H]``, then ``-inf`` outside
    the window), and the soft cap's derivative (``None`` without one)."""
    len_q, len_k = scores.shape[-2:]
    derivative = None
    if softcap > 0:
        t = torch.tanh(scores / softcap)
        scores, derivative = softcap * t, 1 - t * t
    if slopes is not None:
        rel = torch.arange(len_k, device=scores.device)[None, :] - torch.arange(len_q, device=scores.device)[:, None]
        scores = scores - slopes.to(scores.dtype)[..., None, None] * (rel - (len_k - len_q)).abs()
    allowed = attention_mask(len_q, len_k, window_size, scores.device)
    return torch.where(allowed, scores, float("-inf")), derivative


def _attend_explicit(q, k, v, scale, window_size, softcap, slopes):
    """One sequence with an explicit score matrix: ``q [Lq, H, Dh]``, ``k, v
    [Lk, H_kv, Dh]``, ``slopes [H]`` or ``None``. Scores in q's dtype (as
    FlashAttention's tests' same-precision reference), softmax in at least
    float32. Differentiable in q, k, v through ``out`` and ``lse``; queries
    that see no key give zeros and ``lse = -inf`` with zero gradients."""
    len_q, len_k = q.shape[0], k.shape[0]
    work = work_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    kb, vb = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    scores, _ = _score_mods((q.transpose(0, 1) @ kb.transpose(-1, -2)).to(work) * scale, window_size, softcap,
                            slopes)
    # A row without keys gets finite dummy scores, then is overwritten: the
    # softmax of an all -inf row would be NaN, in the values and the gradients.
    empty = ~attention_mask(len_q, len_k, window_size, q.device).any(-1)
    scores = scores.masked_fill(empty[:, None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    out = (p.to(q.dtype) @ vb).transpose(0, 1)
    out = torch.where(empty[:, None, None], 0.0, out).to(q.dtype)
    return out, torch.where(empty, float("-inf"), lse)


def _window(causal, window_size):
    # FlashAttention: causal is the window (left, 0).
    return (window_size[0], 0) if causal else tuple(window_size)


def uses_score_mods(causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None) -> bool:
    """Whether an attention call needs the explicit-score path (anything but
    plain softmax attention)."""
    return causal or tuple(window_size) != (-1, -1) or softcap > 0 or alibi_slopes is not None


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale=None, causal=False,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Softmax attention within each packed sequence.

    ``q [total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]`` (query head ``h``
    reads kv head ``h // (H / H_kv)``), int32 offsets ``[B+1]``;
    ``cu_seqlens_k=None`` means q's offsets. Returns ``(out, lse)``: ``out``
    like ``q`` (zeros for a query whose key sequence is empty) and ``lse [H,
    total_q]``, the natural-log sum-exp of the scaled scores (float32, float64
    for float64 inputs, ``-inf`` without keys). ``out`` is differentiable; on
    CPU ``lse`` is not (see :func:`_attend`).

    One batched call when all sequences share their lengths, one per sequence
    otherwise.

    ``causal``, ``window_size``, ``softcap`` and ``alibi_slopes`` (``[H]`` or
    ``[B, H]``) as in FlashAttention (see :func:`attention_mask`); with any of
    them every sequence is computed with an explicit score matrix, and ``lse``
    is differentiable too.
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    heads, head_dim = q.shape[1], q.shape[2]
    lse_dtype = work_dtype(q.dtype)
    segments, uniform = _attention_segments(cu_seqlens_q, cu_seqlens_k)
    if uses_score_mods(causal, window_size, softcap, alibi_slopes):
        window = _window(causal, window_size)
        results = [
            _attend_explicit(q[rows_q], k[rows_k], v[rows_k], scale, window, softcap,
                             None if alibi_slopes is None else alibi_slopes.expand(len(segments), heads)[b])
            for b, (rows_q, rows_k) in enumerate(segments)
        ]
        if not results:
            return q.new_zeros(q.shape), torch.empty((heads, 0), dtype=lse_dtype, device=q.device)
        return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results], dim=1)
    if uniform is not None:
        batched = [t.unflatten(0, (len(segments), -1)).transpose(1, 2) for t in (q, k, v)]
        out, lse = _attend(*batched, scale)
        out, lse = out.transpose(1, 2).reshape(q.shape), lse.transpose(0, 1).reshape(heads, -1)
        return _propagate_nan(out, lse, q, k, v, cu_seqlens_q, cu_seqlens_k) if q.device.type == "cpu" else (out, lse)
    outs, lses = [], []
    for rows_q, rows_k in segments:
        len_q, len_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if len_q == 0:
            continue
        if len_k == 0:
            outs.append(q.new_zeros((len_q, heads, head_dim)))
            lses.append(torch.full((heads, len_q), float("-inf"), dtype=lse_dtype, device=q.device))
            continue
        out, lse = _attend(*(t[rows].transpose(0, 1)[None] for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k))),
                           scale)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return q.new_zeros(q.shape), torch.empty((heads, 0), dtype=lse_dtype, device=q.device)
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return _propagate_nan(out, lse, q, k, v, cu_seqlens_q, cu_seqlens_k) if q.device.type == "cpu" else (out, lse)


def varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale=None,
                              grad_lse=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Gradients of :func:`varlen_attention` for ``q, k, v`` from its ``out``
    and ``lse``; ``grad_lse`` (``[H, total_q]`` or ``None``) is the gradient
    reaching ``lse``.

    On CPU without ``grad_lse``: ATen's fused CPU flash-attention backward.
    Otherwise the closed form, per sequence in at least float32: ``P =
    exp(scale * q k^T - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T -
    rowsum(dO * O) + grad_lse)``, ``dQ = scale * dS K``, ``dK = scale * dS^T
    Q``, a kv head summing over its query heads; scores are built for a few kv
    heads at a time, so a long sequence stays within a few hundred MB. The
    score modifiers of :func:`varlen_attention` enter ``P`` (and the soft cap
    multiplies ``dS`` by its derivative).
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    segments, uniform = _attention_segments(cu_seqlens_q, cu_seqlens_k)
    mods = uses_score_mods(causal, window_size, softcap, alibi_slopes)
    window = _window(causal, window_size)
    if q.device.type == "cpu" and grad_lse is None and not mods:
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if uniform is not None:
            batch = len(segments)
            views = [t.unflatten(0, (batch, -1)).transpose(1, 2) for t in (grad_out, q, k, v, out)]
            grads = fused(*_unit_stride_rows(*views), lse.unflatten(1, (batch, -1)).transpose(0, 1), 0.0, False,
                          scale=scale)
            return tuple(g.transpose(1, 2).reshape(t.shape) for g, t in zip(grads, (q, k, v)))
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rows_q, rows_k in segments:
            if rows_q.stop == rows_q.start or rows_k.stop == rows_k.start:
                continue
            views = [t[rows].transpose(0, 1)[None] for t, rows in
                     ((grad_out, rows_q), (q, rows_q), (k, rows_k), (v, rows_k), (out, rows_q))]
            grads = fused(*_unit_stride_rows(*views), lse[None, :, rows_q], 0.0, False, scale=scale)
            for full, grad, rows in zip((dq, dk, dv), grads, (rows_q, rows_k, rows_k)):
                full[rows] = grad[0].transpose(0, 1)
        return dq, dk, dv

    work = work_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    for b, (rows_q, rows_k) in enumerate(segments):
        len_q, len_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if len_q == 0 or len_k == 0:
            continue
        # [H_kv, G, L, Dh] for the query side, [H_kv, 1, L, Dh] for keys and values.
        qb, gb, ob = (t[rows_q].to(work).transpose(0, 1).unflatten(0, (kv_heads, group)) for t in (q, grad_out, out))
        kb, vb = (t[rows_k].to(work).transpose(0, 1).unsqueeze(1) for t in (k, v))
        stats = lse[:, rows_q].to(work).unflatten(0, (kv_heads, group)).unsqueeze(-1)
        # A query that sees no key (lse = -inf) gets P = 0, not exp(-inf + inf).
        stats = stats.masked_fill(torch.isneginf(stats), float("inf"))
        slopes = None if alibi_slopes is None else \
            alibi_slopes.expand(len(segments), heads)[b].to(work).unflatten(0, (kv_heads, group))
        delta = (gb * ob).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse[:, rows_q].to(work).unflatten(0, (kv_heads, group)).unsqueeze(-1)
        chunk = max(1, (1 << 24) // (group * len_q * len_k))
        for first in range(0, kv_heads, chunk):
            h = slice(first, first + chunk)
            scores, derivative = qb[h] @ kb[h].transpose(-1, -2) * scale, None
            if mods:
                scores, derivative = _score_mods(scores, window, softcap, None if slopes is None else slopes[h])
            p = torch.exp(scores - stats[h])
            ds = p * (gb[h] @ vb[h].transpose(-1, -2) - delta[h])
            if derivative is not None:
                ds = ds * derivative
            dv[rows_k, h] = (p.transpose(-1, -2) @ gb[h]).sum(1).transpose(0, 1)
            dk[rows_k, h] = (ds.transpose(-1, -2) @ qb[h]).sum(1).transpose(0, 1) * scale
            dq[rows_q, h.start * group:h.stop * group] = (ds @ kb[h]).flatten(0, 1).transpose(0, 1) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
