"""``python -m bench train``: does pre-training learn, and what does a
training step cost.

1. **Learning.** Selector pre-training (uniqueness target, KL loss) on
   synthetic clips with known moving objects (:mod:`lookwhen.data.synthetic`): the
   selector's top-K recall of the objects' tokens on held-out clips, before
   and after, against chance. The image teacher is a randomly initialised
   timm ViT made in-process (nothing can be downloaded): on these clips a
   background patch repeats exactly across frames whatever the weights, so
   uniqueness singles out the objects all the same. Its targets are computed
   once into a :class:`~lookwhen.training.targets.TargetCache`, as a real run would.
2. **Throughput.** Clips/s of one LookWhen pre-training step (forward with
   per-clip budgets, every loss, backward, AdamW; teacher targets cached)
   against a dense-baseline step (forward, a distillation MSE, backward,
   AdamW), interleaved in one process, and the efficiency: speedup over the
   ratio of the steps' FLOPs (``torch.utils.flop_counter``, forward and
   backward).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Dict, List, Sequence

import torch

import lookwhen
from .. import BenchError
from ..configs import parse_overrides, resolve
from ..report import Record, Result, format_table
from ..timing import Stats, sample
from lookwhen.cli.args import keep_ratio_arg, positive_int_arg
from lookwhen.data.synthetic import COLOURS, SyntheticDataset, selector_recall
from lookwhen.training.engine import TrainSettings, Trainer, make_optimizer
from lookwhen.training.finetune import FinetuneTask, logits_of
from lookwhen.training.losses import LossWeights
from lookwhen.training.pretrain import PretrainModule, PretrainTask
from lookwhen.training.targets import PATCH_FORMATS, TargetCache, WithTargets, teacher_targets, write_cache
from lookwhen.training.teachers import ImageTeacher, TeacherTargets, Teachers
from lookwhen_kernels import keep_ratio_to_k

LEARNING_MODEL = dict(frames=8, image_size=96, patch_size=8, width=64, depth=2, heads=2, selector_width=64,
                      selector_depth=2, selector_heads=2, score_hidden=64, registers=2)
LEARNING_CLIPS = dict(frames=8, size=96, object_size=16, n_objects=(1, 2))
# The fine-tuning task: the colour of one small object seen in 2 of the 8
# frames, an event that 10 % of the tokens chosen at random often miss.
EVENT_CLIPS = dict(frames=8, size=96, object_size=10, visible=2)
TEACHER = dict(name="vit_tiny_patch16_224", image_size=192, depth=4)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=positive_int_arg, help="selector pre-training steps (default 300, --quick 60)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the learning run")
    parser.add_argument("--train-clips", type=positive_int_arg, default=256, help="synthetic training clips")
    parser.add_argument("--val-clips", type=positive_int_arg, default=128, help="held-out synthetic clips")
    parser.add_argument("--patch-format", nargs="+", choices=PATCH_FORMATS, default=["fp16"], dest="patch_formats",
                        help="forms of the cached patch targets to pre-train from, one run each (cache-targets "
                             "--patch-format)")
    parser.add_argument("--keep-ratio", type=keep_ratio_arg, default=0.1, help="budget of the timed LookWhen step")
    parser.add_argument("--batch", type=positive_int_arg, default=1, help="clips per timed training step")
    parser.add_argument("--lookwhen", default="lookwhen-b16", metavar="PRESET")
    parser.add_argument("--baseline", default="internvideo2-b14", metavar="PRESET")
    parser.add_argument("--passes", type=positive_int_arg, help="interleaved timing passes (default 3, --quick 2)")
    parser.add_argument("--finetune-steps", type=positive_int_arg, help="fine-tuning steps (default 500, --quick 40)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4, help="peak learning rate of fine-tuning")
    parser.add_argument("--skip", nargs="+", choices=("learning", "finetune", "throughput"), default=[],
                        help="leave parts out")


def random_image_teacher(folder: str, device, image_size: int = TEACHER["image_size"]) -> ImageTeacher:
    """:data:`TEACHER`, randomly initialised (seed 0), through its weights
    file in ``folder``, as a real teacher loads."""
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model(TEACHER["name"], pretrained=False, num_classes=0, img_size=image_size,
                                depth=TEACHER["depth"])
    weights = os.path.join(folder, "teacher.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, weights)
    return ImageTeacher(TEACHER["name"], weights, image_size=image_size, depth=TEACHER["depth"]).to(device)


def _learning(args, device, patch_formats: Sequence[str] = ("fp16",)) -> List[Dict]:
    """Selector pre-training from the teacher's cached targets, once per
    form of ``patch_formats`` (the same model initialisation and clips each
    time); the first one's selector goes on to the fine-tuning part
    (``args.pretrained_selector``)."""
    steps = args.steps or (60 if args.quick else 300)
    train = SyntheticDataset(args.train_clips, seed=1, **LEARNING_CLIPS)
    held_out = [SyntheticDataset(args.val_clips, seed=2, **LEARNING_CLIPS).sample(i) for i in range(args.val_clips)]
    config = lookwhen.get_config("lookwhen-b16-light", **LEARNING_MODEL)
    window = config.patch_size * config.selector_downsample
    chance = statistics.mean(float(s.object_tokens(window).float().mean()) for s in held_out)
    fingerprint = {"synthetic": [args.train_clips, TEACHER["name"]]}
    results = []
    with tempfile.TemporaryDirectory() as folder:
        teacher = random_image_teacher(folder, device)
        # The teacher runs once; each form is written from the same outputs.
        start = time.perf_counter()
        entries = list(teacher_targets(Teachers(teacher), [(index, 0) for index in range(len(train))],
                                       lambda index, view: train[index]["clip"], config.grid[1:], batch_size=1,
                                       device=device))
        teacher_s = time.perf_counter() - start
        for patch_format in patch_formats:
            model = lookwhen.build_model("lookwhen-b16-light", **LEARNING_MODEL, seed=0).to(device)
            start = time.perf_counter()
            cache_folder = os.path.join(folder, f"cache-{patch_format}")
            write_cache(cache_folder, entries, fingerprint, 1, patch_format=patch_format)
            cache_s = teacher_s + time.perf_counter() - start
            cache_mb = sum(os.path.getsize(os.path.join(cache_folder, name))
                           for name in os.listdir(cache_folder)) / 2 ** 20
            before = selector_recall(model.eval(), held_out)
            cache = TargetCache(cache_folder, fingerprint)
            task = PretrainTask(model.train(), cache=cache, train="selector", weights=LossWeights(selector=1.0))
            settings = TrainSettings(out=os.path.join(folder, f"run-{patch_format}"), steps=steps, batch_size=16,
                                     lr=args.lr, save_every=steps, device=str(device), progress=None)
            start = time.perf_counter()
            last = Trainer(task, WithTargets(train, cache), settings, log=lambda line: None).fit()
            train_s = time.perf_counter() - start
            results.append({"patch_format": patch_format, "steps": steps, "batch": 16,
                            "train_clips": args.train_clips, "val_clips": args.val_clips, "recall_before": before,
                            "recall_after": selector_recall(model.eval(), held_out), "chance": chance,
                            "final_loss": last["loss"], "cache_seconds": cache_s, "cache_mb": cache_mb,
                            "train_seconds": train_s})
            if len(results) == 1:
                args.pretrained_selector = model
    return results


@torch.no_grad()
def accuracy(model, samples, keep_ratio: float, device, batch_size: int = 16, task: str = "direction") -> float:
    model = model.eval()
    correct = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        clips = torch.stack([s.clip for s in chunk]).to(device)
        predicted = logits_of(model, clips, keep_ratio=keep_ratio).argmax(-1).cpu()
        correct += int((predicted == torch.tensor([s.target(task) for s in chunk])).sum())
    return correct / len(samples)


def _finetuning(args, device) -> Dict:
    """Fine-tune on the colour of a brief event (3 classes: a small object
    seen in 2 of the 8 frames) at a keep ratio of 0.1, from the pre-trained
    selector, and the same with random tokens."""
    steps = args.finetune_steps or (40 if args.quick else 500)
    keep = 0.1
    # Fresh clips all along: a few hundred would be memorised (backgrounds).
    train = SyntheticDataset(steps * 16, seed=3, task="colour", **EVENT_CLIPS)
    held_out = [SyntheticDataset(args.val_clips, seed=4, **EVENT_CLIPS).sample(i) for i in range(args.val_clips)]
    pretrained = getattr(args, "pretrained_selector", None)
    results = {"steps": steps, "keep_ratio": keep, "batch": 16, "classes": len(COLOURS), "task": "colour"}
    for selection in ("selector", "random"):
        model = lookwhen.build_model("lookwhen-b16-light", **LEARNING_MODEL, num_classes=len(COLOURS)).to(device)
        if pretrained is not None:
            model.selector.load_state_dict(pretrained.selector.state_dict())
        task = FinetuneTask(model.train(), keep_ratio=keep, selection=selection, layer_decay=0.9)
        with tempfile.TemporaryDirectory() as folder:
            settings = TrainSettings(out=folder, steps=steps, batch_size=16, lr=args.finetune_lr, save_every=steps,
                                     device=str(device), progress=None)
            start = time.perf_counter()
            Trainer(task, train, settings, log=lambda line: None).fit()
            results[f"{selection}_seconds"] = time.perf_counter() - start
        results[f"{selection}_accuracy"] = accuracy(model, held_out, keep, device, task="colour")
    results["pretrained_selector"] = pretrained is not None
    return results


def _lookwhen_step(cfg, batch, keep, device):
    model = lookwhen.build_model(cfg).to(device).train()
    image_dim = video_dim = cfg.width
    frames, h, w = cfg.grid
    targets = TeacherTargets(torch.randn(batch, frames, h * w, image_dim, device=device),
                             torch.randn(batch, frames, image_dim, device=device),
                             torch.randn(batch, video_dim, device=device))

    class _Fixed:  # cached targets, already on the device
        def get(self, indices, views):
            return targets

        def first(self):
            return targets

    task = PretrainTask(model, cache=_Fixed(), weights=LossWeights())
    module: PretrainModule = task.module.to(device)
    optimizer = make_optimizer(module, TrainSettings(out="", steps=1))
    budgets = torch.full((batch,), keep_ratio_to_k(keep, cfg.n_tokens), dtype=torch.int32)
    clips = torch.randint(0, 256, (batch, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                          device=device)
    batch_dict = {"clips": clips, "indices": torch.arange(batch), "views": torch.zeros(batch, dtype=torch.long)}

    def step():
        loss, _ = module(batch_dict, budgets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_backward():
        module(batch_dict, budgets)[0].backward()

    return step, forward_backward


def _dense_step(cfg, batch, device):
    model = lookwhen.build_model(cfg).to(device).train()
    head = torch.nn.Linear(cfg.width, cfg.width).to(device)
    module = torch.nn.ModuleDict({"model": model, "head": head})
    optimizer = make_optimizer(module, TrainSettings(out="", steps=1))
    clips = torch.randint(0, 256, (batch, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                          device=device)
    target = torch.randn(batch, cfg.width, device=device)

    def forward_backward():
        torch.nn.functional.mse_loss(head(model(clips)), target).backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward_backward


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _throughput(args, device) -> Dict:
    overrides = parse_overrides(args.set)
    cfg_lw, cfg_base = resolve(args.lookwhen, overrides), resolve(args.baseline, overrides)
    if cfg_lw.kind != "lookwhen" or cfg_base.kind != "dense":
        raise BenchError("--lookwhen needs a LookWhen preset and --baseline a dense one")
    passes = args.passes or (2 if args.quick else 3)
    lw_step, lw_fb = _lookwhen_step(cfg_lw, args.batch, args.keep_ratio, device)
    base_step, base_fb = _dense_step(cfg_base, args.batch, device)
    flops = {"lookwhen": _flops(lw_fb), "dense": _flops(base_fb)}
    seconds: Dict[str, List[float]] = {"lookwhen": [], "dense": []}
    for name, step in (("lookwhen", lw_step), ("dense", base_step)):
        step()  # warm-up: first-call allocations and optimiser state
    for _ in range(passes):
        for name, step in (("lookwhen", lw_step), ("dense", base_step)):
            seconds[name].append(Stats.from_samples(sample(step, device, min_run_time=0.5, min_samples=1)).median)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    speedup = median["dense"] / median["lookwhen"]
    ratio = flops["dense"] / flops["lookwhen"]
    return {"lookwhen": cfg_lw.name, "baseline": cfg_base.name, "keep_ratio": args.keep_ratio, "batch": args.batch,
            "passes": passes, "clips_per_s": {k: args.batch / v for k, v in median.items()},
            "pass_seconds": seconds, "train_gflops_per_clip": {k: v / 1e9 / args.batch for k, v in flops.items()},
            "speedup": speedup, "flops_ratio": ratio, "efficiency": speedup / ratio}


def run(args, device: torch.device) -> Result:
    if args.dtype != "fp32" and device.type == "cpu":
        raise BenchError("--dtype: training runs in fp32 on CPU (bf16 autocast is the GPU path)")
    payload, records, tables = [], [], []
    if "learning" not in args.skip:
        learned = _learning(args, device, args.patch_formats)
        payload += [{"part": "learning", **run} for run in learned]
        tables.append(format_table(
            ("targets", "cache MB", "steps", "clips/step", "recall before", "recall after", "chance", "final loss",
             "train s"),
            [(run["patch_format"], f"{run['cache_mb']:.1f}", run["steps"], run["batch"],
              f"{run['recall_before']:.3f}", f"{run['recall_after']:.3f}", f"{run['chance']:.3f}",
              f"{run['final_loss']:.4f}", f"{run['train_seconds']:.0f}") for run in learned],
            title="selector pre-training on synthetic clips from cached teacher targets: top-K recall of the "
                  "moving objects' tokens (held out)"))
        records += [Record("train", f"selector-{run['patch_format']}", "learning", m, run["steps"], run[m])
                    for run in learned for m in ("recall_before", "recall_after", "chance")]
    if "finetune" not in args.skip:
        tuned = _finetuning(args, device)
        payload.append({"part": "finetune", **tuned})
        tables.append(format_table(
            ("steps", "keep", "selection", "val accuracy", "train s"),
            [(tuned["steps"], tuned["keep_ratio"], name, f"{100 * tuned[name + '_accuracy']:.1f}%",
              f"{tuned[name + '_seconds']:.0f}") for name in ("selector", "random")],
            title="fine-tuning on the colour of a brief event (3 classes; a small object in 2 of 8 frames; "
                  "held out)"
                  + (", from the pre-trained selector" if tuned["pretrained_selector"] else "")))
        records += [Record("train", name, "finetune", "accuracy", tuned["keep_ratio"], tuned[name + "_accuracy"])
                    for name in ("selector", "random")]
    if "throughput" not in args.skip:
        timed = _throughput(args, device)
        payload.append({"part": "throughput", **timed})
        rate, gflops = timed["clips_per_s"], timed["train_gflops_per_clip"]
        tables.append(format_table(
            ("LookWhen clips/s", "dense clips/s", "speedup", "LookWhen GFLOPs", "dense GFLOPs", "FLOPs ratio",
             "efficiency"),
            [(f"{rate['lookwhen']:.3f}", f"{rate['dense']:.3f}", f"{timed['speedup']:.2f}x",
              f"{gflops['lookwhen']:.1f}", f"{gflops['dense']:.1f}", f"{timed['flops_ratio']:.2f}x",
              f"{timed['efficiency']:.2f}")],
            title=f"training step (forward + backward + AdamW), {timed['lookwhen']} at keep ratio "
                  f"{timed['keep_ratio']} vs {timed['baseline']}, batch {timed['batch']}, median of "
                  f"{timed['passes']} interleaved passes"))
        records += [Record("train", k, "step", "clips_per_s", timed["keep_ratio"], v) for k, v in rate.items()]
    return Result("train", "\n\n".join(tables), payload, records, plot=lambda figure: _plot(figure, payload))


def _plot(figure, payload) -> None:
    """Left: recall before and after pre-training against chance. Right:
    training clips/s of both models, with the FLOPs-ratio limit."""
    parts = {p["part"]: p for p in payload}
    axes = figure.subplots(1, len(parts))
    axes = list(axes) if len(parts) > 1 else [axes]
    if "learning" in parts:
        ax, learned = axes.pop(0), parts["learning"]
        runs = [p for p in payload if p["part"] == "learning"]
        values = [learned["chance"], learned["recall_before"]] + [run["recall_after"] for run in runs]
        ax.bar(["chance", "before"] + [f"after {run['steps']} steps\n({run['patch_format']} targets)" for run in runs],
               values, color=["tab:gray", "tab:orange"] + ["tab:green"] * len(runs))
        for x, value in enumerate(values):
            ax.text(x, value + 0.01, f"{value:.2f}", ha="center", va="bottom")
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("top-K recall of object tokens (held out)")
        ax.set_title("selector pre-training on synthetic clips", fontsize=10)
    if "finetune" in parts:
        ax, tuned = axes.pop(0), parts["finetune"]
        values = [tuned["selector_accuracy"], tuned["random_accuracy"], 1 / tuned["classes"]]
        ax.bar(["selector's tokens", "random tokens", "chance"], values, color=["tab:green", "tab:orange", "tab:gray"])
        for x, value in enumerate(values):
            ax.text(x, value + 0.01, f"{100 * value:.0f}%", ha="center", va="bottom")
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"fine-tuning at keep ratio {tuned['keep_ratio']}", fontsize=10)
    if "throughput" in parts:
        ax, timed = axes.pop(0), parts["throughput"]
        rates = timed["clips_per_s"]
        ax.bar([timed["lookwhen"], timed["baseline"]], [rates["lookwhen"], rates["dense"]],
               color=["tab:blue", "tab:gray"])
        ax.axhline(rates["dense"] * timed["flops_ratio"], color="tab:blue", linestyle="--",
                   label=f"FLOPs-ratio limit ({timed['flops_ratio']:.1f}x)")
        ax.set_ylabel("training clips/s")
        ax.set_title(f"training step, keep ratio {timed['keep_ratio']}: {timed['speedup']:.2f}x, "
                     f"efficiency {timed['efficiency']:.2f}", fontsize=10)
        ax.legend(fontsize="small")
