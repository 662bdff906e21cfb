"""Writing files so that a reader, or a run restarted after a crash, never
finds half of one: every file is written under a temporary name beside its
final one and renamed into place (``os.replace`` is atomic on one file
system). Embedding shards, the target cache and the trainer's run folder
all write through here.

A folder that a restarted run fills in is pinned to what it was made for:
a JSON file holding a fingerprint (the inputs, the model, the teachers),
compared on every restart so that a folder made for something else is
refused instead of silently mixed (:func:`check_pinned`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Dict, Iterator, List, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; renamed onto ``path``
    when the block ends, removed when it raises."""
    temporary = os.fspath(path) + ".tmp"
    try:
        yield temporary
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[str]:
    """A fresh temporary folder beside ``path`` to fill (hidden, so that
    listings of the parent pass over it); it replaces ``path`` when the
    block ends and is removed when the block raises."""
    parent, name = os.path.split(os.fspath(path))
    temporary = os.path.join(parent, f".{name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: PathLike, value, **options) -> None:
    """``value`` as JSON (``options`` go to ``json.dump``)."""
    write_text(path, json.dumps(value, **options))


def write_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file (the tensors must be contiguous CPU tensors)."""
    with atomic_path(path) as temporary:
        save_file(dict(tensors), temporary, metadata=metadata)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def differing_keys(before: Mapping, after: Mapping) -> List[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def check_pinned(path: PathLike, fingerprint: Dict, *, what: str, key: Optional[str] = None) -> Optional[Dict]:
    """The JSON file at ``path`` (``None`` when there is none yet), after
    checking that it was made for ``fingerprint``: the whole file, or its
    entry ``key``. A file made for something else raises ``ValueError``
    saying the folder holds ``what``. Compare fingerprints that went
    through JSON (``json.loads(json.dumps(...))``): tuples become lists in
    the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        stored = json.load(handle)
    pinned = stored if key is None else stored.get(key)
    if pinned != fingerprint:
        differ = differing_keys(pinned if isinstance(pinned, dict) else {}, fingerprint)
        raise ValueError(f"{os.path.dirname(path)}: holds {what} (differs in {', '.join(differ)}); use a new folder")
    return stored
