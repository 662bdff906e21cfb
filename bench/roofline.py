"""``python -m bench roofline``: the least time each op and each model can
take on a named GPU, ``max(FLOPs / peak tensor FLOP/s, bytes / memory
bandwidth)``, and on a real GPU the measured time against it.

FLOPs are counted by ``torch.utils.flop_counter`` on a real run of the op or
model (our ops register their formulas). Bytes are the least traffic: for an op
every input read and every output written once at 2-byte floats (see
``Case.bytes_moved``); for a model its weights read once at 2 bytes, the uint8
clip read once and the embedding written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import lookwhen
from . import BenchError
from .configs import DTYPES, autocast, parse_overrides, parse_shapes
from .ops import FLOAT_BYTES, cases_for, make_step
from .report import Record, Result, format_table
from .timing import Stats, rotating, sample
from lookwhen.cli.args import keep_ratio_arg, positive_float_arg, positive_int_arg


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    tensor_flops: float  # dense (no 2:4 sparsity) FP16/BF16 tensor-core FLOP/s
    bandwidth: float  # memory bytes/s
    source: str


# The vendor's datasheets. NVIDIA lists Hopper's tensor throughput "with
# sparsity"; the dense figure is half of it.
GPUS: Dict[str, GPU] = {g.key: g for g in (
    GPU("H100-SXM", "NVIDIA H100 SXM5 80GB", 989.4e12, 3.35e12,
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity, "
        "GPU memory bandwidth 3.35 TB/s; https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"),
    GPU("H200", "NVIDIA H200 SXM 141GB", 989.4e12, 4.8e12,
        "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity, "
        "GPU memory bandwidth 4.8 TB/s; https://www.nvidia.com/en-us/data-center/h200/"),
    GPU("A100-80GB", "NVIDIA A100 80GB SXM", 312e12, 2.039e12,
        "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): BF16/FP16 Tensor Core 312 TFLOPS (624 with sparsity), "
        "GPU memory bandwidth 2,039 GB/s; https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    GPU("L40S", "NVIDIA L40S 48GB", 362.05e12, 864e9,
        "NVIDIA L40S datasheet: BF16/FP16 Tensor Core 362.05 TFLOPS (733 with sparsity), memory bandwidth 864 GB/s; "
        "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"),
)}


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find_gpu(name: str) -> GPU:
    """``H100``, ``h100-sxm``, ``"A100 80GB"``, ``l40s``... -> the table row."""
    wanted = _normalise(name)
    matches = [g for g in GPUS.values() if _normalise(g.key).startswith(wanted) or wanted.startswith(_normalise(g.key))]
    if len(matches) != 1:
        raise BenchError(f"--gpu {name}: unknown GPU; choose from {', '.join(GPUS)}")
    return matches[0]


def floor_seconds(flops: float, bytes_moved: float, gpu: GPU):
    compute, memory = flops / gpu.tensor_flops, bytes_moved / gpu.bandwidth
    return max(compute, memory), ("compute" if compute >= memory else "memory")


def add_arguments(parser) -> None:
    parser.add_argument("--gpu", nargs="+", default=list(GPUS), metavar="NAME",
                        help=f"GPUs from the datasheet table (default: all of {', '.join(GPUS)})")
    parser.add_argument("--shapes", nargs="+", default=["lookwhen-b16", "internvideo2-b14"], metavar="PRESET[:K=V,...]")
    parser.add_argument("--batch", type=positive_int_arg, help="clips (default: 1 on CPU, 16 on CUDA)")
    parser.add_argument("--keep-ratio", nargs="+", type=keep_ratio_arg, help="keep ratios (default: each config's)")
    parser.add_argument("--min-run-time", type=positive_float_arg, help="seconds per measurement on a GPU (default: 0.3)")


@dataclass
class Item:
    """One op case or one model: what the floor is computed for."""

    name: str
    shape: str
    flops: float
    bytes_moved: float
    step: object = None  # the measured call, on a GPU only
    measured: float = None


def _count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _model_items(cfg, batch, ratios, device) -> List[Item]:
    model = lookwhen.build_model(cfg).to(device).eval()
    clips = [(torch.randint(0, 256, (batch, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                            device=device),) for _ in range(3)]
    weights = sum(p.numel() for p in model.parameters()) * FLOAT_BYTES
    traffic = weights + clips[0][0].numel() + batch * cfg.width * FLOAT_BYTES
    if cfg.kind == "dense":
        return [Item(cfg.name, f"B{batch} all {cfg.n_tokens} tokens", _count(lambda: model(clips[0][0])), traffic,
                     rotating(model, clips))]
    return [Item(cfg.name, f"B{batch} keep {r:g}", _count(lambda r=r: model(clips[0][0], keep_ratio=r)), traffic,
                 rotating(lambda clip, r=r: model(clip, keep_ratio=r), clips)) for r in ratios]


def run(args, device: torch.device) -> Result:
    gpus = list(dict.fromkeys(find_gpu(name) for name in args.gpu))
    dtype = DTYPES[args.dtype]
    configs = parse_shapes(args.shapes, parse_overrides(args.set))
    batch = args.batch or (16 if device.type == "cuda" else 1)
    measure = device.type == "cuda"
    items: List[Item] = []
    with torch.inference_mode(), autocast(device, dtype):
        for cfg in tqdm(configs, desc="roofline", unit="model", leave=False):
            ratios = args.keep_ratio or [cfg.keep_ratio]
            seen = set()
            for case in (c for r in ratios for c in cases_for(cfg, batch, r)):
                if (case.kernel, case.label) in seen:
                    continue
                seen.add((case.kernel, case.label))
                inputs = case.make_inputs(device, dtype)
                fused = case.op(device, dtype)
                step = make_step(case, case.fused, "fwd", device, dtype, rotate=3) if measure else None
                items.append(Item(case.kernel, f"{cfg.name} {case.label}", _count(lambda: fused(*inputs)),
                                  case.bytes_moved, step))
            items.extend(_model_items(cfg, batch, ratios, device))
        # Rows of one op together (the keep ratios interleave them), models last.
        models = {cfg.name for cfg in configs}
        order = {name: i for i, name in enumerate(dict.fromkeys(item.name for item in items))}
        items.sort(key=lambda item: (item.name in models, order[item.name]))
        if measure:
            for item in tqdm(items, desc="measure", unit="item", leave=False):
                item.measured = Stats.from_samples(sample(item.step, device, min_run_time=args.min_run_time or 0.3)).median
    return _result(items, gpus, device)


def _result(items: List[Item], gpus: List[GPU], device) -> Result:
    rows, payload, records = [], [], []
    for gpu in gpus:
        for item in items:
            floor, bound = floor_seconds(item.flops, item.bytes_moved, gpu)
            vs_floor = None if item.measured is None else item.measured / floor
            rows.append((gpu.key, item.name, item.shape, f"{item.flops / 1e9:.4g}", f"{item.bytes_moved / 1e6:.4g}",
                         f"{item.flops / max(item.bytes_moved, 1):.1f}", f"{floor * 1e6:.2f}", bound,
                         "-" if item.measured is None else f"{item.measured * 1e6:.1f}",
                         "-" if vs_floor is None else f"{100 * vs_floor:.0f}%"))
            payload.append({"gpu": gpu.key, "item": item.name, "shape": item.shape, "flops": item.flops,
                            "bytes": item.bytes_moved, "floor_s": floor, "bound": bound,
                            "measured_s": item.measured, "measured_pct_of_floor": None if vs_floor is None else 100 * vs_floor})
            records.append(Record(item.name, gpu.key, "fwd", "floor_s", item.shape, floor))
            if item.measured is not None:
                records.append(Record(item.name, gpu.key, "fwd", "measured_s", item.shape, item.measured))
    note = ("Predicted floors (FLOPs / peak dense tensor FLOP/s vs bytes / bandwidth, the larger); measured on "
            f"{device.type}" + ("" if device.type == "cuda" else ": none (no GPU), predictions only"))
    table = format_table(("gpu", "item", "shape", "GFLOP", "MB", "FLOP/B", "floor us", "bound", "measured us",
                          "measured/floor"), rows, title=note)
    sources = "\n".join(f"  {g.key}: {g.tensor_flops / 1e12:g} TFLOP/s, {g.bandwidth / 1e12:g} TB/s - {g.source}"
                        for g in gpus)
    extra = {"gpus": [{"key": g.key, "name": g.name, "tensor_flops": g.tensor_flops, "bandwidth": g.bandwidth,
                       "source": g.source} for g in gpus]}
    return Result("roofline", table + "\n\nSources:\n" + sources, payload, records,
                  plot=lambda fig: _plot(fig, payload, gpus), extra=extra)


def _plot(figure, payload, gpus) -> None:
    labels = list(dict.fromkeys(f"{p['item']} {p['shape']}" for p in payload))
    ax = figure.add_subplot()
    height = 0.8 / len(gpus)
    for i, gpu in enumerate(gpus):
        floors = {f"{p['item']} {p['shape']}": p["floor_s"] * 1e6 for p in payload if p["gpu"] == gpu.key}
        ax.barh([j + i * height for j in range(len(labels))], [floors[label] for label in labels], height=height,
                label=gpu.key)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("floor time (us), log scale")
    ax.legend(fontsize=7)
    figure.set_size_inches(9, max(3.0, 0.3 * len(labels) + 1.5))
