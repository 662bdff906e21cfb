"""lookwhen_kernels: fused Triton ops for token-selection video transformers.

CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference,
or the Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1``.
Every op is also registered as ``torch.ops.lookwhen.<name>``.
"""
from lookwhen_kernels.ops.frame_normalize import frame_normalize

__all__ = [
    "frame_normalize",
]
__version__ = "0.1.0"
