"""The training verbs of the ``lookwhen`` command: ``pretrain``,
``finetune``, ``evaluate`` and ``cache-targets``. Under ``torchrun`` every rank runs the same command; the
engine (:mod:`lookwhen.training.engine`) splits the work."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch
from tqdm import tqdm

from lookwhen.cli.args import (
    CommandError,
    checked_device,
    decoder_arg,
    int_arg,
    keep_ratio_arg,
    number_arg,
    parse_key_values,
    parse_overrides,
    positive_float_arg,
    positive_int_arg,
)
from lookwhen.data.annotations import FORMATS, load_data, read_class_file
from lookwhen.data.augment import Augment
from lookwhen.data.datasets import Sampling, SkipReport, VideoDataset
from lookwhen.io.checkpoint import load_checkpoint, read_labels
from lookwhen.models import build_model
from lookwhen.models.config import DEFAULT_PRESET, PRESETS
from lookwhen.training.distributed import Distributed, is_main_process, local_device
from lookwhen.training.engine import Trainer, TrainSettings
from lookwhen.training.evaluate import evaluate, format_evaluation, parse_views
from lookwhen.training.finetune import FinetuneTask, finetune_model, sigma_decay_steps
from lookwhen.training.losses import LossWeights
from lookwhen.training.pretrain import PretrainTask
from lookwhen.training.targets import (
    TargetCache,
    cache_fingerprint,
    cached_keys,
    merge_rank_indexes,
    teacher_targets,
    write_cache,
)
from lookwhen.training.teachers import ImageTeacher, Teachers, VideoTeacher


def _key_values(items):
    try:
        return parse_key_values(items)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _device(name: str) -> torch.device:
    device = local_device(checked_device(name))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _overrides(args):
    try:
        return parse_overrides(args.set)
    except ValueError as error:
        raise CommandError(f"--set: {error}") from None


def _model(args):
    if args.init:
        if args.set:
            raise CommandError("--set: the model comes from --init; its config cannot be changed")
        return load_checkpoint(args.init)
    overrides = _overrides(args)
    try:
        return build_model(args.preset, **overrides)
    except ValueError as error:
        raise CommandError(f"--set: {error}") from None


def _annotations(args, classes=None):
    """``--data`` as ``--format`` reads it; class names map through
    ``--classes``, else ``classes``, else the reader's default."""
    if args.classes:
        classes = read_class_file(args.classes)
    return load_data(args.data, format=args.format, root=args.root, classes=classes)


def _dataset(args, config, views: Optional[int] = None):
    sampling = Sampling(frames=config.frames, size=config.image_size, stride=args.stride)
    return VideoDataset(_annotations(args), sampling=sampling, seed=args.seed, views=views, decoder=args.decoder)


def _teachers(args, device):
    if not args.image_teacher or not args.image_teacher_weights:
        raise CommandError("--image-teacher and --image-teacher-weights are needed (or --targets with cached targets)")
    image = ImageTeacher(args.image_teacher, args.image_teacher_weights, image_size=args.image_teacher_size,
                         **_key_values(args.image_teacher_arg))
    video = VideoTeacher.from_checkpoint(args.video_teacher) if args.video_teacher else None
    return Teachers(image, video).to(device)


def _settings(args, device):
    """The loop's settings from the options :func:`_loop_options` adds."""
    return TrainSettings(
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        clip_grad=None if args.clip_grad == 0 else args.clip_grad, accumulate=args.accumulate, seed=args.seed,
        save_every=args.save_every, workers=args.workers, compile=args.compile, device=str(device),
        resume=args.resume, plot=args.plot, log_every=args.log_every, tensorboard=args.tensorboard,
        peak_tflops=args.peak_tflops, ema=args.ema, checkpoint_activations=args.checkpoint_activations,
        fsdp=args.fsdp,
        val_every=None if not args.val_manifest else args.val_every or args.steps)


def _validation(args, classes):
    """``--val-manifest``'s entries, read as ``--format`` reads ``--data``
    and with the training set's class names (None without the option)."""
    if not args.val_manifest:
        if args.val_every:
            raise CommandError("--val-every: give the held-out videos with --val-manifest")
        return None
    entries = load_data(args.val_manifest, format=args.format, root=args.val_root, classes=classes).entries
    if not entries:
        raise CommandError(f"--val-manifest {args.val_manifest}: no videos")
    return entries


def _teacher_names(args):
    return [args.image_teacher, os.path.abspath(args.image_teacher_weights), args.image_teacher_size,
            sorted(_key_values(args.image_teacher_arg).items()),
            os.path.abspath(args.video_teacher) if args.video_teacher else None]


def cmd_pretrain(args) -> int:
    device = _device(args.device)
    model = _model(args)
    config = model.config
    if config.kind != "lookwhen":
        raise CommandError(f"{config.name} is a dense model; pretrain trains LookWhen models")
    weights = LossWeights(**{**_key_values(args.loss_weight), "temperature": args.temperature})
    settings = _settings(args, device)
    dataset = _dataset(args, config)
    validation = _validation(args, dataset.annotations.classes)
    if validation is not None and args.targets and dataset.multi_label:
        raise CommandError("--val-manifest: with --targets (no teachers) and multi-label data there is nothing to "
                           "validate (selector recall needs the teachers, the kNN probe single labels)")
    if args.targets:
        cache = TargetCache.for_dataset(args.targets, dataset, config.grid)
        dataset.views = cache.views
        task = PretrainTask(model, cache=cache, weights=weights, keep_range=tuple(args.keep_range), train=args.train)
    else:
        task = PretrainTask(model, teachers=_teachers(args, device), weights=weights,
                            keep_range=tuple(args.keep_range), train=args.train)
    os.makedirs(args.out, exist_ok=True)
    last = Trainer(task, dataset, settings, validation=validation).fit()
    if is_main_process():
        final = os.path.join(args.out, "model.safetensors")
        print(f"trained {config.name} for {settings.steps} steps (final loss {last.get('loss', float('nan')):.4g}); "
              f"model in {final}, log in {os.path.join(args.out, 'log.jsonl')}")
    return 0


def cmd_cache_targets(args) -> int:
    device = _device(args.device)
    config = _model(args).config
    dataset = _dataset(args, config, args.views)
    teachers = _teachers(args, device)
    fingerprint = cache_fingerprint(dataset, config.grid, _teacher_names(args))
    ranks = Distributed.start(device)
    done = cached_keys(args.out, fingerprint)
    # Every rank has read the same folder before any writes: the missing
    # keys are dealt out round-robin.
    ranks.barrier()
    todo = [(i, v) for v in range(args.views) for i in range(len(dataset)) if f"{i}/{v}" not in done]
    todo = todo[ranks.rank::ranks.world]
    skips = SkipReport(lambda line: tqdm.write(line, file=sys.stderr))
    bar = tqdm(total=len(todo), unit="clip", file=sys.stderr, disable=None if ranks.main else True)

    def skipped(path, reason):
        skips.add([(path, reason)])
        bar.update(1)

    entries = teacher_targets(teachers, todo, dataset.clip, config.grid[1:], batch_size=args.batch_size,
                              device=device, skipped=skipped)
    try:
        count = write_cache(args.out, entries, fingerprint, args.views, shard_size=args.shard_size,
                            progress=bar.update, rank=ranks.rank, world=ranks.world)
    finally:
        bar.close()
    ranks.barrier()
    if ranks.world > 1 and ranks.main:
        merge_rank_indexes(args.out, fingerprint, args.views)
    ranks.barrier()
    print(f"{f'rank {ranks.rank}: ' if ranks.world > 1 else ''}cached teacher targets of {count} clips "
          f"({len(done)} already there) in {args.out}"
          + (f"; {len(skips.seen)} unreadable videos skipped" if skips.seen else ""))
    return 0


def cmd_finetune(args) -> int:
    device = _device(args.device)
    annotations = _annotations(args)
    num_classes = args.num_classes or annotations.num_classes
    if annotations.multi_label and num_classes != annotations.num_classes:
        raise CommandError(f"--num-classes {num_classes}: the multi-label data set has {annotations.num_classes} "
                           "classes, and its targets are that wide")
    overrides = _overrides(args)
    try:
        model = finetune_model(num_classes, preset=args.preset, init=args.init, overrides=overrides)
    except ValueError as error:
        if args.init:
            raise  # the message names the checkpoint
        raise CommandError(f"--set: {error}") from None
    config = model.config
    teacher = load_checkpoint(args.distill_from, device) if args.distill_from else None
    size = max(config.image_size, teacher.config.image_size if teacher is not None else 0)
    frames = max(config.frames, teacher.config.frames if teacher is not None else 0)
    # A data set whose classes tell left from right is never flipped.
    augment = Augment(randaugment=tuple(args.randaugment) if args.randaugment else None, erase=args.erase)
    sampling = Sampling(frames=frames, size=size, stride=args.stride, flip=annotations.flip and not args.no_flip,
                        augment=augment or None)
    dataset = VideoDataset(annotations, sampling=sampling, seed=args.seed, decoder=args.decoder)
    task = FinetuneTask(model, keep_ratio=args.keep_ratio, keep_range=tuple(args.keep_range) if args.keep_range
                        else None, selection=args.selection, linear_probe=args.linear_probe,
                        layer_decay=args.layer_decay, label_smoothing=args.label_smoothing, teacher=teacher,
                        temperature=args.distill_temperature, alpha=args.distill_alpha, sigma=args.sigma,
                        sigma_steps=sigma_decay_steps(args.sigma_decay, args.steps * args.accumulate),
                        n_samples=args.samples, multi_label=annotations.multi_label, classes=annotations.classes,
                        mixup=args.mixup, cutmix=args.cutmix, mix_prob=args.mix_prob, mix_switch=args.mix_switch,
                        drop_path=args.drop_path)
    settings = _settings(args, device)
    validation = _validation(args, annotations.classes)
    os.makedirs(args.out, exist_ok=True)
    last = Trainer(task, dataset, settings, validation=validation).fit()
    if is_main_process():
        print(f"fine-tuned {config.name} ({num_classes} classes) for {settings.steps} steps (final loss "
              f"{last.get('loss', float('nan')):.4g}); model in {os.path.join(args.out, 'model.safetensors')}")
    return 0


def cmd_evaluate(args) -> int:
    views = parse_views(args.views)
    device = _device(args.device)
    # The class names and the loss the model was fine-tuned with.
    labels = read_labels(args.checkpoint) or {"classes": None, "multi_label": None}
    annotations = _annotations(args, labels["classes"])
    multi_label = annotations.multi_label if labels["multi_label"] is None else labels["multi_label"]
    model = load_checkpoint(args.checkpoint, device)
    if args.keep_ratio is not None and model.config.kind != "lookwhen":
        raise CommandError(f"--keep-ratio: {model.config.name} is a dense model and keeps every token")
    # Under torchrun each rank scores its share of the videos; the main rank reports.
    ranks = Distributed.start(device)
    share = len(range(ranks.rank, len(annotations.entries), ranks.world))
    with tqdm(total=share, unit="video", file=sys.stderr, disable=None if ranks.main else True) as bar:
        result = evaluate(model, annotations.entries, views=views, keep_ratio=args.keep_ratio,
                          batch_size=args.batch_size, workers=args.workers, device=device, progress=bar.update,
                          multi_label=multi_label, decoder=args.decoder, rank=ranks.rank, world=ranks.world)
    if not ranks.main:
        return 0
    for path, message in result.failures:
        print(f"lookwhen evaluate: skipped {' '.join(message.split())}", file=sys.stderr)
    print(format_evaluation(model.config.name, result, views))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"checkpoint": args.checkpoint, "data": args.data, "views": args.views, **result.as_dict()},
                      handle, indent=2)
    return 0


def _source_options(p) -> None:
    p.add_argument("--data", required=True, help="a folder root/<class>/<video>, a manifest of 'path,label' lines "
                   "(labels: class ids or names), or a benchmark's annotation file (--format)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="auto: a folder or manifest; otherwise the benchmark whose annotation file --data is")
    p.add_argument("--root", help="folder the videos' paths are relative to (default: the --data file's)")
    p.add_argument("--classes", metavar="FILE", help="class names in id order: one a line, or a JSON list or "
                   "name-to-id object (default: the names sorted, or the benchmark's own list)")
    decoder_arg(p)


def _data_options(p) -> None:
    _source_options(p)
    p.add_argument("--stride", type=int, default=4, help="frame stride of training clips (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's own GPU)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", default=DEFAULT_PRESET, choices=[n for n, c in PRESETS.items()],
                       help="model preset (random initialisation)")
    group.add_argument("--init", help="start from this checkpoint's weights and config")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides, e.g. depth=2 frames=8")


def _teacher_options(p) -> None:
    p.add_argument("--image-teacher", help="timm model name, e.g. vit_base_patch16_dinov3")
    p.add_argument("--image-teacher-weights", help="its weights: a local safetensors or torch state-dict file")
    p.add_argument("--image-teacher-size", type=int, help="resolution the image teacher runs at (default: its own)")
    p.add_argument("--image-teacher-arg", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more timm.create_model arguments, e.g. depth=4")
    p.add_argument("--video-teacher", help="the video teacher's weights: an official InternVideo2-B/14 checkpoint "
                   "(internvideo2_base_patch14_224, built as the internvideo2-b14 preset) or a lookwhen checkpoint")


def _interval(low: float, high: float, brackets: str = "[]"):
    """An argparse type: a number in the interval ``low, high``, each end
    closed (``[``, ``]``) or open (``(``, ``)``)."""
    def parse(text: str) -> float:
        value = number_arg(text)
        above = value >= low if brackets[0] == "[" else value > low
        below = value <= high if brackets[1] == "]" else value < high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must lie in {brackets[0]}{low:g}, {high:g}{brackets[1]}, got {value}")
        return value
    return parse


def _randaugment_arg(text: str) -> int:
    value = int_arg(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must lie in 0..10, got {value}")
    return value


def _loop_options(p) -> None:
    positive_int = positive_int_arg
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, run.json, model.safetensors")
    p.add_argument("--steps", type=positive_int, required=True, help="optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="clips per optimiser step, over all ranks")
    p.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, help="default: 5%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--save-every", type=positive_int, default=100, help="checkpoint every N steps")
    p.add_argument("--workers", type=int, default=0, help="DataLoader decoding processes")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the weights, gradients and optimiser state over the ranks (FSDP2, a "
                        "unit per transformer block) instead of replicating them (DDP)")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="keep only each transformer block's input and recompute the block in the backward pass "
                        "(less memory, about a third more compute)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--plot", help="draw the loss curves to this PNG at the end")
    p.add_argument("--log-every", type=positive_int, default=10, metavar="N",
                   help="where stderr is not a terminal (a Slurm log): a progress line every N steps (default 10)")
    p.add_argument("--peak-tflops", type=positive_float_arg, metavar="TFLOPS",
                   help="the accelerator's peak TFLOP/s (one rank, the training dtype): log the model FLOPs "
                        "utilisation (MFU)")
    p.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard scalars to OUT/tensorboard (needs the tensorboard extra)")
    p.add_argument("--val-manifest", metavar="FILE", help="held-out videos (read as --data is, with --format) to "
                   "validate on every --val-every steps and at the end")
    p.add_argument("--val-root", help="folder the --val-manifest videos' paths are relative to (default: its own)")
    p.add_argument("--val-every", type=positive_int, metavar="N", help="steps between validations (default: at the "
                   "end only)")
    p.add_argument("--ema", type=_interval(0, 1, "()"), metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.9999), validated beside them and saved as model-ema.safetensors")


def add_parsers(sub) -> None:
    positive_int, keep_ratio = positive_int_arg, keep_ratio_arg
    pre = sub.add_parser("pretrain", help="pre-train LookWhen: uniqueness for the selector, distillation for the "
                                          "extractor")
    _data_options(pre)
    _teacher_options(pre)
    pre.add_argument("--targets", help="a folder of cached teacher targets (lookwhen cache-targets) instead of teachers")
    _loop_options(pre)
    pre.add_argument("--keep-range", type=keep_ratio, nargs=2, default=[0.05, 0.3], metavar=("LOW", "HIGH"),
                     help="per-clip keep ratio drawn uniformly from this range every step")
    pre.add_argument("--train", choices=("all", "selector"), default="all",
                     help="all: selector and extractor; selector: the score path alone")
    pre.add_argument("--loss-weight", nargs="+", default=[], metavar="NAME=W",
                     help="selector (0.1), video, image_video, frame, patch (1.0 each)")
    pre.add_argument("--temperature", type=float, default=1.0, help="of the selector's target distribution")
    pre.set_defaults(func=cmd_pretrain)

    fine = sub.add_parser("finetune", help="fine-tune a classifier on the embedding (or a linear probe)")
    _data_options(fine)
    _loop_options(fine)
    fine.add_argument("--num-classes", type=positive_int, help="default: the dataset's (largest label + 1)")
    choice = fine.add_mutually_exclusive_group()
    choice.add_argument("--keep-ratio", type=keep_ratio, help="LookWhen: tokens kept (default: the model's)")
    choice.add_argument("--keep-range", type=keep_ratio, nargs=2, metavar=("LOW", "HIGH"),
                        help="LookWhen: a keep ratio drawn per clip from this range every step")
    fine.add_argument("--selection", choices=("selector", "random", "perturbed"), default="selector",
                      help="random: uniformly random tokens instead of the selector's (a control); perturbed: "
                           "STTS's differentiable top-K, the selector learns from the task loss")
    fine.add_argument("--sigma", type=float, default=0.05,
                      help="--selection perturbed: noise at the start, decaying linearly to 0 (default 0.05)")
    fine.add_argument("--sigma-decay", type=keep_ratio, default=1.0, metavar="FRACTION",
                      help="--selection perturbed: sigma reaches 0 after this fraction of the steps; the rest "
                           "trains on the hard top-K, the tokens evaluation sees (default 1: STTS's schedule)")
    fine.add_argument("--samples", type=positive_int, default=500,
                      help="--selection perturbed: noisy samples per clip and step (default 500)")
    fine.add_argument("--no-flip", action="store_true", help="no horizontal flips (the default for data sets "
                      "whose classes tell left from right: Something-Something, Jester)")
    fine.add_argument("--randaugment", type=_randaugment_arg, nargs=2, metavar=("N", "M"),
                      help="RandAugment: N operations (1-10) at magnitude M (0-10) per clip, the same on every frame "
                           "(e.g. 2 9)")
    fine.add_argument("--erase", type=_interval(0, 1), default=0.0, metavar="P",
                      help="random erasing: with probability P a noise box, the same on every frame (default 0)")
    fine.add_argument("--mixup", type=_interval(0, float("inf"), "[)"), default=0.0, metavar="ALPHA",
                      help="Mixup with lam ~ Beta(ALPHA, ALPHA), soft targets (default 0: off; timm's recipe: 0.8)")
    fine.add_argument("--cutmix", type=_interval(0, float("inf"), "[)"), default=0.0, metavar="ALPHA",
                      help="CutMix with lam ~ Beta(ALPHA, ALPHA), soft targets (default 0: off; timm's recipe: 1.0)")
    fine.add_argument("--mix-prob", type=_interval(0, 1), default=1.0, metavar="P",
                      help="share of clips mixed when --mixup or --cutmix is on (default 1)")
    fine.add_argument("--mix-switch", type=_interval(0, 1), default=0.5, metavar="P",
                      help="with both on: the probability of CutMix rather than Mixup (default 0.5)")
    fine.add_argument("--drop-path", type=_interval(0, 1, "[)"), default=0.0, metavar="RATE",
                      help="stochastic depth: a block's residual branches dropped per clip with a probability rising "
                           "linearly to RATE at the last block (extractor; default 0)")
    fine.add_argument("--linear-probe", action="store_true", help="train the classifier alone")
    fine.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise learning-rate decay")
    fine.add_argument("--label-smoothing", type=float, default=0.1)
    fine.add_argument("--distill-from", metavar="CHECKPOINT",
                      help="ResKD: a fine-tuned teacher that sees the clip at its own (higher) resolution")
    fine.add_argument("--distill-temperature", type=float, default=4.0)
    fine.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    fine.set_defaults(func=cmd_finetune)

    evaluation = sub.add_parser("evaluate", help="top-1/top-5 accuracy (mAP for multi-label data) with multi-view "
                                                 "testing, and its cost")
    _source_options(evaluation)
    evaluation.add_argument("--checkpoint", required=True, help="a fine-tuned model (lookwhen finetune's output)")
    evaluation.add_argument("--views", default="1x1", help="TEMPORALxSPATIAL views per video, e.g. 4x3")
    evaluation.add_argument("--keep-ratio", type=keep_ratio, help="LookWhen: tokens kept (default: the model's)")
    evaluation.add_argument("--batch-size", type=positive_int, default=8, help="views per forward")
    evaluation.add_argument("--workers", type=int, default=0, help="DataLoader decoding processes")
    evaluation.add_argument("--device", default="cpu")
    evaluation.add_argument("--json", help="write the figures to this file")
    evaluation.set_defaults(func=cmd_evaluate)

    cache = sub.add_parser("cache-targets", help="run the teachers once and store their targets for pretrain --targets")
    _data_options(cache)
    _teacher_options(cache)
    cache.add_argument("--out", required=True, help="cache folder (an interrupted run restarted fills in the rest)")
    cache.add_argument("--views", type=positive_int, default=1, help="random samplings per video (epoch e uses "
                                                                     "view e mod views)")
    cache.add_argument("--batch-size", type=positive_int, default=8)
    cache.add_argument("--shard-size", type=positive_int, default=256, help="clips per safetensors shard")
    cache.set_defaults(func=cmd_cache_targets)

