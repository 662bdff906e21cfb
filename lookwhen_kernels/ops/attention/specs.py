"""The static GPU report's compile specs for the attention kernels."""
from __future__ import annotations

import torch

from lookwhen_kernels.ops._common import FLOAT_DTYPES, TRITON_DTYPE, CompileSpec
from lookwhen_kernels.ops.attention.backward import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess
from lookwhen_kernels.ops.attention.configs import PREPROCESS_BLOCK_M, block_d_for, configs_for, dot_precision_for
from lookwhen_kernels.ops.attention.forward import attn_fwd
from lookwhen_kernels.ops.attention.launch import MOD_FLAGS

# 80 and 96 run masked in the 128-wide tile, 256 in its own.
REPORT_HEAD_DIMS = (64, 80, 96, 128, 256)
# The score-modifier variants (causal/local windows, soft cap, ALiBi) add
# registers to every tile: reported at the 16-bit fast path's head dims.
REPORT_MOD_HEAD_DIMS = (64, 128)
_NO_MODS = dict.fromkeys(MOD_FLAGS, False)
_ALL_MODS = dict.fromkeys(MOD_FLAGS, True)
# Pointer arguments that are float32 whatever the input dtype, and float scalars.
_FP32_POINTERS = ("lse_ptr", "delta_ptr", "glse_ptr", "alibi_ptr")
_FLOAT_SCALARS = ("qk_scale", "softmax_scale", "softcap")


def _signature(fn, ty: str, constexprs: dict) -> dict:
    """Triton types of a kernel's arguments, read off its own parameter list
    (so the report cannot drift from the kernel): offsets are int32, the
    statistics float32, other pointers the input dtype, the rest i32."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.startswith("cu_"):
            return "*i32"
        if name in _FP32_POINTERS:
            return "*fp32"
        if name.endswith("_ptr"):
            return f"*{ty}"
        return "fp32" if name in _FLOAT_SCALARS else "i32"
    return {name: kind(name) for name in fn.arg_names}


def _tile_specs(dtype, head_dim, mods: dict, suffix: str):
    ty = TRITON_DTYPE[dtype]
    base = {"HEAD_DIM": head_dim, "BLOCK_D": block_d_for(head_dim), "DOT_PRECISION": dot_precision_for(dtype)} | mods
    for kernel, fn in (("fwd", attn_fwd), ("dkdv", attn_bwd_dkdv), ("dq", attn_bwd_dq)):
        for config in configs_for(kernel, head_dim, dtype, any(mods.values())):
            constexprs = base | config.kwargs
            tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}w{config.num_warps}"
            yield CompileSpec(
                f"varlen_attention_{kernel}{suffix}[{ty},d{head_dim},{tile}]", fn,
                _signature(fn, ty, constexprs), constexprs,
                num_warps=config.num_warps, num_stages=config.num_stages,
                # fp32's small tiles miss Hopper's 64-row MMA (mma.sync instead).
                tensor_cores=dtype != torch.float32,
                # The dk/dv kernel's MMAs are keys x queries: its key tile is their M side.
                warpgroup_mma=config.kwargs["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"] >= 64,
            )


def compile_specs():
    specs = []
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        for head_dim in REPORT_HEAD_DIMS:
            if dtype == torch.float32 and head_dim > 128:
                continue  # spills, as FP32_CONFIGS says: not a GPU fast path
            specs.extend(_tile_specs(dtype, head_dim, _NO_MODS, ""))
            if dtype != torch.float32 and head_dim in REPORT_MOD_HEAD_DIMS:
                specs.extend(_tile_specs(dtype, head_dim, _ALL_MODS, "_mods"))
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d_for(head_dim), "BLOCK_M": PREPROCESS_BLOCK_M,
                          "HAS_GLSE": False}
            specs.append(CompileSpec(
                f"varlen_attention_bwd_preprocess[{ty},d{head_dim}]", attn_bwd_preprocess,
                _signature(attn_bwd_preprocess, ty, constexprs), constexprs,
            ))
    return specs
