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

A calibration GEMM, measured in the same passes, gives the rate the
hardware reaches on the models' own product (the baseline's MLP, ``[batch *
tokens, width] x [width, mlp_ratio * width]``, through the same linear
layer, dtype and threads): each model's achieved FLOP/s as a share of it
says how close to the matrix units' speed the whole forward runs. Outside
float32 the first batch also runs in float32, and the bench reports each
model's embedding cosine per clip against it and LookWhen's top-K overlap.

The methods table puts what a user would pick instead beside LookWhen, all
measured in the same interleaved passes on the same clips: LookWhen with its
learned selector and with the ``motion`` selector (the decoder's motion
vectors: no selector network runs; decoding the vectors is the decoder's
work and is not timed), the dense baseline, the dense baseline on RLT's kept
tokens (``static_tokens`` is timed, it is part of the model), and the dense
baseline at reduced resolution (ResKD's setting; a size is rounded to the
nearest multiple of the patch). RLT's token count depends on the content, so
the clips are decoded videos: ``--videos DIR``, or synthetic clips (a static
background, one moving object) written to H.264 and decoded back.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lookwhen
import lookwhen_kernels as lk
from . import BenchError
from .configs import DTYPES, autocast, parse_overrides, resolve
from .report import Record, Result, format_table
from .timing import StageTimer, Stats, rotating, sample, synchronize
from lookwhen.cli.args import keep_ratio_arg, positive_float_arg, positive_int_arg
from lookwhen.data.motion import fill_unmeasured, motion_scores, motion_selection, object_recall
from lookwhen.data.synthetic import synthetic_clip, write_video
from lookwhen.data.video import VideoError, fit_clips, read_clips, sample_indices
from lookwhen.models.config import ModelConfig
from lookwhen.models.cpu_inference import PrepackedLinear, bf16_matrix_units, onednn_available, prepack_linears
from lookwhen.models.rlt import DEFAULT_THRESHOLD, RLTDense
from lookwhen_kernels import keep_ratio_to_k

STAGES = ("selector", "selection", "extractor")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


def add_arguments(parser) -> None:
    parser.add_argument("--keep-ratio", nargs="+", type=keep_ratio_arg, default=[0.05, 0.1, 0.2, 0.3],
                        help="keep ratios to sweep (default: 0.05 0.1 0.2 0.3)")
    parser.add_argument("--batch", type=positive_int_arg, help="clips per forward (default: 2 on CPU, 16 on CUDA)")
    parser.add_argument("--lookwhen", default="lookwhen-b16", metavar="PRESET", help="default: lookwhen-b16")
    parser.add_argument("--baseline", default="internvideo2-b14", metavar="PRESET", help="default: internvideo2-b14")
    parser.add_argument("--attention", choices=("kernels", "sdpa"), default="kernels",
                        help="the baseline's attention: lookwhen_kernels.varlen_attention like LookWhen's "
                             "extractor (default), or PyTorch's scaled_dot_product_attention")
    parser.add_argument("--min-run-time", type=positive_float_arg,
                        help="seconds per timing on CPU (default: 0.5, --quick 0.2), at least one call")
    parser.add_argument("--passes", type=positive_int_arg,
                        help="times every model is measured, interleaved (default: 6, --quick 2); "
                             "the median pass counts, their spread is the noise band")
    parser.add_argument("--rotate", type=positive_int_arg, default=3, help="input clips cycled through (default: 3)")
    parser.add_argument("--videos", metavar="DIR",
                        help="time on clips decoded from the videos in DIR (default: synthetic clips with a static "
                             "background, encoded and decoded); RLT's token count depends on the content")
    parser.add_argument("--rlt-threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"RLT's threshold on normalised pixels (default: RLT's {DEFAULT_THRESHOLD})")
    parser.add_argument("--low-res", nargs="*", type=positive_int_arg, default=[112, 160], metavar="PX",
                        help="sizes the dense baseline also runs at (default: 112 160; rounded to a multiple of "
                             "the patch; sizes not below the baseline's are left out)")
    parser.add_argument("--cpu-linear", choices=("onednn", "aten"), default="onednn",
                        help="linear layers of both models on CPU: oneDNN with prepacked weights "
                             "(lookwhen.models.cpu_inference, the default where PyTorch has it) or plain ATen")


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


def _calibration(cfg: ModelConfig, batch: int, device, linear: str) -> Tuple[Timing, float]:
    """The calibration GEMM (see the module docstring) as a timed step, and
    its FLOPs per call."""
    rows, width, hidden = batch * (cfg.n_tokens + 1), cfg.width, int(cfg.width * cfg.mlp_ratio)
    layer = torch.nn.Linear(width, hidden).to(device)
    if linear == "onednn":
        layer = PrepackedLinear.from_linear(layer)
    x = torch.randn(rows, width, device=device)
    return Timing(f"calibration GEMM [{rows}, {width}] x [{width}, {hidden}]", lambda: layer(x)), 2.0 * rows * width * hidden


def _accuracy(lw, base, lw_clip, base_clip, ratios, device, dtype) -> Dict[str, object]:
    """The run's dtype against float32 on one batch: embedding cosine per
    clip for both models, the share of LookWhen's float32 top-K that it
    keeps, and LookWhen's cosine when it is given float32's top-K (what the
    arithmetic alone changes, apart from tokens whose scores the rounding
    reorders)."""
    def cosine(low, full):
        return F.cosine_similarity(low.float(), full.float(), dim=-1).tolist()

    with torch.inference_mode():
        full_base = base(base_clip)
        full_lw = {r: lw(lw_clip, keep_ratio=r) for r in ratios}
        with autocast(device, dtype):
            low_base = base(base_clip)
            low_lw = {r: lw(lw_clip, keep_ratio=r) for r in ratios}
            same_topk = {r: lw(lw_clip, indices=full_lw[r].indices) for r in ratios}
    result: Dict[str, object] = {"baseline_cosine": cosine(low_base, full_base)}
    for r in ratios:
        full, low = full_lw[r], low_lw[r]
        result[r] = {"cosine": cosine(low.embedding, full.embedding),
                     "cosine_same_topk": cosine(same_topk[r].embedding, full.embedding),
                     "topk_overlap": [len(set(a.tolist()) & set(b.tolist())) / a.numel()
                                      for a, b in zip(full.indices.cpu(), low.indices.cpu())]}
    return result


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
    """What runs the linear layers: ``onednn`` (prepacked, CPU float32 or
    bfloat16), ``aten`` (``--cpu-linear aten``, or where oneDNN does not apply)."""
    if (args.cpu_linear == "onednn" and device.type == "cpu" and args.dtype in ("fp32", "bf16")
            and onednn_available()):
        return "onednn"
    return "aten"


@dataclass
class Method:
    """One row of the methods table: what it runs (``timing``), the tokens
    its trunk sees per clip and its FLOPs per clip."""

    timing: Timing
    tokens: float
    flops: float


def _video_paths(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise BenchError(f"--videos {folder}: not a folder")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(VIDEO_SUFFIXES))
    if not paths:
        raise BenchError(f"--videos {folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return paths


def _video_codecs_installed() -> bool:
    """PyAV writes the synthetic videos and decord reads them back; a GPU
    machine may have neither (the ``video`` extra is optional)."""
    return all(importlib.util.find_spec(name) is not None for name in ("av", "decord"))


def _synthetic_samples(count: int, frames: int, size: int):
    """``count`` synthetic clips (static background, one moving object),
    which know their object."""
    generator = np.random.default_rng(0)
    return [synthetic_clip(generator, frames=frames, size=size) for _ in range(count)]


def _synthetic_videos(folder: str, count: int, frames: int, size: int):
    """The synthetic clips written as H.264 with a real motion search (the
    motion selector reads its vectors): their paths and the clips."""
    samples = _synthetic_samples(count, frames, size)
    paths = [write_video(os.path.join(folder, f"{i:03d}.mp4"), sample.clip, preset="medium")
             for i, sample in enumerate(samples)]
    return paths, samples


def _object_tokens(sample, grid) -> torch.Tensor:
    """bool ``[T, h*w]``: the tokens of a model's grid (its sampled frames,
    its resized square) that the object covers any pixel of."""
    frames, grid_h, grid_w = grid
    mask = sample.object_mask[sample_indices(sample.object_mask.shape[0], frames)].float()
    return (F.adaptive_max_pool2d(mask[:, None], (grid_h, grid_w)) > 0).view(frames, -1)


def _synthetic_proof(samples, rlt, clips: torch.Tensor, motions, cfg_lw: ModelConfig) -> str:
    """What RLT keeps and what the motion selector finds on the first batch
    of synthetic clips, against the objects' known tokens."""
    batch = clips.shape[0]
    spatial = rlt.config.grid[1] * rlt.config.grid[2]
    indices, cu, _ = rlt.select(clips)
    later = on_object = 0
    for b in range(batch):
        covered = _object_tokens(samples[b], rlt.config.grid)
        touched = (covered[1:] | covered[:-1]).flatten()
        ids = indices[cu[b]: cu[b + 1]].long().cpu()
        ids = ids[ids >= spatial] - spatial
        later += ids.numel()
        on_object += int(touched[ids].sum())
    text = (f"synthetic proof: RLT keeps frame 0 ({spatial}) + {later / batch:.0f} tokens per clip, "
            f"{100 * on_object / max(later, 1):.0f}% of them on the moving object")
    if motions is None:
        return text
    recalls, chance = [], []
    for b in range(batch):
        truth = _object_tokens(samples[b], cfg_lw.grid).flatten()
        scores = fill_unmeasured(motions[b].scores[None], motions[b].has_vectors[None])
        recalls.append(object_recall(lk.topk_tokens(scores, int(truth.sum())), [truth]))
        chance.append(float(truth.float().mean()))
    return text + (f"; motion selector top-K recall of the object {np.mean(recalls):.2f} "
                   f"(chance {np.mean(chance):.2f})")


def _decoded(paths: Sequence[str], cfg: ModelConfig, batch: int, device) -> List[Tuple[torch.Tensor]]:
    """The videos read at ``cfg``'s frames and size, in batches of
    ``batch`` (the list cycled where it is short)."""
    read = read_clips(paths, cfg.frames, cfg.image_size)
    if read.failures:
        raise BenchError(f"cannot decode {read.failures[0][1]}")
    return _batches(read.clips, cfg, batch, device)


def _batches(clips: torch.Tensor, cfg: ModelConfig, batch: int, device) -> List[Tuple[torch.Tensor]]:
    """uint8 clips resampled to ``cfg``'s frames and size, in batches of
    ``batch`` on ``device`` (the clips cycled where they are short)."""
    clips = fit_clips(clips, cfg.frames, cfg.image_size)
    count = -(-clips.shape[0] // batch) * batch
    clips = clips[torch.arange(count) % clips.shape[0]]
    return [(clips[i: i + batch].to(device),) for i in range(0, count, batch)]


def _motions(paths: Sequence[str], grid) -> Tuple[Optional[list], str]:
    """Motion scores of every video, or ``None`` and why not."""
    try:
        return [motion_scores(path, grid) for path in paths], ""
    except VideoError as error:
        return None, f"motion selector skipped: {error}"


def _snap(size: int, patch: int) -> int:
    return max(patch, round(size / patch) * patch)


def _flops_per_clip(model, clip: torch.Tensor, **kwargs) -> float:
    return lookwhen.count_flops(model, clip, **kwargs) / clip.shape[0]


def run(args, device: torch.device) -> Result:
    overrides = parse_overrides(args.set)
    cfg_lw = resolve(args.lookwhen, overrides)
    cfg_base = resolve(args.baseline, {**overrides, "attention": args.attention})
    if cfg_lw.kind != "lookwhen":
        raise BenchError(f"--lookwhen {args.lookwhen}: not a LookWhen preset")
    if cfg_base.kind != "dense":
        raise BenchError(f"--baseline {args.baseline}: not a dense preset")
    if not args.rlt_threshold >= 0:
        raise BenchError(f"--rlt-threshold: expected a number >= 0, got {args.rlt_threshold}")
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
    low_res = {}
    for size in dict.fromkeys(args.low_res):
        snapped = _snap(size, cfg_base.patch_size)
        if snapped < cfg_base.image_size:
            low_res[size] = resolve(cfg_base, {"image_size": snapped, "name": f"{cfg_base.name}@{snapped}px"})

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as scratch:
        if args.videos:
            found = _video_paths(args.videos)
            # One frame of each tells the readable files apart.
            paths = read_clips(found, 1, 8).paths
            if not paths:
                raise BenchError(f"--videos {args.videos}: none of the {len(found)} video files could be read")
            unread = f", {len(found) - len(paths)} unreadable skipped" if len(paths) < len(found) else ""
            source = f"{len(paths)} videos decoded from {args.videos}{unread}"
            samples = None
        else:
            frames = max(cfg_lw.frames, cfg_base.frames)
            count, size = batch * args.rotate, max(cfg_lw.image_size, cfg_base.image_size)
            if _video_codecs_installed():
                paths, samples = _synthetic_videos(scratch, count, frames, size)
                source = (f"{len(paths)} synthetic clips (static background, one moving object; H.264, decoded); "
                          "give --videos DIR for real ones")
            else:
                paths, samples = None, _synthetic_samples(count, frames, size)
                source = (f"{count} synthetic clips (static background, one moving object) as tensors: "
                          "PyAV or decord is not installed, so no H.264 round trip")
        if paths is None:
            clips = torch.stack([sample.clip for sample in samples])
            lw_clips, base_clips = _batches(clips, cfg_lw, batch, device), _batches(clips, cfg_base, batch, device)
            low_clips = {size: _batches(clips, cfg, batch, device) for size, cfg in low_res.items()}
            motions, motion_note = None, "motion selector skipped: it reads the decoder's motion vectors (needs PyAV)"
        else:
            lw_clips, base_clips = _decoded(paths, cfg_lw, batch, device), _decoded(paths, cfg_base, batch, device)
            low_clips = {size: _decoded(paths, cfg, batch, device) for size, cfg in low_res.items()}
            motions, motion_note = _motions(paths, cfg_lw.grid)

    lw = lookwhen.build_model(cfg_lw).to(device).eval()
    base = lookwhen.build_model(cfg_base).to(device).eval()
    low_models = {size: lookwhen.build_model(cfg).to(device).eval() for size, cfg in low_res.items()}
    linear = _linear_backend(args, device)
    if linear == "onednn":
        # Every model alike: the comparison is between architectures, not
        # between matrix-product libraries.
        for model in (lw, base, *low_models.values()):
            prepack_linears(model)
    rlt = RLTDense(base, threshold=args.rlt_threshold).eval()
    baseline = Timing(cfg_base.name, rotating(base, base_clips))
    ours = {r: Timing(f"{cfg_lw.name} keep {r:g}",
                      rotating(lambda clip, r=r: lw(clip, keep_ratio=r), lw_clips)) for r in ratios}
    motion_sets = {}
    if motions is not None:
        sets = [motions[(i * batch + j) % len(motions)] for i in range(len(lw_clips)) for j in range(batch)]
        for r in ratios:
            motion_sets[r] = [(clip[0], motion_selection(sets[i * batch:(i + 1) * batch], r)[0].to(device))
                              for i, clip in enumerate(lw_clips)]
    by_motion = {r: Timing(f"{cfg_lw.name} keep {r:g} motion",
                           rotating(lambda clip, ids: lw(clip, indices=ids, run_selector=False), motion_sets[r]))
                 for r in motion_sets}
    rlt_timing = Timing(f"{cfg_base.name}+rlt", rotating(rlt, base_clips))
    low_timings = {size: Timing(cfg.name, rotating(low_models[size], low_clips[size])) for size, cfg in low_res.items()}
    gemm, gemm_flops = _calibration(cfg_base, batch, device, linear)
    timings = [gemm, baseline, *ours.values(), *by_motion.values(), rlt_timing, *low_timings.values()]
    splits: Dict[float, List[Dict[str, float]]] = {r: [] for r in ratios}
    steps = passes * (len(timings) + len(ratios)) + 1
    with torch.inference_mode(), autocast(device, dtype), tqdm(total=steps, desc="e2e", unit="step", leave=False) as progress:
        # Full passes over every model, repeated: each later pass shows how
        # much the numbers drift. The stage split is its own forward (the
        # timer synchronises a GPU at every stage boundary).
        gemm.step()  # packs its weight in this dtype and lets oneDNN build its kernel: not timed
        for i in range(passes):
            for t in timings:
                progress.set_postfix_str(t.label)
                t.measure(device, min_run_time)
                progress.update()
            for r in ratios:
                splits[r].append(_stage_split(lw, lw_clips[i % len(lw_clips)][0], r, device))
                progress.update()
        split = {r: {name: statistics.median(s[name] for s in splits[r]) for name in STAGES} for r in ratios}
        # FLOPs per clip: one clip where they do not depend on the content,
        # the mean over the first batch where they do (RLT, motion).
        flops_base = _flops_per_clip(base, base_clips[0][0][:1])
        flops_lw = {r: _flops_per_clip(lw, lw_clips[0][0][:1], keep_ratio=r) for r in ratios}
        methods = [Method(baseline, cfg_base.n_tokens, flops_base)]
        methods += [Method(ours[r], keep_ratio_to_k(r, cfg_lw.n_tokens), flops_lw[r]) for r in ratios]
        for r, timing in by_motion.items():
            clip, ids = motion_sets[r][0]
            methods.append(Method(timing, ids.shape[1],
                                  _flops_per_clip(lw, clip, indices=ids, run_selector=False)))
        kept = torch.cat([rlt.select(clip)[1].diff() for (clip,) in base_clips]).double().mean().item()
        methods.append(Method(rlt_timing, kept, _flops_per_clip(rlt, base_clips[0][0])))
        for size, timing in low_timings.items():
            flops = _flops_per_clip(low_models[size], low_clips[size][0][0][:1])
            methods.append(Method(timing, low_res[size].n_tokens, flops))
        progress.update()
    accuracy = (_accuracy(lw, base, lw_clips[0][0], base_clips[0][0], ratios, device, dtype)
                if dtype != torch.float32 else None)

    gemm_rate = gemm_flops / gemm.stats.median
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
            "lookwhen_gemm_share": rate * flops_lw[r] / gemm_rate,
            "baseline_gemm_share": base_rate * flops_base / gemm_rate,
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
        if accuracy is not None:
            entry.update(lookwhen_cosine=accuracy[r]["cosine"], baseline_cosine=accuracy["baseline_cosine"],
                         topk_overlap=accuracy[r]["topk_overlap"],
                         lookwhen_cosine_same_topk=accuracy[r]["cosine_same_topk"])
        payload.append(entry)
        rows.append((f"{r:g}", entry["tokens_kept"], f"{rate:.3f}", f"{base_rate:.3f}", f"{speedup:.2f}x",
                     f"{flops_lw[r] / 1e9:.4g}", f"{flops_base / 1e9:.4g}", f"{ratio:.2f}x", f"{entry['efficiency']:.2f}",
                     f"{100 * entry['lookwhen_gemm_share']:.0f}% / {100 * entry['baseline_gemm_share']:.0f}%",
                     f"{100 * split[r]['selector']:.1f}%", f"{100 * split[r]['selection']:.1f}%",
                     f"{100 * split[r]['extractor']:.1f}%",
                     f"{100 * ours[r].noise:.1f}% / {100 * baseline.noise:.1f}%"))
        model_name = cfg_lw.name
        for metric, value in (("speedup", speedup), ("flops_ratio", ratio), ("efficiency", entry["efficiency"]),
                              ("gemm_share", entry["lookwhen_gemm_share"]),
                              ("gflops_per_clip", flops_lw[r] / 1e9), ("selection_fraction", split[r]["selection"]),
                              ("selector_fraction", split[r]["selector"]),
                              ("extractor_fraction", split[r]["extractor"])):
            records.append(Record(model_name, "lookwhen", "inference", metric, r, value))
        records.append(Record(model_name, "lookwhen", "inference", "clips_per_s", r, rate,
                              entry["lookwhen_clips_per_s_q20"], entry["lookwhen_clips_per_s_q80"]))
        records.append(Record(cfg_base.name, "dense", "inference", "clips_per_s", r, base_rate,
                              entry["baseline_clips_per_s_q20"], entry["baseline_clips_per_s_q80"]))
    records.append(Record(cfg_base.name, "dense", "inference", "gflops_per_clip", "", flops_base / 1e9))
    method_rows, method_payload = _methods(methods, batch, base_stats.median, flops_base, gemm_rate, records)
    units = ", ".join(bf16_matrix_units()) or "none"
    cpu_setup = (f", linear layers: {linear}, malloc: {args.malloc}, bf16 matrix units: {units}"
                 if device.type == "cpu" else "")
    setup = f"batch {batch}, {args.dtype}, {torch.get_num_threads()} threads, {device.type}{cpu_setup}"
    proof = _synthetic_proof(samples, rlt, base_clips[0][0], motions, cfg_lw) if not args.videos else ""
    notes = "".join(f"; {note}" for note in (motion_note, proof) if note)
    methods_table = format_table(
        ("method", "tokens", "GFLOPs", "GMACs", "clips/s", "speedup", "efficiency", "of GEMM", "noise"), method_rows,
        title=(f"Methods on the same clips ({source}): {setup}; clips/s medians; speedup over {cfg_base.name}; "
               f"efficiency = speedup / FLOPs ratio; of GEMM = achieved FLOP/s / the {gemm.label}'s "
               f"{gemm_rate / 1e9:.0f} GFLOP/s (noise {100 * gemm.noise:.1f}%); "
               f"RLT threshold {args.rlt_threshold:g}{notes}"))
    title = (f"{cfg_lw.name} vs {cfg_base.name} (attention: {cfg_base.attention}): {setup}; clips/s medians; efficiency = speedup / FLOPs ratio; "
             "time split of LookWhen")
    table = format_table(
        ("keep", "K", "LookWhen clips/s", "dense clips/s", "speedup", "LookWhen GFLOPs", "dense GFLOPs",
         "FLOPs ratio", "efficiency", "of GEMM LW / dense", "selector", "selection", "extractor", "noise LW / dense"),
        rows, title=title)
    if accuracy is not None:
        table += "\n\n" + format_table(
            ("model", "keep", "cosine min", "cosine mean", "top-K overlap min", "cosine min at fp32's top-K"),
            [(cfg_base.name, "", f"{min(accuracy['baseline_cosine']):.5f}",
              f"{statistics.mean(accuracy['baseline_cosine']):.5f}", "", "")]
            + [(cfg_lw.name, f"{r:g}", f"{min(accuracy[r]['cosine']):.5f}",
                f"{statistics.mean(accuracy[r]['cosine']):.5f}", f"{min(accuracy[r]['topk_overlap']):.3f}",
                f"{min(accuracy[r]['cosine_same_topk']):.5f}")
               for r in ratios],
            title=f"{args.dtype} against float32 on the first batch ({batch} clips): embedding cosine per clip, "
                  "share of the float32 top-K selected, cosine when given the float32 top-K")
    extra = {"batch": batch, "dtype": args.dtype, "linear": linear, "clips": source, "methods": method_payload,
             "calibration_gemm": {"shape": gemm.label, "gflop_per_s": gemm_rate / 1e9, "noise": gemm.noise,
                                  "time_s": gemm.stats.as_dict()},
             "bf16_matrix_units": list(bf16_matrix_units()),
             "synthetic_proof": proof,
             "rlt_threshold": args.rlt_threshold, "lookwhen": cfg_lw.to_dict(), "baseline": cfg_base.to_dict()}
    return Result("e2e", methods_table + "\n\n" + table, payload, records,
                  plot=lambda fig: _plot(fig, payload, cfg_lw.name, cfg_base.name), extra=extra)


def _methods(methods: List[Method], batch: int, base_seconds: float, base_flops: float, gemm_rate: float,
             records: List[Record]):
    """Rows and JSON entries of the methods table (CSV records appended to
    ``records``)."""
    rows, payload = [], []
    for m in methods:
        stats = m.timing.stats
        speedup = base_seconds / stats.median
        efficiency = speedup / (base_flops / m.flops)
        entry = {"method": m.timing.label, "tokens": m.tokens, "gflops_per_clip": m.flops / 1e9,
                 "gmacs_per_clip": m.flops / 2e9, "clips_per_s": batch / stats.median,
                 "clips_per_s_q20": batch / stats.q80, "clips_per_s_q80": batch / stats.q20,
                 "speedup": speedup, "efficiency": efficiency,
                 "gemm_share": batch / stats.median * m.flops / gemm_rate, "noise": m.timing.noise,
                 "pass_medians_s": [p.median for p in m.timing.passes]}
        payload.append(entry)
        rows.append((m.timing.label, f"{m.tokens:.0f}", f"{m.flops / 1e9:.4g}", f"{m.flops / 2e9:.4g}",
                     f"{entry['clips_per_s']:.3f}", f"{speedup:.2f}x", f"{efficiency:.2f}",
                     f"{100 * entry['gemm_share']:.0f}%", f"{100 * m.timing.noise:.1f}%"))
        for metric in ("tokens", "gflops_per_clip", "gmacs_per_clip", "speedup", "efficiency", "gemm_share"):
            records.append(Record(m.timing.label, "methods", "inference", metric, "", entry[metric]))
        records.append(Record(m.timing.label, "methods", "inference", "clips_per_s", "", entry["clips_per_s"],
                              entry["clips_per_s_q20"], entry["clips_per_s_q80"]))
    return rows, payload


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
