"""The training engine: one loop for every training task.

A task (:class:`Task`) owns the trainable modules and turns a batch into a
loss; the engine does the rest: AdamW (no weight decay on biases, norms,
tokens and position tables), linear warm-up then cosine decay, gradient
clipping and accumulation, bf16 autocast on a GPU, ``torch.compile`` and
activation checkpointing (:mod:`lookwhen.training.recompute`) as options,
data-parallel training under ``torchrun`` (DistributedDataParallel, or
FSDP2 with ``fsdp``: NCCL on GPUs, gloo on CPU; nothing here launches
processes), checkpoints,
exact resume, a progress bar (plain lines where stderr is not a terminal:
a Slurm log), a JSON-lines log, TensorBoard scalars, validation every N
steps and loss plots.

Run folder (``--out``)::

    run.json                    the run's settings, model config and the
                                SHA-256 of its initial weights; each resume
                                appends the settings it changed
    log.jsonl                   one JSON object per optimiser step (losses,
                                lr, clips/s, data-wait share, MFU, the
                                validation metrics of the steps that ran it)
    tensorboard/                the same as TensorBoard scalars (optional)
    checkpoints/step-000100/    model.safetensors (the inference model) and
                                train-state.pt (the rest of the task's
                                state: heads, optimiser, schedule, step, data
                                position, RNG states; the model's weights
                                are read from the safetensors file beside it,
                                so a checkpoint holds them once)
    checkpoints/latest          the name of the newest complete checkpoint
    model.safetensors           the final inference model
    model-ema.safetensors       with ``ema``: the average of its weights (also
                                in each checkpoint)

Checkpoints are written to a temporary folder and renamed into place, so a
crash never leaves a half-written one behind; Ctrl-C saves one before
exiting, and SIGTERM (how Slurm and Kubernetes stop a job) one at the end of
the step under way. ``--resume`` reads only ``step-N`` folders inside the
run's ``checkpoints`` (whatever ``latest`` says), unpickles with
``weights_only=True`` (a crafted file cannot run code), and falls back to the
newest intact checkpoint when the latest is unreadable. It refuses another
model config or batch size; another accumulation or number of ranks keeps
the data position (counted in clips). Resuming restores everything the next step depends on (the data
order is a function of the seed and epoch, the clips of ``(seed, index,
view)``, the budgets of a saved generator), so on CPU a run stopped and
resumed ends with the same parameters as an uninterrupted one.

Watching a run. Each logged step records its time, its throughput
(clips/s over all ranks), the share of the step spent waiting for the data
loader (``data_wait``: near 1 means decoding is the bottleneck; add
``workers``) and, given the accelerator's peak (``peak_tflops``, per rank),
the model FLOPs utilisation: the FLOPs of a step, counted once with
``torch.utils.flop_counter`` on this process's first step (forward and
backward of everything the step runs, teachers included), over the step's
time and the peak.

Batches: ``batch_size`` clips per optimiser step in all, split evenly over
ranks and accumulation steps. Every rank draws the random budgets of the
whole batch from the same generator and takes its own share, so any number
of ranks computes the same step as one process.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lookwhen.data.datasets import SkipReport, collate
from lookwhen.io.atomic import atomic_folder, write_json, write_text
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.flop_counter import FlopCounterMode

from lookwhen.io.checkpoint import save_checkpoint, weights_fingerprint
from lookwhen.models.layers import Block
from lookwhen.training.distributed import Distributed
from lookwhen.training.recompute import checkpoint_blocks

STATE_FILE = "train-state.pt"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model-ema.safetensors"


@dataclass
class TrainSettings:
    out: str
    steps: int
    batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: Optional[int] = None  # default: 5 % of the steps
    weight_decay: float = 0.05
    clip_grad: Optional[float] = 1.0
    accumulate: int = 1
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    workers: int = 0
    compile: bool = False
    device: str = "cpu"
    resume: bool = False
    plot: Optional[str] = None
    progress: Optional[bool] = None  # None: a bar on a terminal
    log_every: int = 10  # steps between plain progress lines (no terminal)
    tensorboard: bool = False
    peak_tflops: Optional[float] = None  # per rank; MFU is left out without it
    val_every: Optional[int] = None  # steps between validations (and at the end)
    ema: Optional[float] = None  # decay of an average of the weights, per step
    checkpoint_activations: bool = False  # recompute the blocks in the backward pass
    fsdp: bool = False  # shard parameters, gradients and optimiser state over the ranks
    extra: Dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.val_every is not None and self.val_every < 1:
            raise ValueError(f"val_every must be at least 1, got {self.val_every}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must lie in (0, 1), got {self.ema}")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < float("inf"):
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be positive (or None for no clipping), got {self.clip_grad}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.steps))
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps], got {self.warmup_steps}")


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak learning rate before optimiser step ``step``:
    linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Task(abc.ABC):
    """What the engine trains. ``module`` holds every trainable parameter
    (it is what DistributedDataParallel wraps); its ``forward(batch, draws)``
    returns ``(weighted loss, {name: unweighted loss part})``. ``draw(generator,
    batch)`` returns the random inputs of a whole (global) micro-batch, of
    which each rank's forward sees its own share."""

    module: nn.Module

    def draw(self, generator: torch.Generator, batch: int):
        return None

    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The inference model to save (no training-only parts)."""

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of ``module``'s parameter ``name``."""
        return 1.0

    def run_info(self) -> Dict:
        return {}

    def label_space(self) -> Optional[Dict]:
        """What checkpoints record of the labels (a classifier's class names
        and whether it is multi-label; :func:`lookwhen.io.checkpoint.save_checkpoint`)."""
        return None

    def unused_parameters(self, forwards: int) -> bool:
        """Whether a step of a run of ``forwards`` training forwards (steps x
        accumulation) may leave some trainable parameter without a
        gradient. DistributedDataParallel then searches the graph for them
        every step (``find_unused_parameters``), and warns when told to
        search where nothing is ever unused; without the search an unused
        parameter stops the run with an error. The safe default is True."""
        return True

    def validate(self, data, device: torch.device, workers: int) -> Dict[str, float]:
        """Metrics of the model on held-out ``data`` (the task's own kind of
        validation set), computed without gradients."""
        raise ValueError(f"{type(self).__name__} has no validation")


def _no_decay(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim < 2 or name.endswith(".bias") or "token" in name or "pos_embed" in name


def make_optimizer(module: nn.Module, settings: TrainSettings,
                   lr_scale: Optional[Callable[[str], float]] = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: no weight decay on biases,
    norms, tokens and position tables; ``lr_scale(name)`` multiplies a
    parameter's learning rate (layer-wise decay), schedules included."""
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            key = (not _no_decay(name, parameter), 1.0 if lr_scale is None else float(lr_scale(name)))
            groups.setdefault(key, []).append(parameter)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": settings.weight_decay if decay else 0.0, "lr": settings.lr * scale}
         for (decay, scale), params in sorted(groups.items(), key=lambda item: (-item[0][1], item[0][0]))],
        lr=settings.lr, betas=(0.9, 0.999))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Shard(torch.utils.data.Sampler):
    """One rank's indices of one epoch, from ``start`` on: the epoch's
    permutation (seeded by seed and epoch), dealt to the ranks round-robin
    (DistributedSampler's rule), the incomplete tail dropped."""

    def __init__(self, length: int, per_epoch: int, seed: int, epoch: int, rank: int, world: int, start: int):
        self.indices = self._indices(length, per_epoch, seed, epoch, rank, world)[start:]

    @staticmethod
    def _indices(length, per_epoch, seed, epoch, rank, world) -> List[int]:
        sampler = torch.utils.data.DistributedSampler(
            range(length), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)[:per_epoch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of this epoch already consumed


class Terminated(Exception):
    """SIGTERM arrived: the step under way finished and a checkpoint was saved."""


# The only names ``checkpoints/latest`` may give (no paths).
CHECKPOINT_NAME = re.compile(r"step-\d{6,}")
# What a damaged or foreign train-state file raises when read: the resume
# moves on to an older checkpoint.
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
               SafetensorError)


def load_train_state(path: str) -> Dict:
    """A train-state file, unpickled with ``weights_only=True``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"optimizer", "scheduler", "position", "generator", "torch_rng"} - set(state)
    if not {"module", "module_rest"} & set(state):
        missing.add("module_rest")
    if missing:
        raise KeyError(f"not a train state: no {', '.join(sorted(missing))}")
    return state


def load_checkpoint_state(folder: str) -> Dict:
    """A checkpoint's train state with the task module's whole state dict
    under ``"module"``: the inference model's weights from its safetensors
    file, under the prefix the train state records, and the rest from the
    train state. (Checkpoints written before the weights were stored once
    hold the whole module in the train state; they read as they are.)"""
    state = load_train_state(os.path.join(folder, STATE_FILE))
    if "module" not in state:
        prefix = state["model_prefix"]
        weights = load_file(os.path.join(folder, state["model_file"]))
        state["module"] = {**{prefix + key: value for key, value in weights.items()}, **state.pop("module_rest")}
    if state.get("ema_file"):
        state["ema"] = load_file(os.path.join(folder, state["ema_file"]))
    return state


class WeightAverage:
    """An exponential moving average of a model's weights, updated after
    every optimiser step (``average += (1 - decay) * (weights - average)``;
    integer buffers are copied): ``--ema``, validated and saved beside the
    model. Under FSDP the average is sharded as the weights are (each rank
    averages its own shard)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        for key, value in self.model.state_dict().items():
            average = self.state[key]
            if average.is_floating_point():
                average.lerp_(value, 1 - self.decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the average inside the block (copied in place,
        so the optimiser keeps its parameters), its own weights after it."""
        own = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        self.model.load_state_dict(self.state)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(own)

    def load(self, whole: Dict[str, torch.Tensor], device: torch.device) -> None:
        """Take the average from whole tensors (a checkpoint's), sharded as
        the weights are where they are."""
        self.state = {key: distribute_tensor(whole[key].to(device), mine.device_mesh, mine.placements)
                      if isinstance(mine, DTensor) else whole[key].to(device) for key, mine in self.state.items()}


def _summary_writer():
    """TensorBoard's writer class (the optional ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'lookwhen-kernels[tensorboard]'"
                         ) from None
    return SummaryWriter


class Trainer:
    """``validation``: held-out data for :meth:`Task.validate`, run every
    ``settings.val_every`` steps."""

    def __init__(self, task: Task, dataset, settings: TrainSettings, *, log: Callable[[str], None] = None,
                 validation=None):
        if settings.val_every is not None and validation is None:
            raise ValueError("val_every needs validation data")
        self.task = task
        self.validation = validation
        self.dataset = dataset
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dist = Distributed.start(self.device)
        self.log = log or (lambda line: print(line, file=sys.stderr))
        world, accumulate = self.dist.world, settings.accumulate
        if settings.batch_size % (world * accumulate):
            raise ValueError(f"batch_size {settings.batch_size} must be divisible by ranks x accumulate = "
                             f"{world} x {accumulate}")
        self.micro = settings.batch_size // (world * accumulate)
        self.steps_per_epoch = len(dataset) // settings.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the dataset has {len(dataset)} videos, fewer than one batch of {settings.batch_size}")
        self.module = task.module.to(self.device)
        if settings.checkpoint_activations and not checkpoint_blocks(self.module):
            raise ValueError("checkpoint_activations: the model has no transformer blocks to recompute")
        # The weights the run starts from, while they are whole (before FSDP shards them).
        self._initial_weights = None if settings.resume else weights_fingerprint(task.model())
        self.sharded = settings.fsdp and world > 1
        if self.sharded:
            # A unit per block (its weights gathered only while it runs) and
            # the rest at the root, before the optimiser sees the parameters.
            for block in [m for m in self.module.modules() if isinstance(m, Block)]:
                fully_shard(block)
            fully_shard(self.module)
        self.optimizer = make_optimizer(self.module, settings, task.lr_scale)
        warmup, total, floor = settings.warmup_steps, settings.steps, settings.min_lr / settings.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, floor))
        self.generator = torch.Generator().manual_seed(settings.seed)
        # What draws from torch's own generators (drop-path, the perturbed
        # top-K's noise) starts from the seed, not from whatever the process
        # did before; each rank its own stream, as timm's trainers seed.
        torch.manual_seed(settings.seed + self.dist.rank)
        self.position = _Position()
        self._snapshot_rng()
        self.skips = SkipReport(self.log)
        self.folder = settings.out
        self.checkpoints = os.path.join(self.folder, "checkpoints")
        self._writer_class = _summary_writer() if settings.tensorboard else None
        # FLOPs of one optimiser step on this rank, once counted.
        self._step_flops: Optional[int] = None
        self.ema = None if settings.ema is None else WeightAverage(task.model(), settings.ema)

    # Checkpoints -----------------------------------------------------------
    def _snapshot_rng(self) -> None:
        """RNG states as of the last completed step: what a checkpoint taken
        later (on Ctrl-C, in the middle of a step) must restore."""
        self._rng_at_step = {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def _model_prefix(self) -> str:
        """Where the inference model sits in the task's module (``"model."``)."""
        model = self.task.model()
        for name, sub in self.module.named_modules():
            if sub is model:
                return name + "." if name else ""
        raise ValueError(f"{type(self.task).__name__}: its model is not part of its module")

    # Whole state dicts: under FSDP gathered from every rank (a collective:
    # all ranks call these) onto the main rank's CPU, in PyTorch's
    # distributed-checkpoint layout (the optimiser's state keyed by parameter
    # name), so an --fsdp run resumes with --fsdp on any number of ranks.
    _WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _module_state(self) -> Dict[str, torch.Tensor]:
        return get_model_state_dict(self.module, options=self._WHOLE) if self.sharded else self.module.state_dict()

    def _optimizer_state(self) -> Dict:
        if self.sharded:
            return get_optimizer_state_dict(self.module, self.optimizer, options=self._WHOLE)
        return self.optimizer.state_dict()

    def _model_state(self, module_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The inference model's share of the module's state dict."""
        prefix = self._model_prefix()
        return {key[len(prefix):]: value for key, value in module_state.items() if key.startswith(prefix)}

    def _state(self, module_state: Dict[str, torch.Tensor], optimizer_state: Dict) -> Dict:
        prefix = self._model_prefix()
        return {
            # The model's weights are in MODEL_FILE beside this state.
            "module_rest": {k: v for k, v in module_state.items() if not k.startswith(prefix)},
            "model_file": MODEL_FILE,
            "model_prefix": prefix,
            "ema_file": None if self.ema is None else EMA_FILE,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "position": dataclasses.asdict(self.position),
            # The clips per global micro-batch and per step: what the data
            # position's micro-batch count means.
            "micro_batch": self.micro * self.dist.world,
            "batch_size": self.settings.batch_size,
            "generator": self._rng_at_step["generator"],
            "torch_rng": self._rng_at_step["torch"],
            "cuda_rng": self._rng_at_step["cuda"],
            "skipped": dict(self.skips.seen),
        }

    def save(self) -> str:
        """Write a checkpoint of the current step (main rank), keep the newest
        ``keep_checkpoints``. Returns its folder."""
        name = f"step-{self.position.step:06d}"
        final = os.path.join(self.checkpoints, name)
        module_state, optimizer_state, ema_state = self._module_state(), self._optimizer_state(), self._ema_state()
        if self.dist.main:
            with atomic_folder(final) as temporary:
                self._save_models(temporary, module_state, ema_state)
                torch.save(self._state(module_state, optimizer_state), os.path.join(temporary, STATE_FILE))
            write_text(os.path.join(self.checkpoints, "latest"), name)
            kept = sorted(d for d in os.listdir(self.checkpoints) if d.startswith("step-"))
            for old in kept[: -self.settings.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.checkpoints, old), ignore_errors=True)
        self.dist.barrier()
        return final

    def _ema_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The weight average as whole tensors (under FSDP gathered from
        every rank: all ranks call this), ``None`` without ``ema``."""
        if self.ema is None:
            return None
        if not self.sharded:
            return self.ema.state
        with self.ema.swapped_in():
            return self._model_state(self._module_state())

    def _save_models(self, folder: str, module_state: Dict[str, torch.Tensor],
                     ema_state: Optional[Dict[str, torch.Tensor]]) -> None:
        """The inference model (its weights in ``module_state``), and its
        weight average (``ema_state``) with ``ema``."""
        save_checkpoint(self.task.model(), os.path.join(folder, MODEL_FILE), labels=self.task.label_space(),
                        state=self._model_state(module_state))
        if ema_state is not None:
            save_checkpoint(self.task.model(), os.path.join(folder, EMA_FILE), labels=self.task.label_space(),
                            state=ema_state)

    def checkpoint_folders(self) -> List[str]:
        """The run's checkpoints, newest first: the one ``latest`` names,
        then every ``step-N`` folder by step. Only names of that form are
        read, so the pointer cannot lead outside the run folder."""
        if not os.path.isdir(self.checkpoints):
            return []
        names = sorted((d for d in os.listdir(self.checkpoints) if CHECKPOINT_NAME.fullmatch(d)
                        and os.path.isdir(os.path.join(self.checkpoints, d))), reverse=True)
        pointer = os.path.join(self.checkpoints, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as handle:
                latest = handle.read().strip()
            if latest in names:
                names.remove(latest)
                names.insert(0, latest)
        return [os.path.join(self.checkpoints, name) for name in names]

    def latest_checkpoint(self) -> Optional[str]:
        folders = self.checkpoint_folders()
        return folders[0] if folders else None

    def restore(self, folder: str) -> None:
        self._restore(load_checkpoint_state(folder))

    def _restore(self, state: Dict) -> None:
        position = _Position(**state["position"])
        batch_size = state.get("batch_size", self.settings.batch_size)
        if batch_size != self.settings.batch_size:
            raise ValueError(f"--resume: the run's batch size is {batch_size}, not {self.settings.batch_size} "
                             "(a step would mean other clips); resume with --batch-size "
                             f"{batch_size} or start a new --out")
        # Another accumulation or number of ranks: the same clips, counted in
        # micro-batches of another size.
        clips = position.micro * state.get("micro_batch", self.micro * self.dist.world)
        micro_batch = self.micro * self.dist.world
        if clips % micro_batch:
            raise ValueError(f"--resume: the checkpoint is {clips} clips into its epoch, not a whole number of "
                             f"micro-batches of {micro_batch}; resume with the run's --accumulate")
        position.micro = clips // micro_batch
        try:
            if self.sharded:
                set_model_state_dict(self.module, state["module"], options=StateDictOptions(full_state_dict=True))
                set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.module.load_state_dict(state["module"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--resume: the checkpoint does not fit this model and optimiser ({first})") from None
        self.position = position
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.skips.seen.update(state.get("skipped", {}))
        if self.ema is not None:
            if "ema" in state:
                self.ema.load(state["ema"], self.device)
            else:
                self.ema = WeightAverage(self.task.model(), self.settings.ema)
                self.log(f"--ema: the checkpoint of step {position.step} has no weight average; it starts from "
                         "the weights there")
        self._snapshot_rng()

    def _resume(self) -> None:
        """Restore the newest checkpoint that reads back whole."""
        folders = self.checkpoint_folders()
        if not folders:
            raise ValueError(f"--resume: {self.checkpoints} holds no checkpoint to resume from")
        for folder in folders:
            try:
                state = load_checkpoint_state(folder)
            except _UNREADABLE as error:
                self.log(f"--resume: {folder} is unreadable ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}); trying the one before")
                continue
            self._restore(state)
            self.log(f"resumed from {folder} (step {self.position.step})")
            return
        raise ValueError(f"--resume: none of the {len(folders)} checkpoints in {self.checkpoints} is readable")

    def _check_same_run(self, before: Dict, info: Dict) -> None:
        """A resumed run trains the model it started with (``before``: its
        run.json; ``info``: this run's, through JSON)."""
        for key in ("task", "model_config", "sampling", "labels"):
            if key in before and key in info and before[key] != info[key]:
                if isinstance(info[key], dict) and isinstance(before[key], dict):
                    # A setting added since the run began reads as None there: its default.
                    changed = sorted(k for k in set(before[key]) | set(info[key])
                                     if before[key].get(k) != info[key].get(k))
                    if not changed:
                        continue
                    what = key.replace("_", " ") + " (" + ", ".join(changed) + ")"
                else:
                    what = f"{key} ({before[key]} -> {info[key]})"
                raise ValueError(f"--resume: {self.folder} holds a run of another {what}; use its own "
                                 "--preset and settings, or a new --out")

    # Run folder --------------------------------------------------------------
    def _prepare_folder(self) -> None:
        run_file = os.path.join(self.folder, "run.json")
        info = {"settings": dataclasses.asdict(self.settings), **self.task.run_info(), "world_size": self.dist.world}
        sampling = getattr(self.dataset, "sampling", None)
        if dataclasses.is_dataclass(sampling):
            # How clips are cut (flip included): a resume with another
            # sampling would not continue the same run.
            info["sampling"] = dataclasses.asdict(sampling)
        before = None
        if self.settings.resume:
            if os.path.isfile(run_file):
                with open(run_file) as handle:
                    before = json.load(handle)
                # As run.json holds it: tuples are lists.
                self._check_same_run(before, json.loads(json.dumps(info, default=str)))
            self._resume()
        elif self.latest_checkpoint() is not None:
            raise ValueError(f"{self.folder} already holds a run; pass --resume to continue it or use a new --out")
        else:
            # The weights the run starts from (a resume keeps the first run's record).
            info["initial_weights"] = self._initial_weights
        if self.dist.main:
            os.makedirs(self.checkpoints, exist_ok=True)
            if before is not None:
                # The run's own settings stay; each resume adds what it changed.
                now = json.loads(json.dumps(info, default=str))
                changed = {k: v for k, v in now["settings"].items()
                           if k != "resume" and before.get("settings", {}).get(k) != v}
                if before.get("world_size") != now["world_size"]:
                    changed["world_size"] = now["world_size"]
                before.setdefault("resumes", []).append({"step": self.position.step, "changed": changed})
                info = before
            write_json(run_file, info, indent=2, default=str)
            self._trim_log()
        self.dist.barrier()

    @property
    def log_file(self) -> str:
        return os.path.join(self.folder, "log.jsonl")

    def _trim_log(self) -> None:
        """Drop log lines past the restored step (written after the
        checkpoint a resumed run starts from)."""
        if not os.path.isfile(self.log_file):
            return
        with open(self.log_file) as handle:
            lines = [line for line in handle if line.strip() and json.loads(line)["step"] <= self.position.step]
        with open(self.log_file, "w") as handle:
            handle.writelines(lines)

    # The loop ------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        epoch, micro = self.position.epoch, self.position.micro
        self.dataset.set_epoch(epoch)
        per_epoch = self.steps_per_epoch * self.settings.batch_size // self.dist.world
        sampler = _Shard(len(self.dataset), per_epoch, self.settings.seed, epoch, self.dist.rank, self.dist.world,
                         micro * self.micro)
        # A generator of its own: otherwise making the iterator draws its
        # workers' base seed from torch's global one, which a resumed run
        # (a new iterator mid-epoch) would then hold in another state than
        # an uninterrupted run (drop-path and other draws from it differ).
        # Clips draw from their own seeds, not the workers'.
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.micro, sampler=sampler, num_workers=self.settings.workers,
            collate_fn=collate, drop_last=True, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.settings.seed))

    def _share(self, drawn):
        """This rank's share of the draws for a global micro-batch (the
        round-robin dealing of :class:`_Shard`): a tensor, or a dict of them,
        sliced along its first dimension."""
        if drawn is None or self.dist.world == 1:
            return drawn
        if isinstance(drawn, dict):
            return {key: self._share(value) for key, value in drawn.items()}
        return drawn[self.dist.rank:: self.dist.world].contiguous()

    def fit(self) -> Dict:
        self._prepare_folder()
        settings = self.settings
        forward = self.module
        if self.dist.world > 1 and not self.sharded:
            forward = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.unused_parameters(settings.steps * settings.accumulate))
        if settings.compile:
            forward = torch.compile(forward)
        # tqdm's disable=None: a bar only on a terminal.
        disable = True if not self.dist.main else None if settings.progress is None else not settings.progress
        bar = tqdm(total=settings.steps, initial=self.position.step, unit="step", file=sys.stderr,
                   disable=disable, dynamic_ncols=True)
        # Where no bar is drawn (stderr is a file: a Slurm log), plain lines.
        self._plain = self.dist.main and bar.disable
        # A resumed run drops the events past its checkpoint, as the log does.
        self._writer = None if self._writer_class is None or not self.dist.main else self._writer_class(
            os.path.join(self.folder, "tensorboard"), purge_step=self.position.step + 1)
        last = {}
        try:
            with self._stop_on_sigterm():
                while self.position.step < settings.steps:
                    last = self._epoch(forward, bar) or last
        except KeyboardInterrupt:
            folder = self.save()
            self.log(f"interrupted at step {self.position.step}: checkpoint saved in {folder}; "
                     "run again with --resume to continue")
            raise
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
        # The last epoch may end part-way: its skips are reported all the same.
        message = self.skips.end_epoch(self.position.epoch)
        if message and self.dist.main:
            self.log(message)
        if self.position.step % settings.save_every:
            self.save()
        module_state, ema_state = self._module_state(), self._ema_state()
        if self.dist.main:
            self._save_models(self.folder, module_state, ema_state)
            if settings.plot:
                plot_log(self.log_file, settings.plot)
        self.dist.barrier()
        return last

    def _epoch(self, forward, bar) -> Dict:
        settings, position = self.settings, self.position
        accumulate = settings.accumulate
        last = {}
        parts_sum: Dict[str, float] = {}
        loss_sum = 0.0
        consumed = position.micro
        # The step's clock starts when the previous step ended (checkpoints
        # and validation excluded); ``waited`` is its time blocked on the loader.
        step_start, waited, step_clips = time.perf_counter(), 0.0, 0
        batches = iter(self._loader())
        with contextlib.ExitStack() as counting:
            counter = None
            while True:
                before = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - before
                if batch is None:
                    break
                if settings.peak_tflops is not None and self._step_flops is None and counter is None:
                    counter = counting.enter_context(FlopCounterMode(display=False))
                self.skips.add(batch["skipped"])
                drawn = self._share(self.task.draw(self.generator, self.micro * self.dist.world))
                sync = consumed % accumulate == accumulate - 1
                with self._gradient_sync(forward, sync):
                    with autocast(self.device):
                        loss, parts = forward(batch, drawn)
                    (loss / accumulate).backward()
                loss_sum += float(loss.detach()) / accumulate
                for name, value in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + float(value) / accumulate
                consumed += 1
                step_clips += len(batch["labels"]) * self.dist.world
                if not sync:
                    continue
                if counter is not None:
                    counting.close()
                    self._step_flops, counter = counter.get_total_flops(), None
                grad_norm = None
                if settings.clip_grad is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), settings.clip_grad)
                    # Under FSDP a DTensor, replicated on every rank.
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                lr = max(group["lr"] for group in self.optimizer.param_groups)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update()
                position.step += 1
                position.micro = consumed
                self._snapshot_rng()
                step_s = max(time.perf_counter() - step_start, 1e-9)
                last = {"step": position.step, "epoch": position.epoch, "lr": lr, "loss": self._reduce(loss_sum),
                        "losses": {k: self._reduce(v) for k, v in parts_sum.items()},
                        "grad_norm": grad_norm, "clips_per_s": step_clips / step_s, "step_s": step_s,
                        "data_wait": min(waited / step_s, 1.0), "time": time.time()}
                if self._step_flops is not None:
                    last["flops"] = self._step_flops * self.dist.world
                    last["mfu"] = self._step_flops / step_s / (settings.peak_tflops * 1e12)
                if settings.val_every is not None and (position.step % settings.val_every == 0
                                                       or position.step == settings.steps):
                    last["val"] = self._validate()
                parts_sum, loss_sum = {}, 0.0
                if self.dist.main:
                    with open(self.log_file, "a") as handle:
                        handle.write(json.dumps(last) + "\n")
                    self._report(last)
                bar.set_postfix(loss=f"{last['loss']:.4g}", clips_s=f"{last['clips_per_s']:.2f}", refresh=False)
                bar.update(1)
                if position.step % settings.save_every == 0:
                    self.save()
                if self._stop_requested():
                    folder = self.save() if position.step % settings.save_every else self.latest_checkpoint()
                    message = (f"terminated (SIGTERM) at step {position.step}: checkpoint saved in {folder}; "
                               "run again with --resume to continue")
                    self.log(message)
                    raise Terminated(message)
                if position.step >= settings.steps:
                    return last
                step_start, waited, step_clips = time.perf_counter(), 0.0, 0
        message = self.skips.end_epoch(position.epoch)
        if message and self.dist.main:
            self.log(message)
        position.epoch += 1
        position.micro = 0
        return last

    def _gradient_sync(self, forward, sync: bool):
        """Gradients averaged over the ranks only on the micro-batch that ends
        a step (``sync``): DDP's ``no_sync`` before it, FSDP's switch."""
        if self.sharded:
            self.module.set_requires_gradient_sync(sync)
        elif not sync and self.dist.world > 1:
            return forward.no_sync()
        return contextlib.nullcontext()

    def _validate(self) -> Dict[str, float]:
        """The task's validation metrics, on the main rank (the others wait;
        under FSDP every rank runs it, as each holds a shard of the weights),
        outside the RNG streams training draws from: a run validated at
        other steps, or resumed, trains the same."""
        metrics: Dict[str, float] = {}
        if self.dist.main or self.sharded:
            modes = [(module, module.training) for module in self.module.modules()]
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast(self.device):
                    metrics = self.task.validate(self.validation, self.device, self.settings.workers)
                    if self.ema is not None:
                        with self.ema.swapped_in():
                            metrics.update({f"ema_{name}": value for name, value in
                                            self.task.validate(self.validation, self.device,
                                                               self.settings.workers).items()})
            finally:
                for module, training in modes:
                    module.training = training
        self.dist.barrier()
        return metrics

    def _report(self, row: Dict) -> None:
        """A logged step as TensorBoard scalars and, where no bar is drawn,
        a progress line every ``log_every`` steps (and at the last one and
        at each validation)."""
        step = row["step"]
        if self._writer is not None:
            for name, value in _scalars(row).items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._plain and (step % self.settings.log_every == 0 or step == self.settings.steps or "val" in row):
            self.log(progress_line(row, self.settings.steps))

    @contextlib.contextmanager
    def _stop_on_sigterm(self):
        """SIGTERM asks for a stop at the end of the step under way (a signal
        handler may run mid-update, so it only sets a flag)."""
        self._sigterm = False
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread
            return

        def request_stop(signum, frame):
            self._sigterm = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM: all ranks stop at the same step."""
        if self.dist.world == 1:
            return self._sigterm
        flag = torch.tensor([float(self._sigterm)], device=self._collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def _collective_device(self) -> torch.device:
        """Where a collective's tensor lives: the GPU under NCCL, else the CPU (gloo)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _reduce(self, value: float) -> float:
        """The mean over ranks (what the averaged gradients optimise)."""
        if self.dist.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor)
        return float(tensor) / self.dist.world


def _scalars(row: Dict) -> Dict[str, float]:
    """A log row's TensorBoard scalars, by tag."""
    scalars = {"loss/total": row["loss"], **{f"loss/{k}": v for k, v in row["losses"].items()},
               "optim/lr": row["lr"], "perf/clips_per_s": row["clips_per_s"], "perf/data_wait": row["data_wait"]}
    if row.get("grad_norm") is not None:
        scalars["optim/grad_norm"] = row["grad_norm"]
    if "mfu" in row:
        scalars["perf/mfu"] = row["mfu"]
    scalars.update({f"val/{k}": v for k, v in row.get("val", {}).items()})
    return scalars


def progress_line(row: Dict, steps: int) -> str:
    """One logged step as a line of a log file."""
    parts = [f"step {row['step']}/{steps}", f"loss {row['loss']:.4g}", f"lr {row['lr']:.3g}",
             f"{row['clips_per_s']:.2f} clips/s", f"data wait {row['data_wait']:.0%}"]
    if "mfu" in row:
        parts.append(f"MFU {row['mfu']:.1%}")
    parts += [f"val {k} {v:.4g}" for k, v in row.get("val", {}).items()]
    return "  ".join(parts)


def read_log(path: str) -> List[Dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_log(log_path: str, out_path: str) -> None:
    """Loss curves of a run (total and each part, log scale) and its
    learning rate, from ``log.jsonl``."""
    # matplotlib (the train extra) only when a plot is asked for.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        raise ValueError(f"{log_path}: the log is empty; nothing to plot")
    steps = [r["step"] for r in rows]
    figure, (losses, rate) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    losses.plot(steps, [r["loss"] for r in rows], label="total (weighted)", color="black", linewidth=2)
    for name in rows[-1]["losses"]:
        losses.plot(steps, [r["losses"].get(name, float("nan")) for r in rows], label=name, alpha=0.8)
    losses.set_yscale("log")
    losses.set_ylabel("loss")
    losses.legend(loc="upper right", fontsize="small")
    losses.grid(True, which="both", alpha=0.3)
    rate.plot(steps, [r["lr"] for r in rows], color="tab:gray")
    rate.set_ylabel("learning rate")
    rate.set_xlabel("optimiser step")
    rate.grid(True, alpha=0.3)
    figure.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))) or "training")
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
