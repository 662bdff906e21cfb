"""``score_tokens``: the selector's score head, LayerNorm -> Linear -> GELU ->
Linear(R), R float32 scores per token (R = 1: one score; R = r*r: LookWhere's
head, whose r x r logits per coarse token ``topk_tokens`` lays onto an
r-times finer grid).

One program owns ``BLOCK_M`` token rows. It streams the rows once for the
LayerNorm statistics (chunk statistics merged with Chan's formula, so any D
runs with a fixed register budget), then walks the hidden layer in
``BLOCK_H`` chunks: for each chunk it accumulates ``tl.dot(normalised rows,
w1 chunk^T)`` over D chunks on the tensor cores, adds ``b1``, applies the
exact GELU and folds the chunk straight into the score with ``w2`` (with R
outputs a second ``tl.dot`` into a ``[rows, R]`` accumulator). The
``[rows, hidden]`` activation never leaves registers. The program's rows come
from HBM once; the re-reads per hidden chunk hit L1/L2 (a 64-row block of
D=768 fp16 is 96 KiB).

The backward (``lookwhen::score_tokens_backward``) is the closed form of
:func:`lookwhen_kernels.reference.score_tokens` in PyTorch ops
(``reference.score_tokens_backward``, or the native kernel on CPU), on every
device: the score head is small next to the extractor, so it has no Triton
kernel yet.
"""
from __future__ import annotations

from typing import List

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
    check_real,
    check_shape,
    check_tensor,
    cpu_dispatch,
    dot_precision,
    next_power_of_2,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.triton_versions import SCORE_TOKENS_STAGES

NUM_STAGES = SCORE_TOKENS_STAGES
# 64 rows is the smallest M of a Hopper warpgroup MMA; 8 warps keep the
# [64, BLOCK_H] fp32 accumulator and the prefetched tiles under ~128 registers
# a thread, spill-free on sm_90 and sm_80 (odd D included).
NUM_WARPS = 8


def _blocks(dtype: torch.dtype, outputs: int = 1) -> dict:
    # fp32's FMA dot holds both operands in registers: a narrower hidden chunk.
    # Several outputs go through tl.dot, whose N is at least 16.
    block_r = 1 if outputs == 1 else max(16, next_power_of_2(outputs))
    return {"BLOCK_M": 64, "BLOCK_H": 64 if dtype == torch.float32 else 128, "BLOCK_D": 32, "BLOCK_R": block_r}


@triton.jit
def _score_tokens_fwd(
    x_ptr, norm_weight_ptr, norm_bias_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    n_rows, dim, hidden, n_outputs, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * dim

    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        tile = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(dim - start, BLOCK_D).to(tl.float32)
        chunk_mean = tl.sum(tile, axis=1) / count
        centred = tl.where(mask, tile - chunk_mean[:, None], 0.0)
        seen = start * 1.0
        total = seen + count
        delta = chunk_mean - mean
        mean = mean + delta * (count / total)
        m2 = m2 + tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / total)
    rstd = 1.0 / tl.sqrt(m2 / dim + eps)

    outs = tl.arange(0, BLOCK_R)
    out_ok = outs < n_outputs
    if BLOCK_R == 1:
        score = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        score = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for h_start in range(0, hidden, BLOCK_H):
        hs = h_start + tl.arange(0, BLOCK_H)
        h_ok = hs < hidden
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            tile = tl.load(
                row_ptrs + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            ).to(tl.float32)
            gamma = tl.load(norm_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            beta = tl.load(norm_bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            # Padded columns get gamma = beta = 0, so they add nothing to the dot.
            y = (tile - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            w1_t = tl.load(
                w1_ptr + hs[None, :] * dim + cols[:, None], mask=h_ok[None, :] & col_ok[:, None], other=0.0
            )
            acc = tl.dot(y.to(w1_t.dtype), w1_t, acc, input_precision=DOT_PRECISION)
        a = acc + tl.load(b1_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        gelu = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
        if BLOCK_R == 1:
            w2 = tl.load(w2_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
            score += tl.sum(gelu * w2[None, :], axis=1)
        else:
            # Padded hidden units have a = 0, so GELU = 0 there: nothing leaks
            # into the sums; padded outputs are masked at the store.
            w2_t = tl.load(
                w2_ptr + outs[None, :] * hidden + hs[:, None], mask=h_ok[:, None] & out_ok[None, :], other=0.0
            )
            score = tl.dot(gelu.to(w2_t.dtype), w2_t, score, input_precision=DOT_PRECISION)
    if BLOCK_R == 1:
        score += tl.load(b2_ptr).to(tl.float32)
        tl.store(out_ptr + rows, score, mask=row_ok)
    else:
        score += tl.load(b2_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * n_outputs + outs[None, :]
        tl.store(out_ptrs, score, mask=row_ok[:, None] & out_ok[None, :])


def _n_outputs(w2: torch.Tensor) -> int:
    return 1 if w2.dim() == 1 else w2.shape[0]


def _out_shape(x: torch.Tensor, w2: torch.Tensor):
    outputs = _n_outputs(w2)
    return tuple(x.shape[:2]) + ((outputs,) if outputs > 1 else ())


def score_tokens_into(out, x, norm_weight, norm_bias, w1, b1, w2, b2, eps):
    """Launch into a preallocated float32 ``out [B, n]`` or ``[B, n, R]``
    (tests poison it first)."""
    n_rows = x.shape[0] * x.shape[1]
    if n_rows:
        outputs = _n_outputs(w2)
        blocks = _blocks(x.dtype, outputs)
        wrap_triton(_score_tokens_fwd)[(triton.cdiv(n_rows, blocks["BLOCK_M"]),)](
            x, norm_weight, norm_bias, w1, b1, w2, b2, out,
            n_rows, x.shape[2], w1.shape[0], outputs, eps,
            **blocks, DOT_PRECISION=dot_precision(x.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return out


@triton_op("lookwhen::score_tokens", mutates_args=())
def _score_tokens(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    if not use_triton(x):
        args = (x, norm_weight, norm_bias, w1, b1, w2, b2, eps)
        return cpu_dispatch("score_tokens", args, reference.score_tokens, handles=w2.shape[0] == 1)
    out = torch.empty(_out_shape(x, w2), device=x.device, dtype=torch.float32)
    return score_tokens_into(out, x, norm_weight, norm_bias, w1, b1, w2, b2, eps)


@torch.library.custom_op("lookwhen::score_tokens_backward", mutates_args=())
def _score_tokens_backward(
    grad: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, w1: torch.Tensor,
    b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float,
) -> List[torch.Tensor]:
    """Gradients for ``(x, norm_weight, norm_bias, w1, b1, w2, b2)``: the
    closed form on every device (the native kernel on CPU where built), a
    registered op so that FLOP counting sees it whichever path runs."""
    args = (grad, x, norm_weight, norm_bias, w1, b1, w2, b2, eps)
    return list(cpu_dispatch("score_tokens_backward", args, reference.score_tokens_backward,
                             handles=grad.dim() == 2))


@_score_tokens_backward.register_fake
def _score_tokens_backward_fake(grad, *inputs_and_eps):
    return [torch.empty_like(t) for t in inputs_and_eps[:-1]]


def _setup_context(ctx, inputs, output):
    *tensors, eps = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps = eps


def _backward(ctx, grad):
    return (*_score_tokens_backward(grad, *ctx.saved_tensors, ctx.eps), None)


_score_tokens.register_autograd(_backward, setup_context=_setup_context)


def _gemm_sizes(x_shape, w1_shape, w2_shape):
    """Rows and the two GEMMs' inner sizes: ``(rows, dim * hidden, hidden * outputs)``."""
    batch, n_tokens, dim = x_shape
    hidden = w1_shape[0]
    outputs = 1 if len(w2_shape) == 1 else w2_shape[0]
    return batch * n_tokens, dim * hidden, hidden * outputs


@register_flop_formula(torch.ops.lookwhen.score_tokens)
def _score_tokens_flops(x_shape, norm_weight_shape, norm_bias_shape, w1_shape, b1_shape, w2_shape,
                        *args, **kwargs) -> int:
    rows, first, second = _gemm_sizes(x_shape, w1_shape, w2_shape)
    return 2 * rows * (first + second)


@register_flop_formula(torch.ops.lookwhen.score_tokens_backward)
def _score_tokens_backward_flops(grad_shape, x_shape, norm_weight_shape, norm_bias_shape, w1_shape, b1_shape,
                                 w2_shape, *args, **kwargs) -> int:
    # The first GEMM again (the hidden activation is recomputed, not saved),
    # then each GEMM's input and weight gradients.
    rows, first, second = _gemm_sizes(x_shape, w1_shape, w2_shape)
    return 2 * rows * (3 * first + 2 * second)


def score_tokens(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Score every selector token: ``Linear2(GELU(Linear1(LayerNorm(x))))``.

    ``x [B, n, D]`` (fp16, bf16 or fp32); LayerNorm over D with
    ``norm_weight, norm_bias [D]``; ``w1 [hidden, D], b1 [hidden]`` and
    ``w2 [R, hidden]`` (or ``[hidden]`` for R = 1), ``b2 [R]`` in
    ``nn.Linear`` layout; GELU is the exact (erf) one. All parameters share
    x's dtype and device and are contiguous. Returns float32 ``[B, n]`` for
    R = 1 and ``[B, n, R]`` for R > 1 (with R = r*r, the r x r sub-token
    logits that ``topk_tokens`` takes as 3-d scores).

    Differentiable with respect to x and every parameter; the backward is the
    closed-form reference gradient in PyTorch ops on every device (no Triton
    kernel), see ``reference.score_tokens_backward``.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, contiguous=True)
    dim = x.shape[2]
    if dim == 0:
        raise ValueError("x: tokens need at least one feature (dimension 2 is 0)")
    check_tensor("w1", w1, ndim=2)
    hidden = w1.shape[0]
    if hidden == 0:
        raise ValueError("w1: the hidden layer needs at least one unit (dimension 0 is 0)")
    check_tensor("w2", w2, dtypes=(x.dtype,), device=x.device, contiguous=True)
    if w2.dim() not in (1, 2) or w2.shape[-1] != hidden or w2.numel() == 0:
        raise ValueError(f"w2: expected shape [R, {hidden}] (R >= 1 outputs) or [{hidden}], got {list(w2.shape)}")
    for name, tensor, shape in (
        ("norm_weight", norm_weight, [dim]),
        ("norm_bias", norm_bias, [dim]),
        ("w1", w1, [hidden, dim]),
        ("b1", b1, [hidden]),
        ("b2", b2, [_n_outputs(w2)]),
    ):
        check_tensor(name, tensor, dtypes=(x.dtype,), device=x.device, contiguous=True)
        check_shape(name, tensor, shape)
    return _score_tokens(x, norm_weight, norm_bias, w1, b1, w2, b2, check_real("eps", eps, "(0, inf]"))


def _compile_spec(dtype: torch.dtype, aligned: bool, outputs: int = 1) -> CompileSpec:
    """``aligned``: the real shapes (D = 384 / 768, hidden 4x, B * 784 rows),
    whose integer arguments are multiples of 16, which the launcher
    specialises on; otherwise an odd D. ``outputs``: R (16 for LookWhere's
    4 x 4 head)."""
    ty = TRITON_DTYPE[dtype]
    constexprs = _blocks(dtype, outputs) | {"DOT_PRECISION": dot_precision(dtype)}
    signature = {
        "x_ptr": f"*{ty}", "norm_weight_ptr": f"*{ty}", "norm_bias_ptr": f"*{ty}",
        "w1_ptr": f"*{ty}", "b1_ptr": f"*{ty}", "w2_ptr": f"*{ty}", "b2_ptr": f"*{ty}",
        "out_ptr": "*fp32", "n_rows": "i32", "dim": "i32", "hidden": "i32", "n_outputs": "i32", "eps": "fp32",
    } | {k: "constexpr" for k in constexprs}
    divisible = ("n_rows", "dim", "hidden") + (("n_outputs",) if outputs % 16 == 0 else ())
    label = ("" if aligned else ",odd D") + ("" if outputs == 1 else f",R={outputs}")
    return CompileSpec(
        f"score_tokens_fwd[{ty}{label}]", _score_tokens_fwd, signature, constexprs,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, tensor_cores=dtype != torch.float32,
        divisible_by_16=divisible if aligned else (),
    )


def compile_specs():
    return (
        [_compile_spec(dtype, aligned=True) for dtype in FLOAT_DTYPES]
        + [_compile_spec(torch.float16, aligned=False)]
        + [_compile_spec(dtype, aligned=True, outputs=16) for dtype in FLOAT_DTYPES]
        + [_compile_spec(torch.float16, aligned=False, outputs=3)]
    )
