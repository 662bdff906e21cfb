"""``varlen_attention``: FlashAttention-2 over packed variable-length sequences.

Layout and arguments are FlashAttention's ``flash_attn_varlen_func``: ``q
[total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]``, ``cu_seqlens int32 [B+1]``.

Forward: one program per (query block, sequence, head), on a flat 1-d grid
of ``cdiv(max_seqlen_q, BLOCK_M) * B * H`` programs (grid axes 1 and 2 stop
at 65,535 sequences); programs past their sequence's end return at once, so
the grid costs nothing for short sequences. The program streams the sequence's
key blocks with the online softmax (running max and sum in fp32, ``exp2``
with the scale folded into ``log2(e)``), so the ``Lq x Lk`` matrix never
exists. Every key block applies the column mask (one select per score):
peeling the partial last block off the loop made the compiler keep a second
register copy of q live across the loop. It writes the output and the
natural-log sum-exp ``lse`` (``[H, total_q]``), which is all the backward
needs.

FlashAttention's score modifiers are constexpr variants of the same kernels
(``WINDOW``, ``SOFTCAP``, ``ALIBI``): the plain kernels compile to what they
were without them. With a window (causal or local), every kernel loops only
over the blocks its tile can see, so fully masked tiles cost nothing.

Backward (FlashAttention-2's split, no atomics, so results are bitwise
reproducible): a preprocess kernel computes ``delta = rowsum(dO * O)`` (minus
the incoming gradient of ``lse`` when there is one, since ``d lse / d s =
P``); a dk/dv kernel with one program per (key block, sequence, kv head)
recomputes ``P^T`` block by block from ``lse`` over all query blocks of every
query head of its group (so grouped-query heads are summed in a fixed order,
inside one program); a dq kernel with one program per query block loops over
the key blocks.

Head dims that are not a power of two run in the next power-of-two tile with
masked columns (80 and 96 in a 128-wide tile).

Dispatch: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) take the
kernels. Other CPU tensors take the reference through a separate opaque op
(``lookwhen::varlen_attention_cpu``): its per-sequence loop depends on the
values of ``cu_seqlens``, which ``torch.compile`` must not trace.

File layout: the kernels, launchers, CPU path and report specs live beside
this module in :mod:`lookwhen_kernels.ops.attention` (one job per file);
this module registers the op, its autograd and FLOP formulas, and holds the
public functions.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Optional, Tuple

import torch
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from lookwhen_kernels.layout import lengths_from_cu_seqlens
from lookwhen_kernels.ops._common import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    INT32_MAX,
    check_int,
    check_real,
    check_offsets,
    check_tensor,
    checks_values,
    use_triton,
)
from lookwhen_kernels.ops.attention import cpu  # noqa: F401  (registers lookwhen::varlen_attention_cpu*)
from lookwhen_kernels.ops.attention.configs import MAX_HEAD_DIM
from lookwhen_kernels.ops.attention.launch import ScoreMods, backward, forward


# ---------------------------------------------------------------------------
# Registered ops, autograd, FLOP formulas
# ---------------------------------------------------------------------------


@triton_op("lookwhen::varlen_attention", mutates_args=())
def _varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, need_lse: bool, window_left: int = -1,
    window_right: int = -1, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
    pin_config: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``. ``need_lse``: the caller sees ``lse``, so the
    backward takes its gradient into account (otherwise it is known to be 0).
    ``pin_config``: the backward runs pinned configs (FlashAttention's
    ``deterministic=True``)."""
    mods = (window_left, window_right, softcap, alibi_slopes)
    if not use_triton(q):
        return torch.ops.lookwhen.varlen_attention_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods)
    return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    ScoreMods(*mods))


@triton_op("lookwhen::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int = -1, window_right: int = -1,
    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, pin_config: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = (window_left, window_right, softcap, alibi_slopes)
    if not use_triton(q):
        return torch.ops.lookwhen.varlen_attention_cpu_backward(
            grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods
        )
    return backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, ScoreMods(*mods), pin_config)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, need_lse, *mods, pin_config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_seqlens = (max_q, max_k)
    ctx.softmax_scale = softmax_scale
    ctx.need_lse = need_lse
    ctx.mods = mods
    ctx.pin_config = pin_config


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    # Only a caller that asked for lse can have used it.
    grad_lse = grad_lse if ctx.need_lse else None
    dq, dk, dv = _varlen_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, ctx.softmax_scale, *ctx.mods,
        ctx.pin_config,
    )
    # The alibi slopes are constants (FlashAttention gives them no gradient either).
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_varlen_attention.register_autograd(_autograd_backward, setup_context=_setup_context)


def attention_flops(q_shape, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, window_left: int = -1,
                    window_right: int = -1) -> int:
    """``4 * H * Dh`` times the (query, key) pairs that see each other: the two
    GEMMs (QK^T and PV). Without a window every pair of a sequence; with one,
    each query's visible keys (bottom-right aligned, -1 unbounded), counted
    per query row in closed form."""
    lengths_q = lengths_from_cu_seqlens(cu_seqlens_q.cpu()).long()
    lengths_k = lengths_from_cu_seqlens(cu_seqlens_k.cpu()).long()
    if (window_left, window_right) == (-1, -1):
        pairs = int((lengths_q * lengths_k).sum())
    else:
        seq = torch.repeat_interleave(torch.arange(len(lengths_q)), lengths_q)
        row = torch.arange(int(lengths_q.sum())) - (torch.cumsum(lengths_q, 0) - lengths_q)[seq]
        position = row + lengths_k[seq] - lengths_q[seq]
        first = position - window_left if window_left >= 0 else torch.zeros_like(position)
        last = position + window_right if window_right >= 0 else lengths_k[seq] - 1
        pairs = int((torch.minimum(last, lengths_k[seq] - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())
    return 4 * pairs * q_shape[1] * q_shape[2]


@register_flop_formula(torch.ops.lookwhen.varlen_attention, get_raw=True)
def _forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, need_lse,
                   window_left=-1, window_right=-1, *args, out_val=None, **kwargs) -> int:
    return attention_flops(q.shape, cu_seqlens_q, cu_seqlens_k, window_left, window_right)


@register_flop_formula(torch.ops.lookwhen.varlen_attention_backward, get_raw=True)
def _backward_flops(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, window_left=-1, window_right=-1, *args, out_val=None, **kwargs) -> int:
    # Five GEMMs (S recomputed, dV, dP, dS, dK/dQ counted as in FlashAttention): 2.5x the forward.
    return attention_flops(q.shape, cu_seqlens_q, cu_seqlens_k, window_left, window_right) * 5 // 2


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_max_seqlen(name: str, value, lengths: Optional[torch.Tensor]) -> int:
    longest = int(lengths.max()) if lengths is not None and lengths.numel() else 0
    if value is None:
        return longest
    check_int(name, value, 0, types=(Integral, torch.SymInt))
    if lengths is not None and value < longest:
        raise ValueError(f"{name}: {value} is shorter than the longest sequence ({longest})")
    return value


def _check_score_mods(causal, window_size, softcap, alibi_slopes, batch: int, heads: int, device) -> ScoreMods:
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected (left, right), got {window_size!r}") from None
    sides = []
    for side, value in (("left", left), ("right", right)):
        # FlashAttention takes a tensor too (its tests draw the window with
        # torch.randint), and any negative side as unbounded; so is a side
        # past any int32 sequence length (the kernels take int32).
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
                and not value.dtype.is_complex and value.dtype != torch.bool:
            value = int(value.item())
        try:
            value = check_int(side, value)
            sides.append(-1 if value < 0 or value >= INT32_MAX else value)
        except ValueError:
            raise ValueError(f"window_size: {side} must be an int (negative: unbounded), got {window_size!r}") \
                from None
    left, right = sides
    if causal:
        # FlashAttention: causal is the window (left, 0).
        right = 0
    softcap = check_real("softcap", softcap, "[0, inf)", note="0: no cap")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), device=device)
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes: expected shape [{heads}] or [{batch}, {heads}], "
                             f"got {list(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.contiguous()
    return ScoreMods(int(left), int(right), float(softcap), alibi_slopes)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_lse: bool = False,
    validate: bool = True,
):
    """Softmax attention within each of B packed sequences.

    Arguments follow FlashAttention's ``flash_attn_varlen_func``:

    - ``q [total_q, H, Dh]``, ``k, v [total_k, H_kv, Dh]`` (fp16, bf16 or fp32,
      one dtype), ``H`` a multiple of ``H_kv`` (grouped-query attention: query
      head ``h`` reads kv head ``h // (H / H_kv)``). ``Dh`` from 1 to 256.
    - ``cu_seqlens_q``, ``cu_seqlens_k``: int32 ``[B+1]`` offsets; sequence
      ``b`` is rows ``cu[b]:cu[b+1]``. ``cu_seqlens_k=None`` means the same
      offsets as the queries (self-attention). Empty sequences are allowed; a
      query sequence whose key sequence is empty gets zeros (and lse ``-inf``).
    - ``max_seqlen_q``, ``max_seqlen_k``: the longest sequence of each side
      (a larger value is fine, a smaller one is an error). When omitted they
      are computed from ``cu_seqlens``, which reads them back to the host: a
      device sync.
    - ``validate``: run the value checks of ``cu_seqlens`` (monotonic, last
      offset = rows, max lengths), which read it back to the host (a device
      sync; never while torch.compile traces). ``validate=False`` with both
      max lengths given reads nothing: FlashAttention's contract, where the
      caller vouches for the offsets (the model validates once at its
      boundary and passes ``False`` per layer; ``flash_attn_varlen_func``
      always does). Structural checks (dtype, device, shape, contiguity of
      ``cu_seqlens``) always run.
    - ``softmax_scale``: defaults to ``Dh ** -0.5``.
    - ``causal``, ``window_size=(left, right)``: FlashAttention's masks. Query
      ``i`` of a sequence sits at key position ``i + Lk - Lq`` (aligned to the
      bottom-right when the lengths differ) and sees the keys from ``left``
      before to ``right`` after it; ``-1`` is unbounded, ``causal`` sets
      ``right = 0``. Key tiles outside the window are skipped. Queries that
      see no key get zeros and lse ``-inf``.
    - ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)``.
    - ``alibi_slopes``: float32 ``[H]`` or ``[B, H]``; adds ``-slope * |key
      position - query position|`` to the scores (after the soft cap).
    - ``deterministic``: the backward runs the pinned configs even where it
      would autotune, so that gradients are bitwise reproducible across
      processes too (it never uses atomics, so within a process they always
      are); see also :func:`lookwhen_kernels.set_deterministic`.
    - ``dropout_p`` exists so that calls written for FlashAttention keep
      working; only 0 is supported.

    Returns ``out [total_q, H, Dh]`` in the input dtype (accumulated in fp32),
    and with ``return_lse=True`` also ``lse``: float32 ``[H, total_q]``, the
    natural-log sum of ``exp(scale * q.k)`` over each query's keys.
    Differentiable in ``q``, ``k``, ``v`` (and through ``lse``); the backward is
    deterministic.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=device)
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    if k.shape[2] != head_dim or v.shape[2] != head_dim:
        raise ValueError(
            f"k, v: expected head dim {head_dim} like q, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: unsupported head dim {head_dim} (supported: 1 to {MAX_HEAD_DIM})")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: expected shape [{total_k}, {kv_heads}, {head_dim}] like k, got {list(v.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"k: the number of query heads ({heads}) must be a multiple of the number of kv heads ({kv_heads})"
        )
    self_attention = cu_seqlens_k is None
    if self_attention:
        cu_seqlens_k = cu_seqlens_q
    check_offsets("cu_seqlens_q", cu_seqlens_q, device=device)
    check_offsets("cu_seqlens_k", cu_seqlens_k, device=device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k: expected B+1 = {cu_seqlens_q.numel()} offsets like cu_seqlens_q, "
            f"got {cu_seqlens_k.numel()}"
        )
    if self_attention and total_k != total_q:
        raise ValueError(
            f"k: cu_seqlens_k=None means k has q's sequences, but k has {total_k} rows and q {total_q}"
        )
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: attention dropout is not supported, got {dropout_p}")
    mods = _check_score_mods(causal, window_size, softcap, alibi_slopes, cu_seqlens_q.numel() - 1, heads, device)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float, got {softmax_scale}")

    lengths_q = lengths_k = None
    if max_seqlen_q is None or max_seqlen_k is None or checks_values(validate, q):
        lengths_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total=total_q)
        lengths_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total=total_k)
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k)
    for name, t, longest in (("q", q, max_seqlen_q), ("k", k, max_seqlen_k), ("v", v, max_seqlen_k)):
        # Offsets inside one sequence are int32 in the kernels.
        if longest * max(t.stride(0), t.shape[1] * t.shape[2]) >= 2 ** 31:
            raise ValueError(f"{name}: a sequence of {longest} rows is too long for int32 offsets")

    out, lse = _varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), bool(return_lse),
        *mods, bool(deterministic),
    )
    return (out, lse) if return_lse else out


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: Optional[float] = None,
    return_lse: bool = False, **options,
):
    """Equal-length batches, FlashAttention's ``flash_attn_func`` layout:
    ``q [B, N, H, Dh]``, ``k, v [B, Nk, H_kv, Dh]``. Returns ``out [B, N, H,
    Dh]`` and, with ``return_lse=True``, ``lse`` float32 ``[B, H, N]``. No
    host sync (the offsets are built on the device). ``options``:
    :func:`varlen_attention`'s ``causal``, ``window_size``, ``softcap``,
    ``alibi_slopes`` (``[H]`` or ``[B, H]``), ``deterministic``."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k, v: expected [{batch}, Nk, H_kv, Dh] with the batch of q, got k {list(k.shape)}, "
                         f"v {list(v.shape)}")
    offsets = torch.arange(batch + 1, device=q.device, dtype=torch.int32)
    cu_q, cu_k = offsets * n_q, offsets * n_k
    result = varlen_attention(
        q.reshape(batch * n_q, heads, head_dim), k.reshape(batch * n_k, *k.shape[2:]),
        v.reshape(batch * n_k, *v.shape[2:]), cu_q, cu_k, n_q, n_k,
        softmax_scale=softmax_scale, return_lse=return_lse, validate=False, **options,
    )
    if not return_lse:
        return result.view(batch, n_q, heads, head_dim)
    out, lse = result
    return out.view(batch, n_q, heads, head_dim), lse.view(heads, batch, n_q).transpose(0, 1)


def block_diagonal_attention(query, key, value, attn_bias, p: float = 0.0, scale: Optional[float] = None):
    """Drop-in for ``xformers.ops.memory_efficient_attention`` with an xformers
    ``BlockDiagonalMask``: ``query [1, total_q, H, Dh]``, ``key, value [1,
    total_k, H_kv, Dh]``; returns ``[1, total_q, H, Dh]``. Needs xformers only
    for the mask class; causal and padded mask variants are rejected."""
    try:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError as exc:
        raise ModuleNotFoundError("block_diagonal_attention needs xformers (pip install xformers)") from exc
    if type(attn_bias) is not BlockDiagonalMask:
        raise ValueError(f"attn_bias: expected an xformers BlockDiagonalMask, got {type(attn_bias).__name__}")
    if p != 0.0:
        raise ValueError(f"p: dropout is not supported, got p={p}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, ndim=4)
        if t.shape[0] != 1:
            raise ValueError(f"{name}: a block-diagonal batch is one packed sequence, expected [1, total, H, Dh], "
                             f"got {list(t.shape)}")
    q_info, k_info = attn_bias.q_seqinfo, attn_bias.k_seqinfo
    out = varlen_attention(
        query[0], key[0], value[0],
        q_info.seqstart.to(device=query.device, dtype=torch.int32),
        k_info.seqstart.to(device=query.device, dtype=torch.int32),
        q_info.max_seqlen, k_info.max_seqlen, softmax_scale=scale, validate=False,
    )
    return out[None]
