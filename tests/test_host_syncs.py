"""No host reads on the hot path: the LookWhen forward through the Triton
kernels (the interpreter here) reads no device data back at a fixed keep
ratio, and at most once for per-clip budgets. ``count_host_reads`` records
what a GPU run would wait for; the ops' own value checks are what it would
catch first, so it is checked to see them."""
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen import build_model
from lookwhen_kernels.layout import cu_seqlens_from_lengths
from lookwhen_kernels.testing import count_host_reads
from helpers import MICRO

TINY = MICRO


@pytest.fixture(scope="module")
def model():
    return build_model("lookwhen-b16", **TINY).eval()


def _clip(batch=2):
    return torch.randint(0, 256, (batch, 2, 32, 32, 3), dtype=torch.uint8)


def test_the_counter_sees_reads():
    x = torch.randn(4)
    host = torch.as_tensor([1, 2])
    with count_host_reads() as reads:
        bool((x > 0).any())
        x.tolist()
        x.to("cpu", torch.float64)
        x[x > 0]
        int(host.sum())  # a host tensor: no device read
    assert len(reads) == 4, reads
    scores = torch.randn(2, 16)
    with count_host_reads() as reads:
        lk.topk_tokens(scores, keep_ratio=0.25)
    assert reads, "topk_tokens' NaN scan (validate=True) reads the scores"
    with count_host_reads() as reads:
        lk.topk_tokens(scores, keep_ratio=0.25, validate=False)
        lk.varlen_attention(*(torch.randn(6, 2, 16) for _ in range(3)), cu_seqlens_from_lengths([2, 4]), None, 4, 4,
                            validate=False)
    assert reads == []


@pytest.mark.parametrize("grad", [False, True])
def test_lookwhen_forward_at_a_keep_ratio_reads_nothing(model, grad):
    clip = _clip()
    with torch.set_grad_enabled(grad), count_host_reads() as reads:
        model(clip)
    assert reads == []


def test_lookwhen_forward_with_budgets_reads_once(model):
    clip = _clip(3)
    budgets = torch.tensor([3, 0, 8], dtype=torch.int32)  # built outside: device data
    with torch.no_grad(), count_host_reads() as reads:
        model(clip, budgets=budgets)
    assert len(reads) == 1, reads
    # Budgets given from the host are never read back.
    with torch.no_grad(), count_host_reads() as reads:
        model(clip, budgets=[3, 0, 8])
    assert reads == []
