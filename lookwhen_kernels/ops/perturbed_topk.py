"""``perturbed_topk``: STTS's differentiable top-K (the perturbed maximum of
Berthet et al.), fused.

Forward: for each of ``n`` samples the scores get ``sigma * N(0, 1)`` noise,
the top-K of the perturbed scores is taken and its ids sorted ascending, and
the one-hot indicators ``[K, N]`` are averaged over the samples. Backward:
``d scores[n] = sum_j grad[j, n] * E[onehot[j, n] * noise[n]] / sigma``.

One program owns one clip and a block of ``SAMPLES`` samples. The noise comes
from Philox (``tl.rand4x`` and Box-Muller), counter ``(clip * n_samples + sample) * N +
token`` under one seed drawn from the caller's generator, so the backward
kernel draws exactly the forward's noise again: neither the noise nor the
per-sample selections (``[n, K, N]``) are ever stored. Each sample's top-K is
the selection core's exact, sort-free top-K (order keys, bitwise K-th largest,
ties to the lowest id); its ascending output slot is a prefix count. The
forward adds 1.0 per hit with atomics into a zeroed ``[B, K, N]`` float32
buffer: integer counts below 2**24 add exactly in any order, so the result is
deterministic, and one scale by ``1 / n`` ends it. The backward writes one
partial sum per program and the host adds the (few) partials in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import (
    CompileSpec,
    FLOAT_DTYPES,
    TRITON_DTYPE,
    check_int,
    check_int32,
    check_real,
    check_tensor,
    checks_values,
    next_power_of_2,
    use_triton,
    wrap_triton,
)
from lookwhen_kernels.ops.selection import MAX_TOKENS, clip_num_warps, order_key, take_top_k

# Samples per program: 500 samples (STTS's setting) are 32 programs per clip,
# enough to fill a GPU at small batches, and few partial gradients to add.
SAMPLES = 16
NOISE_BLOCK = 1024
# Seeds are drawn below 2**31 - 1 so every generator (CPU and CUDA) can draw them.
SEED_BOUND = 2**31 - 1


@triton.jit
def _cos_2pi(u):
    # cos(2 pi u) for u in [0, 1) by symmetry down to x in [0, pi/2] and the
    # Taylor series to x^14 (truncation below 1e-10): libdevice's cosf carries
    # a Payne-Hanek reduction for huge arguments whose local array is a stack
    # frame (a spill in the compile report), and the interpreter has no libdevice.
    a = tl.abs(u - 0.5)
    b = tl.minimum(a, 0.5 - a)
    x2 = (6.283185307179586 * b) * (6.283185307179586 * b)
    c = -1.0 / 87178291200.0
    c = c * x2 + 1.0 / 479001600.0
    c = c * x2 - 1.0 / 3628800.0
    c = c * x2 + 1.0 / 40320.0
    c = c * x2 - 1.0 / 720.0
    c = c * x2 + 1.0 / 24.0
    c = c * x2 - 0.5
    c = c * x2 + 1.0
    return tl.where(a > 0.25, c, -c)


@triton.jit
def _normal(seed, counter):
    """N(0, 1) by Box-Muller from Philox's first two words at ``counter``."""
    u1, u2, _, _ = tl.rand4x(seed, counter)
    return tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7))) * _cos_2pi(u2)


@triton.jit
def _sample_selection(score, seed, ids, valid, clip, sample, n_samples, n_tokens, k, sigma):
    """One sample: the noise, whether each token is in the perturbed top-K,
    and its output slot (rank among the chosen ids, ascending)."""
    counter = (clip.to(tl.int64) * n_samples + sample) * n_tokens + ids
    noise = _normal(seed, counter)
    take, slot = take_top_k(order_key(score + sigma * noise), valid, k)
    return noise, take, slot


@triton.jit
def _perturbed_topk_fwd(
    scores_ptr, seed_ptr, counts_ptr, n_tokens, k, n_samples, sigma,
    SAMPLES: tl.constexpr, BLOCK: tl.constexpr,
):
    clip = tl.program_id(0)
    first = tl.program_id(1) * SAMPLES
    ids = tl.arange(0, BLOCK)
    valid = ids < n_tokens
    score = tl.load(scores_ptr + clip.to(tl.int64) * n_tokens + ids, mask=valid, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    counts = counts_ptr + clip.to(tl.int64) * k * n_tokens
    for i in range(SAMPLES):
        sample = first + i
        if sample < n_samples:
            _, take, slot = _sample_selection(score, seed, ids, valid, clip, sample, n_samples, n_tokens, k, sigma)
            tl.atomic_add(counts + slot.to(tl.int64) * n_tokens + ids, 1.0, mask=take)


@triton.jit
def _perturbed_topk_bwd(
    scores_ptr, seed_ptr, grad_ptr, partial_ptr, n_tokens, k, n_samples, sigma, scale,
    SAMPLES: tl.constexpr, BLOCK: tl.constexpr,
):
    clip = tl.program_id(0)
    part = tl.program_id(1)
    ids = tl.arange(0, BLOCK)
    valid = ids < n_tokens
    score = tl.load(scores_ptr + clip.to(tl.int64) * n_tokens + ids, mask=valid, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    grad = grad_ptr + clip.to(tl.int64) * k * n_tokens
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SAMPLES):
        sample = part * SAMPLES + i
        if sample < n_samples:
            noise, take, slot = _sample_selection(
                score, seed, ids, valid, clip, sample, n_samples, n_tokens, k, sigma)
            g = tl.load(grad + slot.to(tl.int64) * n_tokens + ids, mask=take, other=0.0).to(tl.float32)
            acc += g * noise
    row = (clip.to(tl.int64) * tl.num_programs(1) + part) * n_tokens
    tl.store(partial_ptr + row + ids, acc * scale, mask=valid)


@triton.jit
def _noise_kernel(seed_ptr, out_ptr, total, BLOCK: tl.constexpr):
    counter = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + counter, _normal(tl.load(seed_ptr), counter), mask=counter < total)


def sample_noise(seed: torch.Tensor, batch: int, n_samples: int, n_tokens: int) -> torch.Tensor:
    """The ``N(0, 1)`` noise ``float32 [B, n, N]`` that :func:`perturbed_topk`
    draws under ``seed`` (int64 ``[1]``) on seed's path: Philox through Triton
    (CUDA, or the interpreter), a ``torch.Generator`` seeded with it on the
    CPU path. The CPU path perturbs with it; tests use it to give the
    reference the kernels' exact samples."""
    shape = (batch, n_samples, n_tokens)
    if not use_triton(seed):
        generator = torch.Generator(seed.device).manual_seed(int(seed))
        return torch.randn(shape, generator=generator, device=seed.device, dtype=torch.float32)
    out = torch.empty(shape, device=seed.device, dtype=torch.float32)
    if out.numel():
        wrap_triton(_noise_kernel)[(triton.cdiv(out.numel(), NOISE_BLOCK),)](seed, out, out.numel(), BLOCK=NOISE_BLOCK)
    return out


def _grid(batch: int, n_samples: int):
    return (batch, triton.cdiv(n_samples, SAMPLES))


@torch.library.custom_op("lookwhen::perturbed_topk_cpu", mutates_args=())
def _perturbed_topk_cpu(scores: torch.Tensor, seed: torch.Tensor, k: int, n_samples: int, sigma: float) -> torch.Tensor:
    """The reference on the noise of ``seed``, opaque to torch.compile (the
    noise generator reads the seed's value, which tracing must not see)."""
    noise = sample_noise(seed, scores.shape[0], n_samples, scores.shape[1])
    return reference.perturbed_topk(scores, k, noise, sigma).to(torch.float32)


@_perturbed_topk_cpu.register_fake
def _perturbed_topk_cpu_fake(scores, seed, k, n_samples, sigma):
    return scores.new_empty((scores.shape[0], k, scores.shape[1]), dtype=torch.float32)


@torch.library.custom_op("lookwhen::perturbed_topk_backward_cpu", mutates_args=())
def _perturbed_topk_backward_cpu(
    grad: torch.Tensor, scores: torch.Tensor, seed: torch.Tensor, k: int, n_samples: int, sigma: float,
) -> torch.Tensor:
    noise = sample_noise(seed, scores.shape[0], n_samples, scores.shape[1])
    return reference.perturbed_topk_backward(grad, scores, k, noise, sigma).to(scores.dtype)


@_perturbed_topk_backward_cpu.register_fake
def _perturbed_topk_backward_cpu_fake(grad, scores, seed, k, n_samples, sigma):
    return torch.empty_like(scores)


@triton_op("lookwhen::perturbed_topk", mutates_args=())
def _perturbed_topk(scores: torch.Tensor, seed: torch.Tensor, k: int, n_samples: int, sigma: float) -> torch.Tensor:
    batch, n_tokens = scores.shape
    if not use_triton(scores):
        return torch.ops.lookwhen.perturbed_topk_cpu(scores, seed, k, n_samples, sigma)
    out = torch.zeros((batch, k, n_tokens), device=scores.device, dtype=torch.float32)
    if out.numel():
        block = next_power_of_2(n_tokens)
        wrap_triton(_perturbed_topk_fwd)[_grid(batch, n_samples)](
            scores, seed, out, n_tokens, k, n_samples, sigma,
            SAMPLES=SAMPLES, BLOCK=block, num_warps=clip_num_warps(n_tokens),
        )
        out.mul_(1.0 / n_samples)
    return out


@triton_op("lookwhen::perturbed_topk_backward", mutates_args=())
def _perturbed_topk_backward(
    grad: torch.Tensor, scores: torch.Tensor, seed: torch.Tensor, k: int, n_samples: int, sigma: float,
) -> torch.Tensor:
    batch, n_tokens = scores.shape
    if sigma <= reference.selection.SIGMA_FLOOR or k == 0:
        # The hard top-K is piecewise constant: zero gradient almost everywhere.
        return torch.zeros_like(scores)
    if not use_triton(scores):
        return torch.ops.lookwhen.perturbed_topk_backward_cpu(grad, scores, seed, k, n_samples, sigma)
    grid = _grid(batch, n_samples)
    partial = torch.empty((batch, grid[1], n_tokens), device=scores.device, dtype=torch.float32)
    block = next_power_of_2(n_tokens)
    wrap_triton(_perturbed_topk_bwd)[grid](
        scores, seed, grad.contiguous(), partial, n_tokens, k, n_samples, sigma, 1.0 / (n_samples * sigma),
        SAMPLES=SAMPLES, BLOCK=block, num_warps=clip_num_warps(n_tokens),
    )
    return partial.sum(dim=1).to(scores.dtype)


def _setup_context(ctx, inputs, output):
    scores, seed, k, n_samples, sigma = inputs
    ctx.save_for_backward(scores, seed)
    ctx.args = (k, n_samples, sigma)


def _backward(ctx, grad):
    scores, seed = ctx.saved_tensors
    return _perturbed_topk_backward(grad, scores, seed, *ctx.args), None, None, None, None


_perturbed_topk.register_autograd(_backward, setup_context=_setup_context)


def perturbed_topk(
    scores: torch.Tensor,
    k: int,
    *,
    n_samples: int = 500,
    sigma: float = 0.05,
    generator: Optional[torch.Generator] = None,
    validate: bool = True,
) -> torch.Tensor:
    """STTS's differentiable top-K: the average over ``n_samples`` noisy
    copies ``scores + sigma * N(0, 1)`` of the one-hot indicators of their
    top-K, each sample's ids in ascending order.

    ``scores [B, N]`` (fp16, bf16 or fp32, contiguous, ``N <= MAX_TOKENS``).
    Returns float32 ``[B, K, N]``: row ``j`` holds, for every token, the
    fraction of samples in which it was the ``j``-th chosen id, so
    ``indicators @ tokens`` is STTS's soft selection ``[B, K, D]``.
    Differentiable with respect to ``scores`` (STTS's perturbed-maximum
    gradient ``E[onehot * noise] / sigma`` contracted with the upstream
    gradient, recomputed from the same samples: token t's indicators reach
    score t only);
    ``sigma=0`` is the hard top-K (equal to ``topk_tokens``'s one-hots, ties
    to the lower id) with a zero gradient. The noise is Philox under one seed
    drawn from ``generator`` (on scores' device; torch's default generator of
    that device when None), so ``torch.manual_seed`` reproduces a call; the
    CPU path (no Triton) draws its noise with a ``torch.Generator`` under
    that seed instead. ``validate=True`` scans the scores for NaN (a host read).
    """
    check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES, contiguous=True)
    batch, n_tokens = scores.shape
    if n_tokens == 0:
        raise ValueError("scores: expected at least one token per clip (dimension 1 is 0)")
    if n_tokens > MAX_TOKENS:
        raise ValueError(f"scores: {n_tokens} tokens per clip exceed the {MAX_TOKENS} one program holds")
    k = check_int("k", k, 0, n_tokens, note="tokens per clip")
    n_samples = check_int("n_samples", n_samples, 1)
    sigma = check_real("sigma", sigma, "[0, inf)")
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != scores.device.type
    ):
        raise ValueError(f"generator: expected a torch.Generator on {scores.device.type} (scores' device)")
    check_int32("k", batch * k * n_tokens, "the element count of the indicators")
    if checks_values(validate, scores) and bool(torch.isnan(scores).any()):
        raise ValueError("scores: contain NaN")
    seed = torch.randint(SEED_BOUND, (1,), device=scores.device, generator=generator, dtype=torch.int64)
    return _perturbed_topk(scores, seed, k, n_samples, sigma)


def compile_specs():
    # STTS's setting at LookWhen's sizes: 784 selector tokens (16 frames of a
    # 7 x 7 grid after the 2x scale-down) and the 3136 fine tokens.
    specs = []
    for n_tokens, dtypes in ((784, (torch.float32,)), (3136, FLOAT_DTYPES)):
        block = next_power_of_2(n_tokens)
        flags = {"SAMPLES": SAMPLES, "BLOCK": block}
        scalars = {"n_tokens": "i32", "k": "i32", "n_samples": "i32", "sigma": "fp32"}
        for dtype in dtypes:
            ty = TRITON_DTYPE[dtype]
            specs.append(CompileSpec(
                f"perturbed_topk_fwd[{ty},N={n_tokens}]", _perturbed_topk_fwd,
                {"scores_ptr": f"*{ty}", "seed_ptr": "*i64", "counts_ptr": "*fp32"} | scalars
                | {name: "constexpr" for name in flags},
                flags, num_warps=clip_num_warps(n_tokens), divisible_by_16=("n_tokens",),
            ))
            specs.append(CompileSpec(
                f"perturbed_topk_bwd[{ty},N={n_tokens}]", _perturbed_topk_bwd,
                {"scores_ptr": f"*{ty}", "seed_ptr": "*i64", "grad_ptr": "*fp32", "partial_ptr": "*fp32"}
                | scalars | {"scale": "fp32"} | {name: "constexpr" for name in flags},
                flags, num_warps=clip_num_warps(n_tokens), divisible_by_16=("n_tokens",),
            ))
    specs.append(CompileSpec(
        "perturbed_topk_noise", _noise_kernel,
        {"seed_ptr": "*i64", "out_ptr": "*fp32", "total": "i32", "BLOCK": "constexpr"}, {"BLOCK": NOISE_BLOCK},
    ))
    return specs
