"""The CPU path: opaque ops over the reference (their loops read cu_seqlens,
which torch.compile must not trace)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lookwhen_kernels import reference
from lookwhen_kernels.ops._common import work_dtype
from lookwhen_kernels.ops.attention.launch import ScoreMods


def _reference_mods(mods: ScoreMods) -> dict:
    return {"window_size": (mods.window_left, mods.window_right), "softcap": mods.softcap,
            "alibi_slopes": mods.alibi_slopes}


@torch.library.custom_op("lookwhen::varlen_attention_cpu", mutates_args=())
def _cpu_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    mods = ScoreMods(window_left, window_right, softcap, alibi_slopes)
    out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                                          **_reference_mods(mods))
    # The reference builds lse transposed; the fake (and the kernel) promise contiguous.
    return out.contiguous(), lse.contiguous()


@_cpu_forward.register_fake
def _cpu_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods):
    lse_dtype = work_dtype(q.dtype)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


@torch.library.custom_op("lookwhen::varlen_attention_cpu_backward", mutates_args=())
def _cpu_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mods = ScoreMods(window_left, window_right, softcap, alibi_slopes)
    return reference.varlen_attention_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale, grad_lse=grad_lse,
        **_reference_mods(mods)
    )


@_cpu_backward.register_fake
def _cpu_backward_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, *mods):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
