"""The results-page generator: a bench --json document becomes a markdown page
whose header says where the numbers came from and whose table holds them."""
import json

from bench import results

ENV = {
    "command": ["python -m bench", "e2e", "--device", "cuda", "--json", "out dir/e2e.json"],
    "device": "cuda: Example GPU",
    "versions": {"python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0", "lookwhen_kernels": "0.1.0",
                 "cuda": "13.0"},
    "git_commit": "0123456789abcdef",
    "date": "2026-12-04T17:44:01+00:00",
    "threads": 16,
}


def _e2e_document():
    entry = {"keep_ratio": 0.1, "tokens_kept": 314, "lookwhen_clips_per_s": 600.0, "baseline_clips_per_s": 500.0,
             "speedup": 1.2, "lookwhen_gflops_per_clip": 77.5, "baseline_gflops_per_clip": 509.5,
             "flops_ratio": 6.57, "efficiency": 0.18, "selector_fraction": 0.15, "selection_fraction": 0.16,
             "extractor_fraction": 0.69, "lookwhen_noise": 0.5, "baseline_noise": 0.001}
    method = {"method": "internvideo2-b14", "tokens": 2048, "gflops_per_clip": 509.5, "gmacs_per_clip": 254.8,
              "clips_per_s": 500.0, "speedup": 1.0, "efficiency": 1.0, "noise": 0.001}
    return {**ENV, "batch": 16, "dtype": "bf16", "methods": [method], "lookwhen": {"name": "lookwhen-b16"},
            "baseline": {"name": "internvideo2-b14", "attention": "kernels"}, "e2e": [entry]}


def test_header_names_date_device_versions_commit_and_command():
    page = results.render(_e2e_document(), source="e2e.json")
    assert page.startswith("# bench e2e: Example GPU, 2026-12-04\n")
    assert "2026-12-04T17:44:01+00:00" in page
    assert "cuda: Example GPU" in page
    assert "python 3.12.3, torch 2.11.0, triton 3.6.0, cuda 13.0" in page
    assert "`0123456789abcdef`" in page
    # The program keeps its spaces; an argument with one is quoted.
    assert "`python -m bench e2e --device cuda --json 'out dir/e2e.json'`" in page
    assert "`e2e.json`" in page


def test_e2e_tables():
    page = results.render(_e2e_document())
    assert "| keep | K | LookWhen clips/s | dense clips/s | speedup |" in page
    assert "| 0.1 | 314 | 600.000 | 500.000 | 1.20x | 77.5 | 509.5 | 6.57x | 0.18 | 15.0% | 16.0% | 69.0% | 50.0% / 0.1% |" in page
    assert "| internvideo2-b14 | 2048 | 509.5 | 254.8 | 500.000 | 1.00x | 1.00 | 0.1% |" in page
    assert "- **batch**: 16" in page and "- **dtype**: bf16" in page


def test_ops_table():
    entry = {"kernel": "topk_tokens", "model": "lookwhen-b16", "shape": "784 -> 3136, K314", "mode": "fwd",
             "provider": "eager", "median_s": 0.002, "q20_s": 0.0019, "q80_s": 0.0021, "samples": 9,
             "noise": 0.02, "peak_bytes": 2 * 2**20, "fused_speedup": 4.7}
    document = {**ENV, "command": ["python -m bench", "ops", "--quick"], "ops": [entry]}
    page = results.render(document)
    assert page.startswith("# bench ops:")
    assert "| topk_tokens | lookwhen-b16 784 -> 3136, K314 | fwd | eager | 2.000 | 1.900-2.100 | 2.0% | 2.0 | 4.70x |" in page


def test_other_documents_render_their_entries_generically():
    document = {**ENV, "command": ["python -m bench", "roofline"],
                "roofline": [{"gpu": "H100", "item": "a|b", "floor_s": 4.84e-05, "measured_s": None}],
                "gpus": [{"key": "H100", "bandwidth": 3.35e12}]}
    page = results.render(document)
    assert "| gpu | item | floor_s | measured_s |" in page
    assert "| H100 | a\\|b | 4.84e-05 | - |" in page  # a pipe is escaped, a missing number is "-"
    assert "## gpus" in page and "| H100 | 3.35e+12 |" in page


def test_main_writes_a_page_beside_each_document(tmp_path, capsys):
    path = tmp_path / "e2e-example.json"
    path.write_text(json.dumps(_e2e_document()))
    assert results.main([str(path)]) == 0
    page = (tmp_path / "e2e-example.md").read_text()
    assert page == results.render(_e2e_document(), source="e2e-example.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert results.main([str(bad)]) == 1
    assert "not a bench --json document" in capsys.readouterr().err
