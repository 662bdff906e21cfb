import sys
import types
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lookwhen_kernels import block_diagonal_attention, dense_attention, reference, varlen_attention
from lookwhen_kernels.ops.attention import attention_flops
from lookwhen_kernels.testing import (
    assert_fully_written,
    assert_within_reference_error,
    cu_seqlens_from_lengths,
    random_lengths,
)

HEAD_DIMS = (32, 64, 80, 96, 128)
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
# (H, H_kv) per head dim, so every grouping (MHA, GQA with an odd group, MQA) meets several head dims.
HEADS = {32: (4, 1), 64: (6, 2), 80: (3, 3), 96: (4, 2), 128: (2, 1)}


# Unwritten output elements show as NaN (see conftest).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _choice(values):
    # torch's generator, so the seed conftest prints reproduces a failure.
    return values[int(torch.randint(len(values), ()))]


def _shuffled(values):
    return [values[i] for i in torch.randperm(len(values)).tolist()]


def _lengths(batch, max_len):
    """Random lengths in a random order that always contain 0, 1 and a prime."""
    return _shuffled(random_lengths(batch, max_len, include=(0, 1, _choice(PRIMES))))


def _inputs(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype):
    q = torch.randn(sum(lengths_q), heads, head_dim).to(dtype)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim).to(dtype)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim).to(dtype)
    return q, k, v, cu_seqlens_from_lengths(lengths_q), cu_seqlens_from_lengths(lengths_k)


def _logsumexp(q, k, cu_q, cu_k, scale):
    """``torch.logsumexp`` of every query's scaled scores, ``[H, total_q]``:
    differentiable, in float64 for float64 inputs and float32 otherwise."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    rows = [torch.zeros(q.shape[1], 0, dtype=work)]
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b]:starts_q[b + 1]].to(work)
        kb = k[starts_k[b]:starts_k[b + 1]].to(work).repeat_interleave(group, dim=1)
        rows.append(torch.logsumexp(torch.einsum("qhd,khd->hqk", qb, kb) * scale, dim=-1))
    return torch.cat(rows, dim=1)


def _check_forward(q, k, v, cu_q, cu_k, softmax_scale=None, **kwargs):
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, softmax_scale=softmax_scale, return_lse=True, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert_fully_written(out, "out")
    assert_fully_written(lse, "lse")
    oracle, _ = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k,
                                           softmax_scale=softmax_scale)
    same_precision, lse_same_precision = reference.varlen_attention(q, k, v, cu_q, cu_k, softmax_scale=softmax_scale)
    assert_within_reference_error(out, same_precision, oracle)
    scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale
    oracle_lse = _logsumexp(q.double(), k.double(), cu_q, cu_k, scale)
    assert_within_reference_error(lse, lse_same_precision, oracle_lse, name="lse")
    return out, lse


def _grads(fn, inputs, grad_out, grad_lse):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    loss = (out * grad_out.to(out.dtype)).sum()
    if grad_lse is not None:
        # Queries without keys have lse = -inf and no gradient path; keep the loss finite.
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def _check_backward(q, k, v, cu_q, cu_k, *, with_lse, softmax_scale=None):
    grad_out = torch.randn(q.shape).to(q.dtype)
    grad_lse = torch.randn(q.shape[1], q.shape[0]) if with_lse else None
    scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale

    def kernel(*qkv):
        return varlen_attention(*qkv, cu_q, cu_k, softmax_scale=softmax_scale, return_lse=True)

    def ref(*qkv):
        # The reference's CPU lse carries no gradient: an explicit logsumexp does.
        out, _ = reference.varlen_attention(*qkv, cu_q, cu_k, softmax_scale=softmax_scale)
        return out, _logsumexp(qkv[0], qkv[1], cu_q, cu_k, scale)

    actual = _grads(kernel, (q, k, v), grad_out, grad_lse)
    oracle = _grads(ref, [t.double() for t in (q, k, v)], grad_out.double(),
                    None if grad_lse is None else grad_lse.double())
    same_precision = _grads(ref, (q, k, v), grad_out, grad_lse)
    for name, a, o, s in zip(("dq", "dk", "dv"), actual, oracle, same_precision):
        assert a.dtype == s.dtype and a.shape == s.shape
        assert_fully_written(a, name)
        assert_within_reference_error(a, s, o, factor=3.0, name=name)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_float64_reference(dtype, head_dim):
    heads, kv_heads = HEADS[head_dim]
    lengths_q = _lengths(7, 40)
    # Independent key lengths, with an empty key set under a non-empty query set.
    lengths_k = _lengths(7, 40)
    empty_keys = max(range(7), key=lambda b: lengths_q[b])
    lengths_k[empty_keys] = 0
    _check_forward(*_inputs(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference_gradients(dtype, head_dim):
    heads, kv_heads = HEADS[head_dim]
    lengths_q = _lengths(5, 24)
    lengths_k = _lengths(5, 24)
    # Every other case also back-propagates through lse.
    _check_backward(*_inputs(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype),
                    with_lse=HEAD_DIMS.index(head_dim) % 2 == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_widest_tile(dtype):
    # Head dims above 128 run in the 256-wide tile (and its own configs).
    inputs = _inputs(_lengths(3, 20), _lengths(3, 20), 2, 1, 200, dtype)
    _check_forward(*inputs)
    _check_backward(*inputs, with_lse=False)


@pytest.mark.parametrize("dtype, long, heads", [
    (torch.float32, (700, 901), (2, 1)),
    (torch.float16, (4000, 4001), (1, 1)),
])
def test_lengths_one_and_long_forward(dtype, long, heads):
    # Lengths far apart in one batch (the 1 and 4000); many query and
    # key blocks, so the online softmax rescales across blocks (a large scale
    # makes the running max move).
    lengths = _shuffled([1, int(torch.randint(*long, ())), _choice(PRIMES)])
    _check_forward(*_inputs(lengths, lengths, *heads, 64, dtype), softmax_scale=0.5)


@pytest.mark.parametrize("dtype, long", [(torch.float32, (300, 420)), (torch.float16, (260, 330))])
def test_lengths_one_and_long_backward(dtype, long):
    lengths = _shuffled([1, int(torch.randint(*long, ())), 0, _choice(PRIMES)])
    _check_backward(*_inputs(lengths, lengths, 2, 1, 64, dtype), with_lse=True)


def test_flash_attn_spelling_and_defaults():
    lengths = _lengths(4, 30)
    q, k, v, cu, _ = _inputs(lengths, lengths, 4, 2, 64, torch.float32)
    oracle, _ = reference.varlen_attention(q.double(), k.double(), v.double(), cu)
    same_precision, _ = reference.varlen_attention(q, k, v, cu)
    # As a flash_attn_varlen_func call site spells it, with a generous max_seqlen.
    flash_style = varlen_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64,
                                   dropout_p=0.0, softmax_scale=None, causal=False)
    # cu_seqlens_k=None means q's offsets; the max lengths are computed.
    short = varlen_attention(q, k, v, cu)
    for out in (flash_style, short):
        assert_within_reference_error(out, same_precision, oracle)


def test_packed_qkv_views_and_permuted_layouts():
    lengths = _lengths(4, 30)
    total, heads, head_dim = sum(lengths), 4, 32
    cu = cu_seqlens_from_lengths(lengths)
    # The model's layout: q, k, v unbound from one [total, 3, H, Dh] projection (strided, no copy).
    qkv = torch.randn(total, 3, heads, head_dim)
    _check_forward(*qkv.unbind(1), cu, cu)
    _check_backward(*qkv.unbind(1), cu, cu, with_lse=False)
    # Heads-major storage: not a layout the kernels take directly (copied first).
    permuted = torch.randn(3, heads, total, head_dim).permute(0, 2, 1, 3)
    _check_forward(*permuted.unbind(0), cu, cu)


@pytest.mark.parametrize("lengths", [[9, 9], [9, 4, 1]], ids=["uniform", "ragged"])
@pytest.mark.parametrize("which", ["q", "qkv"])
@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_rows_with_a_non_unit_stride(monkeypatch, backend, which, lengths):
    """Rows strided (the same values at stride 2): ATen's CPU flash kernel
    before torch 2.14, which the PyTorch path calls, read them as contiguous."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    q, k, v, cu, _ = _inputs(lengths, lengths, 4, 2, 32, torch.float32)
    strided = [torch.stack([t, torch.full_like(t, 1e30)], -1)[..., 0] if name in which else t
               for name, t in zip("qkv", (q, k, v))]
    assert strided[0].stride(-1) == 2
    grad_out = torch.randn(q.shape)
    expected = _grads(lambda *qkv: varlen_attention(*qkv, cu, return_lse=True), (q, k, v), grad_out, None)
    got = _grads(lambda *qkv: varlen_attention(*qkv, cu, return_lse=True), strided, grad_out, None)
    torch.testing.assert_close(varlen_attention(*strided, cu), varlen_attention(q, k, v, cu))
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_nan_propagates_as_in_flash_attention(monkeypatch, backend):
    """A NaN in q makes its row's output and lse NaN; in k, every query that
    sees that key; in column d of v, that column of those queries' outputs.
    A query without keys reads nothing (0, -inf)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    q, k, v, cu_q, cu_k = _inputs([3, 2, 1], [3, 2, 0], 4, 2, 16, torch.float32)
    q[1, 0, 5] = float("nan")  # sequence 0, head 0
    k[4, 1, 0] = float("nan")  # sequence 1, kv head 1: query heads 2 and 3
    v[0, 0, 2] = float("nan")  # sequence 0, kv head 0: query heads 0 and 1
    q[5, 3, 0] = float("nan")  # sequence 2 has no keys
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
    expect_out = torch.zeros(6, 4, 16, dtype=torch.bool)
    expect_lse = torch.zeros(6, 4, dtype=torch.bool)
    expect_out[0:3, 0:2, 2] = True
    expect_out[3:5, 2:4] = expect_out[1, 0] = True
    expect_lse[3:5, 2:4] = expect_lse[1, 0] = True
    assert torch.equal(out.isnan(), expect_out)
    assert torch.equal(lse.isnan().transpose(0, 1), expect_lse)
    assert torch.equal(out[5], torch.zeros(4, 16)) and bool(torch.isneginf(lse[:, 5]).all())


def test_empty_batches_and_sequences():
    # No sequences at all, and only empty sequences.
    for lengths in ([], [0, 0, 0]):
        q, k, v, cu, _ = _inputs(lengths, lengths, 2, 1, 32, torch.float32)
        q.requires_grad_(True)
        out, lse = varlen_attention(q, k, v, cu, return_lse=True)
        assert out.shape == (0, 2, 32) and lse.shape == (2, 0)
        out.sum().backward()
    # Queries without keys: zero output, lse = -inf, zero gradient for q;
    # keys without queries: zero gradients for k and v.
    q, k, v, cu_q, cu_k = _inputs([5, 0], [0, 7], 2, 2, 32, torch.float32)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    grads = torch.autograd.grad(varlen_attention(*leaves, cu_q, cu_k), leaves, torch.randn_like(q))
    for grad, t in zip(grads, leaves):
        assert torch.equal(grad, torch.zeros_like(t))


def test_dense_wrapper_matches_reference():
    batch, n_q, n_k, heads, kv_heads, head_dim = 3, _choice(PRIMES), 19, 4, 2, 80
    q = torch.randn(batch, n_q, heads, head_dim, requires_grad=True)
    k = torch.randn(batch, n_k, kv_heads, head_dim, requires_grad=True)
    v = torch.randn(batch, n_k, kv_heads, head_dim, requires_grad=True)
    out, lse = dense_attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, heads, n_q)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2), enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * head_dim ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    actual = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad.double())
    for a, e in zip(actual, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@dataclass
class _SeqLenInfo:
    seqstart: torch.Tensor
    max_seqlen: int


def _install_xformers_stub(monkeypatch):
    """The attributes of xformers' ``BlockDiagonalMask`` the adapter reads
    (``q_seqinfo`` / ``k_seqinfo`` with ``seqstart`` and ``max_seqlen``), on a
    stand-in class, for machines without xformers."""

    class BlockDiagonalMask:
        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqinfo = _SeqLenInfo(cu_seqlens_from_lengths(q_seqlen), max(q_seqlen))
            self.k_seqinfo = _SeqLenInfo(cu_seqlens_from_lengths(kv_seqlen), max(kv_seqlen))

    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.BlockDiagonalMask = BlockDiagonalMask
    for name in ("xformers", "xformers.ops", "xformers.ops.fmha"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha.attn_bias", attn_bias)
    return BlockDiagonalMask


def _check_block_diagonal(mask_class):
    lengths_q, lengths_k = [3, 1, 6], [4, 2, 5]
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 4, 2, 64, torch.float32)
    out = block_diagonal_attention(q[None], k[None], v[None], mask_class(lengths_q, lengths_k))
    oracle, _ = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k)
    assert out.shape == (1,) + q.shape
    assert_within_reference_error(out[0], reference.varlen_attention(q, k, v, cu_q, cu_k)[0], oracle)


def test_block_diagonal_adapter(monkeypatch):
    mask_class = _install_xformers_stub(monkeypatch)
    _check_block_diagonal(mask_class)
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="BlockDiagonalMask"):
        block_diagonal_attention(q, q, q, object())
    with pytest.raises(ValueError, match="dropout"):
        block_diagonal_attention(q, q, q, mask_class([4], [4]), p=0.1)
    with pytest.raises(ValueError, match="one packed sequence"):
        block_diagonal_attention(q.expand(2, -1, -1, -1), q, q, mask_class([4], [4]))


def test_block_diagonal_adapter_with_real_xformers():
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")
    _check_block_diagonal(attn_bias.BlockDiagonalMask.from_seqlens)


def test_block_diagonal_adapter_without_xformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(ModuleNotFoundError, match="xformers"):
        block_diagonal_attention(q, q, q, None)


@pytest.mark.parametrize("equal", [True, False])
def test_cpu_path_matches_float64_oracle(equal):
    # The CPU path (no interpreter): ATen's fused CPU attention, one batched
    # call for equal lengths, one call per sequence otherwise; its backward
    # through ATen's fused backward.
    lengths_q = [6] * 3 if equal else _lengths(4, 20)
    lengths_k = [9] * 3 if equal else _lengths(4, 20)
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 6, 2, 32, torch.float32)
    out, lse = torch.ops.lookwhen.varlen_attention_cpu(q, k, v, cu_q, cu_k, 0.3)
    torch.testing.assert_close(out.double(), _oracle_out(q, k, v, cu_q, cu_k, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), _logsumexp(q.double(), k.double(), cu_q, cu_k, 0.3), rtol=1e-5,
                               atol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.ops.lookwhen.varlen_attention_cpu_backward(grad_out, None, q, k, v, out, lse, cu_q, cu_k, 0.3)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    oracle = torch.autograd.grad(_oracle_out(*leaves, cu_q, cu_k, 0.3), leaves, grad_out.double(),
                                 allow_unused=True, materialize_grads=True)
    for name, g, o in zip(("dq", "dk", "dv"), grads, oracle):
        torch.testing.assert_close(g.double(), o, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("with_lse", [False, True])
def test_public_api_on_the_cpu_path(monkeypatch, with_lse):
    # Without the interpreter, CPU tensors take the registered CPU ops, through
    # the same public function and autograd (the lse gradient takes the
    # closed-form backward).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lengths_q, lengths_k = _lengths(5, 30), _lengths(5, 30)
    inputs = _inputs(lengths_q, lengths_k, 4, 2, 80, torch.float32)
    _check_forward(*inputs)
    _check_backward(*inputs, with_lse=with_lse)


def _oracle_out(q, k, v, cu_q, cu_k, scale):
    """Per-sequence attention written out with einsum in float64 (independent of SDPA)."""
    group = q.shape[1] // k.shape[1]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outs = [torch.zeros(0, *q.shape[1:], dtype=torch.float64)]
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b]:starts_q[b + 1]].double()
        kb, vb = (t[starts_k[b]:starts_k[b + 1]].double().repeat_interleave(group, dim=1) for t in (k, v))
        p = torch.softmax(torch.einsum("qhd,khd->hqk", qb, kb) * scale, dim=-1)
        outs.append(torch.nan_to_num(torch.einsum("hqk,khd->qhd", p, vb)))  # no keys: softmax of nothing
    return torch.cat(outs)


def test_reference_backward_closed_form_matches_autograd():
    lengths_q, lengths_k = _lengths(4, 9), _lengths(4, 9)
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 4, 2, 8, torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.varlen_attention(*leaves, cu_q, cu_k, softmax_scale=0.6)
    explicit_lse = _logsumexp(*leaves[:2], cu_q, cu_k, 0.6)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    loss = (out * grad_out).sum() + (torch.where(torch.isinf(explicit_lse), 0.0, explicit_lse) * grad_lse).sum()
    expected = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    # grad_lse given: the closed form (also what runs off-CPU).
    actual = reference.varlen_attention_backward(grad_out, *(t.detach() for t in (q, k, v, out)), lse, cu_q, cu_k,
                                                 softmax_scale=0.6, grad_lse=grad_lse)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck_float64():
    lengths_q, lengths_k = [2, 0, 3], [3, 2, 1]
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 2, 1, 4, torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *qkv: reference.varlen_attention(*qkv, cu_q, cu_k)[0], leaves)


def test_flop_counter_counts_forward_and_backward():
    lengths_q, lengths_k = [5, 0, 9], [4, 3, 11]
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 4, 2, 32, torch.float32)
    q.requires_grad_(True)
    expected = 4 * (5 * 4 + 9 * 11) * 4 * 32
    assert attention_flops(q.shape, cu_q, cu_k) == expected
    with FlopCounterMode(display=False) as counter:
        out = varlen_attention(q, k, v, cu_q, cu_k)
    assert counter.get_total_flops() == expected
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == expected * 5 // 2


class _TinyAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).unbind(1)
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen).flatten(1)


def test_torch_compile_matches_eager():
    module = _TinyAttention(32, 4)
    lengths = _lengths(3, 12)
    cu = cu_seqlens_from_lengths(lengths)
    x = torch.randn(sum(lengths), 32)
    eager = module(x, cu, max(lengths))
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, cu, max(lengths))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(module.qkv.weight.grad).all()


def test_registered_ops_exist():
    for name in ("varlen_attention", "varlen_attention_backward", "varlen_attention_cpu",
                 "varlen_attention_cpu_backward"):
        assert hasattr(torch.ops.lookwhen, name)


def _bad_case(**overrides):
    lengths = [3, 4]
    q, k, v, cu, _ = _inputs(lengths, lengths, 4, 2, 32, torch.float32)
    args = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu, "cu_seqlens_k": None}
    args.update(overrides)
    return lambda: varlen_attention(**args)


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "bad, message",
    [
        (_bad_case(k=torch.randn(7, 3, 32), v=torch.randn(7, 3, 32)), "multiple of the number of kv heads"),
        (_bad_case(q=torch.randn(7, 4, 32, dtype=torch.float64)), "dtype"),
        (_bad_case(k=torch.randn(7, 2, 32).half()), "dtype"),
        (_bad_case(q=torch.randn(7, 4)), "3-d"),
        (_bad_case(q=[1.0]), "torch.Tensor"),
        (_bad_case(cu_seqlens_q=torch.tensor([0, 3, 7])), "int32"),
        (_bad_case(cu_seqlens_q=_cu([0, 5, 3, 7])), "non-decreasing"),
        (_bad_case(cu_seqlens_q=_cu([1, 3, 7])), "start at 0"),
        # Given both max lengths the caller vouches for the offsets, unless it asks for the checks.
        (_bad_case(cu_seqlens_q=_cu([0, 5, 3, 7]), max_seqlen_q=5, max_seqlen_k=5, validate=True), "non-decreasing"),
        (_bad_case(cu_seqlens_q=_cu([0, 3, 9])), "last offset"),
        (_bad_case(cu_seqlens_q=_cu([0, 3, 6])), "last offset"),
        (_bad_case(cu_seqlens_k=_cu([0, 7])), "offsets like cu_seqlens_q"),
        (_bad_case(k=torch.randn(9, 2, 32), v=torch.randn(9, 2, 32)), "cu_seqlens_k=None"),
        (_bad_case(q=torch.randn(7, 4, 300), k=torch.randn(7, 2, 300), v=torch.randn(7, 2, 300)), "head dim"),
        (_bad_case(q=torch.randn(7, 4, 0), k=torch.randn(7, 2, 0), v=torch.randn(7, 2, 0)), "head dim"),
        (_bad_case(v=torch.randn(7, 2, 16)), "head dim"),
        (_bad_case(v=torch.randn(6, 2, 32)), "like k"),
        (_bad_case(k=torch.randn(7, 2, 32, device="meta")), "k: expected a tensor on cpu"),
        (_bad_case(cu_seqlens_q=_cu([0, 3, 7]).to("meta")), "cu_seqlens_q: expected a tensor on cpu"),
        (lambda: varlen_attention(*_inputs([3, 4], [3, 4], 4, 2, 32, torch.float32)[:4], max_seqlen_q=3),
         "shorter than the longest"),
        (lambda: varlen_attention(*_inputs([3, 4], [3, 4], 4, 2, 32, torch.float32)[:4], max_seqlen_k=-1),
         "non-negative int"),
        (lambda: varlen_attention(*_inputs([3, 4], [3, 4], 4, 2, 32, torch.float32)[:4],
                                  softmax_scale=float("nan")), "softmax_scale"),
        (lambda: varlen_attention(*_inputs([3], [3], 2, 2, 32, torch.float32)[:4], dropout_p=0.1), "dropout_p"),
        (lambda: varlen_attention(*_inputs([3], [3], 2, 2, 32, torch.float32)[:4], causal=1), "causal"),
        (lambda: varlen_attention(*_inputs([3], [3], 2, 2, 32, torch.float32)[:4], window_size=(1.5, 0)),
         "window_size"),
        (lambda: varlen_attention(*_inputs([3], [3], 2, 2, 32, torch.float32)[:4], softcap=-1.0), "softcap"),
        (lambda: varlen_attention(*_inputs([3], [3], 2, 2, 32, torch.float32)[:4],
                                  alibi_slopes=torch.ones(3)), "alibi_slopes"),
        (lambda: dense_attention(torch.randn(2, 3, 4, 32), torch.randn(3, 3, 2, 32), torch.randn(3, 3, 2, 32)),
         "batch of q"),
    ],
)
def test_bad_inputs_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (2, 1)])
def test_bench_providers_agree(window_size):
    from bench import attention

    lengths = [3, 0, 17, 1]
    q, k, v = attention.make_inputs(lengths, 4, 2, 32, device="cpu", dtype=torch.float32)
    cu = cu_seqlens_from_lengths(lengths)
    expected, _ = reference.varlen_attention(q.double(), k.double(), v.double(), cu, window_size=window_size)
    providers = attention.build_providers(lengths, 4, 2, device="cpu", dtype=torch.float32, window_size=window_size)
    assert {"varlen_attention", "sdpa_padded", "sdpa_loop"} <= set(providers)
    for name, fn in providers.items():
        torch.testing.assert_close(fn(q, k, v).double(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_lse_sum_backward_takes_an_expanded_gradient():
    """Issue 11's first reproduction: ``lse.sum().backward()`` hands the
    backward a stride-0 gradient of lse, which it once read as contiguous."""
    lengths = [5, 0, 9, 3]
    q, k, v, cu, _ = _inputs(lengths, lengths, 4, 2, 32, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = varlen_attention(*leaves, cu, return_lse=True)
    lse.sum().backward()
    oracle = [t.double().requires_grad_(True) for t in (q, k, v)]
    _logsumexp(oracle[0], oracle[1], cu, cu, 32 ** -0.5).sum().backward()
    same = [t.clone().requires_grad_(True) for t in (q, k, v)]
    _logsumexp(same[0], same[1], cu, cu, 32 ** -0.5).sum().backward()
    for name, a, o, s in zip(("dq", "dk"), leaves, oracle, same):
        assert_within_reference_error(a.grad, s.grad, o.grad, factor=3.0, name=name)
    # lse does not depend on v.
    assert torch.equal(leaves[2].grad, torch.zeros_like(v))


@pytest.mark.parametrize("argument", ["cu_seqlens_q", "cu_seqlens_k"])
def test_non_contiguous_offsets_are_refused(argument):
    """Issue 11's second reproduction: ``offsets[::2]`` passed validation and
    the kernel read past its end."""
    lengths = [3, 4]
    q, k, v, cu, _ = _inputs(lengths, lengths, 2, 1, 16, torch.float32)
    strided = torch.stack([cu, torch.full_like(cu, -1)], 1).flatten()[::2]
    assert torch.equal(strided, cu) and not strided.is_contiguous()
    offsets = {"cu_seqlens_q": cu, "cu_seqlens_k": cu, argument: strided}
    for max_seqlens in ({}, {"max_seqlen_q": 4, "max_seqlen_k": 4}):
        with pytest.raises(ValueError, match=f"^{argument}: expected a contiguous"):
            varlen_attention(q, k, v, **offsets, **max_seqlens)


@pytest.mark.parametrize("head_dim, heads", [(256, (2, 1)), (8, (8, 1)), (3, (16, 2)), (40, (24, 3))])
def test_extreme_head_dims_and_wide_groups(head_dim, heads):
    """The widest tile (head dim 256), dims below an MMA's K of 16 (masked in
    a 16-wide tile) and grouped-query groups of 8 and more."""
    inputs = _inputs(_lengths(3, 20), _lengths(3, 20), *heads, head_dim, torch.float32)
    _check_forward(*inputs)
    _check_backward(*inputs, with_lse=True)


def test_backward_past_1024_keys():
    """Past 1024 keys and queries: many key and query blocks in the backward."""
    lengths = _shuffled([1, int(torch.randint(1030, 1100, ())), 7])
    _check_backward(*_inputs(lengths, lengths, 1, 1, 16, torch.float32), with_lse=True)


def _alternate_configs():
    """(kernel, tile width, config index) of every config the interpreter's
    first-config rule would never run."""
    from lookwhen_kernels.ops.attention.configs import FP32_CONFIGS, HALF_CONFIGS

    cases = []
    for dtype, table in ((torch.float16, HALF_CONFIGS), (torch.float32, FP32_CONFIGS)):
        for kernel, by_width in table.items():
            for width, configs in by_width.items():
                cases += [(dtype, kernel, width, i) for i in range(1, len(configs))]
    return cases


@pytest.mark.parametrize("dtype, kernel, width, index", _alternate_configs())
def test_every_alternate_autotune_config(monkeypatch, dtype, kernel, width, index):
    """On a GPU the autotuner may pick any config of a list; each one is run
    once here so that none is numerically unchecked."""
    # The launchers look configs up where they live.
    from lookwhen_kernels.ops.attention import launch as module

    original = module.configs_for

    def forced(name, head_dim, dt, mods=False):
        configs = original(name, head_dim, dt, mods)
        return configs[index:index + 1] if name == kernel else configs

    monkeypatch.setattr(module, "configs_for", forced)
    inputs = _inputs(_lengths(3, 40), _lengths(3, 40), 4, 2, width, dtype)
    if kernel == "fwd":
        _check_forward(*inputs)
    else:
        _check_backward(*inputs, with_lse=True)
