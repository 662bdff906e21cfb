"""The Triton kernels of topk_tokens: one clip per program, in registers
(:func:`topk_kernel`) or streamed through a key buffer past the register
limit (:func:`topk_looped_kernel`)."""
import triton
import triton.language as tl

from lookwhen_kernels.ops.selection import kth_largest_key, order_key, upsampled_scores
from lookwhen_kernels.ops.triton_versions import TOPK_LOOPED_WARPS

# Clips past the register limit stream through the key buffer in pieces of
# CHUNK tokens: 4096 keys over 16 warps are 8 per thread, as the register
# kernel's smaller blocks (Triton before 3.8 runs 8 warps: triton_versions).
CHUNK = 4096
LOOPED_WARPS = TOPK_LOOPED_WARPS


@triton.jit
def clip_budget(clip, budgets_ptr, offsets_ptr, k, total, PER_CLIP: tl.constexpr):
    """The clip's K, the offset of its first output slot and the slots the
    output has from there (``total`` in all): budgets and offsets that
    disagree with ``total`` (unchecked under ``validate=False``) cannot make
    a store leave the output."""
    if PER_CLIP:
        base = tl.load(offsets_ptr + clip).to(tl.int64)
        room = tl.where((base >= 0) & (base <= total), total - base, 0)
        return tl.load(budgets_ptr + clip), tl.maximum(base, 0), room
    base = clip.to(tl.int64) * k
    return k, base, base * 0 + k  # room as int64, like the per-clip branch's


@triton.jit
def store_selection(out_ptr, ids, key, valid, kth, free_slots, tied_before, written_before, room):
    """Write the chosen ids of one block: every key above the K-th, and of the
    keys equal to it the first ``free_slots`` (in id order, counting the
    ``tied_before`` ties of earlier blocks), at the slots after
    ``written_before`` (the first ``room`` only). Returns the block's (ties,
    ids written)."""
    above = valid & (key > kth)
    tied = valid & (key == kth)
    take = above | (tied & (tied_before + tl.cumsum(tied.to(tl.int32), axis=0) <= free_slots))
    slot = written_before + tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + slot, ids, mask=take & (slot < room))
    return tl.sum(tied.to(tl.int32), axis=0), tl.sum(take.to(tl.int32), axis=0)


@triton.jit
def topk_kernel(
    scores_ptr, budgets_ptr, offsets_ptr, out_ptr,
    n_in, n_out, k, total,
    h, w, out_h, out_w, scale_h, scale_w,
    UPSAMPLE: tl.constexpr, PER_CLIP: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
):
    clip = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    valid = ids < n_out
    clip_scores = scores_ptr + clip.to(tl.int64) * n_in
    if UPSAMPLE:
        score = upsampled_scores(clip_scores, ids, valid, h, w, out_h, out_w, scale_h, scale_w, SUB)
    else:
        score = tl.load(clip_scores + ids, mask=valid, other=0.0).to(tl.float32)
    budget, out_base, room = clip_budget(clip, budgets_ptr, offsets_ptr, k, total, PER_CLIP)
    key = order_key(score)
    kth = kth_largest_key(key, valid, budget)
    above = valid & (key > kth)
    free_slots = budget - tl.sum(above.to(tl.int32), axis=0)
    store_selection(out_ptr + out_base, ids, key, valid, kth, free_slots, 0, 0, room)


@triton.jit
def topk_looped_kernel(
    scores_ptr, budgets_ptr, offsets_ptr, out_ptr, keys_ptr,
    n_in, n_out, k, total,
    h, w, out_h, out_w, scale_h, scale_w,
    UPSAMPLE: tl.constexpr, PER_CLIP: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
):
    # The same selection as topk_kernel, for clips past the register limit:
    # one pass writes the clip's order keys to ``keys_ptr [B, n_out]``, the
    # 32 counting passes and the selection stream them back chunk by chunk.
    clip = tl.program_id(0)
    clip_scores = scores_ptr + clip.to(tl.int64) * n_in
    clip_keys = keys_ptr + clip.to(tl.int64) * n_out
    for start in range(0, n_out, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        valid = ids < n_out
        if UPSAMPLE:
            score = upsampled_scores(clip_scores, ids, valid, h, w, out_h, out_w, scale_h, scale_w, SUB)
        else:
            score = tl.load(clip_scores + ids, mask=valid, other=0.0).to(tl.float32)
        tl.store(clip_keys + ids, order_key(score), mask=valid)
    budget, out_base, room = clip_budget(clip, budgets_ptr, offsets_ptr, k, total, PER_CLIP)
    # As kth_largest_key, with each count summed over the chunks.
    sign = tl.full([], 1, tl.int32) << 31
    prefix = tl.zeros([], dtype=tl.int32)
    for i in range(32):
        candidate = prefix | (tl.full([], 1, tl.int32) << (31 - i))
        count = tl.zeros([], dtype=tl.int32)
        for start in range(0, n_out, CHUNK):
            ids = start + tl.arange(0, CHUNK)
            valid = ids < n_out
            key = tl.load(clip_keys + ids, mask=valid, other=0)
            count += tl.sum((valid & (key >= (candidate ^ sign))).to(tl.int32), axis=0)
        prefix = tl.where(count >= budget, candidate, prefix)
    kth = prefix ^ sign
    n_above = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_out, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        valid = ids < n_out
        key = tl.load(clip_keys + ids, mask=valid, other=0)
        n_above += tl.sum((valid & (key > kth)).to(tl.int32), axis=0)
    free_slots = budget - n_above
    tied_before = tl.zeros([], dtype=tl.int32)
    written = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_out, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        valid = ids < n_out
        key = tl.load(clip_keys + ids, mask=valid, other=0)
        ties, taken = store_selection(out_ptr + out_base, ids, key, valid, kth, free_slots, tied_before, written,
                                      room)
        tied_before += ties
        written += taken
