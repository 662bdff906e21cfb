"""The training verbs of the ``lookwhen`` command: ``pretrain``,
``finetune``, ``evaluate`` and ``cache-targets``. Under ``torchrun`` every rank runs the same command; the
engine (:mod:`lookwhen.training.engine`) splits the work. This module holds their options; the commands
themselves live in :mod:`lookwhen.cli.train_commands`, imported when one runs."""
from __future__ import annotations

import argparse

from lookwhen.cli.args import (
    decoder_arg,
    int_arg,
    keep_ratio_arg,
    number_arg,
    positive_float_arg,
    positive_int_arg,
)
from lookwhen.data.annotations import FORMATS
from lookwhen.models.config import DEFAULT_PRESET, PRESETS


def _command(name: str):
    """The command ``name`` of :mod:`lookwhen.cli.train_commands`, imported on the call."""
    def run(args) -> int:
        from lookwhen.cli import train_commands
        return getattr(train_commands, name)(args)
    return run


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
    pre.set_defaults(func=_command("cmd_pretrain"))

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
    fine.add_argument("--linear-probe", action="store_true",
                      help="train the classifier alone, on each training video's embedding computed once (its "
                           "centre clip; kept in OUT/embeddings, so a restart embeds only what is missing)")
    fine.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise learning-rate decay")
    fine.add_argument("--label-smoothing", type=float, default=0.1)
    fine.add_argument("--distill-from", metavar="CHECKPOINT",
                      help="ResKD: a fine-tuned teacher that sees the clip at its own (higher) resolution")
    fine.add_argument("--distill-temperature", type=float, default=4.0)
    fine.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    fine.set_defaults(func=_command("cmd_finetune"))

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
    evaluation.set_defaults(func=_command("cmd_evaluate"))

    cache = sub.add_parser("cache-targets", help="run the teachers once and store their targets for pretrain --targets")
    _data_options(cache)
    _teacher_options(cache)
    cache.add_argument("--out", required=True, help="cache folder (an interrupted run restarted fills in the rest)")
    cache.add_argument("--views", type=positive_int, default=1, help="random samplings per video (epoch e uses "
                                                                     "view e mod views)")
    cache.add_argument("--batch-size", type=positive_int, default=8)
    cache.add_argument("--shard-size", type=positive_int, default=256, help="clips per safetensors shard")
    cache.add_argument("--patch-format", choices=("fp16", "int8"), default="fp16",
                       help="how the patch targets are stored: fp16, or int8 with a scale per token (half the size; "
                            "docs/training.md gives what it changes)")
    cache.set_defaults(func=_command("cmd_cache_targets"))
