"""The ``lookwhen`` command: ``embed``, ``show`` and ``info``; the training
verbs ``pretrain`` and ``cache-targets`` live in :mod:`lookwhen.cli_train`.

Every failure caused by the input (a bad argument, an unreadable video or
checkpoint, an unwritable output) ends with one line on stderr and a non-zero
exit status, never a traceback. ``embed`` over many files reports each bad
file, still writes the embeddings of the others, and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from lookwhen.config import BASELINE_PRESET, DEFAULT_PRESET, PRESETS, ModelConfig
from lookwhen.cpu_inference import prepack_linears
from lookwhen.motion import motion_forward, motion_scores

PROG = "lookwhen"
EXIT_USAGE = 2
# Brightness of the patches the extractor never sees, in `show`.
DIM = 0.3
# White columns between the frames and the heat-maps, in `show`.
GAP = 8


class CommandError(Exception):
    """A problem with the user's input: reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _number_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def keep_ratio_arg(text: str) -> float:
    value = _number_arg(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def positive_float_arg(text: str) -> float:
    value = _number_arg(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
    return value


def positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device: only cpu and cuda are supported, got {name!r}")
    return device


def _model_config(args) -> ModelConfig:
    """The config of the model the command will run, without building it
    (so bad input is reported before the slow part)."""
    from lookwhen.checkpoint import read_config
    from lookwhen.config import get_config

    config = read_config(args.checkpoint) if args.checkpoint else get_config(args.preset)
    if config.kind == "dense" and args.keep_ratio is not None:
        raise CommandError(f"--keep-ratio: {config.name} is a dense model and keeps every token")
    if config.kind == "dense" and getattr(args, "selector", "learned") != "learned":
        raise CommandError(f"--selector: {config.name} is a dense model and selects nothing")
    return config


def _load_model(args, device: torch.device) -> torch.nn.Module:
    from lookwhen import build_model
    from lookwhen.checkpoint import load_checkpoint

    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, device)
    else:
        model = build_model(args.preset).to(device)
        print(f"{PROG}: no --checkpoint: {args.preset} weights are randomly initialised "
              f"(seed {model.config.seed})", file=sys.stderr)
    if device.type == "cpu":
        # Inference only: the linear layers may take oneDNN's prepacked path.
        prepack_linears(model)
    return model.eval()


def _check_output(path: str, suffixes) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in suffixes:
        raise CommandError(f"--out {path}: expected a file ending in {' or '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"--out {path}: the folder {folder} does not exist")
    return suffix


def _forward(model, clips: torch.Tensor, keep_ratio: Optional[float], budget_mass: Optional[float] = None,
             budget_temperature: float = 1.0):
    """Embedding, and for LookWhen the selection, of a batch of clips."""
    from lookwhen.model import LookWhen

    with torch.inference_mode():
        if isinstance(model, LookWhen):
            return model(clips, keep_ratio=keep_ratio, budget_mass=budget_mass,
                         budget_temperature=budget_temperature)
        return model(clips)


def _check_budget_mass(args, config: ModelConfig) -> None:
    if args.budget_mass is None:
        if args.budget_temperature != 1.0:
            raise CommandError("--budget-temperature: only with --budget-mass")
        return
    if config.kind == "dense":
        raise CommandError(f"--budget-mass: {config.name} is a dense model and keeps every token")
    if args.keep_ratio is not None:
        raise CommandError("--budget-mass, --keep-ratio: give one way of choosing how many tokens, not both")
    if args.selector == "motion":
        raise CommandError("--budget-mass, --selector motion: budgets come from the learned selector's scores")


# embed ----------------------------------------------------------------------
def cmd_embed(args) -> int:
    from tqdm import tqdm

    from lookwhen.video import iter_clip_batches

    if args.manifest:
        return _embed_manifest(args)
    if not args.out:
        raise CommandError("--out: needed with VIDEO files (or use --manifest and --out-dir)")
    suffix = _check_output(args.out, (".npy", ".safetensors"))
    device = _device(args.device)
    _check_budget_mass(args, _model_config(args))
    model = _load_model(args, device)
    cfg: ModelConfig = model.config
    embeddings, indices, scores, budgets, done, failures = [], [], [], [], [], []
    # disable=None: a bar only on a terminal.
    quiet = True if len(args.videos) < 2 else None
    with tqdm(total=len(args.videos), unit="video", disable=quiet, file=sys.stderr) as bar:
        for batch in iter_clip_batches(args.videos, args.batch_size, cfg.frames, cfg.image_size):
            motions = None
            if args.selector == "motion" and batch.clips is not None:
                batch, motions = _with_motion(batch, cfg)
            for path, message in batch.failures:
                bar.write(f"{PROG} embed: skipped {message}", file=sys.stderr)
            failures.extend(batch.failures)
            if batch.clips is not None:
                if motions is None:
                    out = _forward(model, batch.clips.to(device), args.keep_ratio, args.budget_mass,
                                   args.budget_temperature)
                else:
                    with torch.inference_mode():
                        out = motion_forward(model, batch.clips.to(device), motions, args.keep_ratio)
                if isinstance(out, torch.Tensor):
                    embeddings.append(out.float().cpu())
                else:
                    embeddings.append(out.embedding.float().cpu())
                    indices.append(out.indices.cpu())
                    scores.append(out.scores.float().cpu())
                    budgets.append(out.cu_seqlens.diff().cpu())
                done.extend(batch.paths)
            bar.update(len(batch.paths) + len(batch.failures))
    if not done:
        raise CommandError(f"none of the {len(args.videos)} videos could be read; nothing written")
    table = torch.cat(embeddings)
    if suffix == ".npy":
        np.save(args.out, table.numpy())
    else:
        from safetensors.torch import save_file

        tensors = {"embeddings": table.contiguous()}
        if indices:
            tensors["indices"] = torch.cat(indices).contiguous()
            tensors["scores"] = torch.cat(scores).contiguous()
            if args.budget_mass is not None:
                # Packed ids: each clip's count splits them.
                tensors["budgets"] = torch.cat(budgets).contiguous()
        metadata = {"videos": json.dumps(done), "failed": json.dumps([p for p, _ in failures]), "config": cfg.to_json()}
        save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {len(done)} embeddings of size {table.shape[1]} to {args.out}"
          + (f" ({len(failures)} videos skipped)" if failures else ""))
    return 1 if failures else 0


def _with_motion(batch, cfg: ModelConfig):
    """The batch's clips whose videos carry motion vectors, and their motion
    scores; the others join the batch's failures."""
    from lookwhen.video import ClipBatch, VideoError

    motions, kept, failures = [], [], list(batch.failures)
    for row, path in enumerate(batch.paths):
        try:
            motions.append(motion_scores(path, cfg.grid))
            kept.append(row)
        except VideoError as error:
            failures.append((error.path, str(error)))
    clips = batch.clips[kept] if kept else None
    return ClipBatch(clips, [batch.paths[row] for row in kept], failures), motions


def _embed_manifest(args) -> int:
    """``embed --manifest``: shards under ``--out-dir`` (:mod:`lookwhen.embed`);
    under torchrun each rank embeds its own shards."""
    from tqdm import tqdm

    from lookwhen.data import read_manifest
    from lookwhen.embed import embed_shards

    if args.videos or args.out:
        raise CommandError("--manifest: give --out-dir, not VIDEO files or --out")
    if not args.out_dir:
        raise CommandError("--manifest needs --out-dir (the folder of shards)")
    paths = [path for path, _ in read_manifest(args.manifest, args.root, labels=False)]
    device = _device(args.device)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    _check_budget_mass(args, _model_config(args))
    model = _load_model(args, device)
    share = sum(len(paths[k * args.shard_size:(k + 1) * args.shard_size])
                for k in range(rank, -(-len(paths) // args.shard_size), world))
    with tqdm(total=share, unit="video", file=sys.stderr, disable=None if rank == 0 else True) as bar:
        summary = embed_shards(model, paths, args.out_dir, shard_size=args.shard_size, batch_size=args.batch_size,
                               workers=args.workers, keep_ratio=args.keep_ratio, budget_mass=args.budget_mass,
                               budget_temperature=args.budget_temperature,
                               with_selection=args.with_selection, selector=args.selector,
                               device=device, rank=rank, world=world, progress=bar.update,
                               log=lambda line: bar.write(f"{PROG} embed: {line}", file=sys.stderr))
    print(f"rank {rank}: {summary['shards']} shards ({summary['shards_skipped']} already done), embedded "
          f"{summary['embedded']} videos in {summary['seconds']:.1f} s ({summary['videos_per_s']:.2f} videos/s)"
          + (f", {summary['failed']} unreadable (see *.failed.tsv)" if summary["failed"] else "")
          + f"; shards in {args.out_dir}")
    return 1 if summary["failed"] else 0


# show -----------------------------------------------------------------------
def selection_picture(clip: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
                      config: ModelConfig) -> np.ndarray:
    """RGB picture (uint8 ``[H, W, 3]``): on the left the clip's frames in a
    grid of ``cols = ceil(sqrt(T))`` columns, the selected patches at full
    brightness and the rest dimmed; on the right, after ``GAP`` white
    columns, the selector's scores (bilinearly upsampled to the extractor's
    grid) as a heat-map in the same grid. ``H = rows * S``,
    ``W = 2 * cols * S + GAP`` for ``S``-pixel frames."""
    from matplotlib import colormaps

    from lookwhen.selector import frame_scores
    from lookwhen_kernels import upsample_scores

    frames, height, width, _ = clip.shape
    _, grid_h, grid_w = config.grid
    patch = config.patch_size
    selected = torch.zeros(frames * grid_h * grid_w, dtype=torch.bool)
    selected[indices.reshape(-1).long()] = True
    keep = selected.view(frames, grid_h, grid_w).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    shaded = clip.float() * torch.where(keep, 1.0, DIM)[..., None]

    per_frame = frame_scores(scores.float()[None], config)
    fine = upsample_scores(per_frame, config.score_grid, config.grid).view(frames, grid_h, grid_w)
    span = (fine.max() - fine.min()).clamp(min=1e-12)
    level = ((fine - fine.min()) / span).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    heat = torch.from_numpy(colormaps["inferno"](level.numpy())[..., :3]).float() * 255

    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    panel_w = cols * width
    picture = np.full((rows * height, 2 * panel_w + GAP, 3), 255, dtype=np.uint8)
    for t in range(frames):
        top, left = (t // cols) * height, (t % cols) * width
        picture[top: top + height, left: left + width] = shaded[t].round().byte().numpy()
        left += panel_w + GAP
        picture[top: top + height, left: left + width] = heat[t].round().byte().numpy()
    return picture


def cmd_show(args) -> int:
    from PIL import Image

    from lookwhen.video import read_clip

    _check_output(args.out, (".png",))
    device = _device(args.device)
    cfg = _model_config(args)
    if cfg.kind != "lookwhen":
        raise CommandError(f"{cfg.name} is a dense model; it selects nothing to show")
    clip = read_clip(args.video, cfg.frames, cfg.image_size)
    model = _load_model(args, device)
    out = _forward(model, clip[None].to(device), args.keep_ratio)
    picture = selection_picture(clip, out.indices[0].cpu(), out.scores[0].cpu(), cfg)
    Image.fromarray(picture).save(args.out)
    kept = out.indices.shape[-1]
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]}): {kept} of {cfg.n_tokens} tokens selected")
    return 0


# info -----------------------------------------------------------------------
def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def cmd_info(args) -> int:
    from lookwhen import build_model
    from lookwhen.flops import count_flops, gmacs
    from lookwhen.model import LookWhen
    from lookwhen_kernels import keep_ratio_to_k

    generator = torch.Generator().manual_seed(0)
    names = [args.preset] + ([BASELINE_PRESET] if args.preset != BASELINE_PRESET else [])
    rows, flops = [], {}
    for name in names:
        model = build_model(name).eval()
        cfg = model.config
        clip = torch.randint(0, 256, (1, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                             generator=generator)
        if isinstance(model, LookWhen):
            ratio = cfg.keep_ratio if args.keep_ratio is None else args.keep_ratio
            kept = keep_ratio_to_k(ratio, cfg.n_tokens)
            flops[name] = count_flops(model, clip, keep_ratio=ratio)
            params = (f"{_millions(model):.1f}M (selector {_millions(model.selector):.1f}M, "
                      f"extractor {_millions(model.extractor):.1f}M)")
            tokens = f"{cfg.n_tokens} (selector {cfg.n_selector_tokens})"
            kept_text = f"{kept} ({ratio:g}) + {cfg.n_context} context"
        else:
            flops[name] = count_flops(model, clip)
            params = f"{_millions(model):.1f}M"
            tokens = f"{cfg.n_tokens} + CLS"
            kept_text = "all"
        rows.append((name, params, tokens, kept_text, f"{flops[name] / 1e9:.1f}", f"{gmacs(flops[name]):.1f}"))
    header = ("model", "parameters", "tokens in", "tokens kept", "GFLOPs/clip", "GMACs/clip")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if len(names) == 2:
        print(f"FLOPs ratio {BASELINE_PRESET} / {args.preset}: {flops[BASELINE_PRESET] / flops[args.preset]:.2f}x")
    return 0


# entry point ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LookWhen video embeddings: select tokens, then compute only those.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_options(p, allow_dense=True):
        presets = list(PRESETS) if allow_dense else [n for n, c in PRESETS.items() if c.kind == "lookwhen"]
        group = p.add_mutually_exclusive_group()
        group.add_argument("--preset", default=DEFAULT_PRESET, choices=presets, help="model preset (random weights)")
        group.add_argument("--checkpoint", help="a safetensors checkpoint saved by lookwhen.checkpoint")
        p.add_argument("--keep-ratio", type=keep_ratio_arg, default=None,
                       help="fraction of tokens the extractor keeps (default: the model's)")
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")

    embed = sub.add_parser("embed", help="write video embeddings (.npy, or .safetensors with the selection); "
                                         "--manifest: a collection of any size, in resumable shards")
    embed.add_argument("videos", nargs="*", metavar="VIDEO")
    model_options(embed)
    embed.add_argument("--batch-size", type=positive_int_arg, default=4)
    embed.add_argument("--out", help="FILE.npy (embeddings) or FILE.safetensors (+ indices, scores)")
    embed.add_argument("--manifest", help="a file of video paths (one per line; 'path,label' lines too)")
    embed.add_argument("--root", help="folder the manifest's paths are relative to (default: the manifest's)")
    embed.add_argument("--out-dir", help="with --manifest: folder of shard-NNNNN.safetensors files")
    embed.add_argument("--shard-size", type=positive_int_arg, default=1000, help="videos per shard")
    embed.add_argument("--with-selection", action="store_true", help="store the selected ids and scores too")
    embed.add_argument("--budget-mass", type=keep_ratio_arg, default=None, metavar="MASS",
                       help="per-clip budgets: the fewest tokens holding MASS of the softmax of the scores "
                            "(fewer for concentrated clips; ids then packed, with their budgets)")
    embed.add_argument("--budget-temperature", type=positive_float_arg, default=1.0, metavar="T",
                       help="--budget-mass: the softmax's temperature (below 1 sharpens it, for a selector whose "
                            "scores are too flat to put MASS on its objects; default 1)")
    embed.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    embed.add_argument("--selector", choices=("learned", "motion"), default="learned",
                       help="learned: the model's selector; motion: the fastest-moving tokens by the decoder's "
                            "motion vectors (no selector network runs; videos without vectors are skipped)")
    embed.set_defaults(func=cmd_embed)

    show = sub.add_parser("show", help="draw the selected patches and the score heat-map")
    show.add_argument("video", metavar="VIDEO")
    model_options(show, allow_dense=False)
    show.add_argument("--out", required=True, help="FILE.png")
    show.set_defaults(func=cmd_show)

    info = sub.add_parser("info", help="parameters, tokens and GFLOPs per clip, against the dense baseline")
    info.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS))
    info.add_argument("--keep-ratio", type=keep_ratio_arg, default=None)
    info.set_defaults(func=cmd_info)

    from lookwhen import cli_train

    cli_train.add_parsers(sub, positive_int_arg, keep_ratio_arg)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "embed" and not args.videos and not args.manifest:
        # VIDEO is optional for argparse only because --manifest can replace it.
        parser.exit(EXIT_USAGE, f"{PROG} embed: error: the following arguments are required: VIDEO "
                                "(or --manifest FILE)\n")
    try:
        return args.func(args)
    except (CommandError, ValueError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
