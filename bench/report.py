"""Output of every subcommand: aligned table, JSON, long-format CSV, plot.

A subcommand produces a :class:`Result`: its table, the JSON payload (under a
top-level key named after the subcommand) and the CSV records. The environment
(device, versions, git commit) is added here, once, to every file.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import triton

import lookwhen_kernels

CSV_FIELDS = ("kernel", "provider", "mode", "metric", "x", "median", "q20", "q80", "device", "version")


@dataclass
class Record:
    """One CSV row: a number (with its 20/80 % quantiles when it was timed)."""

    kernel: str
    provider: str
    mode: str
    metric: str
    x: Any
    median: float
    q20: Optional[float] = None
    q80: Optional[float] = None


@dataclass
class Result:
    name: str
    table: str
    payload: List[Dict[str, Any]]
    records: List[Record]
    plot: Optional[Callable[[Any], None]] = None  # draws on a matplotlib Figure
    extra: Dict[str, Any] = field(default_factory=dict)  # more top-level JSON keys
    exit_code: int = 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads"


def versions() -> Dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "lookwhen_kernels": lookwhen_kernels.__version__,
        "cuda": torch.version.cuda or "none",
    }


def git_commit() -> str:
    """HEAD of the checkout the bench runs from, ``+dirty`` with local edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment(device: torch.device) -> Dict[str, Any]:
    return {
        "device": device_string(device),
        "versions": versions(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: Optional[str] = None) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(header))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return text in ("-", "")
    return True


def write_json(path: str, result: Result, env: Dict[str, Any], command: Sequence[str]) -> None:
    document = {"command": list(command), **env, **result.extra, result.name: result.payload}
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")


def write_csv(path: str, result: Result, env: Dict[str, Any]) -> None:
    version = f"{env['versions']['lookwhen_kernels']}+{env['git_commit'][:12]}"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in result.records:
            writer.writerow({
                "kernel": r.kernel, "provider": r.provider, "mode": r.mode, "metric": r.metric, "x": r.x,
                "median": r.median, "q20": "" if r.q20 is None else r.q20, "q80": "" if r.q80 is None else r.q80,
                "device": env["device"], "version": version,
            })


def write_plot(path: str, result: Result, env: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5.5), layout="constrained")
    result.plot(figure)
    figure.suptitle(f"{result.name} - {env['device']} - {env['date'][:10]}", fontsize=9)
    figure.savefig(path, dpi=120)
