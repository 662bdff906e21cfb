"""LookWhen: selector -> score_tokens -> topk_tokens -> gather_patch_embed ->
extractor over packed tokens -> CLS embedding, pooled token features and an
optional classifier.

Each extractor sequence is ``[CLS, selector CLS, selector registers,
selected tokens...]``: the selector's summary tokens give the extractor
context about the parts of the clip it does not see.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import lookwhen_kernels as lk
from lookwhen.models.config import ModelConfig
from lookwhen.models.extractor import Extractor
from lookwhen.models.layers import check_clip, compute_dtype
from lookwhen.models.selection import Selection, selection_of
from lookwhen.models.selector import Selector, frame_scores
from lookwhen_kernels.layout import segment_sum
from lookwhen_kernels import sub_grid_map, upsample_scores
from lookwhen_kernels.ops.selection import check_budgets


@dataclass
class LookWhenOutput:
    """``embedding [B, width]``: the extractor's final-normed CLS token (the
    selector's CLS position without ``extractor_cls``).
    ``tokens [total, width]``: final features of the selected tokens, packed
    clip after clip in the order of ``indices``. ``indices``: the selected
    token ids, ``int32 [B, K]`` for a keep ratio or packed ``[total]`` for
    per-clip budgets. ``cu_seqlens int32 [B+1]``: offsets of each clip's rows
    in ``tokens`` (and in packed ``indices``). ``scores float32 [B, n]`` (or
    ``[B, n, r*r]`` with ``score_outputs`` = r*r): the selector's scores on
    its coarse grid. ``pooled [B, width]``: the mean of
    each clip's token features (zero for a clip with budget 0). ``logits``:
    the classifier applied to ``embedding`` when the config has classes."""

    embedding: torch.Tensor
    tokens: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    scores: torch.Tensor
    pooled: torch.Tensor
    logits: Optional[torch.Tensor] = None


def _no_timer(name: str):
    return contextlib.nullcontext()


class LookWhen(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "lookwhen":
            raise ValueError(f"config {config.name!r} is a {config.kind} config, not a LookWhen one")
        self.config = config
        self.selector = Selector(config)
        self.extractor = Extractor(config)

    def forward(
        self,
        clip: torch.Tensor,
        keep_ratio: Optional[float] = None,
        budgets=None,
        *,
        indices: Optional[torch.Tensor] = None,
        run_selector: bool = True,
        budget_mass: Optional[float] = None,
        budget_temperature: float = 1.0,
        window=None,
        sigma: Optional[float] = None,
        n_samples: int = 500,
        stage_timer: Optional[Callable[[str], contextlib.AbstractContextManager]] = None,
        selection: Optional[Selection] = None,
    ) -> LookWhenOutput:
        """``clip uint8 [B, T, H, W, 3]``. Keep ``keep_ratio`` of the
        extractor's tokens in every clip (default: the config's), or
        ``budgets[b]`` tokens in clip ``b`` (int32 ``[B]``), or exactly the
        token ids ``indices`` (int32 ``[B, K]``, ascending per clip: a
        selection made by another strategy; the selector still supplies its
        context tokens and scores, unless ``run_selector=False``: then the
        selector does not run at all, each extractor sequence is ``[CLS,
        tokens...]`` and ``scores`` is empty ``[B, 0]``, for strategies whose
        selection costs no model, such as decoder motion vectors), or per-clip
        budgets from the scores: the fewest tokens holding ``budget_mass`` of
        their softmax at ``budget_temperature`` (``budgets_from_scores``:
        concentrated clips get fewer tokens), or per frame the ``window = (h,
        w)`` tokens (an int: square) where the scores sum highest
        (``select_windows``, Uni-AdaFocus's one patch per frame). ``sigma`` (training, with a
        keep ratio): STTS's differentiable top-K instead of the hard one,
        see :meth:`_soft_tokens`;
        ``indices`` are then the hard top-K of the same scores.
        ``stage_timer(name)`` returns a context
        manager wrapped around the stages "selection", "selector" and
        "extractor". ``selection``: the same choice as one
        :class:`~lookwhen.models.selection.Selection` (instead of the keyword
        arguments).

        Host syncs: at a keep ratio the forward reads nothing back from the
        device. With budgets it reads them once (none when they are given
        as a list or host tensor; their copy to the device is then the one
        transfer), checks them here and sizes every buffer from that copy.
        An external ``indices`` is checked here too (one read of its range)."""
        check_clip(clip, self.config)
        selection = selection_of(selection, keep_ratio=keep_ratio, budgets=budgets, indices=indices,
                                 run_selector=run_selector, budget_mass=budget_mass,
                                 budget_temperature=budget_temperature, window=window, sigma=sigma,
                                 n_samples=n_samples)
        if selection.motion:
            raise ValueError("motion: the decoder's motion vectors choose the tokens outside the model "
                             "(lookwhen.data.motion.motion_forward)")
        keep_ratio, budgets, indices = selection.keep_ratio, selection.budgets, selection.indices
        budget_mass, budget_temperature = selection.budget_mass, selection.budget_temperature
        sigma, n_samples, run_selector = selection.sigma, selection.n_samples, selection.run_selector
        if indices is not None:
            _check_selection(indices, clip.shape[0], self.config.n_tokens)
        timer = stage_timer or _no_timer
        cfg = self.config
        batch = clip.shape[0]
        dtype = compute_dtype(self.extractor.patch_embed.proj.weight)

        if run_selector:
            features, context = self._encode(clip, dtype, timer)
        else:
            context = clip.new_empty((batch, 0, cfg.width), dtype=dtype)
        with timer("selection"):
            if run_selector:
                scores = self.selector.score(features)
            else:
                scores = clip.new_empty((batch, 0), dtype=torch.float32)
            grids = {"grid": cfg.score_grid, "out_grid": cfg.grid}
            per_frame = frame_scores(scores, cfg) if run_selector else scores
            # The selection is the model's own (scores from the score head,
            # ids from topk): the ops' value checks, host reads, stay off.
            if budget_mass is not None:
                score_map, map_grid = _score_map(per_frame, cfg)
                budgets = lk.budgets_from_scores(score_map, mass=budget_mass, temperature=budget_temperature,
                                                 validate=False, grid=map_grid, out_grid=cfg.grid)
            tokens = None
            if sigma is not None:
                k = cfg.tokens_kept(keep_ratio)
                tokens = self._soft_tokens(clip, per_frame, k, sigma, n_samples, dtype)
                indices = lk.topk_tokens(per_frame, k, validate=False, **grids)
                tokens_cu = None
            elif indices is not None:
                tokens_cu = None
            elif selection.window is not None:
                score_map, map_grid = _score_map(per_frame, cfg)
                indices = lk.select_windows(score_map, selection.window, grid=map_grid, out_grid=cfg.grid,
                                            validate=False)
                tokens_cu = None
            elif budgets is None:
                indices = lk.topk_tokens(per_frame, cfg.tokens_kept(keep_ratio), validate=False, **grids)
                tokens_cu = None
            else:
                budgets, total, longest = _checked_budgets(budgets, batch, cfg.n_tokens, scores.device)
                indices, tokens_cu, _ = lk.topk_tokens_budgets(
                    per_frame, budgets, total=total, max_seqlen=longest, validate=False, **grids
                )
            if tokens is None:
                tokens = self.extractor.embed(clip, indices, tokens_cu, dtype)
            prefix = context.to(dtype)
            if self.extractor.cls_token is not None:
                prefix = torch.cat([self.extractor.cls_token.to(dtype).expand(batch, -1, -1), prefix], 1)
            if tokens_cu is None:
                layout = FixedLayout(batch, prefix.shape[1], indices.shape[1], clip.device)
            else:
                layout = VarlenLayout.build(tokens_cu, prefix.shape[1], tokens.shape[0], longest)
            x = layout.pack(prefix, tokens)
        with timer("extractor"):
            x = self.extractor(x, layout.seq_cu, layout.max_seqlen)
            embedding, selected, pooled = layout.split(x)
            head = self.extractor.head
            return LookWhenOutput(
                embedding=embedding,
                tokens=selected,
                indices=indices,
                cu_seqlens=layout.tokens_cu,
                scores=scores,
                pooled=pooled,
                logits=None if head is None else head(embedding),
            )

    def _soft_tokens(self, clip, scores, k: int, sigma: float, n_samples: int, dtype) -> torch.Tensor:
        """STTS's soft selection on the extractor's candidates, packed
        ``[B*k, D]``: the coarse scores are upsampled to the fine grid as
        ``topk_tokens`` does and min-max normalised per clip (as STTS's
        scorer ends, so ``sigma`` is relative to each clip's score range);
        ``perturbed_topk`` gives the indicators ``[B, k, N]``, and slot ``j``
        of a clip is ``indicators[j] @ candidates``, over every candidate
        token embedded (patch projection + position). The task loss reaches
        the scores through the indicators' perturbed-maximum gradient; at
        ``sigma = 0`` the indicators are one-hot and the tokens are exactly
        the hard top-K's embeddings."""
        cfg = self.config
        batch = clip.shape[0]
        fine = upsample_scores(scores, cfg.score_grid, cfg.grid)
        low, high = fine.amin(dim=1, keepdim=True), fine.amax(dim=1, keepdim=True)
        indicators = lk.perturbed_topk(((fine - low) / (high - low + 1e-5)).contiguous(), k, n_samples=n_samples,
                                       sigma=sigma, validate=False)
        candidates = self.extractor.embed(clip, None, None, dtype).view(batch, cfg.n_tokens, -1)
        return torch.bmm(indicators.to(candidates.dtype), candidates).flatten(0, 1)

    def _encode(self, clip, dtype, timer):
        """The selector's token features and context tokens."""
        batch = clip.shape[0]
        with timer("selection"):
            coarse = self.selector.embed(clip, dtype)
        with timer("selector"):
            return self.selector.encode(coarse.view(batch, self.config.n_selector_tokens, -1))

    def selector_scores(self, clip: torch.Tensor) -> torch.Tensor:
        """The selector alone: float32 scores ``[B, n]`` (or ``[B, n, r*r]``)
        on its coarse grid (what selector pre-training needs, without running
        the extractor)."""
        check_clip(clip, self.config)
        features, _ = self._encode(clip, compute_dtype(self.selector.cls_token), _no_timer)
        return self.selector.score(features)


def _score_map(scores: torch.Tensor, config: ModelConfig):
    """Per-frame scores as one value per cell of their map, and that map's
    grid: ``[B, n]`` on ``score_grid`` as they are, ``[B, n, r*r]`` laid onto
    their r-times finer map (for ops that take 2-d scores)."""
    if scores.dim() == 2:
        return scores, config.score_grid
    frames, h, w = config.score_grid
    r = math.isqrt(scores.shape[2])
    return sub_grid_map(scores, config.score_grid), (frames, h * r, w * r)


def _check_selection(indices, batch: int, n_tokens: int) -> None:
    """A selection from outside the model (reads its values back to check them)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 2:
        raise ValueError("indices: expected an int32 tensor [B, K] of token ids")
    if indices.shape[0] != batch or indices.shape[1] < 1:
        raise ValueError(f"indices: expected shape [{batch}, K >= 1], got {list(indices.shape)}")
    if not indices.is_contiguous():
        raise ValueError("indices: expected a contiguous tensor (call .contiguous() first)")
    if int(indices.min()) < 0 or int(indices.max()) >= n_tokens:
        raise ValueError(f"indices: token ids must lie in [0, {n_tokens})")


def _checked_budgets(budgets, batch: int, n_tokens: int, device: torch.device):
    """The model's boundary for per-clip budgets: one host copy, validated
    here so that the ops below need not read them. Returns the budgets on
    ``device``, their sum and their largest value."""
    if isinstance(budgets, torch.Tensor):
        host = budgets.detach().to("cpu", torch.int64)
        on_device = budgets.to(device)
    else:
        host = torch.as_tensor(budgets, dtype=torch.int64)
        on_device = host.to(device, torch.int32)
    if host.shape != (batch,):
        raise ValueError(f"budgets: expected one budget per clip, shape [{batch}], got {list(host.shape)}")
    check_budgets("budgets", host, n_tokens)
    return on_device, int(host.sum()), int(host.max())


@dataclass
class FixedLayout:
    """Every clip keeps K tokens: the packed sequences are a plain
    ``[B, P + K, D]`` concatenation, offsets are multiples of ``P + K``."""

    batch: int
    n_prefix: int
    keep: int
    device: torch.device

    @property
    def max_seqlen(self) -> int:
        return self.n_prefix + self.keep

    @property
    def seq_cu(self) -> torch.Tensor:
        return torch.arange(self.batch + 1, device=self.device, dtype=torch.int32) * self.max_seqlen

    @property
    def tokens_cu(self) -> torch.Tensor:
        return torch.arange(self.batch + 1, device=self.device, dtype=torch.int32) * self.keep

    def pack(self, prefix, tokens):
        dim = prefix.shape[-1]
        x = torch.cat([prefix, tokens.view(self.batch, self.keep, dim)], dim=1)
        return x.view(-1, dim)

    def split(self, x):
        x = x.view(self.batch, self.max_seqlen, -1)
        selected = x[:, self.n_prefix:]
        return x[:, 0], selected.reshape(self.batch * self.keep, -1), selected.mean(dim=1)


@dataclass
class VarlenLayout:
    """Per-clip budgets: each clip's ``P`` prefix rows go in front of its
    tokens, so offsets shift by ``P`` per clip; all index arithmetic stays on
    the device (only the longest budget is read on the host)."""

    tokens_cu: torch.Tensor
    seq_cu: torch.Tensor
    starts: torch.Tensor
    prefix_rows: torch.Tensor
    token_rows: torch.Tensor
    clip_of_row: torch.Tensor
    lengths: torch.Tensor
    max_seqlen: int

    @classmethod
    def build(cls, tokens_cu, n_prefix, total, longest_budget):
        batch = tokens_cu.numel() - 1
        device = tokens_cu.device
        lengths = (tokens_cu[1:] - tokens_cu[:-1]).long()
        clip_of_row = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=total)
        seq_cu = tokens_cu + n_prefix * torch.arange(batch + 1, device=device, dtype=torch.int32)
        starts = seq_cu[:-1].long()
        return cls(
            tokens_cu=tokens_cu,
            seq_cu=seq_cu,
            starts=starts,
            prefix_rows=(starts[:, None] + torch.arange(n_prefix, device=device)).flatten(),
            token_rows=torch.arange(total, device=device) + n_prefix * (clip_of_row + 1),
            clip_of_row=clip_of_row,
            lengths=lengths,
            max_seqlen=n_prefix + longest_budget,
        )

    def pack(self, prefix, tokens):
        dim = prefix.shape[-1]
        x = tokens.new_empty(self.prefix_rows.numel() + tokens.shape[0], dim)
        x[self.prefix_rows] = prefix.reshape(-1, dim)
        x[self.token_rows] = tokens
        return x

    def split(self, x):
        selected = x[self.token_rows]
        # A GEMM, not index_add_: the same sums on every run (B is small).
        sums = segment_sum(selected, self.clip_of_row, self.lengths.numel())
        pooled = (sums / self.lengths.clamp(min=1)[:, None]).to(selected.dtype)
        return x[self.starts], selected, pooled
