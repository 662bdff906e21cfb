"""The bench's attention peers (:mod:`bench.attention`): FlexAttention with a
document mask and SDPA on jagged nested tensors compute what
``varlen_attention`` computes, built and first called as ``python -m bench
ops`` does it; a peer this torch cannot run is left out with its reason."""
import sys

import pytest
import torch

from bench import attention
from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths

LENGTHS = [1, 7, 33]
HEADS, HEAD_DIM = 3, 16


@pytest.mark.parametrize("kv_heads, window_size", [(HEADS, (-1, -1)), (1, (-1, -1)), (HEADS, (4, 2))])
def test_peers_agree_with_the_reference(kv_heads, window_size):
    checked = attention.check_providers(LENGTHS, HEADS, kv_heads, HEAD_DIM, device="cpu", dtype=torch.float32,
                                        window_size=window_size)
    assert checked.disagree == []
    reasons = {(name, stage): why for name, stage, why in checked.left_out}
    # torch 2.14 on CPU: FlexAttention compiles its forward only; SDPA on
    # jagged tensors runs forward and backward, without GQA or a window.
    assert "flex_attention" in checked.providers and checked.providers["flex_attention"].forward_only
    assert "backward on CPU" in reasons[("flex_attention", "backward")]
    njt = kv_heads == HEADS and window_size == (-1, -1)
    assert ("sdpa_njt" in checked.providers) == njt
    if njt:
        assert not getattr(checked.providers["sdpa_njt"], "forward_only", False)
    elif kv_heads != HEADS:
        assert ("sdpa_njt", "forward") in reasons
    else:
        assert "window_size (4, 2)" in reasons[("sdpa_njt", "forward")]

    q, k, v = attention.make_inputs(LENGTHS, HEADS, kv_heads, HEAD_DIM, device="cpu", dtype=torch.float32, seed=5)
    oracle = [t.double().requires_grad_() for t in (q, k, v)]
    expected, _ = reference.varlen_attention(*oracle, cu_seqlens_from_lengths(LENGTHS), window_size=window_size)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(grad)
    for name in ("flex_attention", "sdpa_njt"):
        fn = checked.providers.get(name)
        if fn is None:
            continue
        # New inputs of the case's shapes run what the first call compiled.
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
            out = fn(q, k, v)
        torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5, msg=name)
        if getattr(fn, "forward_only", False):
            continue
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward(grad.float())
        for label, leaf, truth in zip("qkv", leaves, oracle):
            torch.testing.assert_close(leaf.grad.double(), truth.grad, rtol=1e-5, atol=1e-5, msg=f"{name} d{label}")


def test_a_provider_that_disagrees_is_left_out(monkeypatch):
    build = attention.build_providers

    def with_a_shifted_output(*args, **kwargs):
        providers = build(*args, **kwargs)
        return {**providers, "shifted": lambda q, k, v: providers["varlen_attention"](q, k, v) + 0.01}

    monkeypatch.setattr(attention, "build_providers", with_a_shifted_output)
    monkeypatch.setattr(attention, "build_peers", lambda *args, **kwargs: ({}, {}))
    checked = attention.check_providers([5, 3], 2, 2, 8, device="cpu", dtype=torch.float32)
    assert list(checked.providers) == ["varlen_attention", "sdpa_padded", "sdpa_loop"]
    # A constant shift leaves the gradients as they are.
    [(name, stage, error, allowed)] = checked.disagree
    assert (name, stage) == ("shifted", "forward") and error == pytest.approx(0.01, rel=1e-3) and error > allowed
    assert checked.errors[("shifted", "backward")] < 1e-5


def test_a_torch_without_the_peers_leaves_them_out(monkeypatch):
    """As on an older torch: no FlexAttention module, no jagged layout."""
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    monkeypatch.delattr(torch.nested, "nested_tensor_from_jagged")
    checked = attention.check_providers([2, 3], 2, 2, 8, device="cpu", dtype=torch.float32)
    assert list(checked.providers) == ["varlen_attention", "sdpa_padded", "sdpa_loop"]
    reasons = {name: (stage, why) for name, stage, why in checked.left_out}
    assert reasons["flex_attention"][0] == "forward" and "flex_attention" in reasons["flex_attention"][1]
    assert reasons["sdpa_njt"][0] == "forward" and reasons["sdpa_njt"][1].startswith("AttributeError")


def test_no_tokens_is_a_value_error():
    with pytest.raises(ValueError, match="lengths"):
        attention.check_providers([0, 0], 2, 2, 8, device="cpu", dtype=torch.float32)
