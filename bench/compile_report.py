"""``python -m bench inspect``: the static compile report of
``lookwhen_kernels.inspect`` (every kernel built for sm_90 and sm_80: registers,
spills, shared memory, tensor-core instructions) in the bench's output formats."""
from __future__ import annotations

import os
from dataclasses import asdict

from tqdm import tqdm

from . import BenchError
from .report import Record, Result
from lookwhen_kernels import inspect as compile_inspect

METRICS = ("registers", "spill_bytes", "shared_bytes", "tensor_core_instructions")


def add_arguments(parser) -> None:
    parser.add_argument("--only", nargs="+", metavar="WORD", help="keep kernels whose name contains one of these words")


def run(args, device) -> Result:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise BenchError("inspect: unset TRITON_INTERPRET (the interpreter cannot compile for a GPU)")
    specs = compile_inspect.collect_specs(args.only)
    if not specs:
        raise BenchError("inspect: no kernel matched --only " + " ".join(args.only or []))
    jobs = [(spec, arch) for spec in specs for arch in spec.archs]
    rows = [compile_inspect.compile_one(spec, arch) for spec, arch in tqdm(jobs, desc="inspect", unit="build", leave=False)]
    failed = [r for r in rows if not r.ok]
    table = compile_inspect.format_table(rows) + f"\n\n{len(rows) - len(failed)} of {len(rows)} kernel builds ok"
    records = [Record(r.kernel, r.arch, "compile", metric, "", getattr(r, metric))
               for r in rows for metric in METRICS if getattr(r, metric) is not None]
    payload = [asdict(r) | {"ok": r.ok} for r in rows]
    return Result("inspect", table, payload, records, plot=lambda fig: _plot(fig, rows), exit_code=1 if failed else 0)


def _plot(figure, rows) -> None:
    archs = sorted({r.arch for r in rows})
    kernels = list(dict.fromkeys(r.kernel for r in rows))
    by_key = {(r.kernel, r.arch): r for r in rows}
    axes = figure.subplots(1, 2, sharey=True)
    height = 0.8 / len(archs)
    for metric, ax, label in ((lambda r: r.registers, axes[0], "registers per thread"),
                              (lambda r: r.shared_bytes / 1024, axes[1], "shared memory (KiB)")):
        for i, arch in enumerate(archs):
            values = [metric(by_key[(k, arch)]) if (k, arch) in by_key and by_key[(k, arch)].error is None else 0
                      for k in kernels]
            ax.barh([j + i * height for j in range(len(kernels))], values, height=height, label=arch)
        ax.set_xlabel(label)
    axes[0].set_yticks([j + 0.4 - height / 2 for j in range(len(kernels))], kernels, fontsize=6)
    axes[0].invert_yaxis()
    axes[0].axvline(255, color="red", linewidth=0.8)  # the per-thread register limit
    axes[1].legend(fontsize=7)
    figure.set_size_inches(9, max(3.0, 0.25 * len(kernels) + 1.5))
