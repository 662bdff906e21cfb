"""``python -m bench e2e``: LookWhen against the dense baseline, end to end.

Both models are randomly initialised (throughput does not depend on the
weights) and run in one process on the same device, threads and dtype, in
inference mode. For each keep ratio: clips/s of each, the measured speedup,
the FLOPs of each (``torch.utils.flop_counter``) and their ratio, and
efficiency = speedup / FLOPs ratio (the FLOPs ratio is what selection could
give if its own work were free). A separate run with the model's stage timer
splits LookWhen's time into selector, selection path and extractor. On
CPU both models get the same set-up: oneDNN linear layers with prepacked
weights (``--cpu-linear``) and freed memory kept in the process
(``--malloc``, applied by ``bench.__main__``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from tqdm import tqdm

import lookwhen
from bench import BenchError
from bench.configs import DTYPES, autocast, parse_overrides, resolve
from bench.report import Record, Result, format_table
from bench.timing import StageTimer, Stats, rotating, sample, synchronize
from lookwhen.cpu_inference import onednn_available, prepack_linears
from lookwhen_kernels.ops.topk_tokens import keep_ratio_to_k

STAGES = ("selector", "selection", "extractor")


def add_arguments(parser) -> None:
    from bench.__main__ import positive_float
    from lookwhen.cli import keep_ratio_arg as keep_ratio, positive_int_arg as positive_int

    parser.add_argument("--keep-ratio", nargs="+", type=keep_ratio, default=[0.05, 0.1, 0.2, 0.3],
                        help="keep ratios to sweep (default: 0.05 0.1 0.2 0.3)")
    parser.add_argument("--batch", type=positive_int, help="clips per forward (default: 2 on CPU, 16 on CUDA)")
    parser.add_argument("--lookwhen", default="lookwhen-b16", metavar="PRESET", help="default: lookwhen-b16")
    parser.add_argument("--baseline", default="internvideo2-b14", metavar="PRESET", help="default: internvideo2-b14")
    parser.add_argument("--attention", choices=("kernels", "sdpa"), default="kernels",
                        help="the baseline's attention: lookwhen_kernels.varlen_attention like LookWhen's "
                             "extractor (default), or PyTorch's scaled_dot_product_attention")
    parser.add_argument("--min-run-time", type=positive_float,
                        help="seconds per timing on CPU (default: 0.5, --quick 0.2), at least one call")
    parser.add_argument("--passes", type=positive_int,
                        help="times every model is measured, interleaved (default: 6, --quick 2); "
                             "the median pass counts, their spread is the noise band")
    parser.add_argument("--rotate", type=positive_int, default=3, help="input clips cycled through (default: 3)")
    parser.add_argument("--cpu-linear", choices=("onednn", "aten"), default="onednn",
                        help="linear layers of both models on CPU: oneDNN with prepacked weights "
                             "(lookwhen.cpu_inference, the default where PyTorch has it) or plain ATen")


@dataclass
class Timing:
    """One model at one keep ratio, measured once per pass."""

    label: str
    step: object
    passes: List[Stats] = field(default_factory=list)
    samples: List[float] = field(default_factory=list)

    def measure(self, device, min_run_time: float) -> None:
        # A whole model forward is long next to the timer: one call is a sample.
        expected = self.passes[0].median if self.passes else None
        times = sample(self.step, device, min_run_time=min_run_time, min_samples=1, expected=expected)
        self.passes.append(Stats.from_samples(times))
        self.samples.extend(times)

    @property
    def stats(self) -> Stats:
        """The median of the pass medians, with the quantiles of all samples.
        Interference from other jobs on a shared machine comes in bursts that
        can slow a third of one model's passes and not the other's: six
        passes outvote them."""
        pooled = Stats.from_samples(self.samples)
        return Stats(statistics.median(p.median for p in self.passes), pooled.q20, pooled.q80, pooled.samples)

    @property
    def noise(self) -> float:
        """Spread of the pass medians relative to the fastest."""
        medians = [p.median for p in self.passes]
        return (max(medians) - min(medians)) / min(medians)


def _stage_split(model, clip, keep, device) -> Dict[str, float]:
    """Fractions of one LookWhen forward's wall time per stage."""
    timer = StageTimer(device)
    synchronize(device)
    start = time.perf_counter()
    model(clip, keep_ratio=keep, stage_timer=timer)
    synchronize(device)
    total = time.perf_counter() - start
    return {name: timer.seconds.get(name, 0.0) / total for name in STAGES}


def _linear_backend(args, device: torch.device) -> str:
    """What runs the linear layers: ``onednn`` (prepacked, CPU float32),
    ``aten`` (``--cpu-linear aten``, or where oneDNN does not apply)."""
    if args.cpu_linear == "onednn" and device.type == "cpu" and args.dtype == "fp32" and onednn_available():
        return "onednn"
    return "aten"


def run(args, device: torch.device) -> Result:
    overrides = parse_overrides(args.set)
    cfg_lw = resolve(args.lookwhen, overrides)
    cfg_base = resolve(args.baseline, {**overrides, "attention": args.attention})
    if cfg_lw.kind != "lookwhen":
        raise BenchError(f"--lookwhen {args.lookwhen}: not a LookWhen preset")
    if cfg_base.kind != "dense":
        raise BenchError(f"--baseline {args.baseline}: not a dense preset")
    dtype = DTYPES[args.dtype]
    # Throughput is measured on batches, as in the paper. On CPU one clip per
    # call leaves LookWhen's extractor with ~160-row matrix products that run
    # 5-10 % below the baseline's 2049-row ones per FLOP; two clips per call
    # (what packing varlen sequences is for) fit the 3-minute budget.
    batch = args.batch or (16 if device.type == "cuda" else 2)
    min_run_time = args.min_run_time or (0.2 if args.quick else 0.5)
    passes = args.passes or (2 if args.quick else 6)
    ratios = list(dict.fromkeys(args.keep_ratio))
    if passes < 2:
        raise BenchError("--passes: at least 2 (their spread is the noise band)")

    def clips(cfg):
        return [(torch.randint(0, 256, (batch, cfg.frames, cfg.image_size, cfg.image_size, 3),
                               dtype=torch.uint8, device=device),) for _ in range(args.rotate)]

    lw = lookwhen.build_model(cfg_lw).to(device).eval()
    base = lookwhen.build_model(cfg_base).to(device).eval()
    linear = _linear_backend(args, device)
    if linear == "onednn":
        # Both models alike: the comparison is between architectures, not
        # between matrix-product libraries.
        prepack_linears(lw)
        prepack_linears(base)
    lw_clips, base_clips = clips(cfg_lw), clips(cfg_base)
    baseline = Timing(cfg_base.name, rotating(base, base_clips))
    ours = {r: Timing(f"{cfg_lw.name} keep {r:g}",
                      rotating(lambda clip, r=r: lw(clip, keep_ratio=r), lw_clips)) for r in ratios}
    splits: Dict[float, List[Dict[str, float]]] = {r: [] for r in ratios}
    steps = passes * (1 + len(ratios)) + len(ratios) + 1
    with torch.inference_mode(), autocast(device, dtype), tqdm(total=steps, desc="e2e", unit="step", leave=False) as progress:
        # Full passes (baseline, then every ratio), repeated: each later pass
        # shows how much the numbers drift. The stage split is its own
        # forward (the timer synchronises a GPU at every stage boundary).
        for i in range(passes):
            for t in (baseline, *ours.values()):
                progress.set_postfix_str(t.label)
                t.measure(device, min_run_time)
                progress.update()
            for r in ratios:
                splits[r].append(_stage_split(lw, lw_clips[i % len(lw_clips)][0], r, device))
        split = {r: {name: statistics.median(s[name] for s in splits[r]) for name in STAGES} for r in ratios}
        # FLOPs per clip do not depend on the batch: count one clip.
        flops_base = lookwhen.count_flops(base, base_clips[0][0][:1])
        progress.update()
        flops_lw = {}
        for r in ratios:
            flops_lw[r] = lookwhen.count_flops(lw, lw_clips[0][0][:1], keep_ratio=r)
            progress.update()

    base_stats = baseline.stats
    base_rate = batch / base_stats.median
    payload, rows, records = [], [], []
    for r in ratios:
        stats = ours[r].stats
        rate = batch / stats.median
        speedup = base_stats.median / stats.median
        ratio = flops_base / flops_lw[r]
        entry = {
            "keep_ratio": r,
            "tokens_kept": keep_ratio_to_k(r, cfg_lw.n_tokens),
            "lookwhen_clips_per_s": rate,
            "lookwhen_clips_per_s_q20": batch / stats.q80,
            "lookwhen_clips_per_s_q80": batch / stats.q20,
            "baseline_clips_per_s": base_rate,
            "baseline_clips_per_s_q20": batch / base_stats.q80,
            "baseline_clips_per_s_q80": batch / base_stats.q20,
            "speedup": speedup,
            "lookwhen_gflops_per_clip": flops_lw[r] / 1e9,
            "baseline_gflops_per_clip": flops_base / 1e9,
            "flops_ratio": ratio,
            "efficiency": speedup / ratio,
            "selection_fraction": split[r]["selection"],
            "selector_fraction": split[r]["selector"],
            "extractor_fraction": split[r]["extractor"],
            "lookwhen_noise": ours[r].noise,
            "baseline_noise": baseline.noise,
            "lookwhen_pass_medians_s": [p.median for p in ours[r].passes],
            "baseline_pass_medians_s": [p.median for p in baseline.passes],
            "lookwhen_time_s": stats.as_dict(),
            "baseline_time_s": base_stats.as_dict(),
        }
        payload.append(entry)
        rows.append((f"{r:g}", entry["tokens_kept"], f"{rate:.3f}", f"{base_rate:.3f}", f"{speedup:.2f}x",
                     f"{flops_lw[r] / 1e9:.4g}", f"{flops_base / 1e9:.4g}", f"{ratio:.2f}x", f"{entry['efficiency']:.2f}",
                     f"{100 * split[r]['selector']:.1f}%", f"{100 * split[r]['selection']:.1f}%",
                     f"{100 * split[r]['extractor']:.1f}%",
                     f"{100 * ours[r].noise:.1f}% / {100 * baseline.noise:.1f}%"))
        model_name = cfg_lw.name
        for metric, value in (("speedup", speedup), ("flops_ratio", ratio), ("efficiency", entry["efficiency"]),
                              ("gflops_per_clip", flops_lw[r] / 1e9), ("selection_fraction", split[r]["selection"]),
                              ("selector_fraction", split[r]["selector"]),
                              ("extractor_fraction", split[r]["extractor"])):
            records.append(Record(model_name, "lookwhen", "inference", metric, r, value))
        records.append(Record(model_name, "lookwhen", "inference", "clips_per_s", r, rate,
                              entry["lookwhen_clips_per_s_q20"], entry["lookwhen_clips_per_s_q80"]))
        records.append(Record(cfg_base.name, "dense", "inference", "clips_per_s", r, base_rate,
                              entry["baseline_clips_per_s_q20"], entry["baseline_clips_per_s_q80"]))
    records.append(Record(cfg_base.name, "dense", "inference", "gflops_per_clip", "", flops_base / 1e9))
    cpu_setup = f", linear layers: {linear}, malloc: {args.malloc}" if device.type == "cpu" else ""
    title = (f"{cfg_lw.name} vs {cfg_base.name} (attention: {cfg_base.attention}): batch {batch}, {args.dtype}, "
             f"{torch.get_num_threads()} threads, "
             f"{device.type}{cpu_setup}; clips/s medians; efficiency = speedup / FLOPs ratio; time split of LookWhen")
    table = format_table(
        ("keep", "K", "LookWhen clips/s", "dense clips/s", "speedup", "LookWhen GFLOPs", "dense GFLOPs",
         "FLOPs ratio", "efficiency", "selector", "selection", "extractor", "noise LW / dense"), rows, title=title)
    extra = {"batch": batch, "dtype": args.dtype, "linear": linear,
             "lookwhen": cfg_lw.to_dict(), "baseline": cfg_base.to_dict()}
    return Result("e2e", table, payload, records, plot=lambda fig: _plot(fig, payload, cfg_lw.name, cfg_base.name),
                  extra=extra)


def _plot(figure, payload, lw_name: str, base_name: str) -> None:
    from matplotlib.ticker import ScalarFormatter

    ratios = [p["keep_ratio"] for p in payload]
    ax = figure.add_subplot()
    # The median of the pass medians can lie just outside the pooled samples'
    # quantiles; such a bar is drawn with zero length.
    ax.errorbar(ratios, [p["lookwhen_clips_per_s"] for p in payload], marker="o", label=f"{lw_name} (bars: q20-q80)",
                yerr=[[max(p["lookwhen_clips_per_s"] - p["lookwhen_clips_per_s_q20"], 0.0) for p in payload],
                      [max(p["lookwhen_clips_per_s_q80"] - p["lookwhen_clips_per_s"], 0.0) for p in payload]])
    ax.plot(ratios, [p["baseline_clips_per_s"] * p["flops_ratio"] for p in payload], linestyle="--", marker="x",
            label=f"FLOPs limit ({base_name} clips/s x FLOPs ratio)")
    ax.plot(ratios, [p["baseline_clips_per_s"] for p in payload], marker="s", label=base_name)
    for p in payload:
        ax.annotate(f"{p['speedup']:.1f}x, eff {p['efficiency']:.2f}", (p["keep_ratio"], p["lookwhen_clips_per_s"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("clips / s")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
