"""``python -m bench pipeline``: from video file to embedding, LookWhen
against the dense baseline, in one process.

What a user embedding a collection of videos waits for is the whole path:
open and seek, decode, crop and resize, copy to the device, the model. Three
measurements, each interleaved over passes (medians):

1. **Decoding a sampled clip** of every video, per decoder
   (:mod:`lookwhen.data.decoders`), split into phases, beside the
   ``read_clip`` of the release before this one (decord with its default
   threads, then a float32 resize) and beside reading the decoder's motion
   vectors (the compressed-domain route: the ``motion`` selector's input,
   which needs every frame decoded).
2. **The models on decoded clips**: each one's time per clip.
3. **From files**, the models fed by the chosen decoder: *serial* (decode,
   then the model, in one loop: the split of a clip's time, the decode
   share) and *overlapped* (decoding in ``--decode-workers`` DataLoader
   processes while the model runs, pinned memory and prefetch on a GPU):
   time per clip against ``max(decode, model)``, and LookWhen's speedup from
   files against its speedup on decoded clips.

Cores: on CPU each decoding worker takes a core and the model the rest
(``torch.set_num_threads(cores - workers)``), the decoded-clip timings
included, so that every speedup compares the same machine set-up.

Without ``--videos`` the bench writes its own sample videos with PyAV: H.264
at 1280x720 with x264's default keyframe interval (250 frames) and with one
keyframe every 2 s, 640x272 and 176x144, 10 s at 30 fps each, of a panning
textured scene with moving objects and sensor grain (``--quick``: shorter
and smaller).
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lookwhen
from . import BenchError
from .configs import DTYPES, autocast, parse_overrides, resolve
from .e2e import _video_paths
from .report import Record, Result, format_table
from .timing import synchronize
from lookwhen.cli.args import keep_ratio_arg, positive_int_arg
from lookwhen.data import decoders
from lookwhen.data.decoders import DecodeStats
from lookwhen.data.motion import motion_scores
from lookwhen.data.video import VideoError, read_clip, sample_indices
from lookwhen.models.cpu_inference import onednn_available, prepack_linears

PHASES = ("open", "seek", "decode", "resize", "copy", "model")
# name, width, height, seconds, keyframe interval in frames
SAMPLE_VIDEOS = (("720p-keyint250", 1280, 720, 10, 250), ("720p-keyint60", 1280, 720, 10, 60),
                 ("272p", 640, 272, 10, 250), ("144p", 176, 144, 10, 250))
QUICK_VIDEOS = (("360p-keyint250", 640, 360, 3, 250), ("144p", 176, 144, 3, 250))
FPS = 30
LEGACY = "read_clip before"


def add_arguments(parser) -> None:
    parser.add_argument("--videos", metavar="DIR", help="the videos to read (default: sample videos the bench writes)")
    parser.add_argument("--keep-ratio", nargs="+", type=keep_ratio_arg, default=[0.05, 0.1, 0.3],
                        help="LookWhen's keep ratios (default: 0.05 0.1 0.3)")
    parser.add_argument("--lookwhen", default="lookwhen-b16", metavar="PRESET", help="default: lookwhen-b16")
    parser.add_argument("--baseline", default="internvideo2-b14", metavar="PRESET", help="default: internvideo2-b14")
    parser.add_argument("--decoder", choices=("auto", *decoders.DECODERS), default="auto",
                        help="the decoder feeding the models (default: auto, PyAV where installed); every "
                             "installed decoder is timed in the decode table")
    parser.add_argument("--decode-workers", type=positive_int_arg,
                        help="DataLoader decoding processes (default: 1 on CPU, the model keeping the other cores; "
                             "on CUDA one per core, at most 8)")
    parser.add_argument("--clips", type=positive_int_arg,
                        help="clips per from-file run (default 8, --quick 4; the videos cycled)")
    parser.add_argument("--passes", type=positive_int_arg, help="interleaved passes (default 3, --quick 2)")
    parser.add_argument("--batch", type=positive_int_arg, help="clips per forward (default: 1 on CPU, 8 on CUDA)")


# -- sample videos -----------------------------------------------------------


def _texture(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth random structure at the scale of ``cell`` pixels, float [H, W, 3]."""
    coarse = torch.from_numpy(rng.random((1, 3, math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)))
    fine = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return fine[0].permute(1, 2, 0).numpy()


def write_sample_video(path: str, width: int, height: int, seconds: float, keyint: int, seed: int = 0) -> str:
    """A panning textured scene with three moving objects and grain, as
    H.264 (x264 at crf 23, B-frames on, a keyframe every ``keyint``
    frames): content that costs a decoder what camera footage does, not a
    flat test pattern."""
    import av

    rng = np.random.default_rng(seed)
    frames = max(1, round(seconds * FPS))
    pan = frames * 2
    scene = 255 * (0.55 * _texture(rng, height, width + pan, 96) + 0.3 * _texture(rng, height, width + pan, 12)
                   + 0.15 * _texture(rng, height, width + pan, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    objects = [(rng.uniform(0.1, 0.9, 2) * (height, width), rng.uniform(-4, 4, 2), rng.uniform(0.06, 0.14) * height,
                rng.uniform(40, 255, 3)) for _ in range(3)]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast",
                          "x264-params": f"keyint={keyint}:min-keyint={min(keyint, 25)}"}
        for t in range(frames):
            image = scene[:, 2 * t: 2 * t + width].copy()
            for (centre, velocity, radius, colour) in objects:
                cy, cx = (centre + t * velocity) % (height, width)
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
                image[inside] = 0.7 * colour + 0.3 * image[inside]
            image += rng.normal(0, 3, (height, width, 1))
            frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# -- decoding ----------------------------------------------------------------


def legacy_read_clip(path, frames: int, size: int) -> torch.Tensor:
    """``read_clip`` as the release before this one did it, the baseline of
    the decode table: decord with its default threads (every frame on the way
    converted to RGB), then the centre square resized in float32."""
    decoded = decoders.decode(path, lambda n: sample_indices(n, frames), decoder="decord", threads=0)
    _, height, width, _ = decoded.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = decoded[:, top: top + side, left: left + side].permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@dataclass
class DecodeRow:
    """One method on one video: seconds and phases of every pass."""

    video: str
    method: str
    seconds: List[float] = field(default_factory=list)
    cpu_seconds: List[float] = field(default_factory=list)  # every thread of the process: what the clip costs
    passes: List[DecodeStats] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def phase(self, name: str) -> float:
        return statistics.median(getattr(stats, name) for stats in self.passes)


def _decode_table(paths: Sequence[str], frames: int, size: int, names: Sequence[str], passes: int, grid,
                  progress) -> List[DecodeRow]:
    """Every video read by every method once per pass, interleaved."""
    methods = {LEGACY: lambda path, stats: legacy_read_clip(path, frames, size)}
    for name in names:
        methods[name] = lambda path, stats, name=name: read_clip(path, frames, size, decoder=name, stats=stats)
    methods["motion vectors"] = lambda path, stats: motion_scores(path, grid)
    rows = {(path, m): DecodeRow(os.path.basename(path), m) for path in paths for m in methods}
    for path in paths:  # warm-up: imports, FFmpeg's first open
        for method, read in methods.items():
            read(path, DecodeStats())
    for _ in range(passes):
        for path in paths:
            for method, read in methods.items():
                row = rows[(path, method)]
                stats = DecodeStats()
                start, cpu = time.perf_counter(), time.process_time()
                read(path, stats)
                row.seconds.append(time.perf_counter() - start)
                row.cpu_seconds.append(time.process_time() - cpu)
                row.passes.append(stats)
                progress.update()
    return list(rows.values())


# -- the models ----------------------------------------------------------------


class _Clips(torch.utils.data.Dataset):
    """Clip ``i`` of the from-file runs: video ``i % len(paths)``."""

    def __init__(self, paths: Sequence[str], count: int, frames: int, size: int, decoder: str):
        self.paths, self.count, self.frames, self.size, self.decoder = list(paths), count, frames, size, decoder

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        stats = DecodeStats()
        clip = read_clip(self.paths[index % len(self.paths)], self.frames, self.size, decoder=self.decoder,
                         threads=decoders.loader_threads(), stats=stats)
        return clip, torch.tensor([getattr(stats, phase) for phase in DecodeStats.PHASES])


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def _loader(dataset: _Clips, batch: int, workers: int, device: torch.device):
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, worker_init_fn=_one_thread,
                                       pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
                                       persistent_workers=False)


@dataclass
class ModelRun:
    """One model (at one keep ratio) measured on decoded clips and from files."""

    label: str
    forward: object
    frames: int
    size: int
    decoded: List[float] = field(default_factory=list)       # seconds per clip, one per pass
    serial: List[Dict[str, float]] = field(default_factory=list)  # seconds per clip per phase, one per pass
    overlapped: List[float] = field(default_factory=list)    # seconds per clip, one per pass

    def split(self) -> Dict[str, float]:
        return {phase: statistics.median(p[phase] for p in self.serial) for phase in PHASES}


def _time_decoded(run: ModelRun, clips: torch.Tensor, batch: int, device) -> float:
    """Seconds per clip of the model on decoded clips already on the device."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, clips.shape[0], batch):
        run.forward(clips[i: i + batch])
    synchronize(device)
    return (time.perf_counter() - start) / clips.shape[0]


def _time_serial(run: ModelRun, dataset: _Clips, batch: int, device) -> Dict[str, float]:
    """Per-clip seconds of each phase, decoding in this process."""
    totals = dict.fromkeys(PHASES, 0.0)
    for clips, phases in _loader(dataset, batch, 0, device):
        for phase, seconds in zip(DecodeStats.PHASES, phases.sum(0).tolist()):
            totals[phase] += seconds
        start = time.perf_counter()
        clips = clips.to(device)
        synchronize(device)
        totals["copy"] += time.perf_counter() - start
        start = time.perf_counter()
        run.forward(clips)
        synchronize(device)
        totals["model"] += time.perf_counter() - start
    return {phase: seconds / len(dataset) for phase, seconds in totals.items()}


def _time_overlapped(run: ModelRun, dataset: _Clips, batch: int, workers: int, device) -> float:
    """Seconds per clip with decoding in worker processes, after the first
    batch (the workers' start-up and an empty pipeline)."""
    loader = iter(_loader(dataset, batch, workers, device))
    run.forward(next(loader)[0].to(device, non_blocking=True))
    synchronize(device)
    start, done = time.perf_counter(), 0
    for clips, _ in loader:
        run.forward(clips.to(device, non_blocking=True))
        done += clips.shape[0]
    synchronize(device)
    return (time.perf_counter() - start) / max(done, 1)


# -- the run -------------------------------------------------------------------


def _sample_videos(folder: str, quick: bool, progress_text) -> List[str]:
    specs = QUICK_VIDEOS if quick else SAMPLE_VIDEOS
    paths = []
    for i, (name, width, height, seconds, keyint) in enumerate(specs):
        progress_text(f"writing sample video {name}")
        paths.append(write_sample_video(os.path.join(folder, f"{name}.mp4"), width, height, seconds, keyint, seed=i))
    return paths


def run(args, device: torch.device) -> Result:
    overrides = parse_overrides(args.set)
    cfg_lw, cfg_base = resolve(args.lookwhen, overrides), resolve(args.baseline, overrides)
    if cfg_lw.kind != "lookwhen":
        raise BenchError(f"--lookwhen {args.lookwhen}: not a LookWhen preset")
    if cfg_base.kind != "dense":
        raise BenchError(f"--baseline {args.baseline}: not a dense preset")
    try:
        decoder = decoders.resolve_decoder(args.decoder)
    except ImportError as error:
        raise BenchError(str(error)) from None
    available = decoders.available_decoders()
    if decoder not in available:
        raise BenchError(f"--decoder {args.decoder}: it does not load here (installed and loading: "
                         f"{', '.join(available) or 'none'})")
    if "decord" not in available:
        raise BenchError("the decode table's baseline (the previous read_clip) needs decord: pip install decord2")
    dtype = DTYPES[args.dtype]
    passes = args.passes or (2 if args.quick else 3)
    count = args.clips or (4 if args.quick else 8)
    batch = args.batch or (8 if device.type == "cuda" else 1)
    cores = os.cpu_count() or 1
    workers = args.decode_workers or (min(8, cores) if device.type == "cuda" else 1)
    if device.type == "cpu":
        if workers >= cores:
            raise BenchError(f"--decode-workers {workers}: this machine has {cores} cores and the model needs one")
        torch.set_num_threads(args.threads or cores - workers)
    ratios = list(dict.fromkeys(args.keep_ratio))

    lw = lookwhen.build_model(cfg_lw).to(device).eval()
    base = lookwhen.build_model(cfg_base).to(device).eval()
    # As in bench e2e: both models' linear layers prepacked for oneDNN on CPU.
    linear = "onednn" if device.type == "cpu" and args.dtype == "fp32" and onednn_available() else "aten"
    if linear == "onednn":
        for model in (lw, base):
            prepack_linears(model)
    runs = [ModelRun(f"{cfg_lw.name} keep {r:g}", lambda clips, r=r: lw(clips, keep_ratio=r), cfg_lw.frames,
                     cfg_lw.image_size) for r in ratios]
    runs.append(ModelRun(cfg_base.name, base, cfg_base.frames, cfg_base.image_size))

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch, \
            tqdm(desc="pipeline", unit="step", leave=False) as progress:
        if args.videos:
            found = _video_paths(args.videos)
            paths = []
            for path in found:
                try:
                    read_clip(path, 1, 8, decoder=decoder)
                    paths.append(path)
                except VideoError:
                    pass
            if not paths:
                raise BenchError(f"--videos {args.videos}: none of the {len(found)} video files could be read")
            source = f"{len(paths)} videos from {args.videos}"
        else:
            paths = _sample_videos(scratch, args.quick, progress.set_postfix_str)
            source = "the bench's sample videos (" + ", ".join(
                f"{w}x{h} {s} s keyint {k}" for _, w, h, s, k in (QUICK_VIDEOS if args.quick else SAMPLE_VIDEOS)) + ")"
        progress.total = passes * (len(paths) * (len(available) + 2) + 3 * len(runs))
        progress.set_postfix_str("decoding")
        decode_rows = _decode_table(paths, cfg_lw.frames, cfg_lw.image_size, available, passes, cfg_lw.grid,
                                    progress)
        decoded = {(r.frames, r.size): torch.stack([read_clip(paths[i % len(paths)], r.frames, r.size,
                                                              decoder=decoder) for i in range(count)]).to(device)
                   for r in runs}
        datasets = {(r.frames, r.size): _Clips(paths, count, r.frames, r.size, decoder) for r in runs}
        with torch.inference_mode(), autocast(device, dtype):
            for run_ in runs:  # warm-up
                run_.forward(decoded[(run_.frames, run_.size)][:batch])
            for _ in range(passes):
                for run_ in runs:
                    key = (run_.frames, run_.size)
                    progress.set_postfix_str(run_.label)
                    run_.decoded.append(_time_decoded(run_, decoded[key], batch, device))
                    progress.update()
                    run_.serial.append(_time_serial(run_, datasets[key], batch, device))
                    progress.update()
                    run_.overlapped.append(_time_overlapped(run_, datasets[key], batch, workers, device))
                    progress.update()
    return _result(decode_rows, runs, ratios, decoder, workers, batch, source, args, device, linear)


def _result(decode_rows, runs: List[ModelRun], ratios, decoder: str, workers: int, batch: int, source: str, args,
            device, linear: str) -> Result:
    legacy = {row.video: row.median for row in decode_rows if row.method == LEGACY}
    legacy_cpu = {row.video: statistics.median(row.cpu_seconds) for row in decode_rows if row.method == LEGACY}
    decode_table_rows, decode_payload, records = [], [], []
    for row in decode_rows:
        phases = {name: row.phase(name) for name in DecodeStats.PHASES}
        frames_decoded = row.passes[-1].frames_decoded
        cpu = statistics.median(row.cpu_seconds)
        entry = {"video": row.video, "method": row.method, "seconds_per_clip": row.median,
                 "cpu_seconds_per_clip": cpu, "pass_seconds": row.seconds,
                 "speedup_over_previous_read_clip": legacy[row.video] / row.median,
                 "cpu_saving_over_previous_read_clip": legacy_cpu[row.video] / cpu,
                 **phases, "frames_decoded": frames_decoded}
        decode_payload.append(entry)
        split = "" if row.method in (LEGACY, "motion vectors") else (
            f"{1e3 * (phases['open'] + phases['seek']):.1f} / {1e3 * phases['decode']:.1f} / "
            f"{1e3 * phases['resize']:.1f}")
        decode_table_rows.append((row.video, row.method, f"{1e3 * row.median:.1f}", f"{1e3 * cpu:.1f}", split,
                                  "" if frames_decoded in (None, 0) else frames_decoded,
                                  f"{entry['speedup_over_previous_read_clip']:.2f}x",
                                  f"{entry['cpu_saving_over_previous_read_clip']:.2f}x"))
        records.append(Record("pipeline", row.method, "decode", "seconds_per_clip", row.video, row.median,
                              min(row.seconds), max(row.seconds)))
    base = runs[-1]
    base_decoded = statistics.median(base.decoded)
    base_serial = sum(base.split().values())
    base_overlapped = statistics.median(base.overlapped)
    model_rows, model_payload = [], []
    for r, run_ in zip([*ratios, None], runs):
        split = run_.split()
        serial = sum(split.values())
        decode_s = split["open"] + split["seek"] + split["decode"] + split["resize"]
        overlapped = statistics.median(run_.overlapped)
        model_s = statistics.median(run_.decoded)
        floor = max(decode_s / workers, model_s)
        entry = {"model": run_.label, "keep_ratio": r, "model_seconds_per_clip": model_s,
                 "serial_seconds_per_clip": serial, "serial_split_s": split, "decode_share": decode_s / serial,
                 "overlapped_seconds_per_clip": overlapped, "overlap_floor_s": floor,
                 "overlapped_over_floor": overlapped / floor, "videos_per_s_overlapped": 1 / overlapped,
                 "decoded_pass_s": run_.decoded, "overlapped_pass_s": run_.overlapped}
        if r is not None:
            entry.update(speedup_decoded=base_decoded / model_s, speedup_serial=base_serial / serial,
                         speedup_overlapped=base_overlapped / overlapped)
            entry["overlapped_share_of_decoded_speedup"] = entry["speedup_overlapped"] / entry["speedup_decoded"]
        model_payload.append(entry)
        speedups = ("", "", "", "") if r is None else (
            f"{entry['speedup_decoded']:.2f}x", f"{entry['speedup_serial']:.2f}x",
            f"{entry['speedup_overlapped']:.2f}x", f"{100 * entry['overlapped_share_of_decoded_speedup']:.0f}%")
        model_rows.append((run_.label, f"{1e3 * model_s:.0f}", f"{1e3 * decode_s:.0f}",
                           f"{100 * entry['decode_share']:.0f}%", f"{1e3 * serial:.0f}", f"{1e3 * overlapped:.0f}",
                           f"{overlapped / floor:.2f}", f"{1 / overlapped:.2f}", *speedups))
        for metric in ("model_seconds_per_clip", "serial_seconds_per_clip", "overlapped_seconds_per_clip",
                       "decode_share", "overlapped_over_floor"):
            records.append(Record("pipeline", run_.label, "from-file", metric, "" if r is None else r, entry[metric]))
    threads = torch.get_num_threads()
    setup = (f"{device.type}, {args.dtype}, batch {batch}, model {threads} threads, {workers} decoding "
             f"worker{'s' if workers > 1 else ''}, decoder {decoder}" + (f", linear layers {linear}"
                                                                           if device.type == "cpu" else ""))
    decode_table = format_table(
        ("video", "method", "ms per clip", "CPU ms per clip", "open+seek / decode / resize ms", "frames decoded",
         "vs before", "CPU vs before"),
        decode_table_rows,
        title=(f"Decoding one sampled clip ({runs[0].frames} frames at {runs[0].size} px) from {source}: medians of "
               f"{len(base.decoded)} interleaved passes; '{LEGACY}' is decord with its threads then a float32 resize; "
               "'motion vectors' decodes every frame for the motion selector"))
    model_table = format_table(
        ("model", "model ms/clip", "decode ms/clip", "decode share", "serial ms/clip", "overlapped ms/clip",
         "overlapped / max(decode, model)", "videos/s", "speedup decoded", "speedup serial", "speedup overlapped",
         "share of decoded speedup"),
        model_rows,
        title=(f"From file to embedding ({setup}): decode = open+seek+decode+resize in one process; serial = decode "
               "then model; overlapped = decoding in the workers while the model runs; speedups over "
               f"{base.label}"))
    extra = {"decoder": decoder, "decode_workers": workers, "batch": batch, "model_threads": threads,
             "source": source, "linear": linear, "decode": decode_payload}
    return Result("pipeline", decode_table + "\n\n" + model_table, model_payload, records,
                  plot=lambda figure: _plot(figure, model_payload, decode_payload, decoder), extra=extra)


def _plot(figure, model_payload, decode_payload, decoder: str) -> None:
    """Left: each model's time per clip from files, split into phases
    (serial), with the overlapped time marked. Right: ms per decoded clip
    per video and method."""
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    labels = [entry["model"].replace(" keep ", "\nkeep ") for entry in model_payload]
    bottom = np.zeros(len(model_payload))
    for phase, colour in zip(PHASES, ("tab:gray", "tab:olive", "tab:orange", "tab:brown", "tab:purple", "tab:blue")):
        values = np.array([1e3 * entry["serial_split_s"][phase] for entry in model_payload])
        if values.any():
            left.bar(labels, values, bottom=bottom, color=colour, label=phase)
        bottom += values
    left.scatter(labels, [1e3 * entry["overlapped_seconds_per_clip"] for entry in model_payload], marker="D",
                 color="black", zorder=3, label="overlapped")
    left.set_yscale("log")
    left.set_ylabel("ms per clip (serial, split into phases)")
    left.legend(fontsize=7)
    left.tick_params(axis="x", labelsize=7)
    left.set_title("from file to embedding", fontsize=9)
    videos = list(dict.fromkeys(entry["video"] for entry in decode_payload))
    methods = list(dict.fromkeys(entry["method"] for entry in decode_payload))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        values = [1e3 * next(e["seconds_per_clip"] for e in decode_payload if e["video"] == v and e["method"] == method)
                  for v in videos]
        right.bar(np.arange(len(videos)) + j * width, values, width, label=method)
    right.set_xticks(np.arange(len(videos)) + 0.4 - width / 2, [v.rsplit(".", 1)[0] for v in videos], fontsize=7,
                     rotation=20)
    right.set_yscale("log")
    right.set_ylabel("ms per sampled clip")
    right.legend(fontsize=7)
    right.set_title(f"decoding a clip (feeding the models: {decoder})", fontsize=9)
