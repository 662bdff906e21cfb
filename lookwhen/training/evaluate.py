"""Evaluation the way video papers report it: top-1 and top-5 accuracy with
the multi-view protocol (``4x3``: 4 temporal clips x 3 spatial crops, the
views' softmax scores averaged per video), with the cost beside it: clips/s
and GFLOPs (and GMACs, the papers' unit: one multiply-add) per view.

Multi-label data sets (Charades) report mAP instead: the views' sigmoid
scores averaged per video, the average precision of each class over the
videos (the precision at each positive, ranked by score, averaged over the
positives; videos with equal scores count as one threshold), and the mean
over the classes with at least one positive video, which is how Charades'
own evaluation skips classes absent from a split.

Views. Temporal clip ``i`` of ``n`` takes ``frames`` frames by the uniform
rule inside the ``i``-th of ``n`` equal parts of the video. Spatial crop
``j`` of ``m``: the short side resized to ``size`` and ``m`` squares spread
evenly along the long side (for ``m = 1`` the centre; for 3, the two ends and
the centre). The protocol is deterministic: a second run gives the same
numbers, and so does a run under ``torchrun`` on any number of ranks (each
scores its share of the videos; the scores are gathered before the metrics).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from lookwhen.data.datasets import Entry, collate_list
from lookwhen.models.lookwhen import LookWhen
from lookwhen.models.rlt import RLTDense
from lookwhen.data.decoders import loader_threads
from lookwhen.data.video import VideoError, decode_frames, resize_short_side, sample_indices
from lookwhen.models.flops import count_flops


def classifier_of(model: nn.Module) -> nn.Linear:
    """The classifier on the embedding of any of the model kinds."""
    if isinstance(model, LookWhen):
        return model.extractor.head
    if isinstance(model, RLTDense):
        return model.baseline.head
    return model.head


def logits_of(model: nn.Module, clips: torch.Tensor, **selection) -> torch.Tensor:
    """Class logits of any of the model kinds (LookWhen takes ``keep_ratio``,
    ``budgets`` or ``indices``; a dense model and RLT, which picks its own
    tokens, take none)."""
    if isinstance(model, LookWhen):
        return model(clips, **selection).logits
    if isinstance(model, RLTDense):
        return classifier_of(model)(model(clips).embedding)
    return classifier_of(model)(model(clips))


def parse_views(text: str) -> Tuple[int, int]:
    """``"4x3"`` -> ``(4, 3)`` (temporal clips, spatial crops)."""
    parts = text.lower().split("x")
    try:
        temporal, spatial = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"views: expected TEMPORALxSPATIAL such as 4x3, got {text!r}") from None
    if temporal < 1 or spatial < 1:
        raise ValueError(f"views: both counts must be at least 1, got {text!r}")
    return temporal, spatial


def view_indices(n_frames: int, frames: int, temporal: int) -> List[int]:
    """Frame indices of every temporal clip, concatenated."""
    out = []
    for i in range(temporal):
        first, stop = (i * n_frames) // temporal, ((i + 1) * n_frames) // temporal
        out += sample_indices(max(stop - first, 1), frames, min(first, n_frames - 1))
    return out


def spatial_crops(frames: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> ``[count, F, size, size, 3]``."""
    x = resize_short_side(frames, size)
    _, new_h, new_w, _ = x.shape
    crops = []
    for j in range(count):
        at = 0.5 if count == 1 else j / (count - 1)
        top, left = round((new_h - size) * at), round((new_w - size) * at)
        if new_h > new_w:
            left = (new_w - size) // 2
        else:
            top = (new_h - size) // 2
        crops.append(x[:, top: top + size, left: left + size])
    return torch.stack(crops).contiguous()


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision of one class: ``scores [N]`` ranked high to low,
    ``positive bool [N]``; the precision at each distinct score that holds
    positives, weighted by the positives it holds (so the order among equal
    scores does not matter). NaN without positives."""
    total = int(positive.sum())
    if total == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positive = scores[order].double(), positive[order].double()
    hits = positive.cumsum(0)
    # The last index of each run of equal scores: one threshold.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    at = last.nonzero().squeeze(1)
    hits_at = hits[at]
    new_hits = torch.diff(hits_at, prepend=hits_at.new_zeros(1))
    precision = hits_at / (at + 1).double()
    return float((new_hits * precision).sum() / total)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes of :func:`average_precision`, for ``scores [N, C]``
    and 0/1 ``targets [N, C]``; classes without positives are skipped (NaN
    when no class has any)."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets: expected the same [N, C] shape, got {list(scores.shape)} and "
                         f"{list(targets.shape)}")
    values = [average_precision(scores[:, c], targets[:, c] > 0) for c in range(scores.shape[1])]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


class ViewDataset(torch.utils.data.Dataset):
    """Every view of one video per item: ``views uint8 [V, T, S, S, 3]``
    (temporal-major), or ``None`` with the failure for an unreadable file."""

    def __init__(self, items: Sequence[Entry], frames: int, size: int, views: Tuple[int, int], decoder: str = "auto"):
        self.items, self.frames, self.size, self.views = [Entry(*item) for item in items], frames, size, views
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict:
        path, label, start, end = self.items[index]
        temporal, spatial = self.views
        try:
            decoded = decode_frames(path, lambda n: view_indices(n, self.frames, temporal), start=start, end=end,
                                    decoder=self.decoder, threads=loader_threads())
        except VideoError as error:
            return {"views": None, "label": label, "path": path, "error": str(error)}
        crops = spatial_crops(decoded, self.size, spatial)  # [spatial, temporal * T, S, S, 3]
        crops = crops.unflatten(1, (temporal, self.frames)).transpose(0, 1).flatten(0, 1)
        return {"views": crops, "label": label, "path": path, "error": None}


@dataclass
class Evaluation:
    videos: int
    views_per_video: int
    clips_per_s: float
    gflops_per_view: float
    # top-1 and top-5 of a single-label data set, mAP of a multi-label one;
    # None where they do not apply.
    top1: Optional[float] = None
    top5: Optional[float] = None
    failures: List[Tuple[str, str]] = field(default_factory=list)
    predictions: List[int] = field(default_factory=list)
    # The keep ratio the model ran at (a LookWhen model's own unless one was
    # given) and the tokens it kept per view; None for a dense model.
    keep_ratio: Optional[float] = None
    tokens_kept: Optional[int] = None
    mAP: Optional[float] = None

    @property
    def gmacs_per_view(self) -> float:
        return self.gflops_per_view / 2

    def as_dict(self) -> Dict:
        return {"top1": self.top1, "top5": self.top5, "mAP": self.mAP, "videos": self.videos,
                "views_per_video": self.views_per_video,
                "clips_per_s": self.clips_per_s, "gflops_per_view": self.gflops_per_view,
                "gmacs_per_view": self.gmacs_per_view, "keep_ratio": self.keep_ratio, "tokens_kept": self.tokens_kept,
                "failures": [list(f) for f in self.failures]}


@torch.no_grad()
def evaluate(model, items: Sequence[Entry], *, views: Tuple[int, int] = (1, 1),
             keep_ratio: Optional[float] = None, window=None, batch_size: int = 4, workers: int = 0,
             device: torch.device = torch.device("cpu"), progress=None, multi_label: bool = False,
             decoder: str = "auto", rank: int = 0, world: int = 1) -> Evaluation:
    """Top-1 / top-5 of ``model`` over the entries (``(path, label)`` pairs
    will do), or with ``multi_label`` (labels: tuples of class ids) its mAP;
    unreadable videos are left out and listed in ``failures``. Decoding runs
    in ``workers`` processes while the model runs (``decoder``: see
    :mod:`lookwhen.data.decoders`). Under ``torchrun`` (``world`` > 1, a
    process group started) each rank scores every ``world``-th video from
    ``rank`` on, and every rank returns the metrics over all of them.
    ``keep_ratio`` or ``window`` (LookWhen): its selection, see
    :meth:`~lookwhen.models.lookwhen.LookWhen.forward`."""
    cfg = model.config
    if not cfg.num_classes:
        raise ValueError(f"{cfg.name}: evaluation needs a classifier (num_classes > 0)")
    selection = {k: v for k, v in (("keep_ratio", keep_ratio), ("window", window)) if v is not None}
    if selection and not isinstance(model, LookWhen):
        raise ValueError(f"{', '.join(selection)}: {cfg.name} is a dense model and keeps every token")
    model = model.eval()
    share = list(range(rank, len(items), world))
    loader = torch.utils.data.DataLoader(ViewDataset([items[i] for i in share], cfg.frames, cfg.image_size, views,
                                                     decoder),
                                         batch_size=1, num_workers=workers, collate_fn=collate_list)
    per_video = views[0] * views[1]
    # Per video read, by its index in ``items``: the views' scores averaged
    # (softmax, or sigmoid for multi-label data).
    scored: Dict[int, torch.Tensor] = {}
    failures: List[Tuple[int, str, str]] = []
    pending: List[Tuple[int, Dict]] = []
    compute_s, n_views = 0.0, 0

    def flush():
        nonlocal compute_s, n_views
        if not pending:
            return
        clips = torch.cat([sample["views"] for _, sample in pending]).to(device)
        start = time.perf_counter()
        logits = torch.cat([logits_of(model, clips[i: i + batch_size], **selection).float()
                            for i in range(0, len(clips), batch_size)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s += time.perf_counter() - start
        n_views += len(clips)
        probabilities = logits.sigmoid() if multi_label else logits.softmax(-1)
        for (index, _), scores in zip(pending, probabilities.view(len(pending), per_video, -1).mean(1).cpu()):
            scored[index] = scores
        pending.clear()

    for index, (sample,) in zip(share, loader):
        if sample["views"] is None:
            failures.append((index, sample["path"], sample["error"]))
        else:
            pending.append((index, sample))
            if len(pending) * per_video >= batch_size:
                flush()
        if progress is not None:
            progress(1)
    flush()
    if world > 1:
        # Every rank's share, so that every rank returns the same figures.
        parts = [None] * world
        dist.all_gather_object(parts, (scored, failures, compute_s, n_views))
        scored = {index: scores for part in parts for index, scores in part[0].items()}
        failures = sorted(failure for part in parts for failure in part[1])
        compute_s = max(part[2] for part in parts)
        n_views = sum(part[3] for part in parts)
    if not scored:
        raise ValueError(f"none of the {len(items)} videos could be read")
    order = sorted(scored)
    scores = torch.stack([scored[i] for i in order])
    labels = [Entry(*items[i]).label for i in order]
    predictions = []
    if multi_label:
        targets = torch.zeros_like(scores)
        for row, label in enumerate(labels):
            targets[row, list(label if isinstance(label, tuple) else (label,))] = 1.0
        accuracy = {"mAP": mean_average_precision(scores, targets)}
    else:
        top = scores.topk(min(5, scores.shape[-1]), dim=-1).indices
        truth = torch.tensor(labels)
        predictions = top[:, 0].tolist()
        accuracy = {"top1": float((top[:, 0] == truth).float().mean()),
                    "top5": float((top == truth[:, None]).any(-1).float().mean())}
    probe = torch.zeros((1, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, device=device)
    flops = count_flops(model, probe, **selection) if isinstance(model, LookWhen) else count_flops(model, probe)
    ran_at = (cfg.keep_ratio if keep_ratio is None else keep_ratio) if isinstance(model, LookWhen) else None
    return Evaluation(**accuracy, videos=len(order), views_per_video=per_video,
                      clips_per_s=n_views / max(compute_s, 1e-9), gflops_per_view=flops / 1e9,
                      failures=[(path, error) for _, path, error in failures], predictions=predictions,
                      keep_ratio=ran_at, tokens_kept=None if ran_at is None else cfg.tokens_kept(ran_at))


def format_evaluation(name: str, result: Evaluation, views: Tuple[int, int]) -> str:
    if result.mAP is not None:
        names, figures = ("mAP",), (f"{100 * result.mAP:.2f}",)
    else:
        names, figures = ("top-1", "top-5"), (f"{100 * result.top1:.2f}", f"{100 * result.top5:.2f}")
    header = ("model", "views", "keep", "videos", *names, "GFLOPs/view", "GMACs/view", "views/s")
    keep = "all" if result.keep_ratio is None else f"{result.keep_ratio:g} ({result.tokens_kept} tokens)"
    row = (name, f"{views[0]}x{views[1]}", keep, str(result.videos), *figures, f"{result.gflops_per_view:.2f}",
           f"{result.gmacs_per_view:.2f}", f"{result.clips_per_s:.2f}")
    widths = [max(len(a), len(b)) for a, b in zip(header, row)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in (header, row)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), lines[1]]) + (
        f"\n{len(result.failures)} unreadable videos left out" if result.failures else "")

