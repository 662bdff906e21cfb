"""The work of the training verbs (``pretrain``, ``finetune``, ``evaluate``,
``cache-targets``), imported only when one of them runs: the training stack
(the teachers, timm, the kernels) stays out of ``lookwhen --help``. Their
options are in :mod:`lookwhen.cli.train`."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch
from tqdm import tqdm

from lookwhen.cli.args import (
    CommandError,
    checked_device,
    parse_key_values,
    parse_overrides,
)
from lookwhen.data.annotations import load_data, read_class_file
from lookwhen.data.augment import Augment
from lookwhen.data.datasets import Sampling, SkipReport, VideoDataset
from lookwhen.io.checkpoint import load_checkpoint, read_labels
from lookwhen.models import build_model
from lookwhen.training.distributed import Distributed, is_main_process, local_device
from lookwhen.training.engine import Trainer, TrainSettings
from lookwhen.training.evaluate import evaluate, format_evaluation, parse_views
from lookwhen.training.embed import rank_share
from lookwhen.training.finetune import (
    PROBE_SHARD_SIZE,
    FinetuneTask,
    embed_for_probe,
    finetune_model,
    read_probe_embeddings,
    sigma_decay_steps,
)
from lookwhen.training.losses import LossWeights
from lookwhen.training.pretrain import PretrainTask
from lookwhen.training.targets import (
    TargetCache,
    WithTargets,
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
        dataset = WithTargets(dataset, cache)
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
                            progress=bar.update, rank=ranks.rank, world=ranks.world, patch_format=args.patch_format)
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
    if args.linear_probe:
        dataset = _probe_dataset(args, model, annotations, num_classes, device)
    last = Trainer(task, dataset, settings, validation=validation).fit()
    if is_main_process():
        print(f"fine-tuned {config.name} ({num_classes} classes) for {settings.steps} steps (final loss "
              f"{last.get('loss', float('nan')):.4g}); model in {os.path.join(args.out, 'model.safetensors')}")
    return 0


def _probe_dataset(args, model, annotations, num_classes: int, device):
    """The linear probe's training set: every training video embedded once
    into ``<out>/embeddings`` (kept, so a restart embeds only what is
    missing), each rank its share under torchrun."""
    per_step = [flag for flag, given in (
        ("--mixup", args.mixup), ("--cutmix", args.cutmix), ("--randaugment", args.randaugment),
        ("--erase", args.erase), ("--drop-path", args.drop_path), ("--distill-from", args.distill_from),
        ("--keep-range", args.keep_range), ("--selection " + args.selection, args.selection != "selector")) if given]
    if per_step:
        raise CommandError(f"--linear-probe trains on embeddings computed once, not on clips: not with "
                           f"{', '.join(per_step)}")
    ranks = Distributed.start(device)
    folder = os.path.join(args.out, "embeddings")
    paths = [e.path for e in annotations.entries]
    with tqdm(total=rank_share(paths, PROBE_SHARD_SIZE, ranks.rank, ranks.world), unit="video", desc="embedding",
              file=sys.stderr, disable=None if ranks.main else True) as bar:
        embed_for_probe(model.to(device), annotations.entries, folder, keep_ratio=args.keep_ratio,
                        batch_size=args.batch_size, workers=args.workers, device=device, decoder=args.decoder,
                        rank=ranks.rank, world=ranks.world, progress=bar.update,
                        log=lambda line: tqdm.write(f"lookwhen finetune: {line}", file=sys.stderr))
    ranks.barrier()
    return read_probe_embeddings(annotations.entries, folder, num_classes=num_classes,
                                 multi_label=annotations.multi_label)


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
