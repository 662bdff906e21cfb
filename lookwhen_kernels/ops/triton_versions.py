"""Launch parameters that depend on the Triton release, in one place.

Triton before 3.8 allocates registers less tightly: under 3.6 (the GPU
machine's image) a few of the tiles chosen on 3.8 spill (``python -m
lookwhen_kernels.inspect``). Each is swapped here for the nearest choice that
compiles clean for sm_90 and sm_80 on that release; 3.8 and later keep the
tiles the ops define. The version matrix (``noxfile.py``) runs the compile
report on every pair, so a new release that needs its own choice shows up
there.
"""
from __future__ import annotations

import triton

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
BEFORE_3_8 = TRITON_VERSION < (3, 8)

# frame_normalize's forward: 4 warps leave an 8-byte stack frame in fp16 on sm_90.
FRAME_NORMALIZE_FWD_WARPS = 8 if BEFORE_3_8 else 4
# score_tokens: fp32 with 16 scores per token spills 8 bytes on sm_90 at 3 stages.
SCORE_TOKENS_STAGES = 2 if BEFORE_3_8 else 3
# topk_tokens' looped kernel (clips past the register limit): 16 warps spill
# 16 bytes for the 4 x 4 sub-grid on sm_90.
TOPK_LOOPED_WARPS = 8 if BEFORE_3_8 else 16
# Attention tiles, (BLOCK_M, BLOCK_N, warps, stages) by (table, kernel, tile
# width), replacing the entries of ops/attention/configs.py: FA2's 4-warp
# forward tile and the 16 x 128 backward tiles spill for sm_80, fp32's 32 x 32
# forward in the 128-wide tile for both.
#
# From 3.9 on, every 16-bit head-dim-256 backward tile with 64 keys (the
# warpgroup MMA's 64 rows) spills on sm_90 (16 x 64 at 8 warps: 128 bytes;
# 32 x 64, 64 x 32, 16 and 4 warps, 3 stages: 56 to 1264): 32 x 32 runs
# clean with mma.sync (HMMA) instead of HGMMA on Hopper.
if BEFORE_3_8:
    ATTENTION_TILES = {
        ("half", "fwd", 64): ((128, 64, 8, 3), (128, 128, 8, 3)),
        ("half", "dkdv", 128): ((32, 64, 8, 2), (16, 64, 8, 2)),
        ("half_mods", "dkdv", 64): ((16, 128, 8, 2), (16, 64, 4, 2)),
        ("fp32", "fwd", 128): ((16, 32, 8, 2),),
    }
elif TRITON_VERSION >= (3, 9):
    ATTENTION_TILES = {("half", "dkdv", 256): ((32, 32, 8, 2),)}
else:
    ATTENTION_TILES = {}
