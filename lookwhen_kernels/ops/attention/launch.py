"""From tensors to launches of the attention kernels: layouts, grids, score
modifiers as kernel arguments, autotuning."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton

from lookwhen_kernels.ops._common import deterministic, interpret_mode, wrap_triton
from lookwhen_kernels.ops.attention.backward import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess
from lookwhen_kernels.ops.attention.configs import PREPROCESS_BLOCK_M, block_d_for, configs_for, dot_precision_for
from lookwhen_kernels.ops.attention.forward import attn_fwd
from lookwhen_kernels.ops.attention.scores import LOG2E

_AUTOTUNED = {}


def _launch(kernel, configs: Sequence[triton.Config], grid, *args, pin_config: bool = False, **constexprs) -> None:
    """Autotune over ``configs`` on a GPU (once per head dim and dtype); the
    interpreter, deterministic mode and ``pin_config`` run the first,
    preferred config (the autotuner's pick, and with it the rounding, can
    differ between runs)."""
    if pin_config or interpret_mode() or deterministic():
        config = configs[0]
        wrap_triton(kernel)[grid](*args, **constexprs, **config.kwargs,
                                  num_warps=config.num_warps, num_stages=config.num_stages)
        return
    key = (kernel, id(configs))
    if key not in _AUTOTUNED:
        _AUTOTUNED[key] = triton.autotune(configs=list(configs), key=["HEAD_DIM", *MOD_FLAGS])(kernel)
    wrap_triton(_AUTOTUNED[key])[grid](*args, **constexprs)


MOD_FLAGS = ("WINDOW", "SOFTCAP", "ALIBI")


class ScoreMods(NamedTuple):
    """What changes the scores besides the scale (FlashAttention's
    arguments): window bounds (-1 unbounded; causal is ``(-1, 0)``),
    ``softcap`` (0: none) and ALiBi slopes (float32 ``[H]`` or ``[B, H]``)."""

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None

    def kernel_args(self, max_q: int, max_k: int, dummy: torch.Tensor):
        """The kernels' trailing runtime arguments and their constexpr flags.
        An unbounded side becomes ``max_q + max_k``, wider than any offset
        between a query and a key, so the bound is always a plain compare."""
        unbounded = max_q + max_k
        alibi = self.alibi_slopes
        args = (
            self.window_left if self.window_left >= 0 else unbounded,
            self.window_right if self.window_right >= 0 else unbounded,
            self.softcap if self.softcap > 0 else 1.0,
            dummy if alibi is None else alibi,
            0 if alibi is None or alibi.dim() == 1 else alibi.stride(0),
        )
        flags = dict(zip(MOD_FLAGS, ((self.window_left, self.window_right) != (-1, -1), self.softcap > 0,
                                      alibi is not None)))
        return args, flags



def _row_units(t: torch.Tensor) -> int:
    """The row stride in units of the head dim (see :func:`_kernel_layout`)."""
    total, heads, head_dim = t.shape
    return t.stride(0) // head_dim if total > 1 else heads


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """The kernels take ``[rows, heads, Dh]`` with unit stride along Dh, heads
    adjacent and a row stride that is a multiple of Dh: any contiguous tensor,
    and q/k/v unbound from a packed ``[total, 3, H, Dh]`` projection without a
    copy. Other layouts are copied."""
    total, heads, head_dim = t.shape
    ok = (head_dim == 1 or t.stride(2) == 1) and (heads == 1 or t.stride(1) == head_dim) \
        and (total <= 1 or t.stride(0) % head_dim == 0)
    return t if ok else t.contiguous()


def _tile_width_and_group(q, k):
    return block_d_for(q.shape[2]), q.shape[1] // k.shape[1]


def forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, softmax_scale: float, mods: ScoreMods):
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    total_q, heads, head_dim = q.shape
    batch = cu_q.numel() - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    if total_q == 0 or batch == 0:
        return out, lse
    block_d, group = _tile_width_and_group(q, k)
    mod_args, mod_flags = mods.kernel_args(max_q, max_k, lse)
    _launch(
        attn_fwd, configs_for("fwd", head_dim, q.dtype, any(mod_flags.values())),
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,),
        q, k, v, out, lse, cu_q, cu_k,
        _row_units(q), _row_units(k), _row_units(v), _row_units(out), total_q, group, softmax_scale * LOG2E.value,
        batch, max_q, *mod_args,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=dot_precision_for(q.dtype), **mod_flags,
    )
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, softmax_scale: float,
              mods: ScoreMods, pin_config: bool):
    q, k, v, out, grad_out = (_kernel_layout(t) for t in (q, k, v, out, grad_out))
    total_q, heads, head_dim = q.shape
    batch = cu_q.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch == 0 or total_q == 0:
        # No query attends to anything: every key gets a zero gradient.
        return dq, dk.zero_(), dv.zero_()
    block_d, group = _tile_width_and_group(q, k)
    delta = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    glse = grad_lse if grad_lse is not None else lse
    wrap_triton(attn_bwd_preprocess)[(triton.cdiv(total_q, PREPROCESS_BLOCK_M), heads)](
        out, grad_out, glse, delta, _row_units(out), _row_units(grad_out), glse.stride(0), glse.stride(1),
        total_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=PREPROCESS_BLOCK_M, HAS_GLSE=grad_lse is not None,
    )
    qk_scale = softmax_scale * LOG2E.value
    mod_args, mod_flags = mods.kernel_args(max_q, max_k, delta)
    if k.shape[0]:
        _launch(
            attn_bwd_dkdv, configs_for("dkdv", head_dim, q.dtype, any(mod_flags.values())),
            lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]) * batch * k.shape[1],),
            q, k, v, grad_out, lse, delta, dk, dv, cu_q, cu_k,
            _row_units(q), _row_units(k), _row_units(v), _row_units(grad_out), _row_units(dk), _row_units(dv),
            total_q, group, qk_scale, softmax_scale, batch, max_k, *mod_args, pin_config=pin_config,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=dot_precision_for(q.dtype), **mod_flags,
        )
    _launch(
        attn_bwd_dq, configs_for("dq", head_dim, q.dtype, any(mod_flags.values())),
        lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * heads,),
        q, k, v, grad_out, lse, delta, dq, cu_q, cu_k,
        _row_units(q), _row_units(k), _row_units(v), _row_units(grad_out), _row_units(dq),
        total_q, group, qk_scale, softmax_scale, batch, max_q, *mod_args, pin_config=pin_config,
        HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=dot_precision_for(q.dtype), **mod_flags,
    )
    return dq, dk, dv
