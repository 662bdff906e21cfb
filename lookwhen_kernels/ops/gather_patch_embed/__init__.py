"""``gather_patch_embed``: patch embedding of selected tokens, straight from the
uint8 clip.

A forward program owns ``BLOCK_M`` packed output rows x ``BLOCK_N`` channels.
It turns each row's token id into the clip offset of its patch once, then walks
the reduction dimension in ``BLOCK_K`` chunks: uint8 pixels are loaded from the
clip, cast to the weight's dtype and fed to ``tl.dot`` (tensor cores) with a
chunk of the weight, accumulating in float32. No patch tensor exists in memory.

Normalisation is folded into the GEMM operands on the host, once per call (a
``D x 3*p*p`` elementwise op, tiny next to the GEMM). With ``s_c = 1 / (255
std_c)`` and ``o_c = (128/255 - mean_c) / std_c`` the normalised pixel is
``(x - 128) * s_c + o_c``, so

    out[d] = sum_k (W[d,k] s_k) (x_k - 128) + (bias[d] + sum_k W[d,k] o_k) + pos[n, d].

The kernel's A operand is the centred raw pixel ``(x - 128) / 256``, an
integer over a power of two that fp16 and bf16 hold exactly; the weight is
pre-scaled by ``256 s`` (about ``W / std``: the power of two keeps it out of
fp16's subnormal range) and the mean term lives in a float32 effective bias.
The inner loop does no normalisation arithmetic at all, and centring at 128
(rather than feeding ``x`` in ``[0, 255]``) keeps the products as small as in
the normalised formulation, so rounding the scaled weight costs no more
accuracy than rounding normalised pixels would.

The reduction runs over the patch's *window* in the clip, in the clip's own
byte order: ``py`` (patch row), then the ``3 * p * downsample`` contiguous bytes
of that clip row. With ``downsample=2`` the A operand sums the window's two
clip rows (``(a + b - 256) / 256``, still exact in fp16 and bf16) and the
weight holds each entry twice (once per clip column it averages) divided by 4,
so the 2x2 mean happens inside the GEMM. That doubles the selector's (small)
tensor-core work but keeps every pixel load a contiguous run that the compiler
turns into vector ``cp.async`` copies (for ViT-B/16 at 224: 8 bytes per
thread, pipelined like the weight), instead of four scalar byte loads per
element held in registers.

Backward (a Triton kernel too, no patch tensor either): the kernel computes
``G = A^T @ grad`` over the same window layout (float32, tensor cores) and the
host folds it back: ``d_weight = 256 s * G + o * colsum(grad)``, with ``G``
summed over the clip columns a downsampled pixel averages and divided by
``downsample^2``. ``d_bias`` is the
column sum of ``grad``; ``d_pos_embed`` adds every row of ``grad`` into
``[N, D]`` at its token id (``index_add``; a one-hot GEMM in deterministic
mode, where the atomic adds' order must not vary).

One job per file: ``kernels`` (Triton), ``launch`` (tensors to launches and
the host side of the backward), ``op`` (registration, autograd, FLOP
formulas, the public function), ``specs`` (the static GPU report's
configurations).
"""
from lookwhen_kernels.ops.gather_patch_embed.launch import forward_into, window_grad_into
from lookwhen_kernels.ops.gather_patch_embed.op import gather_patch_embed
from lookwhen_kernels.ops.gather_patch_embed.specs import compile_specs

__all__ = ["compile_specs", "forward_into", "gather_patch_embed", "window_grad_into"]
