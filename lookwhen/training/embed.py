"""Embedding videos: a list of files into one table (:func:`embed_files`),
or a collection of any size into shards (:func:`embed_shards`). Both run
batches through :func:`embed_batch` and gather them in :class:`Embedded`.

Shards: the manifest's videos are cut into shards of ``shard_size``
consecutive entries; shard ``k`` goes to ``shard-0000k.safetensors`` in the
output folder: ``embeddings [n, D]`` for the ``n`` readable videos of the
shard (and, on request, the selected ``indices`` and the selector's
``scores``), with the videos' paths, the shard's range and the model config
in the metadata. Unreadable videos are listed in ``shard-0000k.failed.tsv``
beside it (path, tab, reason) and never stop the run.

Each shard is written whole (:mod:`lookwhen.io.atomic`), and a restart
skips the shards already there, so a killed run loses at most the shards in
progress. ``run.json`` pins the manifest, shard size and model (its config
and the SHA-256 of its weights): a restart with other inputs is refused. Under ``torchrun`` rank ``r`` of ``w`` takes
shards ``r, r + w, ...``. Decoding runs in DataLoader workers, so it
overlaps the model's compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lookwhen.data.motion import MotionScores, motion_forward, motion_scores
from lookwhen.data.decoders import loader_threads
from lookwhen.data.video import VideoError, read_clip
from lookwhen.io.atomic import check_pinned, shard_name, write_json, write_tensors
from lookwhen.io.checkpoint import weights_fingerprint
from lookwhen.models.lookwhen import LookWhen
from lookwhen.models.selection import Selection, selection_of

RUN_FILE = "run.json"
FILE_SUFFIXES = (".npy", ".safetensors")


def embed_batch(model, clips: torch.Tensor, selection: Selection = Selection(),
                motions: Optional[Sequence[MotionScores]] = None):
    """One batch through either model kind, without autograd: a
    ``LookWhenOutput`` (LookWhen: the ``selection``, or the motion
    selector's choice from ``motions``) or the dense model's embeddings."""
    with torch.inference_mode():
        if not isinstance(model, LookWhen):
            return model(clips)
        if selection.motion:
            return motion_forward(model, clips, motions, selection.keep_ratio)
        return model(clips, selection=selection)


@dataclass
class Embedded:
    """Outputs of :func:`embed_batch` gathered batch after batch, on the
    CPU: the embeddings and, for LookWhen, the selected ids, the scores and
    each clip's count of tokens (packed ids split by it)."""

    width: int
    parts: Dict[str, List[torch.Tensor]] = field(
        default_factory=lambda: {"embeddings": [], "indices": [], "scores": [], "budgets": []})

    def add(self, out) -> None:
        if isinstance(out, torch.Tensor):
            self.parts["embeddings"].append(out.float().cpu())
            return
        self.parts["embeddings"].append(out.embedding.float().cpu())
        self.parts["indices"].append(out.indices.cpu())
        self.parts["scores"].append(out.scores.float().cpu())
        self.parts["budgets"].append(out.cu_seqlens.diff().cpu())

    @property
    def selected(self) -> bool:
        return bool(self.parts["indices"])

    def tensors(self, with_selection: bool, budgets: bool) -> Dict[str, torch.Tensor]:
        """``embeddings`` (``[0, width]`` when nothing was embedded), with
        ``indices`` and ``scores`` when asked for and there are any, and
        ``budgets`` too when the ids are packed (per-clip budgets)."""
        names = ["embeddings"]
        if with_selection:
            names += ["indices", "scores"] + (["budgets"] if budgets else [])
        return {name: (torch.cat(self.parts[name]) if self.parts[name] else torch.zeros((0, self.width))).contiguous()
                for name in names}


def embed_files(model, paths: Sequence[str], *, selection: Selection = Selection(), batch_size: int = 4,
                workers: int = 0, decoder: str = "auto", device: torch.device = torch.device("cpu"),
                skipped: Optional[Callable[[str, str], None]] = None,
                progress: Optional[Callable[[int], None]] = None) -> Tuple[Embedded, List[str], List[Tuple[str, str]]]:
    """Embed ``paths`` in order: ``(embedded, paths read, (path, message)
    of each file that could not be)``; ``skipped(path, message)`` hears of
    each bad file as it happens and ``progress(n)`` of every file done.
    Decoding runs in ``workers`` processes while the model runs."""
    cfg = model.config
    selection.check_model(cfg)
    embedded, done, failures = Embedded(cfg.width), [], []
    for batch in clip_loader(paths, cfg, selection, batch_size, workers, decoder, device):
        for path, message in batch["failures"]:
            if skipped is not None:
                skipped(path, message)
        failures.extend(batch["failures"])
        if batch["clips"] is not None:
            embedded.add(embed_batch(model, batch["clips"].to(device, non_blocking=True), selection,
                                     batch["motions"]))
            done.extend(batch["paths"])
        if progress is not None:
            progress(len(batch["paths"]) + len(batch["failures"]))
    return embedded, done, failures


def write_embeddings(path: str, embedded: Embedded, config, videos: Sequence[str],
                     failures: Sequence[Tuple[str, str]], *, budgets: bool) -> None:
    """``.npy``: the embeddings alone; ``.safetensors``: with the selection
    (and ``budgets`` for packed ids) and the videos and config in the
    metadata."""
    tensors = embedded.tensors(with_selection=embedded.selected, budgets=budgets)
    if path.lower().endswith(".npy"):
        np.save(path, tensors["embeddings"].numpy())
        return
    metadata = {"videos": json.dumps(list(videos)), "failed": json.dumps([p for p, _ in failures]),
                "config": config.to_json()}
    save_file(tensors, path, metadata=metadata)


class _Clips(torch.utils.data.Dataset):
    """``(path, clip, error, motion)`` per video; ``motion`` (the decoder's
    motion scores on ``motion_grid``) only when a grid is given."""

    def __init__(self, paths: Sequence[str], frames: int, size: int, motion_grid=None, decoder: str = "auto"):
        self.paths, self.frames, self.size, self.motion_grid = list(paths), frames, size, motion_grid
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            clip = read_clip(path, self.frames, self.size, decoder=self.decoder, threads=loader_threads())
            motion = None if self.motion_grid is None else motion_scores(path, self.motion_grid)
            return path, clip, None, motion
        except VideoError as error:
            return path, None, str(error), None


def clip_loader(paths: Sequence[str], cfg, selection: Selection, batch_size: int, workers: int, decoder: str,
                device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of ``paths`` in order, decoded in ``workers`` processes (the
    motion scores too where the selection needs them), as
    :func:`_collate_clips` gives them; pinned on a GPU."""
    motion_grid = cfg.grid if selection.motion else None
    return torch.utils.data.DataLoader(_Clips(paths, cfg.frames, cfg.image_size, motion_grid, decoder),
                                       batch_size=batch_size, num_workers=workers, collate_fn=_collate_clips,
                                       pin_memory=device.type == "cuda")


def _collate_clips(samples) -> Dict:
    """The readable clips stacked in the worker (so that the loader pins the
    batch itself on a GPU), their paths and motion scores, and the failures."""
    good = [(path, clip, motion) for path, clip, _, motion in samples if clip is not None]
    return {"paths": [path for path, _, _ in good], "clips": torch.stack([c for _, c, _ in good]) if good else None,
            "motions": [motion for _, _, motion in good],
            "failures": [(path, error) for path, clip, error, _ in samples if clip is None]}


def rank_shards(count: int, shard_size: int, rank: int = 0, world: int = 1) -> List[int]:
    """The shards of ``count`` videos that rank ``rank`` of ``world`` embeds."""
    return list(range(rank, -(-count // shard_size), world))


def rank_share(paths: Sequence[str], shard_size: int, rank: int = 0, world: int = 1) -> int:
    """How many videos rank ``rank`` of ``world`` embeds (its progress total)."""
    return sum(len(paths[k * shard_size:(k + 1) * shard_size]) for k in rank_shards(len(paths), shard_size, rank, world))


@torch.no_grad()
def embed_shards(model, paths: Sequence[str], folder: str, *, shard_size: int = 1000, batch_size: int = 8,
                 workers: int = 2, keep_ratio: Optional[float] = None, budget_mass: Optional[float] = None,
                 budget_temperature: float = 1.0, with_selection: bool = False, selector: str = "learned",
                 selection: Optional[Selection] = None,
                 device: torch.device = torch.device("cpu"), rank: int = 0, world: int = 1, decoder: str = "auto",
                 progress: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print) -> Dict:
    """Embed ``paths`` into shards under ``folder`` (see the module
    docstring); returns counts and the throughput of this process. With
    ``budget_mass`` each clip keeps the fewest tokens holding that mass of
    its scores' softmax (at ``budget_temperature``); stored ids are then
    packed, with ``budgets``.
    ``selector="motion"`` selects by the decoder's motion vectors
    (:func:`lookwhen.data.motion.motion_forward`); videos without them fail.
    ``selection`` gives all of that as one value instead. Decoding runs in
    ``workers`` processes while the model runs (``decoder``: see
    :mod:`lookwhen.data.decoders`); on a GPU the clips come in pinned memory
    and are copied without blocking."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    if not paths:
        raise ValueError("no videos to embed")
    if selector not in ("learned", "motion"):
        raise ValueError(f"selector: expected 'learned' or 'motion', got {selector!r}")
    selection = selection_of(selection, keep_ratio=keep_ratio, budget_mass=budget_mass,
                             budget_temperature=budget_temperature, motion=selector == "motion")
    cfg = model.config
    if not isinstance(model, LookWhen) and with_selection:
        raise ValueError(f"{cfg.name} is a dense model: it keeps every token and selects nothing")
    selection.check_model(cfg)
    os.makedirs(folder, exist_ok=True)
    # Through JSON, so that it compares equal to the file a first run wrote.
    info = json.loads(json.dumps({"videos": hashlib.sha1("\n".join(paths).encode()).hexdigest(),
                                  "count": len(paths), "shard_size": shard_size, "config": cfg.to_dict(),
                                  "weights": weights_fingerprint(model),
                                  "keep_ratio": selection.keep_ratio, "with_selection": with_selection}
                                 # Only when set: folders of earlier runs keep matching.
                                 | ({"selector": "motion"} if selection.motion else {})
                                 | ({"budget_mass": selection.budget_mass} if selection.budget_mass is not None
                                    else {})
                                 | ({"budget_temperature": selection.budget_temperature}
                                    if selection.budget_temperature != 1.0 else {})))
    if rank == 0 and check_pinned(os.path.join(folder, RUN_FILE), info, what="embeddings of another run") is None:
        write_json(os.path.join(folder, RUN_FILE), info, indent=2)
    shards = rank_shards(len(paths), shard_size, rank, world)
    todo = [k for k in shards if not os.path.isfile(os.path.join(folder, shard_name(k)))]
    done_before = len(shards) - len(todo)
    if progress is not None and done_before:
        progress(sum(len(paths[k * shard_size:(k + 1) * shard_size]) for k in shards if k not in todo))
    model = model.eval()
    embedded_count = failed = 0
    start = time.perf_counter()
    for k in todo:
        members = paths[k * shard_size:(k + 1) * shard_size]
        embedded = Embedded(cfg.width)
        good, bad = [], []
        for batch in clip_loader(members, cfg, selection, batch_size, workers, decoder, device):
            good += batch["paths"]
            bad += batch["failures"]
            if batch["clips"] is not None:
                embedded.add(embed_batch(model, batch["clips"].to(device, non_blocking=True), selection,
                                         batch["motions"]))
            if progress is not None:
                progress(len(batch["paths"]) + len(batch["failures"]))
        target = os.path.join(folder, shard_name(k))
        if bad:
            with open(target.replace(".safetensors", ".failed.tsv"), "w") as handle:
                handle.writelines(f"{path}\t{' '.join(error.split())}\n" for path, error in bad)
            for path, error in bad:
                log(f"skipped {' '.join(error.split())}")
        metadata = {"videos": json.dumps(good), "first": str(k * shard_size), "stop": str(k * shard_size + len(members)),
                    "failed": json.dumps([p for p, _ in bad]), "config": cfg.to_json()}
        write_tensors(target, embedded.tensors(with_selection, budgets=selection.budget_mass is not None), metadata)
        embedded_count += len(good)
        failed += len(bad)
    seconds = time.perf_counter() - start
    # A re-run reports the failures of the shards it found done as well: the
    # folder, not this process, is the run.
    for k in set(shards) - set(todo):
        failures = os.path.join(folder, shard_name(k)).replace(".safetensors", ".failed.tsv")
        if os.path.isfile(failures):
            with open(failures) as handle:
                failed += sum(1 for line in handle if line.strip())
    return {"shards": len(shards), "shards_skipped": done_before, "embedded": embedded_count, "failed": failed,
            "seconds": seconds, "videos_per_s": embedded_count / seconds if seconds > 0 else 0.0}


def read_shards(folder: str) -> Dict:
    """All shards of a folder, in order: ``embeddings`` (concatenated),
    ``videos`` (paths) and, when stored, ``indices`` and ``scores``."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("shard-") and n.endswith(".safetensors"))
    parts: Dict[str, List[torch.Tensor]] = {}
    videos: List[str] = []
    for name in names:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            videos += json.loads(handle.metadata()["videos"])
            for key in handle.keys():
                parts.setdefault(key, []).append(handle.get_tensor(key))
    return {"videos": videos, **{k: torch.cat(v) for k, v in parts.items()}}
