"""The benchmark CLI end to end: every subcommand runs for real (in a
subprocess, without Triton's interpreter, so the ops take their CPU paths) at
tiny shapes and writes its table, JSON, CSV and plot; bad arguments give one
line on stderr and a non-zero exit. No timing is asserted."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

import torch

from bench.__main__ import main
from bench.ops import cases_for
from bench.report import CSV_FIELDS
from bench.roofline import GPUS, find_gpu, floor_seconds
from lookwhen.cli.args import parse_overrides
from lookwhen.models.config import get_config
from lookwhen.models.cpu_inference import onednn_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["frames=2", "depth=1", "width=64", "heads=2", "pool_heads=2", "selector_width=32", "context_projection=true", "selector_heads=2",
        "selector_depth=1", "score_hidden=32"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_with_outputs(tmp_path, *args):
    paths = {ext: str(tmp_path / f"out.{ext}") for ext in ("json", "csv", "png")}
    proc = run_cli(*args, "--json", paths["json"], "--csv", paths["csv"], "--plot", paths["png"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    with open(paths["json"]) as handle:
        document = json.load(handle)
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == PNG_MAGIC
    assert os.path.getsize(paths["png"]) > 5000  # a drawn figure, not an empty canvas
    for key in ("device", "versions", "git_commit", "date", "command"):
        assert key in document
    assert document["device"].startswith("cpu")
    assert rows and set(rows[0]) == set(CSV_FIELDS)
    assert all(r["device"] == document["device"] for r in rows)
    return proc.stdout, document, rows


def test_e2e_cli(tmp_path):
    stdout, document, rows = run_with_outputs(
        tmp_path, "e2e", "--quick", "--keep-ratio", "0.1", "0.5", "--min-run-time", "0.01", "--set", *TINY)
    assert "speedup" in stdout and "efficiency" in stdout
    entries = document["e2e"]
    assert [e["keep_ratio"] for e in entries] == [0.1, 0.5]
    for e in entries:
        for key in ("speedup", "flops_ratio", "efficiency", "selection_fraction", "lookwhen_clips_per_s",
                    "baseline_clips_per_s"):
            assert math.isfinite(e[key]) and e[key] > 0, key
        assert e["speedup"] == pytest.approx(e["lookwhen_clips_per_s"] / e["baseline_clips_per_s"])
        assert e["efficiency"] == pytest.approx(e["speedup"] / e["flops_ratio"])
        assert e["flops_ratio"] == pytest.approx(e["baseline_gflops_per_clip"] / e["lookwhen_gflops_per_clip"])
        split = e["selection_fraction"] + e["selector_fraction"] + e["extractor_fraction"]
        assert 0 < split <= 1.0 + 1e-9
    # Keeping more tokens costs more FLOPs.
    assert entries[0]["lookwhen_gflops_per_clip"] < entries[1]["lookwhen_gflops_per_clip"]
    metrics = {(r["metric"], r["x"]) for r in rows}
    assert ("efficiency", "0.1") in metrics and ("clips_per_s", "0.5") in metrics
    # Both models ran with the same CPU set-up, and the table says which.
    assert document["linear"] == ("onednn" if onednn_available() else "aten")
    assert document["malloc"] in ("retain", "system")
    assert f"linear layers: {document['linear']}, malloc: {document['malloc']}" in stdout
    # The baseline's attention runs through the same kernels as LookWhen's extractor.
    assert document["baseline"]["attention"] == "kernels"
    check_methods(document, stdout, motion=True)
    assert "synthetic clips" in stdout
    proof = document["synthetic_proof"]
    assert proof.startswith("synthetic proof: RLT keeps frame 0 (256) + ") and proof in stdout
    assert "motion selector top-K recall of the object" in proof


def test_e2e_bf16_reports_agreement_with_float32(tmp_path):
    # Cosine per clip of the first batch, top-K overlap, and the cosine at
    # float32's own selection, which only the arithmetic can move.
    stdout, document, _ = run_with_outputs(
        tmp_path, "e2e", "--quick", "--dtype", "bf16", "--keep-ratio", "0.5", "--min-run-time", "0.01",
        "--passes", "2", "--low-res", "--set", *TINY)
    entry, = document["e2e"]
    batch = document["batch"]
    for key in ("lookwhen_cosine", "baseline_cosine", "topk_overlap", "lookwhen_cosine_same_topk"):
        assert len(entry[key]) == batch and all(-1 <= v <= 1 + 1e-6 for v in entry[key]), key
    assert all(0 <= v <= 1 for v in entry["topk_overlap"])
    assert min(entry["lookwhen_cosine_same_topk"]) > 0.99
    assert "cosine when given the float32 top-K" in stdout


def check_methods(document, stdout, motion):
    """The methods table: every method, and numbers consistent with each other."""
    methods = {m["method"]: m for m in document["methods"]}
    dense = methods["internvideo2-b14"]
    expected = {"internvideo2-b14", "lookwhen-b16 keep 0.1", "internvideo2-b14+rlt", "internvideo2-b14@112px",
                "internvideo2-b14@154px"} | ({"lookwhen-b16 keep 0.1 motion"} if motion else set())
    assert expected <= set(methods) and ("lookwhen-b16 keep 0.1 motion" in methods) == motion
    for m in methods.values():
        assert m["gmacs_per_clip"] == pytest.approx(m["gflops_per_clip"] / 2)
        assert m["speedup"] == pytest.approx(m["clips_per_s"] / dense["clips_per_s"])
        assert m["efficiency"] == pytest.approx(m["speedup"] * m["gflops_per_clip"] / dense["gflops_per_clip"])
        assert m["method"] in stdout
    # Two frames of 16 x 16 patches: RLT keeps frame 0 and the moving object's tokens.
    assert 256 < methods["internvideo2-b14+rlt"]["tokens"] < 512 == dense["tokens"]
    assert methods["internvideo2-b14@112px"]["tokens"] == 2 * 8 * 8
    assert methods["internvideo2-b14@112px"]["gflops_per_clip"] < dense["gflops_per_clip"]
    if motion:
        # No selector network runs: fewer FLOPs than the learned selector's row.
        motion_gflops = methods["lookwhen-b16 keep 0.1 motion"]["gflops_per_clip"]
        assert motion_gflops < methods["lookwhen-b16 keep 0.1"]["gflops_per_clip"]


def test_e2e_methods_on_a_folder_of_videos(tmp_path):
    """``--videos DIR``: decoded clips; a file without motion vectors turns
    the motion rows off (and says so), an unreadable one is skipped."""
    import numpy as np

    from lookwhen.data.synthetic import synthetic_clip, write_video
    from helpers import encode

    rng = np.random.default_rng(0)
    write_video(tmp_path / "a.mp4", synthetic_clip(rng, frames=4, size=64).clip, preset="medium")
    encode(tmp_path / "b.avi", synthetic_clip(rng, frames=4, size=64).clip, codec="mjpeg", options={},
           pix_fmt="yuvj420p")
    (tmp_path / "c.mp4").write_text("not a video")
    path = str(tmp_path / "out.json")
    proc = run_cli("e2e", "--quick", "--keep-ratio", "0.1", "--min-run-time", "0.01", "--passes", "2",
                   "--videos", str(tmp_path), "--low-res", "112", "160", "--set", *TINY, "--json", path)
    assert proc.returncode == 0, proc.stderr
    with open(path) as handle:
        document = json.load(handle)
    assert document["clips"].startswith(f"2 videos decoded from {tmp_path}, 1 unreadable skipped")
    assert "motion selector skipped" in proc.stdout and "b.avi" in proc.stdout
    check_methods(document, proc.stdout, motion=False)
    assert document["synthetic_proof"] == ""


def test_train_cli(tmp_path):
    stdout, document, rows = run_with_outputs(
        tmp_path, "train", "--quick", "--steps", "2", "--finetune-steps", "2", "--train-clips", "16", "--val-clips",
        "4", "--batch", "1", "--patch-format", "fp16", "int8", "--set", *TINY)
    learning, compact, tuned, timed = document["train"]
    assert (learning["patch_format"], compact["patch_format"]) == ("fp16", "int8")
    # One byte a feature and a float16 scale per token, against two bytes.
    assert 0.4 < compact["cache_mb"] / learning["cache_mb"] < 0.7
    assert tuned["steps"] == 2 and {"selector_accuracy", "random_accuracy"} <= set(tuned)
    assert all(0 <= tuned[k] <= 1 for k in ("selector_accuracy", "random_accuracy"))
    assert learning["steps"] == 2 and 0 <= learning["recall_before"] <= 1 and 0 <= learning["recall_after"] <= 1
    assert 0 < learning["chance"] < 1
    assert timed["speedup"] == pytest.approx(timed["clips_per_s"]["lookwhen"] / timed["clips_per_s"]["dense"])
    assert timed["efficiency"] == pytest.approx(timed["speedup"] / timed["flops_ratio"])
    assert timed["train_gflops_per_clip"]["lookwhen"] < timed["train_gflops_per_clip"]["dense"]
    assert "recall after" in stdout and "efficiency" in stdout
    assert {r["metric"] for r in rows} >= {"recall_after", "clips_per_s"}


def test_seeds_cli(tmp_path):
    """The perturbed rows with their schedule, the control, and the window
    and budget parts, on a few steps (that it runs, and what it records)."""
    json_path = tmp_path / "seeds.json"
    proc = run_cli("seeds", "--quick", "--steps", "2", "--finetune-steps", "3", "--train-clips", "16",
                   "--val-clips", "4", "--heads", "stts", "--control", "--seed", "1", "--sigma-decay", "0.5",
                   "--json", str(json_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    parts = json.load(open(json_path))["seeds"]
    perturbed, control, windows = parts
    assert (perturbed["head"], perturbed["selection"], perturbed["seed"]) == ("stts", "perturbed", 1)
    assert perturbed["sigma"] == 0.2 and perturbed["sigma_decay"] == 0.5 and perturbed["steps"] == 3
    assert control["selection"] == "selector" and control["sigma"] == 0.0
    assert all(0 <= r[k] <= 1 for r in (perturbed, control) for k in ("accuracy", "recall_before", "recall_after"))
    assert windows["part"] == "windows" and all(0 <= windows[k] <= 1 for k in ("window_recall", "window_chance"))
    assert len(windows["budgets"]) == 4 and "budget 3 objects" in proc.stdout
    assert run_cli("seeds", "--sigma-decay", "0").returncode == 2


def test_pareto_cli_separates_the_controls(tmp_path):
    """``--quick``: the dense model learns the pattern; random tokens at keep
    ratio 0.1 (which miss the square in about 43 % of clips) and the
    half-resolution model (which cannot see it) fall clearly below."""
    json_path, plot = tmp_path / "rows.json", tmp_path / "frontier.png"
    proc = run_cli("pareto", "--quick", "--json", str(json_path), "--plot", str(plot), timeout=900)
    assert proc.returncode == 0, proc.stderr
    document = json.load(open(json_path))
    rows = document["pareto"]
    assert {k for row in rows for k in row} >= {"method", "keep_ratio", "accuracy", "gflops", "clips_per_s", "seed"}
    accuracy = {row["method"]: row["accuracy"] for row in rows}
    assert set(accuracy) == {"dense", "dense-half", "random"}
    assert accuracy["dense"] >= 0.5, accuracy
    assert accuracy["dense"] - accuracy["random"] >= 0.15, accuracy
    assert accuracy["dense"] - accuracy["dense-half"] >= 0.25, accuracy
    assert accuracy["dense-half"] < 0.4, accuracy
    gflops = {row["method"]: row["gflops"] for row in rows}
    # Random tokens (51 of 512, no selector network) cost less than the
    # half-resolution model's 128.
    assert gflops["random"] < gflops["dense-half"] < gflops["dense"]
    assert plot.stat().st_size > 0 and "frontier" in proc.stdout


def test_pipeline_cli(tmp_path):
    """File to embedding on the quick sample videos: every installed decoder
    and the previous read_clip in the decode table, both models serial and
    overlapped, the phases adding up to the serial time."""
    stdout, document, rows = run_with_outputs(tmp_path, "pipeline", "--quick", "--keep-ratio", "0.1", "--clips", "2",
                                              "--set", *TINY)
    assert "From file to embedding" in stdout and "read_clip before" in stdout
    decode = document["decode"]
    methods = {entry["method"] for entry in decode}
    assert {"read_clip before", "pyav", "decord", "motion vectors"} <= methods
    videos = {entry["video"] for entry in decode}
    assert len(videos) == 2
    for entry in decode:
        assert entry["seconds_per_clip"] > 0
        if entry["method"] == "pyav":
            assert entry["frames_decoded"] > 0 and entry["decode"] > 0
    lookwhen_row, dense_row = document["pipeline"]
    assert lookwhen_row["keep_ratio"] == 0.1 and dense_row["keep_ratio"] is None
    for entry in (lookwhen_row, dense_row):
        split = entry["serial_split_s"]
        assert set(split) == {"open", "seek", "decode", "resize", "copy", "model"}
        assert math.isclose(sum(split.values()), entry["serial_seconds_per_clip"], rel_tol=1e-9)
        assert split["decode"] > 0 and split["model"] > 0
        assert entry["overlapped_seconds_per_clip"] > 0 and 0 < entry["decode_share"] < 1
    assert lookwhen_row["speedup_decoded"] > 0 and lookwhen_row["speedup_overlapped"] > 0


def test_e2e_plain_cpu_setup(tmp_path):
    path = str(tmp_path / "out.json")
    proc = run_cli("e2e", "--quick", "--keep-ratio", "0.5", "--min-run-time", "0.01", "--passes", "2",
                   "--cpu-linear", "aten", "--malloc", "system", "--attention", "sdpa", "--set", *TINY, "--json", path)
    assert proc.returncode == 0, proc.stderr
    with open(path) as handle:
        document = json.load(handle)
    assert (document["linear"], document["malloc"]) == ("aten", "system")
    assert "linear layers: aten, malloc: system" in proc.stdout
    assert document["baseline"]["attention"] == "sdpa" and "(attention: sdpa)" in proc.stdout


@pytest.mark.parametrize("units, command, expected", [
    (("amx_bf16", "avx512_bf16"), "e2e", "bf16"), (("avx512_bf16",), "e2e", "bf16"), ((), "e2e", "fp32"),
    (("amx_bf16",), "pareto", "fp32"), (("amx_bf16",), "ops", "fp32")])
def test_auto_dtype_on_cpu_follows_the_matrix_units(units, command, expected, monkeypatch):
    import lookwhen.models.cpu_inference as cpu_inference
    from bench.__main__ import _auto_dtype

    monkeypatch.setattr(cpu_inference, "bf16_matrix_units", lambda: units)
    dtype, note = _auto_dtype(command, torch.device("cpu"))
    assert dtype == expected
    if command == "e2e":
        assert all(unit in note for unit in units) and expected in note
    else:
        assert note is None
    assert _auto_dtype(command, torch.device("cuda")) == ("bf16", None)


def test_e2e_without_video_libraries(tmp_path):
    """The GPU machine's image has neither PyAV nor decord: the synthetic
    clips are timed as tensors and the motion selector, which needs the
    decoder's vectors, is left out with a note."""
    path = str(tmp_path / "out.json")
    hide = "import runpy, sys; sys.modules.update(av=None, decord=None); sys.argv[0] = 'bench'; runpy.run_module('bench', run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", hide, "e2e", "--quick", "--keep-ratio", "0.1", "--min-run-time",
                           "0.01", "--passes", "2", "--set", *TINY, "--json", path],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    with open(path) as handle:
        document = json.load(handle)
    assert "as tensors" in document["clips"] and "motion selector skipped" in proc.stdout
    check_methods(document, proc.stdout, motion=False)
    assert document["synthetic_proof"].startswith("synthetic proof: RLT keeps frame 0 (256) + ")


def test_ops_cli(tmp_path):
    stdout, document, rows = run_with_outputs(
        tmp_path, "ops", "--quick", "--shapes", "lookwhen-b16", "--min-run-time", "0.001", "--rotate", "1",
        "--set", *TINY)
    entries = document["ops"]
    kernels = {e["kernel"] for e in entries}
    assert {"score_tokens", "topk_tokens", "gather_patch_embed", "gather_tokens", "varlen_attention",
            "nn_uniqueness", "frame_normalize"} <= kernels
    for e in entries:
        assert e["q20_s"] <= e["median_s"] <= e["q80_s"]
        assert e["peak_bytes"] >= 0
        assert (e["fused_speedup"] is None) == (e["provider"] in ("fused", "varlen_attention"))
    modes = {(e["kernel"], e["mode"]) for e in entries}
    assert {("varlen_attention", m) for m in ("fwd", "bwd", "fwd+bwd")} <= modes
    assert ("topk_tokens", "fwd") in modes and ("topk_tokens", "bwd") not in modes
    assert {e["model"] for e in entries} == {"lookwhen-b16"}
    assert {r["metric"] for r in rows} >= {"time_s", "peak_bytes", "noise", "fused_speedup", "max_abs_error"}
    assert "fused speedup" in stdout
    # The attention peers: checked against the op, FlexAttention forward only
    # on CPU, SDPA on jagged tensors where there is no window; the reasons
    # for what is left out are listed.
    attention = [e for e in entries if e["kernel"] == "varlen_attention"]
    for e in attention:
        assert (e["max_abs_error"] is None) == (e["provider"] == "varlen_attention")
        assert e["max_abs_error"] is None or e["max_abs_error"] < 1e-3
    timed = {(e["provider"], e["mode"]) for e in attention}
    assert ("flex_attention", "fwd") in timed and ("flex_attention", "fwd+bwd") not in timed
    assert ("sdpa_njt", "fwd+bwd") in timed
    assert document["disagree"] == []
    left_out = {(e["provider"], e["pass"]) for e in document["left_out"]}
    assert ("flex_attention", "backward") in left_out and ("sdpa_njt", "forward") in left_out
    assert "left out: flex_attention backward in 5 case(s)" in stdout


def test_roofline_cli(tmp_path):
    stdout, document, rows = run_with_outputs(tmp_path, "roofline", "--gpu", "H100", "L40S", "--set", *TINY)
    assert "Sources:" in stdout and "datasheet" in stdout
    gpus = {g["key"]: g for g in document["gpus"]}
    assert set(gpus) == {"H100-SXM", "L40S"}
    items = {e["item"] for e in document["roofline"]}
    assert {"lookwhen-b16", "internvideo2-b14", "varlen_attention", "gather_patch_embed"} <= items
    for e in document["roofline"]:
        gpu = gpus[e["gpu"]]
        assert e["floor_s"] == pytest.approx(max(e["flops"] / gpu["tensor_flops"], e["bytes"] / gpu["bandwidth"]))
        assert e["measured_s"] is None  # no GPU here: predictions only
    models = {e["item"]: e for e in document["roofline"] if e["gpu"] == "H100-SXM" and e["item"].endswith(("b16", "b14"))}
    assert models["internvideo2-b14"]["flops"] > models["lookwhen-b16"]["flops"] > 0
    assert {r["metric"] for r in rows} == {"floor_s"}


def test_inspect_cli(tmp_path):
    stdout, document, rows = run_with_outputs(tmp_path, "inspect", "--only", "frame_normalize_fwd[fp32]")
    assert [(r["kernel"], r["arch"]) for r in document["inspect"]] == [
        ("frame_normalize_fwd[fp32]", "sm_90"), ("frame_normalize_fwd[fp32]", "sm_80")]
    assert all(r["ok"] and r["registers"] > 0 for r in document["inspect"])
    assert "kernel builds ok" in stdout
    assert {r["metric"] for r in rows} >= {"registers", "spill_bytes", "shared_bytes"}


def _tiny_cases():
    overrides = parse_overrides(TINY)
    return [case for name in ("lookwhen-b16", "internvideo2-b14")
            for case in cases_for(get_config(name, **overrides), batch=2, keep_ratio=0.1)]


def test_alternatives_compute_what_the_op_computes(monkeypatch):
    # The ops' CPU path (no interpreter) is the reference: every eager
    # composition the bench times against must give the op's result.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.device("cpu")
    for case in _tiny_cases():
        inputs = case.make_inputs(cpu, torch.float32)
        providers = case.providers(cpu, torch.float32)
        # Without grad, as the bench times forwards (a compiled peer was compiled for that).
        with torch.no_grad():
            expected = providers[case.fused](*inputs)
            assert len(providers) >= 2, case.kernel
            for name, fn in providers.items():
                torch.testing.assert_close(fn(*inputs), expected, rtol=1e-4, atol=1e-4, msg=f"{case.kernel} {name}")


def test_gpu_table_and_floor():
    assert find_gpu("h100").key == "H100-SXM"
    assert find_gpu("A100 80GB").key == "A100-80GB"
    assert all(g.source and "datasheet" in g.source for g in GPUS.values())
    h100 = GPUS["H100-SXM"]
    assert floor_seconds(h100.tensor_flops, 0, h100) == (1.0, "compute")
    assert floor_seconds(0, h100.bandwidth * 2, h100) == (2.0, "memory")


@pytest.mark.parametrize("argv, words", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["e2e", "--keep-ratio", "0"], "--keep-ratio: must lie in (0, 1]"),
    (["e2e", "--keep-ratio", "half"], "--keep-ratio: not a number"),
    (["e2e", "--batch", "-2"], "--batch: must be at least 1"),
    (["ops", "--modes", "sideways"], "invalid choice"),
    (["e2e", "--set", "depth"], "KEY=VALUE"),
    (["e2e", "--set", "colour=3"], "not a config field"),
    (["e2e", "--set", "depth=two"], "expected an integer"),
    (["e2e", "--set", "width=100"], "not divisible"),
    (["e2e", "--lookwhen", "internvideo2-b14"], "not a LookWhen preset"),
    (["ops", "--shapes", "resnet-50"], "unknown preset"),
    (["ops", "--kernels", "no_such_op"], "no kernel matched"),
    (["roofline", "--gpu", "X100"], "unknown GPU"),
    (["e2e", "--json", "/no/such/folder/out.json"], "does not exist"),
    (["e2e", "--plot", "out.txt"], "png"),
    (["e2e", "--cpu-linear", "mkl"], "invalid choice"),
    (["pipeline", "--decoder", "ffmpeg"], "invalid choice"),
    (["pipeline", "--decode-workers", "0"], "--decode-workers: must be at least 1"),
    (["pipeline", "--videos", "/no/such/folder"], "not a folder"),
    (["ops", "--malloc", "jemalloc"], "invalid choice"),
])
def test_bad_arguments_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err


def test_bad_argument_real_process():
    proc = run_cli("e2e", "--keep-ratio", "1.5")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--keep-ratio: must lie in (0, 1]" in proc.stderr
    assert proc.stdout == ""


def test_refuses_interpreter(capsys):
    # The test suite runs with TRITON_INTERPRET=1: timings would be meaningless.
    assert main(["ops", "--quick"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err
