"""RLT: the dense baseline run on the tokens that changed (run-length
tokenisation, Choudhury et al.), the comparison of LookWhen's paper.

``static_tokens`` picks, per clip, every token of the first frame and every
later token whose patch differs from the previous frame by RLT's threshold;
the kept ids are embedded straight from the uint8 clip
(``gather_patch_embed``, with their rows of the baseline's positional table),
each clip's CLS goes in front, and the baseline's blocks run on the packed
sequences (``cu_seqlens``: RLT's block-diagonal mask without the padding).
The baseline's packed path (``forward_packed``) runs the blocks and pools each
sequence with its attention-pooling head. The optional
run-length embedding is RLT's: a learned row per run length (in tubelets),
added to each kept token.

The weights are the baseline's own (the module holds the baseline, not a
copy): the same model, shown fewer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn

import lookwhen_kernels as lk
from lookwhen.models.baseline import DenseBaseline
from lookwhen.models.layers import SeparablePosEmbed, check_clip, compute_dtype
from lookwhen.models.lookwhen import VarlenLayout
from lookwhen_kernels.layout import lengths_from_cu_seqlens

# RLT's default: 0.1 on the scale of ImageNet-normalised pixels (its
# differences are taken after normalisation).
DEFAULT_THRESHOLD = 0.1


@dataclass
class RLTOutput:
    """``embedding [B, width]``; the selection: ``indices [total]`` (kept ids,
    ascending per clip), ``cu_seqlens int32 [B+1]`` and ``run_lengths
    [total]`` (tubelets each kept token stands for)."""

    embedding: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    run_lengths: torch.Tensor

    @property
    def tokens_per_clip(self) -> torch.Tensor:
        return lengths_from_cu_seqlens(self.cu_seqlens)


class RLTDense(nn.Module):
    """``baseline`` (a :class:`DenseBaseline`) on RLT's kept tokens.
    ``threshold`` is on the normalised-pixel scale (RLT's); ``encode_length``
    adds RLT's run-length embedding (a new, learned table)."""

    def __init__(self, baseline: DenseBaseline, threshold: float = DEFAULT_THRESHOLD, encode_length: bool = False):
        super().__init__()
        self.baseline = baseline
        self.config = baseline.config
        self.threshold = float(threshold)
        self.length_embed = None
        if encode_length:
            self.length_embed = nn.Parameter(torch.zeros(self.config.frames // self.config.tubelet,
                                                         self.config.width))
            trunc_normal_(self.length_embed, std=0.02)

    def select(self, clip: torch.Tensor):
        """``static_tokens`` at the model's patch size, threshold and
        normalisation: ``(indices, cu_seqlens, run_lengths)``."""
        cfg = self.config
        return lk.static_tokens(clip, patch_size=cfg.patch_size, threshold=self.threshold, tubelet=cfg.tubelet,
                                std=cfg.std)

    def _positions(self, dtype):
        """The CLS token's position row (``None`` for the separable table,
        which has none) and the patch tokens' table ``[N, D]``."""
        pos = self.baseline.pos_embed
        if isinstance(pos, SeparablePosEmbed):
            return None, pos.table(dtype)
        return pos[0, :1].to(dtype), pos[0, 1:].to(dtype)

    def embed(self, clip, indices, cu_seqlens, run_lengths, dtype) -> torch.Tensor:
        """Patch embeddings (+ positions, + run lengths) of the kept tokens,
        packed ``[total, D]``."""
        base, cfg = self.baseline, self.config
        proj = base.patch_embed.proj
        tokens = lk.gather_patch_embed(
            clip, indices, proj.weight.to(dtype), proj.bias.to(dtype), self._positions(dtype)[1],
            patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std, cu_seqlens=cu_seqlens, validate=False,
        )
        if self.length_embed is not None:
            tokens = tokens + self.length_embed.to(dtype)[run_lengths.long() - 1]
        return tokens

    def trunk(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, longest: int) -> torch.Tensor:
        """CLS in front of each clip's tokens, then the baseline's packed
        path (blocks over the sequences, the pooling head per sequence):
        ``[B, D]``."""
        base = self.baseline
        batch = cu_seqlens.numel() - 1
        layout = VarlenLayout.build(cu_seqlens, 1, tokens.shape[0], longest)
        cls = base.cls_token.to(tokens.dtype)
        cls_position = self._positions(tokens.dtype)[0]
        if cls_position is not None:
            cls = cls + cls_position
        x = layout.pack(cls.expand(batch, -1, -1), tokens)
        return base.forward_packed(x, layout.seq_cu, layout.max_seqlen)

    def forward(self, clip: torch.Tensor) -> RLTOutput:
        """``clip uint8 [B, T, H, W, 3]``. Host reads: the kept-token count
        (sizing the selection) and the longest clip (the attention's
        ``max_seqlen``), both from the one ``cu_seqlens``."""
        check_clip(clip, self.config)
        indices, cu_seqlens, run_lengths = self.select(clip)
        longest = int(lengths_from_cu_seqlens(cu_seqlens).max())
        tokens = self.embed(clip, indices, cu_seqlens, run_lengths, compute_dtype(self.baseline.cls_token))
        return RLTOutput(self.trunk(tokens, cu_seqlens, longest), indices, cu_seqlens, run_lengths)
