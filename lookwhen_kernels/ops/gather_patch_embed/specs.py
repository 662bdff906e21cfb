"""gather_patch_embed's configurations for the static GPU report."""
import torch

from lookwhen_kernels.ops._common import FLOAT_DTYPES, TRITON_DTYPE, CompileSpec, dot_precision
from lookwhen_kernels.ops.gather_patch_embed.kernels import gather_patch_embed_bwd_weight, gather_patch_embed_fwd
from lookwhen_kernels.ops.gather_patch_embed.launch import backward_blocks, forward_blocks


def _spec_signature(ty: str, forward: bool) -> dict:
    ptrs = {"clip_ptr": "*u8", "ids_ptr": "*i32", "cu_ptr": "*i32"}
    if forward:
        ptrs |= {"w_ptr": f"*{ty}", "b_ptr": "*fp32", "pos_ptr": f"*{ty}", "out_ptr": f"*{ty}"}
    else:
        ptrs |= {"grad_ptr": f"*{ty}", "g_ptr": "*fp32"}
    ints = ("total", "n_clips", "rows_per_clip", "frames", "height", "width", "grid_w", "grid_hw", "dim")
    consts = ("PATCH", "DOWNSAMPLE", "HAS_IDS", "HAS_CU", "DOT_PRECISION")
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if forward else ("BLOCK_ROWS", "BLOCK_K", "BLOCK_D")
    return ptrs | {k: "i32" for k in ints} | {k: "constexpr" for k in consts + blocks}


# The two real configurations, on 16-frame 224x224 clips: the extractor embeds
# a fixed budget of full-resolution ViT-B/16 tokens (D=768, K ~ 314 per clip),
# the selector every token of the half-resolution clip (D=384, 784 per clip).
FRAMES, SIZE, PATCH = 16, 224, 16
CONFIGS = (
    ("extractor", {"dim": 768, "downsample": 1, "rows_per_clip": 314, "has_ids": True}),
    ("selector", {"dim": 384, "downsample": 2, "rows_per_clip": 784, "has_ids": False}),
)


def compile_specs():
    specs = []
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        for name, cfg in CONFIGS:
            grid_w = SIZE // (PATCH * cfg["downsample"])
            ints = {"rows_per_clip": cfg["rows_per_clip"], "frames": FRAMES, "height": SIZE, "width": SIZE,
                    "grid_w": grid_w, "grid_hw": grid_w * grid_w, "dim": cfg["dim"]}
            common = {
                "PATCH": PATCH, "DOWNSAMPLE": cfg["downsample"], "HAS_IDS": cfg["has_ids"], "HAS_CU": False,
                "DOT_PRECISION": dot_precision(dtype),
            }
            options = {
                "tensor_cores": dtype != torch.float32,
                "divisible_by_16": tuple(k for k, v in ints.items() if v % 16 == 0),
            }
            specs.append(CompileSpec(
                f"gather_patch_embed_fwd[{name},{ty}]", gather_patch_embed_fwd, _spec_signature(ty, True),
                common | forward_blocks(dtype, cfg["dim"]), **options,
            ))
            specs.append(CompileSpec(
                f"gather_patch_embed_bwd[{name},{ty}]", gather_patch_embed_bwd_weight, _spec_signature(ty, False),
                common | backward_blocks(dtype, cfg["dim"]), **options,
            ))
    return specs
