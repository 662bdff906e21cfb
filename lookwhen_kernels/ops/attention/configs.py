"""Tile configurations of the attention kernels, by kernel and tile width."""
from __future__ import annotations

from typing import Tuple

import torch
import triton

from lookwhen_kernels.ops._common import next_power_of_2
from lookwhen_kernels.ops.triton_versions import ATTENTION_TILES

MAX_HEAD_DIM = 256

# ---------------------------------------------------------------------------
# Tile configurations: (BLOCK_M queries, BLOCK_N keys, warps, stages), by tile
# width (BLOCK_D <= 64, 128, 256). On a GPU the autotuner picks between the
# entries once per head dim, dtype and score-modifier variant; the
# interpreter (tests) runs the first.
# Every fp16/bf16 entry for 64 and 128 compiles without spills for sm_90 and
# sm_80 (``python -m lookwhen_kernels.inspect --only varlen_attention``) on
# Triton 3.8 and later; ops/triton_versions.py swaps the tiles older releases
# spill on.
#
# FlashAttention-2 runs 128 x 128 (hdim <= 64) and 128 x 64 (hdim 128, H100)
# forward tiles with 4 warps, and backward tiles of 128 keys x 128 queries
# (hdim 64) or 128 keys x 64 queries (hdim 128) with 8 warps. Triton keeps
# more in registers than its hand-written kernels (the backward holds k, v,
# dk and dv of the key tile), so the same shapes spill here. The lists keep
# FA2's 128-query forward tile (and its 128-key tile in the head-dim-64
# backward) and pair it with the widest other tile and warp count that do
# not spill.
# ---------------------------------------------------------------------------


def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


HALF_CONFIGS = {
    "fwd": {
        64: (_config(128, 64, 4, 3), _config(128, 128, 8, 3)),
        128: (_config(128, 64, 8, 3), _config(128, 32, 8, 3)),
        256: (_config(64, 64, 8, 2),),
    },
    # The key tile is the M side of all the dk/dv kernel's MMAs (keys x queries).
    "dkdv": {
        64: (_config(32, 128, 8, 2), _config(32, 64, 4, 2)),
        128: (_config(32, 64, 8, 2), _config(16, 128, 8, 2)),
        256: (_config(16, 64, 8, 2),),
    },
    "dq": {
        64: (_config(128, 64, 8, 2), _config(64, 64, 4, 2)),
        128: (_config(128, 32, 8, 2), _config(64, 64, 4, 2)),
        # A 32-row alternative misses Hopper's 64-row warpgroup MMA (no HGMMA).
        256: (_config(64, 32, 8, 2),),
    },
}
# fp32 products run as three TF32 MMAs each (see dot_precision_for), which
# triples the operand registers: small tiles, one config each. Spill-free up
# to head dim 128 (the 128-wide dq tile at 16 x 16: 32 x 16 spills for the
# masked head dims 80 and 96); the 256-wide backward spills (fp32 is not the
# GPU fast path, so the static report leaves it out).
FP32_CONFIGS = {
    "fwd": {64: (_config(128, 32, 8, 2),), 128: (_config(32, 32, 8, 2),), 256: (_config(16, 32, 4, 2),)},
    "dkdv": {64: (_config(16, 32, 4, 2),), 128: (_config(16, 16, 4, 2),), 256: (_config(16, 16, 8, 2),)},
    "dq": {64: (_config(32, 32, 4, 2),), 128: (_config(16, 16, 8, 2),), 256: (_config(16, 16, 8, 2),)},
}
# Score modifiers (window, soft cap, ALiBi) hold more in registers: at head
# dims 64 and 128 the configs that spill with all of them on (sm_80 or sm_90)
# are left out. Head dim 256 keeps its single config, unchecked with them
# (the report covers the modifiers at 64 and 128).
HALF_MOD_CONFIGS = {
    "fwd": {64: HALF_CONFIGS["fwd"][64][1:], 128: HALF_CONFIGS["fwd"][128][1:]},
    "dkdv": {128: HALF_CONFIGS["dkdv"][128][:1]},
    "dq": {64: HALF_CONFIGS["dq"][64][:1], 128: HALF_CONFIGS["dq"][128][:1]},
}
PREPROCESS_BLOCK_M = 64

_TABLES = {"half": HALF_CONFIGS, "half_mods": HALF_MOD_CONFIGS, "fp32": FP32_CONFIGS}
for (table, kernel, width), tiles in ATTENTION_TILES.items():
    _TABLES[table].setdefault(kernel, {})[width] = tuple(_config(*tile) for tile in tiles)


def block_d_for(head_dim: int) -> int:
    """The tile width a head dim runs in: a power of two, at least 16 (the K of an MMA)."""
    return max(16, next_power_of_2(head_dim))


def configs_for(kernel: str, head_dim: int, dtype: torch.dtype, mods: bool = False) -> Tuple[triton.Config, ...]:
    """The configs a kernel runs with; ``mods``: with score modifiers."""
    width = max(64, block_d_for(head_dim))
    if dtype == torch.float32:
        return FP32_CONFIGS[kernel][width]
    return HALF_MOD_CONFIGS.get(kernel, {}).get(width, HALF_CONFIGS[kernel][width]) if mods \
        else HALF_CONFIGS[kernel][width]


def dot_precision_for(dtype: torch.dtype) -> str:
    # fp32 inputs promise fp32-level products: "tf32x3" (hi/lo TF32 split,
    # ~1e-6 relative) keeps them on the tensor cores. Exact "ieee" dots run as
    # FMAs whose operands sit in registers and spill at any useful tile.
    return "tf32x3" if dtype == torch.float32 else "tf32"
