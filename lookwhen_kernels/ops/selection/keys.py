"""Exact, sort-free selection on order keys (Triton helpers).

A float maps to an int32 key with the same order (flip the magnitude bits of
negatives; -0.0 is folded into +0.0 first so the two compare equal, as floats
do). The K-th largest key is built bit by bit from the top, 32 counting
passes over the block (``count(key >= candidate) >= K`` keeps the bit).
Every key above it is taken, and of the keys equal to it the ones with the
lowest ids fill the rest (a prefix count over the tie mask); a prefix sum
over the selection mask gives every chosen id its output slot, ascending.
"""
import triton
import triton.language as tl


@triton.jit
def order_key(score):
    """int32 key of a float32 score with the same order (-0.0 == +0.0)."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def kth_largest_key(key, valid, k):
    """The ``k``-th largest of the ``valid`` keys."""
    # The answer is built in the unsigned image of the key (sign bit flipped),
    # where setting bits from the top is a bisection; each candidate is
    # compared back in the signed image. With k == 0 every bit is kept and the
    # result exceeds every finite key, so nothing is selected.
    sign = tl.full([], 1, tl.int32) << 31
    prefix = tl.zeros([], dtype=tl.int32)
    for i in range(32):
        candidate = prefix | (tl.full([], 1, tl.int32) << (31 - i))
        count = tl.sum((valid & (key >= (candidate ^ sign))).to(tl.int32), axis=0)
        prefix = tl.where(count >= k, candidate, prefix)
    return prefix ^ sign


@triton.jit
def take_top_k(key, valid, k):
    """Which entries are among the ``k`` largest order keys (ties to the
    lower index) and each taken entry's output slot: its rank among the
    taken ones in ascending index order."""
    kth = kth_largest_key(key, valid, k)
    above = valid & (key > kth)
    tied = valid & (key == kth)
    free_slots = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= free_slots))
    return take, tl.cumsum(take.to(tl.int32), axis=0) - 1
