"""``nn_uniqueness``: for every token, the distance to its nearest other token
of the same clip (LookWhen's selection target).

Flash-style: one program owns ``BLOCK_M`` query tokens of one clip and walks
the clip's keys in ``BLOCK_N`` blocks. Each block is one ``tl.dot(q, k^T)``
tile (accumulated over D chunks, so any D fits a fixed register budget), turned
into squared distances ``|q|^2 + |k|^2 - 2 q.k`` (or negated cosine
similarities) with squared norms from a first, one-pass kernel; self and
out-of-range keys are masked, and a running minimum with its argument is kept.
No ``[N, N]`` matrix exists; extra memory is ``B * N`` floats.

The running minimum only picks each token's neighbour: the expansion loses
digits when two tokens nearly coincide (``|q|^2`` and ``2 q.k`` cancel), so the
program then re-measures the distance to that neighbour directly, in fp32
(``sqrt(sum((q - k)^2))``, or ``|u - v|^2 / 2`` on the normalised vectors for
cosine): exact duplicates give exactly 0 and close pairs keep full precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import (
    CompileSpec,
    FLOAT_DTYPES,
    TRITON_DTYPE,
    check_int32,
    check_tensor,
    cpu_dispatch,
    dot_precision,
    use_triton,
    wrap_triton,
)

METRICS = ("l2", "cosine")
NUM_STAGES = 3
NORM_BLOCKS = {"BLOCK_R": 32, "BLOCK_D": 32}
# 64x64 distance tiles (two warpgroups of 64x32 on Hopper), D in chunks of 32:
# spill-free for every dtype on sm_90 and sm_80, odd D included.
BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}
NUM_WARPS = 8
# CUDA's limit on grid axis 1, which holds the query blocks of a clip.
MAX_GRID_Y = 65535
# F.normalize's default, as in reference.nn_uniqueness.
COSINE_EPS = tl.constexpr(1e-12)


@triton.jit
def _sq_norms(x_ptr, out_ptr, n_rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * dim
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        tile = tl.load(row_ptrs + cols[None, :], mask=row_ok[:, None] & (cols < dim)[None, :], other=0.0)
        tile = tile.to(tl.float32)
        total += tl.sum(tile * tile, axis=1)
    tl.store(out_ptr + rows, total, mask=row_ok)


@triton.jit
def _nn_uniqueness_fwd(
    x_ptr, sq_ptr, out_ptr,
    n_tokens, dim,
    COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    clip = tl.program_id(0)
    queries = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = queries < n_tokens
    clip_rows = clip.to(tl.int64) * n_tokens
    clip_ptr = x_ptr + clip_rows * dim
    clip_sq = sq_ptr + clip_rows
    q_ptrs = clip_ptr + queries[:, None] * dim
    q_sq = tl.load(clip_sq + queries, mask=q_ok, other=0.0)
    # F.normalize's convention: a zero vector has cosine 0 with everything.
    q_inv = 1.0 / tl.maximum(tl.sqrt(q_sq), COSINE_EPS)

    best = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    nearest = queries
    for key_start in range(0, n_tokens, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k_ok = keys < n_tokens
        k_ptrs = clip_ptr + keys[None, :] * dim
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            q = tl.load(q_ptrs + cols[None, :], mask=q_ok[:, None] & col_ok[None, :], other=0.0)
            k_t = tl.load(k_ptrs + cols[:, None], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dots = tl.dot(q, k_t, dots, input_precision=DOT_PRECISION)
        k_sq = tl.load(clip_sq + keys, mask=k_ok, other=0.0)
        if COSINE:
            k_inv = 1.0 / tl.maximum(tl.sqrt(k_sq), COSINE_EPS)
            score = -(dots * q_inv[:, None] * k_inv[None, :])
        else:
            score = q_sq[:, None] + k_sq[None, :] - 2.0 * dots
        # A NaN score (a NaN feature, or squares past float32) is nobody's
        # neighbour: excluded here, as min reductions differ on NaN (Triton
        # 3.6's interpreter propagates it).
        candidate = k_ok[None, :] & (keys[None, :] != queries[:, None]) & (score == score)
        score = tl.where(candidate, score, float("inf"))
        block_best, block_arg = tl.min(score, axis=1, return_indices=True)
        better = block_best < best
        best = tl.where(better, block_best, best)
        nearest = tl.where(better, key_start + block_arg, nearest)

    # Re-measure the chosen neighbour directly: |q - k|^2 for "l2"; for
    # "cosine", 1 - u.v = (|u - v|^2 + (1 - |u|^2) + (1 - |v|^2)) / 2 with
    # u = q / max(|q|, COSINE_EPS), whose last two terms are exactly 0 unless
    # |q| < COSINE_EPS.
    n_sq = tl.load(clip_sq + nearest, mask=q_ok, other=0.0)
    if COSINE:
        q_scale = q_inv
        n_scale = 1.0 / tl.maximum(tl.sqrt(n_sq), COSINE_EPS)
    else:
        q_scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        n_scale = q_scale
    n_ptrs = clip_ptr + nearest[:, None] * dim
    exact = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = q_ok[:, None] & (cols < dim)[None, :]
        q = tl.load(q_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        k = tl.load(n_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = q * q_scale[:, None] - k * n_scale[:, None]
        exact += tl.sum(diff * diff, axis=1)
    if COSINE:
        short_q = 1.0 - tl.minimum(q_sq / (COSINE_EPS * COSINE_EPS), 1.0)
        short_n = 1.0 - tl.minimum(n_sq / (COSINE_EPS * COSINE_EPS), 1.0)
        distance = 0.5 * (exact + short_q + short_n)
    else:
        distance = tl.sqrt_rn(exact)
    # best stays inf when no other token has a finite score (none, NaN
    # features, squares past float32); a token's own NaN makes it NaN.
    distance = tl.where(best < float("inf"), distance, float("inf"))
    distance = tl.where(q_sq != q_sq, float("nan"), distance)
    tl.store(out_ptr + clip_rows + queries, distance, mask=q_ok)


def nn_uniqueness_into(out, x, metric):
    """Launch into a preallocated float32 ``out [B, N]`` (tests poison it first)."""
    batch, n_tokens, dim = x.shape
    if out.numel() == 0:
        return out
    sq = torch.empty((batch * n_tokens,), device=x.device, dtype=torch.float32)
    wrap_triton(_sq_norms)[(triton.cdiv(batch * n_tokens, NORM_BLOCKS["BLOCK_R"]),)](
        x, sq, batch * n_tokens, dim, **NORM_BLOCKS
    )
    # Clips on axis 0: axis 1 stops at 65,535 programs. (A flat grid's
    # div/mod costs the odd-D fp16 build a spill on sm_80.)
    wrap_triton(_nn_uniqueness_fwd)[(batch, triton.cdiv(n_tokens, BLOCKS["BLOCK_M"]))](
        x, sq, out, n_tokens, dim,
        COSINE=metric == "cosine", **BLOCKS, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


@triton_op("lookwhen::nn_uniqueness", mutates_args=())
def _nn_uniqueness(x: torch.Tensor, metric: str) -> torch.Tensor:
    if not use_triton(x):
        return cpu_dispatch("nn_uniqueness", (x, metric), reference.nn_uniqueness)
    out = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    return nn_uniqueness_into(out, x, metric)


@register_flop_formula(torch.ops.lookwhen.nn_uniqueness)
def _nn_uniqueness_flops(x_shape, *args, **kwargs) -> int:
    batch, n_tokens, dim = x_shape
    return 2 * batch * n_tokens * n_tokens * dim


def nn_uniqueness(x: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """Distance from every token to its nearest other token of the same clip.

    ``x [B, N, D]`` (fp16, bf16 or fp32, contiguous). ``metric="l2"``: the
    Euclidean distance; ``metric="cosine"``: ``1 - max cosine similarity``
    (a zero vector has cosine 0 with every token). Computed in fp32; returns
    float32 ``[B, N]``; a clip of one token gets ``inf``; exact duplicates get
    0. A training target: the result carries no gradient.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    check_int32("x", x.shape[1] * x.shape[2], "the element count of one clip")
    if triton.cdiv(x.shape[1], BLOCKS["BLOCK_M"]) > MAX_GRID_Y:
        raise ValueError(f"x: {x.shape[1]} tokens per clip need more than {MAX_GRID_Y} query blocks")
    if x.shape[2] == 0:
        raise ValueError("x: tokens need at least one feature (dimension 2 is 0)")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(map(repr, METRICS))}, got {metric!r}")
    return _nn_uniqueness(x.detach(), metric)


def _compile_specs(dtype: torch.dtype, aligned: bool):
    """``aligned``: the real shapes (N = 784 / 3136, D = 384 / 768), whose
    integer arguments are multiples of 16, which the launcher specialises on;
    otherwise an odd D."""
    ty = TRITON_DTYPE[dtype]
    label = "" if aligned else ",odd D"
    specs = [CompileSpec(
        f"nn_uniqueness_sq_norms[{ty}{label}]", _sq_norms,
        {"x_ptr": f"*{ty}", "out_ptr": "*fp32", "n_rows": "i32", "dim": "i32",
         "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
        NORM_BLOCKS, divisible_by_16=("n_rows", "dim") if aligned else (),
    )]
    for metric in METRICS:
        constexprs = {"COSINE": metric == "cosine"} | BLOCKS | {"DOT_PRECISION": dot_precision(dtype)}
        specs.append(CompileSpec(
            f"nn_uniqueness_fwd[{ty},{metric}{label}]", _nn_uniqueness_fwd,
            {"x_ptr": f"*{ty}", "sq_ptr": "*fp32", "out_ptr": "*fp32", "n_tokens": "i32", "dim": "i32"}
            | {k: "constexpr" for k in constexprs},
            constexprs, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            tensor_cores=dtype != torch.float32, divisible_by_16=("n_tokens", "dim") if aligned else (),
        ))
    return specs


def compile_specs():
    specs = [spec for dtype in FLOAT_DTYPES for spec in _compile_specs(dtype, aligned=True)]
    return specs + _compile_specs(torch.float16, aligned=False)
