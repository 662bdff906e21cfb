"""Video input: exact frame sampling, geometry and bad files.

Every test video is made with PyAV (``helpers.make_video``). Each frame
carries its index in its pixels, so the decoded clip says which frames were
sampled (``helpers.decode_indices``).
"""

import av
import numpy as np
import pytest
import torch

from lookwhen.data.decoders import DecodeStats, available_decoders, decode
from lookwhen.data.video import VideoError, iter_clip_batches, read_clip, read_clips, resize_square, sample_indices
from helpers import CODECS, decode_indices, make_video

# Every decoder this environment loads must give the same frames.
DECODERS = available_decoders()

@pytest.mark.parametrize(
    "codec, n_frames, width, height",
    [
        ("h264", 40, 96, 54),   # a width decord2 returns with padded rows
        ("h264", 23, 70, 130),  # portrait
        ("vp9", 37, 99, 71),    # odd width and height
        ("vp9", 3, 45, 33),     # very short, odd sizes
    ],
)
def test_sampling_returns_the_frames_asked_for(tmp_path, codec, n_frames, width, height):
    path = make_video(tmp_path / f"v{CODECS[codec][1]}", n_frames, width, height, codec)
    frames = 8
    clips = {name: read_clip(path, frames, 32, decoder=name) for name in DECODERS}
    for name, clip in clips.items():
        assert clip.dtype == torch.uint8 and clip.shape == (frames, 32, 32, 3), name
        assert decode_indices(clip) == sample_indices(n_frames, frames), name
        assert torch.equal(clip, clips["pyav"]), f"{name} and pyav decode different pixels"


@pytest.mark.parametrize("decoder", DECODERS)
def test_seeks_and_skips_yet_returns_exact_frames(tmp_path, decoder):
    """A keyframe every 8 frames and B-frames: any order, repeats, both
    ends; the PyAV decoder gets there decoding a fraction of the stream."""
    path = make_video(tmp_path / "gop.mp4", 70, 64, 48, keyint=8)
    wanted = [65, 3, 3, 40, 17, 69, 0, 8, 7]
    stats = DecodeStats()
    frames = decode(path, lambda n: wanted, decoder=decoder, stats=stats)
    assert frames.shape == (len(wanted), 48, 64, 3)
    assert decode_indices(frames) == wanted
    with av.open(path) as container:  # every frame, decoded in order by FFmpeg itself
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert np.array_equal(frames.numpy(), np.stack([reference[i] for i in wanted]))
    if decoder == "pyav":
        assert 0 < stats.frames_decoded < 35 and stats.seek > 0
        sparse = DecodeStats()
        decode(path, lambda n: [60, 65], stats=sparse)
        assert sparse.frames_decoded <= 8  # from the keyframe at 56, references only until 60
    else:
        assert stats.frames_decoded is None


def test_decoder_arguments_are_checked(tmp_path):
    path = make_video(tmp_path / "a.mp4", 10, 32, 32)
    with pytest.raises(ValueError, match="decoder must be"):
        read_clip(path, 4, 32, decoder="ffmpeg")
    with pytest.raises(ValueError, match="threads"):
        read_clip(path, 4, 32, threads=-1)
    with pytest.raises(ValueError, match="outside"):
        decode(path, lambda n: [n])
    with pytest.raises(ValueError, match="no frames were asked for"):
        decode(path, lambda n: [])


def test_sample_indices_rule():
    # Centre of each of T equal segments.
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(16, 16) == list(range(16))
    # Shorter than T: every frame appears, in order, as evenly as possible.
    short = sample_indices(3, 8)
    assert short == sorted(short) and set(short) == {0, 1, 2}
    counts = [short.count(i) for i in range(3)]
    assert max(counts) - min(counts) <= 1
    assert sample_indices(1, 5) == [0] * 5
    assert sample_indices(10, 2, first=30) == [32, 37]
    with pytest.raises(ValueError):
        sample_indices(0, 4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_time_window(tmp_path, decoder):
    path = make_video(tmp_path / "w.mp4", 50, 64, 48, fps=10)
    clip = read_clip(path, 4, 32, start=1.0, end=3.0, decoder=decoder)  # frames 10 .. 29
    assert decode_indices(clip) == sample_indices(20, 4, first=10)
    clip = read_clip(path, 5, 32, start=4.0, decoder=decoder)  # frames 40 .. 49
    assert decode_indices(clip) == sample_indices(10, 5, first=40)
    with pytest.raises(VideoError, match="holds no frames"):
        read_clip(path, 4, 32, start=7.0, end=9.0, decoder=decoder)


def test_geometry_short_side_resize_and_centre_crop():
    frames = torch.zeros(2, 60, 100, 3, dtype=torch.uint8)
    frames[:, :, 20:80] = 200  # the centred 60 x 60 square
    out = resize_square(frames, 30)
    assert out.shape == (2, 30, 30, 3) and bool((out == 200).all())
    # A frame already of the target size is cut, not resampled.
    same = torch.randint(0, 256, (1, 32, 40, 3), dtype=torch.uint8)
    assert torch.equal(resize_square(same, 32), same[:, :, 4:36])


def _bad_files(tmp_path):
    good = make_video(tmp_path / "good.mp4", 20, 64, 48)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    return {
        "missing": (str(tmp_path / "missing.mp4"), "no such file"),
        "empty": (str(empty), "empty"),
        "truncated": (str(truncated), "truncated"),
        "text": (str(text), "not a readable video"),
        "directory": (str(tmp_path), "directory"),
    }


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_files_raise_errors_naming_the_file(tmp_path, decoder):
    for path, reason in _bad_files(tmp_path).values():
        with pytest.raises(VideoError, match=reason) as info:
            read_clip(path, 4, 32, decoder=decoder)
        assert str(info.value).startswith(path) and info.value.path == path
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_stream_fails_on_decode(tmp_path, decoder):
    """An MP4 with its index first (faststart) opens when cut, then fails
    when a missing frame is decoded."""
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(VideoError, match="truncated") as info:
        read_clip(path, 8, 32, decoder=decoder)
    assert str(path) in str(info.value)


def test_batch_reports_bad_files_and_keeps_the_rest(tmp_path):
    bad = _bad_files(tmp_path)
    good = [make_video(tmp_path / f"g{i}.webm", 5 + i, 40, 30, "vp9") for i in range(3)]
    paths = [good[0], bad["missing"][0], good[1], bad["text"][0], bad["truncated"][0], good[2]]
    batch = read_clips(paths, 4, 32)
    assert batch.paths == good
    assert [p for p, _ in batch.failures] == [bad["missing"][0], bad["text"][0], bad["truncated"][0]]
    assert all(message.startswith(p) for p, message in batch.failures)
    assert batch.clips.shape == (3, 4, 32, 32, 3)
    for clip, n in zip(batch.clips, (5, 6, 7)):
        assert decode_indices(clip) == sample_indices(n, 4)
    # Grouped, nothing is lost either.
    groups = list(iter_clip_batches(paths, 4, 4, 32))
    assert [len(g.paths) + len(g.failures) for g in groups] == [4, 2]
    assert sum((g.paths for g in groups), []) == good
    assert read_clips([bad["empty"][0]], 4, 32).clips is None
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_clip_batches(paths, 0))


@pytest.mark.skipif("pyav" not in DECODERS, reason="PyAV is not installed")
def test_quick_probe_falls_back_to_a_full_one(tmp_path, monkeypatch):
    """The PyAV decoder opens without FFmpeg's decoding probe; a container
    whose frame size that leaves unknown is opened again with it, and the
    frames come out the same either way."""
    path = make_video(tmp_path / "probe.mp4", 12, 64, 48)
    opened, real_open = [], av.open

    def open_without_size(*args, options=None, **kwargs):
        container = real_open(*args, options=options, **kwargs)
        opened.append(options)
        if options:
            container.streams.video[0].codec_context.width = 0  # as a quick probe of some containers leaves it
        return container

    expected = read_clip(path, 5, 32, decoder="pyav")
    monkeypatch.setattr(av, "open", open_without_size)
    assert torch.equal(read_clip(path, 5, 32, decoder="pyav"), expected)
    assert opened == [{"skip_frame": "all"}, None]
