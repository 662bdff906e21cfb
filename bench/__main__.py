"""``python -m bench <subcommand>`` (installed as ``lookwhen-bench``).

Subcommands: ``e2e`` (LookWhen against the dense baseline), ``ops`` (every
fused op against the eager composition it replaces), ``roofline`` (floor
times on named GPUs), ``inspect`` (static sm_90/sm_80 compile report),
``pipeline`` (video file to embedding), ``train`` (pre-training: learning on synthetic clips, training throughput), ``seeds``
(the seed methods' selections on synthetic clips), ``pareto`` (every method's accuracy against its compute). Each
prints an aligned table and can write ``--json``, ``--csv`` and ``--plot``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

from . import BenchError, compile_report, e2e, ops, pipeline, report, roofline
from .experiments import pareto, seeds, train
from .timing import retain_freed_memory
from lookwhen.cli.args import positive_int_arg

PLOT_FORMATS = (".png", ".pdf", ".svg")


class _Parser(argparse.ArgumentParser):
    """argparse prints usage and exits; we want one line through ``main``."""

    def error(self, message):
        raise BenchError(f"{self.prog}: {message}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=positive_int_arg, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--json", metavar="FILE", help="write every number, the device, versions and git commit")
    parser.add_argument("--csv", metavar="FILE",
                        help="long-format rows: kernel, provider, mode, metric, x, median, q20, q80, device, version")
    parser.add_argument("--plot", metavar="FILE.png", help="write a plot (png, pdf or svg)")


def _timing_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--malloc", choices=("retain", "system"), default="retain",
                        help="CPU: retain (default) keeps freed memory in the process (glibc mallopt), as jemalloc "
                             "or tcmalloc would, instead of page-faulting large temporaries back in on every call; "
                             "system keeps the C library's defaults")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="auto: bf16 on CUDA; on CPU bf16 for e2e where the CPU has bf16 matrix units (AMX, "
                        "AVX512-BF16), else fp32")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every model, e.g. --set frames=4 depth=2")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timings")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bench", description="Benchmarks of lookwhen-kernels. Each subcommand prints an "
                     "aligned table and can write --json, --csv and --plot files.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{e2e,pipeline,ops,roofline,inspect,train,seeds,pareto}")
    for name, module, help_text in (
        ("e2e", e2e, "LookWhen vs the dense baseline, RLT, motion selection and low resolution: tokens, "
                    "GFLOPs, GMACs, clips/s, speedup, efficiency, time split"),
        ("pipeline", pipeline, "from video file to embedding: decoders, the time split of a clip (open, seek, "
                               "decode, resize, copy, model), serial and overlapped, speedup from files"),
        ("ops", ops, "each fused op vs the eager PyTorch composition it replaces"),
        ("roofline", roofline, "floor time of each op and both models on named GPUs"),
        ("inspect", compile_report, "static compile report: registers, spills, shared memory, tensor cores"),
        ("train", train, "pre-training: selector recall on synthetic clips, training-step throughput vs dense"),
        ("pareto", pareto, "accuracy against GFLOPs and clips/s: every method trained alike on a task where the "
                           "choice of tokens decides accuracy, the frontier marked"),
        ("seeds", seeds, "the seed methods' selections on synthetic clips: perturbed top-K fine-tuning, windows, "
                         "budgets"),
    ):
        command = sub.add_parser(name, help=help_text, description=help_text)
        _common(command)
        if name != "inspect":
            _model_args(command)
            _timing_args(command)
        module.add_arguments(command)
        command.set_defaults(module=module)
    return parser


def _check_output(option: str, path: Optional[str]) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BenchError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BenchError(f"{option} {path}: folder {folder} is not writable")
    if option == "--plot" and os.path.splitext(path)[1].lower() not in PLOT_FORMATS:
        raise BenchError(f"--plot {path}: expected a file ending in {', '.join(PLOT_FORMATS)}")


def _device(args):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _auto_dtype(command: str, device) -> Tuple[str, Optional[str]]:
    """``--dtype auto``: bf16 on CUDA, and for e2e on a CPU whose bf16 matrix
    units make it the faster type (there oneDNN runs bf16 products about 8x
    faster than float32 ones; without the units it emulates them, slower).
    The other commands train or compare ops in float32 on a CPU. Returns the
    type and, where the CPU decided it, the sentence that says why."""
    if device.type == "cuda":
        return "bf16", None
    if command != "e2e":
        return "fp32", None
    from lookwhen.models.cpu_inference import bf16_matrix_units

    units = bf16_matrix_units()
    if units:
        return "bf16", f"--dtype auto: bf16, the CPU has {', '.join(units)}"
    return "fp32", "--dtype auto: fp32, the CPU has no bf16 matrix units"


def run(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for option in ("json", "csv", "plot"):
        _check_output(f"--{option}", getattr(args, option))
    if args.threads:
        import torch  # here: --help must not wait for it

        torch.set_num_threads(args.threads)
    device = _device(args)
    dtype_note = None
    if getattr(args, "dtype", None) == "auto":
        args.dtype, dtype_note = _auto_dtype(args.command, device)
    if device.type == "cpu" and args.command != "inspect" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise BenchError("unset TRITON_INTERPRET: under Triton's interpreter the timings mean nothing")
    malloc = None
    if device.type == "cpu" and args.command != "inspect":
        malloc = "retain" if args.malloc == "retain" and retain_freed_memory() else "system"
        args.malloc = malloc
    result = args.module.run(args, device)
    # Said after the run, not before it: a bad option must stay a one-line error.
    if dtype_note:
        print(dtype_note, file=sys.stderr)
    print(result.table)
    env = report.environment(device)
    if dtype_note:
        env["dtype_auto"] = dtype_note
    if malloc:
        env["malloc"] = malloc
    command = ["python -m bench", *(sys.argv[1:] if argv is None else argv)]
    if args.json:
        report.write_json(args.json, result, env, command)
    if args.csv:
        report.write_csv(args.csv, result, env)
    if args.plot:
        report.write_plot(args.plot, result, env)
    return result.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return run(argv)
    except BenchError as exc:
        message = str(exc)
        print(message if message.startswith("python -m bench") else f"python -m bench: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
