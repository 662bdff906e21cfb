"""Deterministic mode: two runs in two processes give bitwise-equal outputs
and gradients (configs pinned, no atomic adds in the positional-embedding
gradient or the pooling)."""
import os
import subprocess
import sys

import torch

import lookwhen_kernels as lk
from lookwhen_kernels.layout import segment_sum

RUN = r"""
import sys, torch
from lookwhen import build_model
import lookwhen_kernels as lk
assert lk.deterministic()
torch.manual_seed(0)
model = build_model("lookwhen-b16", frames=2, image_size=32, width=16, depth=1, heads=2, selector_width=8, context_projection=True,
                    selector_depth=1, selector_heads=2, score_hidden=8, registers=1).train()
clip = torch.randint(0, 256, (3, 2, 32, 32, 3), dtype=torch.uint8)
results = {}
for name, kwargs in (("ratio", {}), ("budgets", {"budgets": [3, 0, 8]})):
    model.zero_grad()
    out = model(clip, **kwargs)
    (out.embedding.square().sum() + out.pooled.sum() + out.scores.sum()).backward()
    results[name] = [out.embedding, out.tokens, out.pooled] + [p.grad for p in model.parameters()
                                                                 if p.grad is not None]
torch.save(results, sys.argv[1])
"""


def test_two_processes_give_bitwise_equal_outputs_and_gradients(tmp_path):
    env = dict(os.environ, LOOKWHEN_DETERMINISTIC="1", PYTHONPATH=os.getcwd())
    runs = []
    for i in range(2):
        path = tmp_path / f"run{i}.pt"
        proc = subprocess.run([sys.executable, "-c", RUN, str(path)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(torch.load(path))
    for name in runs[0]:
        assert len(runs[0][name]) == len(runs[1][name]) > 3
        for a, b in zip(runs[0][name], runs[1][name]):
            assert torch.equal(a, b), name


def test_switch_and_fixed_order_sums():
    previous = lk.set_deterministic(True)
    try:
        assert lk.deterministic()
    finally:
        lk.set_deterministic(previous)
    rows, ids = torch.randn(9, 4), torch.tensor([2, 0, 2, 5, 5, 5, 1, 0, 2])
    expected = torch.zeros(6, 4).index_add_(0, ids, rows)
    torch.testing.assert_close(segment_sum(rows, ids, 6), expected)
