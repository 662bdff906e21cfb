"""Embedding a collection of any size, in shards.

The manifest's videos are cut into shards of ``shard_size`` consecutive
entries; shard ``k`` goes to ``shard-0000k.safetensors`` in the output folder:
``embeddings [n, D]`` for the ``n`` readable videos of the shard (and, on
request, the selected ``indices`` and the selector's ``scores``), with the
videos' paths, the shard's range and the model config in the metadata.
Unreadable videos are listed in ``shard-0000k.failed.tsv`` beside it (path,
tab, reason) and never stop the run.

Each shard is written to a temporary file and renamed into place, and a
restart skips the shards already there, so a killed run loses at most the
shards in progress. ``run.json`` pins the manifest, shard size and model: a
restart with other inputs is refused. Under ``torchrun`` rank ``r`` of ``w``
takes shards ``r, r + w, ...``. Decoding runs in DataLoader workers, so it
overlaps the model's compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lookwhen.data.datasets import collate_list
from lookwhen.data.motion import motion_forward, motion_scores
from lookwhen.data.video import VideoError, read_clip

RUN_FILE = "run.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class _Clips(torch.utils.data.Dataset):
    """``(path, clip, error, motion)`` per video; ``motion`` (the decoder's
    motion scores on ``motion_grid``) only when a grid is given."""

    def __init__(self, paths: Sequence[str], frames: int, size: int, motion_grid=None):
        self.paths, self.frames, self.size, self.motion_grid = list(paths), frames, size, motion_grid

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            clip = read_clip(path, self.frames, self.size)
            motion = None if self.motion_grid is None else motion_scores(path, self.motion_grid)
            return path, clip, None, motion
        except VideoError as error:
            return path, None, str(error), None


def _check_run(folder: str, info: Dict) -> None:
    path = os.path.join(folder, RUN_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            before = json.load(handle)
        if before != info:
            differ = sorted(k for k in set(before) | set(info) if before.get(k) != info.get(k))
            raise ValueError(f"{folder}: holds embeddings of another run (differs in {', '.join(differ)}); "
                             "use a new folder")
        return
    with open(path + ".tmp", "w") as handle:
        json.dump(info, handle, indent=2)
    os.replace(path + ".tmp", path)


@torch.no_grad()
def embed_shards(model, paths: Sequence[str], folder: str, *, shard_size: int = 1000, batch_size: int = 8,
                 workers: int = 2, keep_ratio: Optional[float] = None, budget_mass: Optional[float] = None,
                 budget_temperature: float = 1.0, with_selection: bool = False, selector: str = "learned",
                 device: torch.device = torch.device("cpu"), rank: int = 0, world: int = 1,
                 progress: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print) -> Dict:
    """Embed ``paths`` into shards under ``folder`` (see the module
    docstring); returns counts and the throughput of this process. With
    ``budget_mass`` each clip keeps the fewest tokens holding that mass of
    its scores' softmax (at ``budget_temperature``); stored ids are then
    packed, with ``budgets``.
    ``selector="motion"`` selects by the decoder's motion vectors
    (:func:`lookwhen.data.motion.motion_forward`); videos without them fail."""
    from safetensors.torch import save_file

    from lookwhen.models.lookwhen import LookWhen

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1, got {shard_size} and {batch_size}")
    if not paths:
        raise ValueError("no videos to embed")
    cfg = model.config
    lookwhen = isinstance(model, LookWhen)
    if not lookwhen and (keep_ratio is not None or budget_mass is not None or with_selection
                         or selector != "learned"):
        raise ValueError(f"{cfg.name} is a dense model: it keeps every token and selects nothing")
    if selector not in ("learned", "motion"):
        raise ValueError(f"selector: expected 'learned' or 'motion', got {selector!r}")
    if budget_mass is None and budget_temperature != 1.0:
        raise ValueError("budget_temperature: only with budget_mass")
    if selector == "motion" and budget_mass is not None:
        raise ValueError("budget_mass: budgets come from the learned selector's scores, not selector='motion'")
    os.makedirs(folder, exist_ok=True)
    # Through JSON, so that it compares equal to the file a first run wrote.
    info = json.loads(json.dumps({"videos": hashlib.sha1("\n".join(paths).encode()).hexdigest(),
                                  "count": len(paths), "shard_size": shard_size, "config": cfg.to_dict(),
                                  "keep_ratio": keep_ratio, "with_selection": with_selection}
                                 # Only when set: folders of earlier runs keep matching.
                                 | ({"selector": selector} if selector != "learned" else {})
                                 | ({"budget_mass": budget_mass} if budget_mass is not None else {})
                                 | ({"budget_temperature": budget_temperature} if budget_temperature != 1.0 else {})))
    if rank == 0:
        _check_run(folder, info)
    shards = [k for k in range(rank, -(-len(paths) // shard_size), world)]
    todo = [k for k in shards if not os.path.isfile(os.path.join(folder, shard_name(k)))]
    done_before = len(shards) - len(todo)
    if progress is not None and done_before:
        progress(sum(len(paths[k * shard_size:(k + 1) * shard_size]) for k in shards if k not in todo))
    model = model.eval()
    selection = {name: value for name, value in (("keep_ratio", keep_ratio), ("budget_mass", budget_mass))
                 if lookwhen and value is not None}
    if budget_mass is not None:
        selection["budget_temperature"] = budget_temperature
    embedded = failed = 0
    start = time.perf_counter()
    for k in todo:
        members = paths[k * shard_size:(k + 1) * shard_size]
        motion_grid = cfg.grid if selector == "motion" else None
        loader = torch.utils.data.DataLoader(_Clips(members, cfg.frames, cfg.image_size, motion_grid),
                                             batch_size=batch_size, num_workers=workers, collate_fn=collate_list)
        tensors: Dict[str, List[torch.Tensor]] = {"embeddings": [], "indices": [], "scores": [], "budgets": []}
        good, bad = [], []
        for batch in loader:
            clips = [clip for _, clip, _, _ in batch if clip is not None]
            good += [path for path, clip, _, _ in batch if clip is not None]
            bad += [(path, error) for path, clip, error, _ in batch if clip is None]
            if clips:
                stacked = torch.stack(clips).to(device)
                if motion_grid is None:
                    out = model(stacked, **selection)
                else:
                    motions = [motion for _, clip, _, motion in batch if clip is not None]
                    out = motion_forward(model, stacked, motions, keep_ratio)
                if lookwhen:
                    tensors["embeddings"].append(out.embedding.float().cpu())
                    tensors["indices"].append(out.indices.cpu())
                    tensors["scores"].append(out.scores.float().cpu())
                    tensors["budgets"].append(out.cu_seqlens.diff().cpu())
                else:
                    tensors["embeddings"].append(out.float().cpu())
            if progress is not None:
                progress(len(batch))
        names = ("embeddings", "indices", "scores") if with_selection else ("embeddings",)
        if with_selection and budget_mass is not None:
            names += ("budgets",)
        width = cfg.width
        table = {name: (torch.cat(tensors[name]) if tensors[name] else torch.zeros((0, width))).contiguous()
                 for name in names}
        target = os.path.join(folder, shard_name(k))
        sidecar = target.replace(".safetensors", ".failed.tsv")
        if bad:
            with open(sidecar, "w") as handle:
                handle.writelines(f"{path}\t{' '.join(error.split())}\n" for path, error in bad)
            for path, error in bad:
                log(f"skipped {' '.join(error.split())}")
        metadata = {"videos": json.dumps(good), "first": str(k * shard_size), "stop": str(k * shard_size + len(members)),
                    "failed": json.dumps([p for p, _ in bad]), "config": cfg.to_json()}
        save_file(table, target + ".tmp", metadata=metadata)
        os.replace(target + ".tmp", target)
        embedded += len(good)
        failed += len(bad)
    seconds = time.perf_counter() - start
    return {"shards": len(shards), "shards_skipped": done_before, "embedded": embedded, "failed": failed,
            "seconds": seconds, "videos_per_s": embedded / seconds if seconds > 0 else 0.0}


def read_shards(folder: str) -> Dict:
    """All shards of a folder, in order: ``embeddings`` (concatenated),
    ``videos`` (paths) and, when stored, ``indices`` and ``scores``."""
    from safetensors import safe_open

    names = sorted(n for n in os.listdir(folder) if n.startswith("shard-") and n.endswith(".safetensors"))
    parts: Dict[str, List[torch.Tensor]] = {}
    videos: List[str] = []
    for name in names:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            videos += json.loads(handle.metadata()["videos"])
            for key in handle.keys():
                parts.setdefault(key, []).append(handle.get_tensor(key))
    return {"videos": videos, **{k: torch.cat(v) for k, v in parts.items()}}
