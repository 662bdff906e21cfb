"""The Triton kernels of gather_patch_embed: the forward GEMM straight from
the uint8 clip, and the weight gradient's ``A^T @ grad`` over the same
window layout."""
import triton
import triton.language as tl

# A power of two: scaling the integer pixels by it is exact, and it lifts the
# pre-scaled weight (~ W / std) out of fp16's subnormal range, where W / (255
# std) of a typical |W| ~ 0.01 would land.
PIXEL_SCALE = tl.constexpr(1.0 / 256)


@triton.jit
def row_tokens(rows, row_ok, ids_ptr, cu_ptr, n_clips, rows_per_clip, n_tokens, HAS_IDS: tl.constexpr,
               HAS_CU: tl.constexpr):
    """Clip index and token id of each packed row, and whether the row is
    inside the clip batch: for an id outside ``[0, n_tokens)`` (unchecked
    under ``validate=False``) nothing is read, and its row holds the bias terms."""
    if HAS_CU:
        # Row r belongs to clip b when cu[b] <= r < cu[b+1]; counting the
        # offsets <= r also steps over empty clips. B is small.
        clip = tl.zeros_like(rows)
        for b in range(1, n_clips):
            clip += (rows >= tl.load(cu_ptr + b)).to(tl.int32)
    else:
        clip = rows // rows_per_clip
    if HAS_IDS:
        token = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    else:
        token = rows - clip * rows_per_clip
    inside = row_ok & (token >= 0) & (token < n_tokens) & (clip < n_clips)
    return clip, token, inside


@triton.jit
def patch_origin(clip, token, frames, height, width, grid_w, grid_hw, WINDOW: tl.constexpr):
    """Byte offset of each token's top-left pixel in the clip (int64)."""
    t = token // grid_hw
    rest = token - t * grid_hw
    i = rest // grid_w
    j = rest - i * grid_w
    frame = clip.to(tl.int64) * frames + t
    return ((frame * height + i * WINDOW) * width + j * WINDOW) * 3


@triton.jit
def window_offsets(origin, kk, width, RUN: tl.constexpr, DOWNSAMPLE: tl.constexpr):
    """Byte offsets ``[rows, k]`` of reduction index ``kk``: patch row ``py``
    starts ``DOWNSAMPLE * py`` clip rows below the origin, and the rest of ``kk``
    runs through the row's ``RUN`` contiguous bytes."""
    py = kk // RUN
    return origin[:, None] + (py * (DOWNSAMPLE * 3) * width + (kk - py * RUN))[None, :]


@triton.jit
def window_pixels(clip_ptr, offsets, mask, width, DOWNSAMPLE: tl.constexpr):
    """The GEMM's A operand in float32: the sum over the window's
    ``DOWNSAMPLE`` clip rows, centred (``- 128 * DOWNSAMPLE``) and times
    ``PIXEL_SCALE``; masked elements are 0."""
    x = tl.load(clip_ptr + offsets, mask=mask, other=128).to(tl.int32)
    for dy in tl.static_range(1, DOWNSAMPLE):
        x += tl.load(clip_ptr + offsets + dy * 3 * width, mask=mask, other=128).to(tl.int32)
    return (x - 128 * DOWNSAMPLE).to(tl.float32) * PIXEL_SCALE


@triton.jit
def gather_patch_embed_fwd(
    clip_ptr, ids_ptr, cu_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    total, n_clips, rows_per_clip, frames, height, width, grid_w, grid_hw, dim,
    PATCH: tl.constexpr, DOWNSAMPLE: tl.constexpr, HAS_IDS: tl.constexpr, HAS_CU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    RUN: tl.constexpr = 3 * PATCH * DOWNSAMPLE
    KDIM: tl.constexpr = RUN * PATCH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    clip, token, inside = row_tokens(rows, row_ok, ids_ptr, cu_ptr, n_clips, rows_per_clip, frames * grid_hw,
                                     HAS_IDS, HAS_CU)
    origin = patch_origin(clip, token, frames, height, width, grid_w, grid_hw, DOWNSAMPLE * PATCH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < KDIM
        offsets = window_offsets(origin, kk, width, RUN, DOWNSAMPLE)
        x = window_pixels(clip_ptr, offsets, inside[:, None] & k_ok[None, :], width, DOWNSAMPLE)
        w = tl.load(w_ptr + kk[:, None] * dim + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    mask = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + token[:, None].to(tl.int64) * dim + cols[None, :], mask=inside[:, None] & col_ok[None, :],
                  other=0.0)
    out = acc + bias[None, :] + pos.to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gather_patch_embed_bwd_weight(
    clip_ptr, ids_ptr, cu_ptr, grad_ptr, g_ptr,
    total, n_clips, rows_per_clip, frames, height, width, grid_w, grid_hw, dim,
    PATCH: tl.constexpr, DOWNSAMPLE: tl.constexpr, HAS_IDS: tl.constexpr, HAS_CU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # G[k, d] = sum over rows of A[row, k] * grad[row, d] (A: the forward's
    # centred window pixels); a program owns a [BLOCK_K, BLOCK_D] tile of G
    # and streams every row.
    RUN: tl.constexpr = 3 * PATCH * DOWNSAMPLE
    KDIM: tl.constexpr = RUN * PATCH
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < KDIM
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, total, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < total
        clip, token, inside = row_tokens(rows, row_ok, ids_ptr, cu_ptr, n_clips, rows_per_clip, frames * grid_hw,
                                         HAS_IDS, HAS_CU)
        origin = patch_origin(clip, token, frames, height, width, grid_w, grid_hw, DOWNSAMPLE * PATCH)
        offsets = window_offsets(origin, kk, width, RUN, DOWNSAMPLE)
        x = window_pixels(clip_ptr, offsets, inside[:, None] & k_ok[None, :], width, DOWNSAMPLE)
        g = tl.load(
            grad_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc = tl.dot(tl.trans(x.to(g.dtype)), g, acc, input_precision=DOT_PRECISION)
    tl.store(g_ptr + kk[:, None] * dim + cols[None, :], acc, mask=k_ok[:, None] & col_ok[None, :])
