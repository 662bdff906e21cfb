"""``gather_tokens`` / ``scatter_tokens``: the selected rows of ``[B, N, D]``
to the packed ``[total, D]`` layout and back. Each is the other's adjoint, so
each one's backward is the other op.

One kernel moves rows both ways: a program owns a block of packed rows and a
block of channels, finds each row's clip (``row // K`` for a fixed K, a
binary search over ``cu_seqlens`` in registers for the packed form, so no
row-to-clip map is built and nothing is read back), and copies between packed
row ``r`` and token row ``clip * N + indices[r]``.

``scatter_tokens`` zero-fills its output and then scatters the selected rows
into it. The alternative, one dense pass that writes every output row once
(the packed row or zeros), needs the inverse map token -> packed row, i.e. an
extra int map per call plus a scatter to build it; zero-filling costs only the
``total * D`` selected rows written twice (about K/N of the output, 10% at the
usual keep ratio), runs at memset bandwidth and keeps a single kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lookwhen_kernels import reference
from lookwhen_kernels.layout import patch_rows
from lookwhen_kernels.ops._common import (
    CompileSpec,
    FLOAT_DTYPES,
    TRITON_DTYPE,
    check_cu_seqlens,
    check_indices,
    check_int,
    check_int32,
    check_offsets,
    check_shape,
    check_tensor,
    checks_values,
    cpu_dispatch,
    next_power_of_2,
    use_triton,
    wrap_triton,
)


@triton.jit
def _clip_of_rows(cu_seqlens_ptr, rows, n_clips, search_steps):
    # The last clip whose start is <= row: empty clips share their start with
    # the next clip, so "last" skips them.
    lo = tl.zeros(rows.shape, dtype=tl.int32)
    hi = tl.zeros(rows.shape, dtype=tl.int32) + (n_clips - 1)
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        ahead = tl.load(cu_seqlens_ptr + mid) <= rows
        lo = tl.where(ahead, mid, lo)
        hi = tl.where(ahead, hi, mid - 1)
    return lo


@triton.jit
def _move_rows_kernel(
    src_ptr, dst_ptr, indices_ptr, cu_seqlens_ptr,
    total, n_tokens, dim, k, n_clips, search_steps,
    SCATTER: tl.constexpr, VARLEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < total
    mask = row_ok[:, None] & (cols < dim)[None, :]
    token = tl.load(indices_ptr + rows, mask=row_ok, other=0)
    if VARLEN:
        clip = _clip_of_rows(cu_seqlens_ptr, rows, n_clips, search_steps)
    else:
        clip = rows // k
    packed = rows.to(tl.int64)[:, None] * dim + cols[None, :]
    spread = (clip.to(tl.int64) * n_tokens + token)[:, None] * dim + cols[None, :]
    if SCATTER:
        tl.store(dst_ptr + spread, tl.load(src_ptr + packed, mask=mask), mask=mask)
    else:
        tl.store(dst_ptr + packed, tl.load(src_ptr + spread, mask=mask), mask=mask)


def _blocks(dim: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_D): 2048 elements per program, 16 per thread at 4 warps
    (twice that spills 64-bit addresses on sm_80 when D is not a multiple of
    16); D=768 splits into three 256-wide column blocks with no masked lanes."""
    block_d = min(256, next_power_of_2(dim))
    return max(1, min(64, 2048 // block_d)), block_d


def move_rows(
    src: torch.Tensor, dst: torch.Tensor, indices: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
    n_tokens: int, scatter: bool,
) -> None:
    """Copy between packed rows and token rows; ``dst`` is written only at the
    rows the selection names."""
    total, dim = indices.numel(), src.shape[-1]
    if total == 0 or dim == 0:
        return
    varlen = cu_seqlens is not None
    n_clips = cu_seqlens.numel() - 1 if varlen else indices.shape[0]
    block_r, block_d = _blocks(dim)
    wrap_triton(_move_rows_kernel)[(triton.cdiv(total, block_r), triton.cdiv(dim, block_d))](
        src, dst, indices, cu_seqlens if varlen else indices,
        total, n_tokens, dim, 0 if varlen else indices.shape[1], n_clips, (n_clips - 1).bit_length(),
        SCATTER=scatter, VARLEN=varlen, BLOCK_R=block_r, BLOCK_D=block_d,
    )


@triton_op("lookwhen::gather_tokens", mutates_args=())
def _gather_tokens(x: torch.Tensor, indices: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    if not use_triton(x):
        return cpu_dispatch(None, (x, indices, cu_seqlens), reference.gather_tokens)
    x = x.contiguous()
    out = x.new_empty((indices.numel(), x.shape[2]))
    move_rows(x, out, indices, cu_seqlens, x.shape[1], scatter=False)
    return out


@triton_op("lookwhen::scatter_tokens", mutates_args=())
def _scatter_tokens(
    packed: torch.Tensor, indices: torch.Tensor, n_tokens: int, cu_seqlens: Optional[torch.Tensor]
) -> torch.Tensor:
    if not use_triton(packed):
        return cpu_dispatch(None, (packed, indices, n_tokens, cu_seqlens), reference.scatter_tokens)
    packed = packed.contiguous()
    batch = indices.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    out = packed.new_zeros((batch, n_tokens, packed.shape[1]))
    move_rows(packed, out, indices, cu_seqlens, n_tokens, scatter=True)
    return out


def _gather_setup_context(ctx, inputs, output):
    x, indices, cu_seqlens = inputs
    ctx.save_for_backward(indices, cu_seqlens)
    ctx.n_tokens = x.shape[1]


def _gather_backward(ctx, grad):
    indices, cu_seqlens = ctx.saved_tensors
    return _scatter_tokens(grad, indices, ctx.n_tokens, cu_seqlens), None, None


def _scatter_setup_context(ctx, inputs, output):
    _, indices, _, cu_seqlens = inputs
    ctx.save_for_backward(indices, cu_seqlens)


def _scatter_backward(ctx, grad):
    indices, cu_seqlens = ctx.saved_tensors
    return _gather_tokens(grad, indices, cu_seqlens), None, None, None


_gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup_context)
_scatter_tokens.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)


def _check_selection(indices, cu_seqlens, n_tokens: int, device: torch.device, validate: bool) -> int:
    """Validate a selection and return its batch size.

    Shape, dtype, device and contiguity checks always run. The value checks
    (offsets, id range, ids unique within a clip) read back to the host, so
    they run only with ``validate`` and never while torch.compile traces.
    """
    check_tensor("indices", indices, dtypes=(torch.int32,), device=device, contiguous=True)
    check_int32("indices", indices.numel(), "the number of selected rows")
    if cu_seqlens is None:
        if indices.dim() != 2:
            raise ValueError(
                f"indices: expected [B, K] (or packed [total] with cu_seqlens), got shape {list(indices.shape)}"
            )
        batch = indices.shape[0]
    else:
        check_offsets("cu_seqlens", cu_seqlens, device=device)
        if indices.dim() != 1:
            raise ValueError(f"indices: expected packed [total] with cu_seqlens, got shape {list(indices.shape)}")
        batch = cu_seqlens.numel() - 1
    if not checks_values(validate, indices):
        return batch
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, total=indices.numel(), device=device)
    check_indices("indices", indices, n_tokens, device=device)
    if indices.numel():
        clips, tokens = patch_rows(indices, cu_seqlens, batch, n_tokens, indices.device)
        if int(torch.bincount(clips * n_tokens + tokens, minlength=batch * n_tokens).max()) > 1:
            raise ValueError("indices: token ids must be unique within each clip")
    return batch


def gather_tokens(
    x: torch.Tensor, indices: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *, validate: bool = True,
) -> torch.Tensor:
    """The selected tokens of every clip, packed.

    ``x [B, N, D]`` (fp16, bf16 or fp32, contiguous). ``indices`` is int32
    ``[B, K]`` (the same K for every clip) or packed ``[total]`` with
    ``cu_seqlens int32 [B+1]``; ids lie in ``[0, N)`` and are unique within a
    clip (any order). Returns ``[total, D]`` (``total = B*K`` for the fixed
    form), clip after clip in the order of ``indices``. Differentiable in
    ``x``: the backward is :func:`scatter_tokens`. With ``validate=True``
    (the default) reads the indices and offsets back to the host to check
    them (a device sync; never while torch.compile traces); ``validate=False``
    reads nothing.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    batch = _check_selection(indices, cu_seqlens, x.shape[1], x.device, validate)
    if batch != x.shape[0]:
        name = "indices" if cu_seqlens is None else "cu_seqlens"
        raise ValueError(f"{name}: describes {batch} clips but x has {x.shape[0]}")
    return _gather_tokens(x, indices, cu_seqlens)


def scatter_tokens(
    packed: torch.Tensor, indices: torch.Tensor, n_tokens: int, cu_seqlens: Optional[torch.Tensor] = None, *,
    validate: bool = True,
) -> torch.Tensor:
    """Adjoint of :func:`gather_tokens`: ``packed [total, D]`` back to
    ``[B, n_tokens, D]``, row ``r`` at ``(clip of r, indices[r])`` and zeros
    at every token no row names. ``indices``/``cu_seqlens`` as in
    :func:`gather_tokens` (ids unique within a clip, so no two rows collide).
    Differentiable in ``packed``: the backward is :func:`gather_tokens`.
    ``validate`` as in :func:`gather_tokens`.
    """
    check_tensor("packed", packed, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    n_tokens = check_int("n_tokens", n_tokens, 0)
    _check_selection(indices, cu_seqlens, n_tokens, packed.device, validate)
    check_shape("packed", packed, [indices.numel(), None])
    return _scatter_tokens(packed, indices, n_tokens, cu_seqlens)


def compile_specs():
    # ViT-B: D = 768, 3136 tokens per clip, fixed K and packed budgets.
    specs = []
    block_r, block_d = _blocks(768)
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        for scatter in (False, True):
            for varlen in (False, True):
                name = "scatter_tokens" if scatter else "gather_tokens"
                specs.append(CompileSpec(
                    f"{name}[{ty},{'packed' if varlen else 'fixed'},D=768]", _move_rows_kernel,
                    {"src_ptr": f"*{ty}", "dst_ptr": f"*{ty}", "indices_ptr": "*i32", "cu_seqlens_ptr": "*i32",
                     "total": "i32", "n_tokens": "i32", "dim": "i32", "k": "i32", "n_clips": "i32",
                     "search_steps": "i32", "SCATTER": "constexpr", "VARLEN": "constexpr",
                     "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                    {"SCATTER": scatter, "VARLEN": varlen, "BLOCK_R": block_r, "BLOCK_D": block_d},
                    divisible_by_16=("n_tokens", "dim"),
                ))
    return specs
