"""The ``lookwhen`` command: ``embed``, ``show`` and ``info``; the training
verbs (``pretrain``, ``finetune``, ``evaluate``, ``cache-targets``) live in
:mod:`lookwhen.cli.train`. Parsing and printing only: the work is done by
the library.

Every failure caused by the input (a bad argument, an unreadable video or
checkpoint, an unwritable output) ends with one line on stderr and a non-zero
exit status, never a traceback. ``embed`` over many files reports each bad
file, still writes the embeddings of the others, and exits with status 1.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, List, Optional

from lookwhen.cli import train as cli_train
from lookwhen.cli.args import (
    EXIT_USAGE,
    CommandError,
    Parser,
    checked_device,
    decoder_arg,
    keep_ratio_arg,
    positive_float_arg,
    positive_int_arg,
)
from lookwhen.models.config import DEFAULT_PRESET, PRESETS, ModelConfig, get_config

if TYPE_CHECKING:
    import torch

    from lookwhen.models.selection import Selection

# The networks, the video decoding and the training engine are imported by
# the commands that use them, not here: ``lookwhen --help`` (and a usage
# error) should not wait for timm, the kernels and torch's compiler
# (tests/test_cli.py::test_help_imports_no_heavy_modules).

PROG = "lookwhen"


def _option(field: str) -> str:
    """A Selection field as the option that sets it, in error messages."""
    return {"motion": "--selector motion"}.get(field, "--" + field.replace("_", "-"))


def _selection(args, config: ModelConfig) -> Selection:
    """What the options ask the model to select, checked against the model
    (a dense model keeps every token)."""
    from lookwhen.models.selection import Selection

    motion = getattr(args, "selector", "learned") == "motion"
    selection = Selection(keep_ratio=args.keep_ratio, budget_mass=getattr(args, "budget_mass", None),
                          budget_temperature=getattr(args, "budget_temperature", 1.0), motion=motion, spell=_option)
    selection.check_model(config)
    return selection


def _model_config(args) -> ModelConfig:
    """The config of the model the command will run, without building it
    (so bad input is reported before the slow part)."""
    if args.checkpoint:
        from lookwhen.io.checkpoint import read_config

        return read_config(args.checkpoint)
    return get_config(args.preset)


def _load_model(args, device: "torch.device") -> "torch.nn.Module":
    from lookwhen.io.checkpoint import load_checkpoint
    from lookwhen.models import build_model
    from lookwhen.models.cpu_inference import prepack_linears

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


# embed ----------------------------------------------------------------------
def cmd_embed(args) -> int:
    from tqdm import tqdm

    from lookwhen.training.embed import FILE_SUFFIXES, embed_files, write_embeddings

    if args.manifest:
        return _embed_manifest(args)
    if not args.out:
        raise CommandError("--out: needed with VIDEO files (or use --manifest and --out-dir)")
    _check_output(args.out, FILE_SUFFIXES)
    device = checked_device(args.device)
    selection = _selection(args, _model_config(args))
    model = _load_model(args, device)
    # disable=None: a bar only on a terminal.
    quiet = True if len(args.videos) < 2 else None
    with tqdm(total=len(args.videos), unit="video", disable=quiet, file=sys.stderr) as bar:
        embedded, done, failures = embed_files(
            model, args.videos, selection=selection, batch_size=args.batch_size, workers=args.workers,
            decoder=args.decoder, device=device,
            skipped=lambda path, message: bar.write(f"{PROG} embed: skipped {message}", file=sys.stderr),
            progress=bar.update)
    if not done:
        raise CommandError(f"none of the {len(args.videos)} videos could be read; nothing written")
    write_embeddings(args.out, embedded, model.config, done, failures, budgets=args.budget_mass is not None)
    print(f"wrote {len(done)} embeddings of size {model.config.width} to {args.out}"
          + (f" ({len(failures)} videos skipped)" if failures else ""))
    return 1 if failures else 0


def _embed_manifest(args) -> int:
    """``embed --manifest``: shards under ``--out-dir``
    (:mod:`lookwhen.training.embed`); under torchrun each rank embeds its
    own shards."""
    from tqdm import tqdm

    from lookwhen.data.datasets import read_manifest
    from lookwhen.training.distributed import local_device, rank_and_world
    from lookwhen.training.embed import embed_shards, rank_share

    if args.videos or args.out:
        raise CommandError("--manifest: give --out-dir, not VIDEO files or --out")
    if not args.out_dir:
        raise CommandError("--manifest needs --out-dir (the folder of shards)")
    paths = [entry.path for entry in read_manifest(args.manifest, args.root, labels=False).entries]
    device = local_device(checked_device(args.device))
    rank, world = rank_and_world()
    selection = _selection(args, _model_config(args))
    model = _load_model(args, device)
    share = rank_share(paths, args.shard_size, rank, world)
    with tqdm(total=share, unit="video", file=sys.stderr, disable=None if rank == 0 else True) as bar:
        summary = embed_shards(model, paths, args.out_dir, shard_size=args.shard_size, batch_size=args.batch_size,
                               workers=args.workers, selection=selection, with_selection=args.with_selection,
                               device=device, rank=rank, world=world, decoder=args.decoder, progress=bar.update,
                               log=lambda line: bar.write(f"{PROG} embed: {line}", file=sys.stderr))
    print(f"rank {rank}: {summary['shards']} shards ({summary['shards_skipped']} already done), embedded "
          f"{summary['embedded']} videos in {summary['seconds']:.1f} s ({summary['videos_per_s']:.2f} videos/s)"
          + (f", {summary['failed']} unreadable (see *.failed.tsv)" if summary["failed"] else "")
          + f"; shards in {args.out_dir}")
    return 1 if summary["failed"] else 0


# show -----------------------------------------------------------------------
def cmd_show(args) -> int:
    # PIL (the video extra) only to write the PNG.
    from PIL import Image

    from lookwhen.data.video import read_clip
    from lookwhen.models.picture import selection_picture
    from lookwhen.training.embed import embed_batch

    _check_output(args.out, (".png",))
    device = checked_device(args.device)
    cfg = _model_config(args)
    if cfg.kind != "lookwhen":
        raise CommandError(f"{cfg.name} is a dense model; it selects nothing to show")
    selection = _selection(args, cfg)
    clip = read_clip(args.video, cfg.frames, cfg.image_size)
    model = _load_model(args, device)
    out = embed_batch(model, clip[None].to(device), selection)
    picture = selection_picture(clip, out.indices[0].cpu(), out.scores[0].cpu(), cfg)
    Image.fromarray(picture).save(args.out)
    kept = out.indices.shape[-1]
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]}): {kept} of {cfg.n_tokens} tokens selected")
    return 0


# info -----------------------------------------------------------------------
def cmd_info(args) -> int:
    from lookwhen.models.costs import cost_table

    rows = cost_table(args.preset, args.keep_ratio)
    header = ("model", "parameters", "tokens in", "tokens kept", "GFLOPs/clip", "GMACs/clip")
    cells = [(r.name, r.parameters, r.tokens_in, r.tokens_kept, f"{r.gflops:.1f}", f"{r.gmacs:.1f}") for r in rows]
    widths = [max(len(r[i]) for r in cells + [header]) for i in range(len(header))]
    for row in [header] + cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if len(rows) == 2:
        model, baseline = rows
        print(f"FLOPs ratio {baseline.name} / {model.name}: {baseline.flops / model.flops:.2f}x")
    return 0


# entry point ------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="LookWhen video embeddings: select tokens, then compute only those.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def model_options(p, allow_dense=True):
        presets = list(PRESETS) if allow_dense else [n for n, c in PRESETS.items() if c.kind == "lookwhen"]
        group = p.add_mutually_exclusive_group()
        group.add_argument("--preset", default=DEFAULT_PRESET, choices=presets, help="model preset (random weights)")
        group.add_argument("--checkpoint", help="a safetensors checkpoint saved by lookwhen.io.checkpoint")
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
    decoder_arg(embed)
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

    cli_train.add_parsers(sub)
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
    except Exception as error:
        # The engine's Terminated (imported only by the commands that train:
        # if the engine is not loaded, it was not raised). The engine has
        # logged where it saved.
        engine = sys.modules.get("lookwhen.training.engine")
        if engine is not None and isinstance(error, engine.Terminated):
            return 128 + signal.SIGTERM
        raise


if __name__ == "__main__":
    sys.exit(main())
