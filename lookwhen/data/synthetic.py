"""Synthetic clips with known structure, for showing that training learns
(no data set can be downloaded here).

A clip is a static textured background with square objects moving across
it in a straight line. Background patches repeat exactly from frame to frame,
so in any image teacher's feature space their nearest neighbour is the same
patch in another frame (uniqueness near 0), while the patches an object
covers change with it: the tokens a selector should learn to keep are known
in advance (:attr:`SyntheticClip.object_tokens`). The label is the direction
of motion, a four-class task that a classifier can only solve by looking at
the objects across frames.

The pattern task (:func:`pattern_clip`) is one where the choice of tokens
decides accuracy: the label is a one-pixel checkerboard on a small object
seen briefly among static look-alikes, which only full resolution shows.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

import lookwhen_kernels as lk

DIRECTIONS = ("right", "left", "down", "up")
# The strongest channel of the moving objects' colour.
COLOURS = ("red", "green", "blue")
# The pattern task's classes: the sign, per channel, of the colour offset of
# a checkerboard's even squares ((y + x) even; the odd squares take the
# opposite offset). Any 2x2 block mean (the selector's view) or 2x
# antialiased resize of it is the object's plain base colour.
PATTERNS = ("red", "green", "blue", "white")
_PATTERN_SIGNS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "white": (1, 1, 1)}
CLASSES = {"direction": DIRECTIONS, "colour": COLOURS, "pattern": PATTERNS}
TASKS = tuple(CLASSES)
# (dy, dx) per frame, in units of the speed.
_STEP = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


@dataclass
class SyntheticClip:
    """``clip uint8 [T, S, S, 3]``; ``label``: index into :data:`DIRECTIONS`;
    ``object_mask bool [T, S, S]``: the pixels the moving objects cover;
    ``colour``: index into :data:`COLOURS` of the moving objects;
    ``pattern``: index into :data:`PATTERNS` of their fine pattern (the
    pattern task's clips)."""

    clip: torch.Tensor
    label: int
    object_mask: torch.Tensor
    colour: int = 0
    pattern: int = 0

    def target(self, task: str) -> int:
        """The class of the clip for ``task``: "direction", "colour" or "pattern"."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return {"direction": self.label, "colour": self.colour, "pattern": self.pattern}[task]

    def object_tokens(self, patch_size: int, min_cover: float = 0.0, frame_stride: int = 1) -> torch.Tensor:
        """bool ``[T' * (S/p) * (S/p)]`` in token order: the patches more than
        ``min_cover`` of whose pixels belong to an object (by default, any
        pixel: a patch an object only touches changes with it too), on every
        ``frame_stride``-th frame (``T' = ceil(T / frame_stride)``: the frames
        a selector with that stride sees)."""
        mask = self.object_mask[::frame_stride]
        frames, size, _ = mask.shape
        side = size // patch_size
        cover = mask.float().view(frames, side, patch_size, side, patch_size).mean(dim=(2, 4))
        return (cover > min_cover).flatten()


def _background(rng: np.random.Generator, size: int, cell: Optional[int] = None, noise: int = 24) -> np.ndarray:
    """Blocks of random grey levels (faintly tinted) of ``cell`` pixels with
    fine noise of +-``noise`` on top: every patch of the background looks
    different from its neighbours, and none is as colourful as an object."""
    cell = cell or max(2, size // 28)
    cells = math.ceil(size / cell)
    coarse = rng.integers(40, 216, (cells, cells, 1)) + rng.integers(-8, 9, (cells, cells, 3))
    image = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:size, :size]
    if noise:
        image = image + rng.integers(-noise, noise + 1, (size, size, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def _object_colour(rng: np.random.Generator, dominant: int) -> np.ndarray:
    """A saturated colour whose strongest channel is ``dominant`` (R, G, B)."""
    colour = rng.integers(0, 120, 3)
    colour[dominant] = rng.integers(210, 256)
    return colour


def _sprite(rng: np.random.Generator, side: int, dominant: int) -> np.ndarray:
    # Textured: shifted by the motion, no object patch repeats another.
    texture = rng.integers(-40, 41, (side, side, 1))
    return np.clip(_object_colour(rng, dominant) + texture, 0, 255).astype(np.uint8)


def synthetic_clip(
    generator: np.random.Generator,
    *,
    frames: int = 16,
    size: int = 224,
    n_objects: int = 1,
    object_size: Optional[int] = None,
    speed: Optional[float] = None,
    label: Optional[int] = None,
    colour: Optional[int] = None,
    visible: Optional[int] = None,
) -> SyntheticClip:
    """One clip. Every moving object goes in the clip's direction (``label``,
    drawn when ``None``) at ``speed`` pixels per frame (default: across about
    half the frame over the clip), from a random start that keeps it inside
    the frame. Objects are ``object_size`` pixels square (default ``size /
    7``), textured, in a saturated colour (unlike the greyish background)
    whose strongest channel is ``colour`` (drawn when ``None``). ``visible`` limits the moving objects to that many
    consecutive frames (from a random first one): an event that a fixed
    budget of random tokens easily misses."""
    if frames < 1 or size < 8:
        raise ValueError(f"frames must be >= 1 and size >= 8, got {frames} and {size}")
    if n_objects < 0:
        raise ValueError(f"n_objects must be >= 0, got {n_objects}")
    side = object_size or max(4, size // 7)
    if not 1 <= side <= size:
        raise ValueError(f"object_size must lie in [1, {size}], got {side}")
    if label is None:
        label = int(generator.integers(len(DIRECTIONS)))
    if not 0 <= label < len(DIRECTIONS):
        raise ValueError(f"label must lie in [0, {len(DIRECTIONS)}), got {label}")
    if colour is None:
        colour = int(generator.integers(len(COLOURS)))
    if not 0 <= colour < len(COLOURS):
        raise ValueError(f"colour must lie in [0, {len(COLOURS)}), got {colour}")
    visible = frames if visible is None else visible
    if not 1 <= visible <= frames:
        raise ValueError(f"visible must lie in [1, {frames}] (frames), got {visible}")
    travel_room = size - side
    if speed is None:
        speed = travel_room / (2 * max(frames - 1, 1))
    dy, dx = _STEP[DIRECTIONS[label]]
    travel = speed * (frames - 1)
    if travel > travel_room:
        raise ValueError(f"speed {speed} moves an object {travel:.0f} px, more than the {travel_room} px of room")

    background = _background(generator, size)
    video = np.repeat(background[None], frames, 0)
    mask = np.zeros((frames, size, size), dtype=bool)
    first = int(generator.integers(0, frames - visible + 1))
    for _ in range(n_objects):
        sprite = _sprite(generator, side, colour)

        def start(step):
            # Leave room for the whole path along the direction of motion.
            low = travel if step < 0 else 0.0
            high = travel_room - (travel if step > 0 else 0.0)
            return generator.uniform(low, high)

        y0, x0 = start(dy), start(dx)
        for t in range(first, first + visible):
            y, x = int(round(y0 + dy * speed * t)), int(round(x0 + dx * speed * t))
            video[t, y: y + side, x: x + side] = sprite
            mask[t, y: y + side, x: x + side] = True
    return SyntheticClip(torch.from_numpy(video), label, torch.from_numpy(mask), colour)


def pattern_clip(
    generator: np.random.Generator,
    *,
    frames: int = 8,
    size: int = 64,
    object_size: int = 6,
    visible: int = 2,
    speed: int = 4,
    distractors: int = 3,
    amplitude: int = 48,
    pattern: Optional[int] = None,
    align: int = 2,
) -> SyntheticClip:
    """A clip of the pattern task. An ``object_size``-pixel square, seen in
    ``visible`` consecutive frames from a random first one, moves ``speed``
    pixels per frame in a random direction from a random place; it wears a
    one-pixel checkerboard whose squares are its base colour plus and minus
    ``amplitude`` times the signs of ``PATTERNS[pattern]`` (the label, drawn
    when ``None``). ``distractors`` static squares of the same size and base
    colour, but plain, stay in every frame. Every square sits on even
    pixel coordinates, so that a 2x2 block mean (the selector's view) or a
    2x antialiased resize turns the moving square into exactly its base
    colour, like the distractors: at half resolution nothing tells the label
    or which square it is, except that one appears briefly and moves. The
    label needs the pixels of one of the few tokens the object covers."""
    if frames < 1 or size < 8 or size % 2:
        raise ValueError(f"frames must be >= 1 and size an even number >= 8, got {frames} and {size}")
    if object_size < 2 or object_size % 2 or object_size > size:
        raise ValueError(f"object_size must be an even number in [2, {size}], got {object_size}")
    if speed < 0 or speed % 2:
        raise ValueError(f"speed must be an even number of pixels >= 0, got {speed}")
    if not 1 <= visible <= frames:
        raise ValueError(f"visible must lie in [1, {frames}] (frames), got {visible}")
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    if not 0 < amplitude <= 64:
        raise ValueError(f"amplitude must lie in (0, 64] (the squares stay within 0..255), got {amplitude}")
    if pattern is None:
        pattern = int(generator.integers(len(PATTERNS)))
    if not 0 <= pattern < len(PATTERNS):
        raise ValueError(f"pattern must lie in [0, {len(PATTERNS)}), got {pattern}")
    travel = speed * (visible - 1)
    if travel > size - object_size:
        raise ValueError(f"speed {speed} moves the object {travel} px, more than the {size - object_size} px of room")

    if align < 2 or align % 2 or speed % align:
        raise ValueError(f"align must be an even number of pixels dividing speed {speed}, got {align}")

    def even(low: int, high: int) -> int:
        return align * int(generator.integers(-(-low // align), high // align + 1))

    base = generator.integers(64 + amplitude // 4, 193 - amplitude // 4, 3)
    # Pixel noise would hide the one-pixel pattern: the texture is 4-px blocks.
    video = np.repeat(_background(generator, size, cell=4, noise=0)[None], frames, 0)
    room = size - object_size
    for _ in range(distractors):
        y, x = even(0, room), even(0, room)
        video[:, y: y + object_size, x: x + object_size] = base
    label = int(generator.integers(len(DIRECTIONS)))
    dy, dx = _STEP[DIRECTIONS[label]]
    parity = np.add.outer(np.arange(object_size), np.arange(object_size)) % 2
    offset = amplitude * np.array(_PATTERN_SIGNS[PATTERNS[pattern]])
    sprite = np.where(parity[..., None] == 0, base + offset, base - offset).astype(np.uint8)
    y0 = even(travel if dy < 0 else 0, room - (travel if dy > 0 else 0))
    x0 = even(travel if dx < 0 else 0, room - (travel if dx > 0 else 0))
    first = int(generator.integers(0, frames - visible + 1))
    mask = np.zeros((frames, size, size), dtype=bool)
    for step in range(visible):
        y, x = y0 + dy * speed * step, x0 + dx * speed * step
        video[first + step, y: y + object_size, x: x + object_size] = sprite
        mask[first + step, y: y + object_size, x: x + object_size] = True
    return SyntheticClip(torch.from_numpy(video), label, torch.from_numpy(mask), int(np.argmax(base)), pattern)


def write_video(path, clip: torch.Tensor, fps: int = 10, preset: str = "ultrafast"):
    """Encode uint8 ``[T, H, W, 3]`` as H.264 at near-lossless quality
    (needs PyAV: ``pip install av``) into the file ``path``, or into a
    writable binary file object as MP4. x264's ``preset`` sets how hard it
    searches for motion: ``ultrafast`` leaves most moving blocks without a
    vector, ``medium`` (x264's default) finds them, for
    :mod:`lookwhen.data.motion`. Returns ``path`` (as a string for a path)."""
    # PyAV (the video extra) only to encode files; clips as tensors need none.
    import av

    frames, height, width, _ = clip.shape
    in_memory = hasattr(path, "write")
    with av.open(path if in_memory else os.fspath(path), "w", format="mp4" if in_memory else None) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"crf": "0", "preset": preset}
        for image in clip.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path if in_memory else os.fspath(path)


def write_dataset(root, per_class: int, *, seed: int = 0, task: str = "direction", **clip_kwargs) -> List[str]:
    """A folder tree ``root/<class>/<i>.mp4`` of synthetic clips (classes:
    :data:`CLASSES` of ``task``), the layout
    :class:`lookwhen.data.datasets.VideoDataset` reads. Returns the paths."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    generator = np.random.default_rng(seed)
    paths = []
    for label, name in enumerate(CLASSES[task]):
        folder = os.path.join(os.fspath(root), name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            if task == "pattern":
                sample = pattern_clip(generator, pattern=label, **clip_kwargs)
            else:
                sample = synthetic_clip(generator, **{"label" if task == "direction" else "colour": label},
                                        **clip_kwargs)
            paths.append(write_video(os.path.join(folder, f"{i:04d}.mp4"), sample.clip))
    return paths


class SyntheticDataset(torch.utils.data.Dataset):
    """``n`` synthetic clips, each made on demand from ``(seed, index)``, in
    the sample format of :class:`lookwhen.data.datasets.VideoDataset` (``view`` is
    always 0: a synthetic clip has one sampling), labelled for ``task``
    ("direction" or "colour"). ``n_objects`` may be a ``(low, high)`` range
    drawn per clip."""

    def __init__(self, n: int, *, seed: int = 0, task: str = "direction", n_objects=1, **clip_kwargs):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "pattern" and n_objects != 1:
            raise ValueError("the pattern task has one labelled object (and plain distractors): no n_objects")
        self.n, self.seed, self.task, self.n_objects, self.clip_kwargs = n, seed, task, n_objects, clip_kwargs

    @property
    def classes(self) -> Sequence[str]:
        return CLASSES[self.task]

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Clips do not change between epochs."""

    def sample(self, index: int) -> SyntheticClip:
        generator = np.random.default_rng((self.seed, index))
        if self.task == "pattern":
            return pattern_clip(generator, **self.clip_kwargs)
        count = self.n_objects
        if isinstance(count, tuple):
            count = int(generator.integers(count[0], count[1] + 1))
        return synthetic_clip(generator, n_objects=count, **self.clip_kwargs)

    def __getitem__(self, index: int):
        sample = self.sample(index)
        return {"clip": sample.clip, "label": sample.target(self.task), "index": index, "view": 0, "skipped": []}


@torch.no_grad()
def selector_recall(model, samples: Sequence[SyntheticClip], batch_size: int = 8) -> float:
    """Top-K recall of a LookWhen selector on synthetic clips, on the
    selector's own token grid: per clip, K is the number of selector tokens
    the objects touch, and the recall is the fraction of them among the K
    best-scored tokens (chance: K / n)."""
    cfg = model.config
    window = cfg.patch_size * cfg.selector_downsample
    device = next(model.parameters()).device
    recalls = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        truth = [s.object_tokens(window, frame_stride=cfg.selector_frame_stride) for s in chunk]
        scores = model.selector_scores(torch.stack([s.clip for s in chunk]).to(device))
        budgets = torch.tensor([int(t.sum()) for t in truth], dtype=torch.int32, device=device)
        indices, cu, _ = lk.topk_tokens_budgets(scores, budgets)
        for b, wanted in enumerate(truth):
            chosen = indices[cu[b]: cu[b + 1]].long().cpu()
            if wanted.any():
                recalls.append(float(wanted[chosen].sum()) / float(wanted.sum()))
    return sum(recalls) / max(len(recalls), 1)
