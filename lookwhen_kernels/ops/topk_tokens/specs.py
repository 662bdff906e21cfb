"""topk_tokens' configurations for the static GPU report."""
import torch

from lookwhen_kernels.ops._common import FLOAT_DTYPES, TRITON_DTYPE, CompileSpec
from lookwhen_kernels.ops.selection import MAX_SUB_GRID_TOKENS, MAX_TOKENS
from lookwhen_kernels.ops.topk_tokens.kernels import CHUNK, LOOPED_WARPS, topk_kernel, topk_looped_kernel
from lookwhen_kernels.ops.topk_tokens.launch import launch_config, register_limit


def compile_specs():
    # ViT-B/16 at 224 over 16 frames: 784 coarse selector tokens (the 2x
    # scaled-down clip) upsampled to 3136 fine tokens, K = 314 (keep 10%);
    # plus the largest clip held in registers, and one past it (the looped
    # kernel: 16 frames of a 32 x 32 grid); and LookWhere's head, 11 x 11
    # tokens of 4 x 4 logits resized to a 37 x 37 grid (518 px, patch 14),
    # and the same map over 16 frames, past the register limit.
    fp32 = (torch.float32,)
    configs = (
        ("upsample", 3136, True, False, FLOAT_DTYPES, 1),
        ("direct", 3136, False, False, FLOAT_DTYPES, 1),
        ("upsample_budgets", 3136, True, True, fp32, 1),
        ("upsample_budgets", MAX_TOKENS, True, True, fp32, 1),
        ("upsample_budgets", 16384, True, True, fp32, 1),
        ("direct", 16384, False, False, (torch.float16,), 1),
        ("sub4", 1369, True, False, FLOAT_DTYPES, 4),
        ("sub4_budgets", MAX_SUB_GRID_TOKENS, True, True, fp32, 4),
        ("sub4_budgets", 16 * 1369, True, True, fp32, 4),
    )
    scalars = {"n_in": "i32", "n_out": "i32", "k": "i32", "total": "i32", "h": "i32", "w": "i32", "out_h": "i32", "out_w": "i32",
               "scale_h": "fp32", "scale_w": "fp32", "UPSAMPLE": "constexpr", "PER_CLIP": "constexpr",
               "SUB": "constexpr"}
    specs = []
    for mode, n_out, upsample, per_clip, dtypes, sub in configs:
        flags = {"UPSAMPLE": upsample, "PER_CLIP": per_clip, "SUB": sub}
        pointers = {"budgets_ptr": "*i32", "offsets_ptr": "*i32", "out_ptr": "*i32"}
        if n_out > register_limit(sub):
            fn, num_warps, flags = topk_looped_kernel, LOOPED_WARPS, flags | {"CHUNK": CHUNK}
            pointers["keys_ptr"] = "*i32"
        else:
            block, num_warps = launch_config(n_out)
            fn, flags = topk_kernel, flags | {"BLOCK": block}
        divisible = ("n_in", "n_out") if n_out % 16 == 0 else ("n_in",)
        for dtype in dtypes:
            ty = TRITON_DTYPE[dtype]
            specs.append(CompileSpec(
                f"topk_tokens[{ty},{mode},N={n_out}]", fn,
                {"scores_ptr": f"*{ty}"} | pointers | scalars | {name: "constexpr" for name in flags},
                flags, num_warps=num_warps, divisible_by_16=divisible,
            ))
    return specs
