"""Helpers several test modules share (not a test module itself): tiny
model shapes, generated videos and running the command in-process.

Model shapes: every test shrinks a preset through ``build_model(preset,
**SHAPE)``. They derive from a few bases here, each test keeping only what
it changes, so that a new config field or a renamed one is fixed once.
"""
import av
import numpy as np
import torch

from lookwhen.cli import main

# LookWhen at toy size: a 64 px clip of 16-px patches (4 x 4 tokens per
# frame), one extractor layer, a projected 16-wide selector.
TINY = dict(frames=2, image_size=64, width=32, depth=2, heads=2, selector_width=16, context_projection=True,
            selector_depth=1, selector_heads=2, score_hidden=16, registers=2, keep_ratio=0.25)
# Smaller still, where a test compiles or counts host syncs: 32 px clips.
MICRO = dict(TINY, image_size=32, width=16, depth=1, selector_width=8, score_hidden=8, registers=1)
# 8 frames of 64 px in 8-px patches (an 8 x 8 grid, the selector on every
# frame): enough tokens for a selector to learn where the objects are.
SMALL = dict(frames=8, image_size=64, patch_size=8, width=32, depth=1, heads=2, selector_width=32,
             selector_depth=1, selector_heads=2, score_hidden=32, registers=2, keep_ratio=0.25,
             selector_frame_stride=1)
# The dense baseline at toy size: 2 frames of 28 px in 14-px patches.
DENSE_TINY = dict(frames=2, image_size=28, width=32, depth=2, heads=2, pool_heads=2)

CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm")}


def make_video(path, n_frames, width, height, codec="h264", fps=10, keyint=None):
    """Write a video whose frame ``i`` encodes ``i``: the top half is gray
    level ``16 * (i // 16) + 8`` and the bottom half ``16 * (i % 16) + 8``
    (flat areas survive lossy coding within a few levels), so the decoded
    clip says which frames were sampled (:func:`decode_indices`).
    ``keyint``: H.264 with a keyframe every ``keyint`` frames and two
    B-frames between references (seeking and frame skipping to exercise)."""
    encoder, _ = CODECS[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "h264" and keyint:
            stream.options = {"crf": "1", "preset": "ultrafast",
                              "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=2:b-adapt=0"}
        elif codec == "h264":
            stream.options = {"crf": "1", "preset": "ultrafast"}
        else:
            stream.options = {"crf": "4", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        for i in range(n_frames):
            image = np.empty((height, width, 3), np.uint8)
            image[: height // 2] = 16 * (i // 16) + 8
            image[height // 2:] = 16 * (i % 16) + 8
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decode_indices(clip: torch.Tensor) -> list:
    """Frame indices encoded in a clip ``[T, S, S, 3]`` by :func:`make_video`:
    the mean level of the top and bottom quarters (away from the seam)."""
    quarter = clip.shape[1] // 4
    top = clip[:, :quarter].double().mean(dim=(1, 2, 3))
    bottom = clip[:, -quarter:].double().mean(dim=(1, 2, 3))
    return (16 * torch.round((top - 8) / 16) + torch.round((bottom - 8) / 16)).long().tolist()


def encode(path, clip, codec="libx264", options=None, pix_fmt="yuv420p"):
    """uint8 ``[T, S, S, 3]`` -> a video file (H.264 with a real motion search
    by default: ultrafast x264 leaves most moving blocks with zero vectors)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], pix_fmt
        stream.options = {"crf": "18", "preset": "medium"} if options is None else options
        for image in clip.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def run(capsys, *argv):
    """Exit status, stdout and stderr lines of one ``lookwhen`` command run
    in-process."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]
