"""``python -m bench pareto``: accuracy against compute, every method trained
the same way on one task where the choice of tokens decides accuracy.

The task (:func:`lookwhen.data.synthetic.pattern_clip`, the ``pattern``
task): an 8-pixel square moves across 8 frames of 64 px among three static
squares of the same base colour; the label is the colour signs of a
one-pixel checkerboard on the moving square (4 classes). The square covers
one 8-px token a frame, 8 of the clip's 512 candidates; a 2x block mean or
a 2x antialiased resize turns it into its plain base colour, so the
half-resolution models and the selector's context tokens (CLS and
registers, which see the clip at half resolution) cannot read the label.
A random 10 % of the tokens misses all 8 about 43 % of the time.

Every method fine-tunes a tiny model of its family (2 layers, 64 wide; 8 px
tokens) with the same steps, fresh clips per step, batch, AdamW and
schedule, and is scored on the same held-out clips:

- ``dense``: the InternVideo2-shaped baseline on every token;
  ``dense-half``: the same at 32 px (the clip resized by half, antialiased);
  ``reskd``: ResKD's half-resolution student, distilled from the trained
  dense model at full resolution; ``rlt``: the dense model on the tokens
  RLT keeps (the first frame's and those that changed since the previous
  frame), as many as each clip's content decides.
- ``lookwhen``: selector pre-trained on uniqueness (a random image teacher's
  nearest-neighbour distances) while the extractor distils the trained
  dense model (video teacher) and the image teacher, then fine-tuned;
  ``lookwhen-scratch``: fine-tuned from initialisation (the hard top-K
  sends no gradient to its selector); ``random``: random tokens;
  ``stts``: STTS's perturbed top-K, the selector trained by the task loss;
  ``adafocus``: Uni-AdaFocus's one window per frame, placed where the
  pre-trained selector's scores sum highest (the window whose area is
  nearest the keep ratio's share of a frame), then fine-tuned as LookWhen;
  ``motion``: the tokens that move fastest by the motion vectors of the
  clip encoded as H.264 (x264's default search), the extractor fine-tuned
  from initialisation; its selection costs nothing beyond the decode, so
  it is timed on the chosen tokens.

GFLOPs per clip are counted (``torch.utils.flop_counter``) and clips/s are
measured in this process (inference, interleaved passes, medians); the
frontier is the set of points no other point beats on both accuracy and
GFLOPs.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import lookwhen
import lookwhen_kernels as lk
from .. import BenchError
from ..report import Record, Result, format_table
from ..timing import Stats, sample
from . import train as bench_train
from lookwhen.cli.args import keep_ratio_arg, positive_int_arg
from lookwhen.data.motion import WithMotion
from lookwhen.data.synthetic import PATTERNS, SyntheticDataset
from lookwhen.data.video import fit_clips
from lookwhen.models.flops import count_flops
from lookwhen.models.lookwhen import LookWhen
from lookwhen.models.rlt import RLTDense
from lookwhen.training.engine import TrainSettings, Trainer
from lookwhen.training.finetune import FinetuneTask, logits_of, random_selection, sigma_decay_steps
from lookwhen.training.losses import LossWeights, uniqueness_target
from lookwhen.training.pretrain import PretrainTask
from lookwhen.training.teachers import Teachers, VideoTeacher

TASK = dict(frames=8, size=64, object_size=8, align=8, speed=8, visible=8, amplitude=64)
MODEL = dict(frames=8, image_size=64, patch_size=8, width=64, depth=2, heads=2, num_classes=len(PATTERNS))
SELECTOR = dict(selector_width=64, selector_depth=2, selector_heads=2, score_hidden=64, registers=2)
# LayerScale (InternVideo2's 1e-5) keeps a 2-layer model near the identity
# for longer than the runs last: the tiny dense models train without it.
DENSE = dict(pool_heads=2, layer_scale=0.0)
HALF_SIZE = 32
GRID = (MODEL["frames"], MODEL["image_size"] // MODEL["patch_size"], MODEL["image_size"] // MODEL["patch_size"])
# The random image teacher at 128 px gives its 16-px patches on the
# extractor's 8 x 8 grid.
TEACHER_SIZE = 128
BATCH = 16
# Held-out clips on which the pre-trained selector is checked.
CHECK_CLIPS = 128
KEEP_RATIOS = (0.05, 0.1, 0.3)
# Methods without a keep ratio: the dense models, and RLT, whose number of
# tokens follows each clip's content.
UNBUDGETED_METHODS = ("dense", "dense-half", "reskd", "rlt")
SELECTING_METHODS = ("lookwhen", "lookwhen-scratch", "random", "stts", "adafocus", "motion")
# The methods that start from LookWhen's pre-trained model.
PRETRAINED_METHODS = ("lookwhen", "adafocus")
METHODS = UNBUDGETED_METHODS + SELECTING_METHODS
# The rows every seed trains; the others train with the first seed only.
HEADLINE = {("dense", None), ("dense-half", None), ("rlt", None), ("lookwhen", 0.1), ("lookwhen-scratch", 0.1),
            ("random", 0.1)}
QUICK_METHODS = ("dense", "dense-half", "random")
COLOURS = {"dense": "black", "dense-half": "tab:gray", "reskd": "tab:brown", "rlt": "tab:red", "lookwhen": "tab:blue",
           "lookwhen-scratch": "tab:cyan", "random": "tab:orange", "stts": "tab:purple",
           "adafocus": "tab:olive", "motion": "tab:pink"}


def add_arguments(parser) -> None:
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        help=f"default: all ({', '.join(METHODS)}); --quick: {', '.join(QUICK_METHODS)}")
    parser.add_argument("--keep-ratio", nargs="+", type=keep_ratio_arg, default=None, dest="keep_ratios",
                        help="keep ratios of the selecting methods (default 0.05 0.1 0.3; --quick 0.1)")
    parser.add_argument("--steps", type=positive_int_arg, help="fine-tuning steps of every method (default 600, "
                        "--quick 250)")
    parser.add_argument("--pretrain-steps", type=positive_int_arg, default=300,
                        help="LookWhen's pre-training steps (selector and distillation)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every run")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds of the headline rows (default 0 1; --quick 0); the others use the first")
    parser.add_argument("--val-clips", type=positive_int_arg, default=512, help="held-out clips")
    parser.add_argument("--passes", type=positive_int_arg, help="interleaved timing passes (default 3, --quick 1)")


def _dense(seed: int, size: int = MODEL["image_size"]):
    return lookwhen.build_model("internvideo2-b14", **{**MODEL, "image_size": size}, **DENSE, seed=seed)


def _lookwhen(seed: int):
    return lookwhen.build_model("lookwhen-b16-light", **MODEL, **SELECTOR, seed=seed)


def _fit(task, steps: int, lr: float, seed: int, data_seed: int, device, motion_cache=None) -> float:
    """Train ``task`` on ``steps * BATCH`` fresh clips (with their motion
    scores, kept in ``motion_cache``, when it is given); the seconds it
    took."""
    train = SyntheticDataset(steps * BATCH, seed=data_seed, task="pattern", **TASK)
    if motion_cache is not None:
        train = WithMotion(train, task.model().config.grid, motion_cache)
    with tempfile.TemporaryDirectory() as folder:
        settings = TrainSettings(out=folder, steps=steps, batch_size=BATCH, lr=lr, save_every=steps,
                                 device=str(device), progress=None, seed=seed)
        start = time.perf_counter()
        Trainer(task, train, settings, log=lambda line: None).fit()
        return time.perf_counter() - start


def window_for(keep: float, grid: Sequence[int]) -> Tuple[int, int]:
    """AdaFocus's window at a keep ratio: of the windows that fit a frame of
    ``grid = (T, h, w)``, the one whose area is nearest ``keep`` of the
    frame's tokens (the squarest of equals)."""
    _, height, width = grid
    target = keep * height * width
    return min(((a, b) for a in range(1, height + 1) for b in range(1, width + 1)),
               key=lambda hw: (abs(hw[0] * hw[1] - target), abs(hw[0] - hw[1]), hw))


def _selection(method: str, keep: Optional[float], config, n_clips: int, motion: Optional[torch.Tensor]) -> Dict:
    """The forward's selection arguments of a point on ``n_clips`` held-out
    clips: per-clip ids for random tokens (the same draw for every model)
    and for the motion selector (each clip's fastest tokens by ``motion
    [n_clips, N]``), neither running the selector network."""
    if keep is None:
        return {}
    if method == "random":
        ids = random_selection(torch.Generator().manual_seed(0), n_clips, config.n_tokens, config.tokens_kept(keep))
        return {"indices": ids, "run_selector": False}
    if method == "motion":
        return {"indices": lk.topk_tokens(motion, keep_ratio=keep), "run_selector": False}
    return {"window": window_for(keep, config.grid)} if method == "adafocus" else {"keep_ratio": keep}


def _clips_of(selection: Dict, start: int, stop: int) -> Dict:
    """``selection`` for the clips ``start:stop`` (per-clip ids sliced)."""
    return {k: v[start:stop] if k == "indices" else v for k, v in selection.items()}


@torch.no_grad()
def _accuracy(model, clips: torch.Tensor, labels: torch.Tensor, selection: Dict) -> float:
    model.eval()
    cfg = model.config
    correct = 0
    for start in range(0, len(clips), 64):
        chunk = fit_clips(clips[start: start + 64], cfg.frames, cfg.image_size)
        predicted = logits_of(model, chunk, **_clips_of(selection, start, start + 64)).argmax(-1).cpu()
        correct += int((predicted == labels[start: start + 64]).sum())
    return correct / len(clips)


def object_recall(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over clips of the share of the object's windows (``truth``, bool
    ``[B, n]``) among as many of the best-scored ones (``scores [B, n]``)."""
    recalls = []
    for clip_scores, wanted in zip(scores.float(), truth):
        k = int(wanted.sum())
        if k:
            recalls.append(float(wanted[clip_scores.topk(k).indices].sum()) / k)
    return statistics.mean(recalls)


@torch.no_grad()
def _selector_check(model, image, samples, device) -> Dict[str, float]:
    """Where the selector looks, on held-out clips: the recall of the
    moving square's windows by the pre-training target (the image teacher's
    uniqueness) and by the pre-trained selector, and by chance."""
    cfg = model.config
    window = cfg.patch_size * cfg.selector_downsample
    truth = torch.stack([s.object_tokens(window, frame_stride=cfg.selector_frame_stride) for s in samples])
    clips = torch.stack([s.clip for s in samples]).to(device)
    target = uniqueness_target(Teachers(image)(clips, cfg.grid[1:]).patches, cfg)
    scores = model.eval().selector_scores(clips)
    return {"teacher_recall": object_recall(target.flatten(1).cpu(), truth),
            "selector_recall": object_recall(scores.flatten(1).cpu(), truth),
            "chance": float(truth.float().mean()), "clips": len(samples)}


def _pretrained(dense, args, seed: int, device, samples):
    """LookWhen pre-trained as the paper does, at this scale: the selector on
    uniqueness, the extractor distilling the trained dense model and the
    image teacher, budgets drawn from 0.05-0.3 per clip. Also the selector's
    check on ``samples`` (:func:`_selector_check`)."""
    model = _lookwhen(seed).to(device)
    with tempfile.TemporaryDirectory() as folder:
        image = bench_train.random_image_teacher(folder, device, image_size=TEACHER_SIZE)
        task = PretrainTask(model.train(), teachers=Teachers(image, VideoTeacher(copy.deepcopy(dense))),
                            weights=LossWeights())
        seconds = _fit(task, args.pretrain_steps, args.lr, seed, 200 + seed, device)
        check = _selector_check(model, image, samples, device)
    return model, seconds, {"seed": seed, "pretrain_steps": args.pretrain_steps, **check}


def _task(method: str, model, keep: Optional[float], steps: int, teacher=None) -> FinetuneTask:
    # One optimiser for all: no layer-wise decay (most runs start from scratch).
    common = dict(layer_decay=1.0)
    if method in UNBUDGETED_METHODS:
        return FinetuneTask(model.train(), teacher=teacher, **common)
    if method == "stts":
        return FinetuneTask(model.train(), keep_ratio=keep, selection="perturbed", sigma=0.2,
                            sigma_steps=sigma_decay_steps(0.8, steps), n_samples=100, **common)
    if method == "adafocus":
        return FinetuneTask(model.train(), window=window_for(keep, model.config.grid), **common)
    return FinetuneTask(model.train(), keep_ratio=keep, selection=method if method in ("random", "motion") else
                        "selector", **common)


def _plan(methods: Sequence[str], keeps: Sequence[float],
          seeds: Sequence[int]) -> List[Tuple[str, Optional[float], int]]:
    points = [(m, None) for m in methods if m in UNBUDGETED_METHODS] + \
             [(m, k) for m in methods if m in SELECTING_METHODS for k in keeps]
    return [(m, k, s) for m, k in points for s in (seeds if (m, k) in HEADLINE else seeds[:1])]


def _train_all(args, device, plan, samples, clips, labels, motion) -> Tuple[List[Dict], Dict, List[Dict]]:
    steps = args.steps
    # Every seed's training clips are encoded once for their motion vectors.
    motion_caches: Dict[int, Dict] = {}
    runs: List[Dict] = []
    timed: Dict[Tuple[str, Optional[float]], object] = {}
    dense_of: Dict[int, object] = {}
    pretrained_of: Dict[int, object] = {}
    checks: List[Dict] = []

    def dense_model(seed):
        if seed not in dense_of:
            model = _dense(seed).to(device)
            seconds = _fit(_task("dense", model, None, steps), steps, args.lr, seed, 100 + seed, device)
            dense_of[seed] = model
            # Trained as LookWhen's teacher or ResKD's, it is a point too.
            timed.setdefault(("dense", None), model)
            runs.append({"method": "dense", "keep_ratio": None, "seed": seed, "train_seconds": seconds,
                         "accuracy": _accuracy(model, clips, labels, {})})
        return dense_of[seed]

    for method, keep, seed in plan:
        if method == "dense":
            model = dense_model(seed)
        else:
            extra = 0.0
            if method == "dense-half":
                model = _dense(seed, HALF_SIZE).to(device)
                task = _task(method, model, None, steps)
            elif method == "reskd":
                model = _dense(seed, HALF_SIZE).to(device)
                task = _task(method, model, None, steps, teacher=copy.deepcopy(dense_model(seed)))
            elif method == "rlt":
                model = RLTDense(_dense(seed)).to(device)
                task = _task(method, model, None, steps)
            else:
                if method in PRETRAINED_METHODS:
                    if seed not in pretrained_of:
                        *pretrained_of[seed], check = _pretrained(dense_model(seed), args, seed, device,
                                                                  samples[:CHECK_CLIPS])
                        checks.append(check)
                    base, extra = pretrained_of[seed]
                    model = copy.deepcopy(base)
                else:
                    model = _lookwhen(seed).to(device)
                task = _task(method, model, keep, steps)
            seconds = _fit(task, steps, args.lr, seed, 100 + seed, device,
                           motion_caches.setdefault(seed, {}) if method == "motion" else None)
            runs.append({"method": method, "keep_ratio": keep, "seed": seed, "train_seconds": seconds,
                         "pretrain_seconds": extra,
                         "accuracy": _accuracy(model, clips, labels,
                                               _selection(method, keep, model.config, len(clips), motion))})
        timed.setdefault((method, keep), model)
    return runs, timed, checks


@torch.no_grad()
def _tokens_per_clip(model, selection: Dict, clips: torch.Tensor) -> float:
    """Patch tokens the deep network runs on, per clip (RLT's: the mean over
    ``clips``, which decide it)."""
    cfg = model.config
    if isinstance(model, RLTDense):
        cu_seqlens = model.select(fit_clips(clips, cfg.frames, cfg.image_size))[1]
        return float(cu_seqlens[-1]) / (cu_seqlens.numel() - 1)
    if "indices" in selection:
        return float(selection["indices"].shape[1])
    if "window" in selection:
        height, width = selection["window"]
        return float(cfg.grid[0] * height * width)
    if isinstance(model, LookWhen):
        return float(cfg.tokens_kept(selection["keep_ratio"]))
    return float(cfg.n_tokens)


def _costs(args, device, timed: Dict, clips: torch.Tensor, motion: Optional[torch.Tensor]) -> Dict:
    """Tokens, GFLOPs (the mean of a batch's clips: RLT's vary) and clips/s
    (inference, batch BATCH) of each point's model, the points interleaved in
    every pass."""
    batch = clips[:BATCH].to(device)
    calls, gflops, tokens = {}, {}, {}
    for point, model in timed.items():
        model.eval()
        cfg = model.config
        x = fit_clips(batch, cfg.frames, cfg.image_size)
        kwargs = _clips_of(_selection(*point, cfg, len(clips), motion), 0, BATCH)
        gflops[point] = count_flops(model, x, **kwargs) / 1e9 / len(x)
        tokens[point] = _tokens_per_clip(model, kwargs, clips)

        def call(model=model, x=x, kwargs=kwargs):
            with torch.inference_mode():
                logits_of(model, x, **kwargs)

        call()
        calls[point] = call
    seconds = {point: [] for point in calls}
    for _ in range(args.passes):
        for point, call in calls.items():
            seconds[point].append(Stats.from_samples(sample(call, device, min_run_time=0.3, min_samples=1)).median)
    return {point: {"tokens": tokens[point], "gflops": gflops[point],
                    "clips_per_s": BATCH / statistics.median(seconds[point])} for point in calls}


def frontier(points: Sequence[Dict]) -> List[Dict]:
    """The points that no other point beats on both accuracy (higher) and
    GFLOPs (lower), by GFLOPs."""
    kept, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p["gflops"], -p["accuracy"])):
        if point["accuracy"] > best:
            kept.append(point)
            best = point["accuracy"]
    return kept


def summarise(runs: Sequence[Dict], costs: Dict) -> List[Dict]:
    """One point per (method, keep ratio): mean accuracy over seeds, its
    spread (half the range) and the costs."""
    points = []
    for (method, keep), cost in costs.items():
        values = [r["accuracy"] for r in runs if r["method"] == method and r["keep_ratio"] == keep]
        points.append({"method": method, "keep_ratio": keep, "accuracy": statistics.mean(values),
                       "spread": (max(values) - min(values)) / 2, "seeds": len(values), **cost})
    on_frontier = {id(p) for p in frontier(points)}
    for point in points:
        point["frontier"] = id(point) in on_frontier
    return points


def run(args, device: torch.device) -> Result:
    if args.dtype != "fp32" and device.type == "cpu":
        raise BenchError("--dtype: training runs in fp32 on CPU")
    methods = args.methods or (QUICK_METHODS if args.quick else METHODS)
    keeps = args.keep_ratios or ((0.1,) if args.quick else KEEP_RATIOS)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    args.steps = args.steps or (250 if args.quick else 600)
    args.passes = args.passes or (1 if args.quick else 3)
    held_out = SyntheticDataset(args.val_clips, seed=7, task="pattern", **TASK)
    samples = [held_out.sample(i) for i in range(args.val_clips)]
    clips = torch.stack([s.clip for s in samples]).to(device)
    labels = torch.tensor([s.pattern for s in samples])
    # The motion selector's scores of the held-out clips, each encoded as H.264.
    motion = None
    if "motion" in methods:
        with_motion = WithMotion(held_out, GRID)
        motion = torch.stack([with_motion[i]["motion"] for i in range(args.val_clips)])
    runs, timed, checks = _train_all(args, device, _plan(methods, keeps, seeds), samples, clips, labels, motion)
    points = summarise(runs, _costs(args, device, timed, clips, motion))
    rows = [{"method": r["method"], "keep_ratio": r["keep_ratio"], "accuracy": r["accuracy"], "seed": r["seed"],
             "train_seconds": r["train_seconds"], "pretrain_seconds": r.get("pretrain_seconds", 0.0),
             **costs_of(points, r)} for r in runs]
    table = format_table(
        ("method", "keep", "accuracy", "seeds", "tokens/clip", "GFLOPs/clip", "clips/s", "frontier"),
        [(p["method"], "-" if p["keep_ratio"] is None else p["keep_ratio"],
          f"{100 * p['accuracy']:.1f}% ± {100 * p['spread']:.1f}", p["seeds"], f"{p['tokens']:.0f}",
          f"{p['gflops']:.3f}",
          f"{p['clips_per_s']:.1f}", "*" if p["frontier"] else "")
         for p in sorted(points, key=lambda p: p["gflops"])],
        title=f"pattern task ({len(PATTERNS)} classes, chance {100 / len(PATTERNS):.0f}%): held-out accuracy "
              f"({args.val_clips} clips) after {args.steps} fine-tuning steps of {BATCH} fresh clips, mean ± half "
              f"the range over seeds {seeds}; LookWhen pre-trained {args.pretrain_steps} steps; "
              f"inference GFLOPs and clips/s (batch {BATCH}, median of {args.passes} interleaved passes)")
    for check in checks:
        table += (f"\nseed {check['seed']}: the moving square's windows among the best-ranked ({check['clips']} "
                  f"held-out clips): by the uniqueness target {100 * check['teacher_recall']:.1f}%, by the "
                  f"selector after {check['pretrain_steps']} pre-training steps {100 * check['selector_recall']:.1f}%,"
                  f" by chance {100 * check['chance']:.1f}%")
    records = [Record("pareto", p["method"], "finetune", metric, p["keep_ratio"] or 1.0, p[metric])
               for p in points for metric in ("accuracy", "gflops", "clips_per_s")]
    settings = {"steps": args.steps, "pretrain_steps": args.pretrain_steps, "lr": args.lr, "batch": BATCH,
                "seeds": seeds, "val_clips": args.val_clips, "passes": args.passes, "task": TASK, "model": MODEL}
    return Result("pareto", table, rows, records, plot=lambda figure: _plot(figure, points),
                  extra={"points": points, "settings": settings, "selector_checks": checks})


def costs_of(points: Sequence[Dict], run: Dict) -> Dict:
    point = next(p for p in points if p["method"] == run["method"] and p["keep_ratio"] == run["keep_ratio"])
    return {"tokens": point["tokens"], "gflops": point["gflops"], "clips_per_s": point["clips_per_s"]}


def _plot(figure, points: Sequence[Dict]) -> None:
    """Accuracy against GFLOPs and against clips/s, one point per method and
    budget (error bars: the spread over seeds), the frontier drawn."""
    axes = figure.subplots(1, 2)
    figure.set_size_inches(12, 4.8)
    for ax, key, label in ((axes[0], "gflops", "GFLOPs per clip (log)"), (axes[1], "clips_per_s", "clips/s (log)")):
        for method in dict.fromkeys(p["method"] for p in points):
            mine = sorted((p for p in points if p["method"] == method), key=lambda p: p[key])
            ax.errorbar([p[key] for p in mine], [100 * p["accuracy"] for p in mine],
                        yerr=[100 * p["spread"] for p in mine], marker="o", color=COLOURS[method], label=method,
                        capsize=3, linestyle="-" if len(mine) > 1 else "none")
            for p in mine:
                if p["keep_ratio"] is not None:
                    ax.annotate(f"{p['keep_ratio']:g}", (p[key], 100 * p["accuracy"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        best = frontier(points) if key == "gflops" else _fastest_frontier(points)
        ax.plot([p[key] for p in best], [100 * p["accuracy"] for p in best], color="tab:green", linewidth=6,
                alpha=0.25, label="frontier", drawstyle="steps-post" if key == "gflops" else "steps-pre")
        ax.axhline(100 / len(PATTERNS), color="tab:gray", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_ylim(0, 105)
    axes[0].set_title("accuracy against compute (pattern task)", fontsize=10)
    axes[1].set_title("accuracy against measured speed", fontsize=10)
    axes[1].legend(fontsize="small", loc="lower left")


def _fastest_frontier(points: Sequence[Dict]) -> List[Dict]:
    """The frontier in speed: no other point both faster and more accurate."""
    flipped = [{**p, "gflops": -p["clips_per_s"]} for p in points]
    keep = {(p["method"], p["keep_ratio"]) for p in frontier(flipped)}
    return sorted((p for p in points if (p["method"], p["keep_ratio"]) in keep), key=lambda p: p["clips_per_s"])
