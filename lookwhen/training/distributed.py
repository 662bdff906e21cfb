"""Running under ``torchrun``: every process runs the same command and
reads its place from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); nothing here launches processes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's own GPU under
    torchrun (``LOCAL_RANK``); other devices are returned as they are."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> "Distributed":
        """From torchrun's environment; a process group is started only when
        there is more than one process."""
        _, world = rank_and_world()
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
