"""``python -m bench seeds``: the seed methods' selection strategies on the
synthetic clips of ``bench train`` (:mod:`lookwhen.data.synthetic`).

1. **Perturbed.** Fine-tuning on the colour of a brief event (``bench
   train``'s task: one 10-px object in 2 of 8 frames, keep ratio 0.1) with
   STTS's differentiable top-K (``selection="perturbed"``, sigma 0.2 -> 0
   over the first 80% of the steps, then the hard top-K) and no uniqueness
   pre-training, for both score heads: held-out accuracy, and the top-K
   recall of the event object by the selector the task loss alone trained
   (before: the same at initialisation). ``--control``: the same run with
   the hard top-K throughout, whose score head no gradient reaches.
2. **Windows.** The selector pre-trained on uniqueness (``bench train``'s
   learning run): per frame, the window of the largest summed score
   (``select_windows`` on the fine grid); its recall of the moving object's
   fine tokens against a window placed at random.
3. **Budgets.** ``budgets_from_scores`` at mass 0.9 on that selector's
   scores, per softmax temperature: tokens given to clips with one small
   object and with three.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Dict, List

import torch

import lookwhen
import lookwhen_kernels as lk
from .. import BenchError
from ..report import Record, Result, format_table
from . import train as bench_train
from lookwhen.cli.args import keep_ratio_arg, positive_int_arg
from lookwhen.data.synthetic import COLOURS, SyntheticDataset, selector_recall
from lookwhen.training.engine import TrainSettings, Trainer
from lookwhen.training.finetune import FinetuneTask, sigma_decay_steps

WINDOW = (4, 4)
WINDOW_CLIPS = dict(frames=8, size=96, object_size=16, n_objects=1)
BUDGET_MASS = 0.9
TEMPERATURES = (1.0, 0.5, 0.2, 0.1)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=positive_int_arg, help="selector pre-training steps (default 300, --quick 60)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of pre-training")
    parser.add_argument("--train-clips", type=positive_int_arg, default=256, help="synthetic pre-training clips")
    parser.add_argument("--val-clips", type=positive_int_arg, default=128, help="held-out synthetic clips")
    parser.add_argument("--finetune-steps", type=positive_int_arg, help="fine-tuning steps (default 2000, --quick 40)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4, help="peak learning rate of fine-tuning")
    parser.add_argument("--samples", type=positive_int_arg, default=100, help="perturbed top-K samples per clip")
    parser.add_argument("--sigma", type=float, default=0.2,
                        help="perturbed top-K noise at the start, decaying linearly to 0 (default 0.2; STTS "
                             "uses 0.05 and 0.1)")
    parser.add_argument("--sigma-decay", type=keep_ratio_arg, default=0.8, metavar="FRACTION",
                        help="sigma reaches 0 after this fraction of the fine-tuning steps, the rest is hard top-K "
                             "(default 0.8; 1 is STTS's schedule)")
    parser.add_argument("--heads", nargs="*", choices=("mlp", "stts"), default=["mlp", "stts"],
                        help="score heads fine-tuned with the perturbed top-K (none: only --control)")
    parser.add_argument("--seed", type=int, default=0,
                        help="fine-tuning: the model's initialisation and the training run's seed (noise, order)")
    parser.add_argument("--control", action="store_true",
                        help="also fine-tune with the hard top-K from scratch (its score head gets no gradient)")
    parser.add_argument("--skip", nargs="+", choices=("perturbed", "windows"), default=[],
                        help="leave parts out (windows includes the budgets)")


def _perturbed(args, device) -> List[Dict]:
    steps = args.finetune_steps or (40 if args.quick else 2000)
    keep = 0.1
    train = SyntheticDataset(steps * 16, seed=3, task="colour", **bench_train.EVENT_CLIPS)
    held_out = [SyntheticDataset(args.val_clips, seed=4, **bench_train.EVENT_CLIPS).sample(i)
                for i in range(args.val_clips)]
    rows = []
    runs = [(head, "perturbed") for head in args.heads] + ([("mlp", "selector")] if args.control else [])
    for head, selection in runs:
        model = lookwhen.build_model("lookwhen-b16", **bench_train.LEARNING_MODEL, score_head=head,
                                     num_classes=len(COLOURS), seed=args.seed).to(device)
        before = selector_recall(model.eval(), held_out)
        task = FinetuneTask(model.train(), keep_ratio=keep, selection=selection, layer_decay=0.9,
                            sigma=args.sigma, sigma_steps=sigma_decay_steps(args.sigma_decay, steps),
                            n_samples=args.samples)
        with tempfile.TemporaryDirectory() as folder:
            settings = TrainSettings(out=folder, steps=steps, batch_size=16, lr=args.finetune_lr, save_every=steps,
                                     device=str(device), progress=None, seed=args.seed)
            start = time.perf_counter()
            Trainer(task, train, settings, log=lambda line: None).fit()
            seconds = time.perf_counter() - start
        rows.append({"head": head, "selection": selection, "seed": args.seed, "steps": steps, "keep_ratio": keep,
                     "samples": args.samples, "sigma": args.sigma if selection == "perturbed" else 0.0,
                     "sigma_decay": args.sigma_decay,
                     "accuracy": bench_train.accuracy(model, held_out, keep, device, task="colour"),
                     "recall_before": before, "recall_after": selector_recall(model.eval(), held_out),
                     "seconds": seconds})
    return rows


@torch.no_grad()
def _window_recall(model, samples, device) -> Dict:
    """Per clip, the fraction of the object's fine tokens inside the chosen
    windows (one per frame), and the same for a window at a uniformly random
    position (its expectation, computed exactly over all positions)."""
    cfg = model.config
    frames, height, width = cfg.grid
    clips = torch.stack([s.clip for s in samples]).to(device)
    scores = model.selector_scores(clips)
    ids = lk.select_windows(scores, WINDOW, grid=cfg.selector_grid, out_grid=cfg.grid).long().cpu()
    kernel = torch.ones(1, 1, *WINDOW)
    recalls, chances = [], []
    for b, sample in enumerate(samples):
        truth = sample.object_tokens(cfg.patch_size)
        if not truth.any():
            continue
        recalls.append(float(truth[ids[b]].sum()) / float(truth.sum()))
        covered = torch.nn.functional.conv2d(truth.float().view(frames, 1, height, width), kernel)
        chances.append(float(covered.flatten(1).mean(1).sum()) / float(truth.sum()))
    return {"window_recall": statistics.mean(recalls), "window_chance": statistics.mean(chances)}


@torch.no_grad()
def _budgets(model, device, n: int) -> List[Dict]:
    """Mean budgets of clips with one small object and with three, per
    softmax temperature (the mass a selector's scores put on its objects
    depends on their scale)."""
    cfg = model.config
    scores = {}
    for objects in (1, 3):
        data = SyntheticDataset(n, seed=5, **{**WINDOW_CLIPS, "object_size": 12, "n_objects": objects})
        scores[objects] = model.selector_scores(torch.stack([data.sample(i).clip for i in range(n)]).to(device))
    rows = []
    for temperature in TEMPERATURES:
        row = {"temperature": temperature, "mass": BUDGET_MASS, "n_tokens": cfg.n_tokens}
        for objects, values in scores.items():
            budgets = lk.budgets_from_scores(values, mass=BUDGET_MASS, temperature=temperature,
                                             grid=cfg.selector_grid, out_grid=cfg.grid)
            row[f"budget_{objects}_objects"] = float(budgets.float().mean())
        rows.append(row)
    return rows


def _windows(args, device) -> Dict:
    learned, = bench_train._learning(args, device)
    model = args.pretrained_selector.eval()
    held_out = [SyntheticDataset(args.val_clips, seed=2, **WINDOW_CLIPS).sample(i) for i in range(args.val_clips)]
    return {"pretrain_steps": learned["steps"], "selector_recall": learned["recall_after"],
            **_window_recall(model, held_out, device), "budgets": _budgets(model, device, args.val_clips)}


def run(args, device: torch.device) -> Result:
    if args.dtype != "fp32" and device.type == "cpu":
        raise BenchError("--dtype: training runs in fp32 on CPU (bf16 autocast is the GPU path)")
    if args.plot:
        raise BenchError("--plot: seeds prints tables only")
    payload, records, tables = [], [], []
    if "perturbed" not in args.skip:
        rows = _perturbed(args, device)
        payload += [{"part": "perturbed", **row} for row in rows]
        tables.append(format_table(
            ("head", "selection", "seed", "steps", "sigma", "decay", "keep", "samples", "val accuracy",
             "event recall before", "after", "train s"),
            [(r["head"], "hard top-K" if r["selection"] == "selector" else "perturbed", r["seed"], r["steps"],
              r["sigma"], r["sigma_decay"], r["keep_ratio"], r["samples"], f"{100 * r['accuracy']:.1f}%",
              f"{r['recall_before']:.3f}", f"{r['recall_after']:.3f}", f"{r['seconds']:.0f}") for r in rows],
            title="fine-tuning with STTS's perturbed top-K, no pre-training: colour of a brief event (held out)"))
        records += [Record("seeds", r["head"], r["selection"], m, r["steps"], r[m])
                    for r in rows for m in ("accuracy", "recall_before", "recall_after")]
    if "windows" not in args.skip:
        w = _windows(args, device)
        payload.append({"part": "windows", **w})
        tables.append(format_table(
            ("pre-train steps", "selector recall", f"window {WINDOW[0]}x{WINDOW[1]} recall", "random window"),
            [(w["pretrain_steps"], f"{w['selector_recall']:.3f}", f"{w['window_recall']:.3f}",
              f"{w['window_chance']:.3f}")],
            title="select_windows on the uniqueness-pre-trained selector: recall of the moving object (held out)"))
        tables.append(format_table(
            ("temperature", "mass", "budget 1 object", "budget 3 objects", "tokens"),
            [(r["temperature"], r["mass"], f"{r['budget_1_objects']:.1f}", f"{r['budget_3_objects']:.1f}",
              r["n_tokens"]) for r in w["budgets"]],
            title="budgets_from_scores on that selector's scores: mean tokens per clip (held out)"))
        records += [Record("seeds", "windows", "recall", m, w["pretrain_steps"], w[m])
                    for m in ("window_recall", "window_chance")]
        records += [Record("seeds", f"{objects} objects", "budgets", "tokens", r["temperature"],
                           r[f"budget_{objects}_objects"]) for r in w["budgets"] for objects in (1, 3)]
    return Result("seeds", "\n\n".join(tables), payload, records)
