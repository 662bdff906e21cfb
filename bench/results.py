"""Results pages: a bench ``--json`` document rendered as a markdown page.

``python -m bench.results docs/results/*.json`` writes ``<name>.md`` beside
each ``<name>.json``. The JSON stays the record and the page is derived from
it, so a published number can always be traced to the run, machine and
commit that produced it; regenerate the page rather than edit it.

Standard library only: rendering a page must not need torch, a GPU or the
package installed, only the document.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Keys every document carries (bench/report.py's ``environment``), shown in the
# header rather than as settings of the run.
HEADER_KEYS = ("command", "device", "versions", "git_commit", "date", "threads")
VERSION_ORDER = ("python", "torch", "triton", "cuda", "lookwhen_kernels")
SUBCOMMANDS = ("e2e", "pipeline", "ops", "roofline", "inspect", "train", "seeds", "pareto")

Column = Tuple[str, Callable[[Dict[str, Any]], Any]]


def _cell(value: Any) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(", ", ": "))
    else:
        text = str(value)
    # A pipe or a newline would end the markdown cell early.
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _table(entries: Sequence[Dict[str, Any]], columns: Sequence[Column]) -> str:
    return markdown_table([name for name, _ in columns], [[get(e) for _, get in columns] for e in entries])


def _formatted(key: str, render: Callable[[Any], str]) -> Callable[[Dict[str, Any]], Any]:
    """A column: the entry's ``key`` rendered, or ``None`` where it is missing."""
    def get(entry):
        value = entry.get(key)
        return None if value is None else render(value)
    return get


def _fixed(key: str, digits: int, suffix: str = "") -> Callable[[Dict[str, Any]], Any]:
    return _formatted(key, lambda value: f"{value:.{digits}f}{suffix}")


def _percent(key: str) -> Callable[[Dict[str, Any]], Any]:
    return _formatted(key, lambda value: f"{100 * value:.1f}%")


def _sig(key: str, digits: int = 4) -> Callable[[Dict[str, Any]], Any]:
    return _formatted(key, lambda value: f"{value:.{digits}g}")


def _ms(key: str) -> Callable[[Dict[str, Any]], Any]:
    return _formatted(key, lambda value: f"{value * 1e3:.3f}")


def command_line(command: Any) -> str:
    if isinstance(command, str):
        return command
    if not command:
        return "unknown"
    # The first element is the program as the bench names itself ("python -m
    # bench"), spaces included; only the arguments need shell quoting.
    return " ".join([str(command[0]), *(shlex.quote(str(a)) for a in command[1:])])


def subcommand(document: Dict[str, Any]) -> Optional[str]:
    """The key holding the bench's entries: the subcommand the run names,
    else a known subcommand's key, else the first list of objects."""
    command = document.get("command")
    if isinstance(command, list) and len(command) > 1 and isinstance(document.get(command[1]), list):
        return command[1]
    for name in SUBCOMMANDS:
        if isinstance(document.get(name), list):
            return name
    for key, value in document.items():
        if key not in HEADER_KEYS and _is_entries(value):
            return key
    return None


def _is_entries(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def header(document: Dict[str, Any], title: str, source: Optional[str]) -> List[str]:
    versions = document.get("versions") or {}
    ordered = [k for k in VERSION_ORDER if k in versions] + [k for k in versions if k not in VERSION_ORDER]
    rows = [
        ("date", document.get("date", "unknown")),
        ("device", document.get("device", "unknown")),
        ("threads", document.get("threads", "-")),
        ("versions", ", ".join(f"{k} {versions[k]}" for k in ordered) or "unknown"),
        ("git commit", f"`{document.get('git_commit', 'unknown')}`"),
        ("command", f"`{command_line(document.get('command'))}`"),
    ]
    lines = [f"# {title}", ""]
    if source:
        lines += [f"Generated from `{source}` by `python -m bench.results`: regenerate it rather than edit it.", ""]
    lines += [_key_value(rows), ""]
    return lines


def _key_value(rows: Sequence[Tuple[str, Any]]) -> str:
    # Markdown needs a header row; the run's facts read better as a list.
    return "\n".join(f"- **{key}**: {value}" for key, value in rows)


def _settings(document: Dict[str, Any], skip: Sequence[str]) -> List[str]:
    """Scalar top-level keys the page has not used elsewhere (batch, dtype...)."""
    items = [(k, v) for k, v in document.items()
             if k not in HEADER_KEYS and k not in skip and not isinstance(v, (dict, list)) and v not in ("", None)]
    if not items:
        return []
    return ["## Settings", "", _key_value(items), ""]


def _e2e(document: Dict[str, Any], entries: List[Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    lookwhen = (document.get("lookwhen") or {}).get("name", "LookWhen")
    baseline = document.get("baseline") or {}
    dense = baseline.get("name", "dense")
    lines = []
    methods = document.get("methods") or []
    if methods:
        lines += [
            "## Methods on the same clips", "",
            f"Clips/s are medians; speedup is over {dense}; efficiency = speedup / FLOPs ratio; "
            "noise is the spread of the pass medians.", "",
            _table(methods, [
                ("method", lambda e: e.get("method")),
                ("tokens", lambda e: None if e.get("tokens") is None else f"{e['tokens']:.0f}"),
                ("GFLOPs", _sig("gflops_per_clip")), ("GMACs", _sig("gmacs_per_clip")),
                ("clips/s", _fixed("clips_per_s", 3)), ("speedup", _fixed("speedup", 2, "x")),
                ("efficiency", _fixed("efficiency", 2)), ("noise", _percent("noise")),
                ("of GEMM", _percent("gemm_share")),
            ]), "",
        ]
    attention = baseline.get("attention")
    lines += [
        f"## {lookwhen} vs {dense}" + (f" (attention: {attention})" if attention else ""), "",
        "Selector, selection and extractor split LookWhen's time; noise is LookWhen's / the dense model's.", "",
        _table(entries, [
            ("keep", lambda e: f"{e['keep_ratio']:g}" if "keep_ratio" in e else None),
            ("K", lambda e: e.get("tokens_kept")),
            ("LookWhen clips/s", _fixed("lookwhen_clips_per_s", 3)),
            ("dense clips/s", _fixed("baseline_clips_per_s", 3)),
            ("speedup", _fixed("speedup", 2, "x")),
            ("LookWhen GFLOPs", _sig("lookwhen_gflops_per_clip")),
            ("dense GFLOPs", _sig("baseline_gflops_per_clip")),
            ("FLOPs ratio", _fixed("flops_ratio", 2, "x")),
            ("efficiency", _fixed("efficiency", 2)),
            ("selector", _percent("selector_fraction")),
            ("selection", _percent("selection_fraction")),
            ("extractor", _percent("extractor_fraction")),
            ("noise LW / dense", lambda e: f"{_percent('lookwhen_noise')(e)} / {_percent('baseline_noise')(e)}"),
            ("of GEMM LW / dense", lambda e: None if "lookwhen_gemm_share" not in e else
             f"{_percent('lookwhen_gemm_share')(e)} / {_percent('baseline_gemm_share')(e)}"),
            ("cosine vs fp32 LW / dense", lambda e: None if "lookwhen_cosine" not in e else
             f"{min(e['lookwhen_cosine']):.5f} / {min(e['baseline_cosine']):.5f}"),
            ("top-K overlap", lambda e: None if "topk_overlap" not in e else f"{min(e['topk_overlap']):.3f}"),
            ("cosine LW at fp32's top-K", lambda e: None if "lookwhen_cosine_same_topk" not in e else
             f"{min(e['lookwhen_cosine_same_topk']):.5f}"),
        ]), "",
    ]
    gemm = document.get("calibration_gemm")
    if gemm:
        lines += [f"Of GEMM: each model's FLOP/s as a share of the {gemm['shape']}'s "
                  f"{gemm['gflop_per_s']:.0f} GFLOP/s in the same run; cosine and top-K overlap: the worst clip "
                  "of the first batch against float32; at fp32's top-K: LookWhen given float32's selection, "
                  "so only the arithmetic differs.", ""]
    models = [(key, document[key]) for key in ("lookwhen", "baseline") if isinstance(document.get(key), dict)]
    if models:
        lines += ["## Models", "", _key_value([(cfg.get("name", key), _model_line(cfg)) for key, cfg in models]), ""]
    return lines, ["methods", "lookwhen", "baseline", "calibration_gemm"]


def _model_line(cfg: Dict[str, Any]) -> str:
    # The full config is in the JSON; the page names what decides the cost.
    parts = [f"{cfg.get('frames', '?')} frames at {cfg.get('image_size', '?')} px",
             f"patch {cfg.get('patch_size', '?')}", f"width {cfg.get('width', '?')}", f"depth {cfg.get('depth', '?')}"]
    if cfg.get("kind") == "lookwhen":
        parts.append(f"selector {cfg.get('selector_depth', '?')} x {cfg.get('selector_width', '?')} wide")
    if cfg.get("attention"):
        parts.append(f"attention {cfg['attention']}")
    return ", ".join(parts)


def _pipeline(document: Dict[str, Any], entries: List[Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    lines = []
    decode = document.get("decode") or []
    if decode:
        lines += [
            "## Decoding one sampled clip", "",
            f"Source: {document.get('source', '?')}. Medians of the interleaved passes; 'read_clip before' is the "
            "previous release's read_clip (decord with its default threads, then a float32 resize); 'motion "
            "vectors' decodes every frame for the motion selector.", "",
            _table(decode, [
                ("video", lambda e: e.get("video")), ("method", lambda e: e.get("method")),
                ("ms per clip", _ms("seconds_per_clip")), ("CPU ms per clip", _ms("cpu_seconds_per_clip")),
                ("open+seek ms", lambda e: None if e.get("open") is None or e["method"] in ("read_clip before",
                 "motion vectors") else f"{1e3 * (e['open'] + e['seek']):.1f}"),
                ("decode ms", lambda e: None if e["method"] in ("read_clip before", "motion vectors")
                 else f"{1e3 * e['decode']:.1f}"),
                ("resize ms", lambda e: None if e["method"] in ("read_clip before", "motion vectors")
                 else f"{1e3 * e['resize']:.1f}"),
                ("frames decoded", lambda e: e.get("frames_decoded") or None),
                ("vs before", _fixed("speedup_over_previous_read_clip", 2, "x")),
                ("CPU vs before", _fixed("cpu_saving_over_previous_read_clip", 2, "x")),
            ]), "",
        ]
    lines += [
        "## From file to embedding", "",
        f"Decoder {document.get('decoder', '?')}, {document.get('decode_workers', '?')} decoding worker(s), the model "
        f"on {document.get('model_threads', '?')} thread(s), batch {document.get('batch', '?')}. Serial: decode "
        "then model in one process; overlapped: decoding in the workers while the model runs. Speedups are over "
        "the dense model (the last row).", "",
        _table(entries, [
            ("model", lambda e: e.get("model")), ("model ms", _ms("model_seconds_per_clip")),
            ("decode share", _percent("decode_share")), ("serial ms", _ms("serial_seconds_per_clip")),
            ("overlapped ms", _ms("overlapped_seconds_per_clip")),
            ("overlapped / max(decode, model)", _fixed("overlapped_over_floor", 2)),
            ("videos/s", _fixed("videos_per_s_overlapped", 2)),
            ("speedup decoded", _fixed("speedup_decoded", 2, "x")),
            ("speedup serial", _fixed("speedup_serial", 2, "x")),
            ("speedup overlapped", _fixed("speedup_overlapped", 2, "x")),
            ("share of decoded speedup", _percent("overlapped_share_of_decoded_speedup")),
        ]), "",
    ]
    return lines, ["decode", "source"]


def _ops(document: Dict[str, Any], entries: List[Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    return [
        "## Fused op vs the eager composition it replaces", "",
        "Fused speedup = the provider's median time / the fused op's (`-` on the fused op's own row).", "",
        _table(entries, [
            ("kernel", lambda e: e.get("kernel")),
            ("shape", lambda e: " ".join(str(e[k]) for k in ("model", "shape") if e.get(k))),
            ("mode", lambda e: e.get("mode")), ("provider", lambda e: e.get("provider")),
            ("median ms", _ms("median_s")),
            ("q20-q80 ms", lambda e: None if e.get("q20_s") is None else f"{e['q20_s'] * 1e3:.3f}-{e['q80_s'] * 1e3:.3f}"),
            ("noise", _percent("noise")),
            ("peak MiB", lambda e: None if e.get("peak_bytes") is None else f"{e['peak_bytes'] / 2**20:.1f}"),
            ("fused speedup", _fixed("fused_speedup", 2, "x")),
        ]), "",
    ], []


def generic_table(entries: Sequence[Dict[str, Any]]) -> str:
    """Every key any entry has, in first-seen order, as a column."""
    keys: List[str] = []
    for entry in entries:
        keys += [k for k in entry if k not in keys]
    return markdown_table(keys, [[entry.get(k) for k in keys] for entry in entries])


def _generic(name: str, entries: List[Dict[str, Any]]) -> List[str]:
    # Entries of different kinds (bench train's and seeds' "part") get a table each.
    parts: Dict[Any, List[Dict[str, Any]]] = {}
    for entry in entries:
        parts.setdefault(entry.get("part"), []).append(entry)
    lines = []
    for part, rows in parts.items():
        lines += [f"## {name}" + (f": {part}" if part is not None else ""), "", generic_table(rows), ""]
    return lines


def _selector_checks(checks: List[Dict[str, Any]]) -> List[str]:
    if not checks:
        return []
    return [
        "## Where the selector looks", "",
        "Share of the moving square's windows among as many of the best-ranked windows, on held-out clips: by "
        "the pre-training target (the image teacher's uniqueness), by the pre-trained selector, by chance.", "",
        _table(checks, [
            ("seed", lambda e: e.get("seed")), ("pre-training steps", lambda e: e.get("pretrain_steps")),
            ("clips", lambda e: e.get("clips")), ("uniqueness target", _percent("teacher_recall")),
            ("selector", _percent("selector_recall")), ("chance", _percent("chance")),
        ]), "",
    ]


def _pareto(document: Dict[str, Any], entries: List[Dict[str, Any]]) -> Tuple[List[str], List[str]]:
    settings = document.get("settings") or {}
    points = sorted(document.get("points") or [], key=lambda p: p.get("gflops", 0))
    keep = lambda e: "-" if e.get("keep_ratio") is None else e["keep_ratio"]  # noqa: E731
    return [
        "## Accuracy against compute", "",
        f"Held-out accuracy ({settings.get('val_clips', '?')} clips) after {settings.get('steps', '?')} fine-tuning "
        f"steps of {settings.get('batch', '?')} fresh clips; mean and half the range over the seeds each point "
        f"trained with (headline points: {settings.get('seeds', '?')}). Inference GFLOPs per clip and clips/s "
        "measured in the same process. Frontier: no other point is both more accurate and cheaper.", "",
        _table(points, [
            ("method", lambda e: e.get("method")), ("keep", keep),
            ("accuracy", lambda e: f"{100 * e['accuracy']:.1f}% ± {100 * e.get('spread', 0):.1f}"),
            ("seeds", lambda e: e.get("seeds")), ("tokens/clip", _fixed("tokens", 0)),
            ("GFLOPs/clip", _fixed("gflops", 3)),
            ("clips/s", _fixed("clips_per_s", 1)), ("frontier", lambda e: "yes" if e.get("frontier") else ""),
        ]), "",
        *_selector_checks(document.get("selector_checks") or []),
        "## Every run", "",
        _table(entries, [
            ("method", lambda e: e.get("method")), ("keep", keep), ("seed", lambda e: e.get("seed")),
            ("accuracy", _percent("accuracy")), ("fine-tune s", _fixed("train_seconds", 0)),
            ("pre-train s", lambda e: f"{e['pretrain_seconds']:.0f}" if e.get("pretrain_seconds") else None),
        ]), "",
    ], ["points", "selector_checks"]


RENDERERS = {"e2e": _e2e, "pipeline": _pipeline, "ops": _ops, "pareto": _pareto}


def render(document: Dict[str, Any], source: Optional[str] = None) -> str:
    name = subcommand(document)
    device = str(document.get("device", "unknown device"))
    title = f"bench {name or 'results'}: {device.split(': ', 1)[-1]}, {str(document.get('date', ''))[:10]}".rstrip(", ")
    lines = header(document, title, source)
    used: List[str] = [name] if name else []
    entries = document.get(name) if name else None
    if name in RENDERERS and isinstance(entries, list):
        body, more = RENDERERS[name](document, entries)
        lines += body
        used += more
    elif _is_entries(entries):
        lines += _generic(name, entries)
    # Any other list of entries the document holds (roofline's "gpus") is data too.
    for key, value in document.items():
        if key not in HEADER_KEYS and key not in used and _is_entries(value):
            lines += [f"## {key}", "", generic_table(value), ""]
            used.append(key)
    lines += _settings(document, used)
    return "\n".join(lines).rstrip("\n") + "\n"


def page_path(json_path: str, out_dir: Optional[str]) -> str:
    stem = os.path.splitext(os.path.basename(json_path))[0]
    return os.path.join(out_dir or os.path.dirname(json_path) or ".", stem + ".md")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.results",
                                     description="Render bench --json documents as markdown pages (<name>.md).")
    parser.add_argument("documents", nargs="+", metavar="FILE.json")
    parser.add_argument("--out-dir", help="where to write the pages (default: beside each document)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.documents:
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except (OSError, ValueError) as error:
            print(f"{path}: {error}", file=sys.stderr)
            status = 1
            continue
        if not isinstance(document, dict):
            print(f"{path}: not a bench --json document (expected an object)", file=sys.stderr)
            status = 1
            continue
        out = page_path(path, args.out_dir)
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(render(document, source=os.path.basename(path)))
        print(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
