"""FlashAttention 2's interface (``lookwhen_kernels.flash_attn_interface``),
tested in FlashAttention's style: the kernels (under the interpreter) and the
CPU path against a float64 oracle, output error at most 2x and gradient error
at most 3x the same-precision reference's. Shapes stay small: the interpreter
is slow."""
import pytest
import torch

import lookwhen_kernels as lk
from lookwhen_kernels import reference
from lookwhen_kernels.testing import assert_fully_written, assert_within_reference_error, cu_seqlens_from_lengths

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

# (head dim, H, H_kv, query lengths, key lengths, score options): every option
# meets differing lengths, an odd head dim and a kv grouping.
CASES = {
    "causal-1vs147-mha": (59, 2, 2, [1, 9], [147, 4], dict(causal=True)),
    "window-113vs203-gqa": (80, 4, 2, [113], [203], dict(window_size=(64, 64))),
    "causal-window-empty-rows-mqa": (32, 3, 1, [20, 5, 6], [7, 0, 6], dict(causal=True, window_size=(2, -1))),
    "softcap-alibi-gqa": (111, 4, 2, [17, 3], [9, 30], dict(softcap=1.5, alibi=(2,))),
    "causal-alibi-per-sequence": (48, 2, 1, [33, 1], [12, 40], dict(causal=True, alibi=(2, 2))),
    "local-softcap-d256-mqa": (256, 2, 1, [9, 4], [13, 4], dict(window_size=(3, 0), softcap=5.0)),
}
# Too long for the interpreter; the CPU path only.
CPU_CASES = {"causal-1023vs1024-gqa": (64, 4, 2, [1023], [1024], dict(causal=True))}


def _inputs(head_dim, heads, kv_heads, lengths_q, lengths_k, dtype):
    q = torch.randn(sum(lengths_q), heads, head_dim).to(dtype)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim).to(dtype)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim).to(dtype)
    return q, k, v, cu_seqlens_from_lengths(lengths_q), cu_seqlens_from_lengths(lengths_k)


def _options(options, heads):
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi is not None:
        # Slopes like ALiBi's geometric ones, per sequence when asked: [H] or [B, H].
        options["alibi_slopes"] = torch.rand(*alibi[:-1], heads) * 0.5 + 0.05
    return options


def _grads(fn, inputs, grad_out, grad_lse):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    # Queries that see no key have lse = -inf and no gradient path.
    loss = (out * grad_out.to(out.dtype)).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def _check(case, dtype):
    head_dim, heads, kv_heads, lengths_q, lengths_k, options = (CASES | CPU_CASES)[case]
    q, k, v, cu_q, cu_k = _inputs(head_dim, heads, kv_heads, lengths_q, lengths_k, dtype)
    options = _options(options, heads)
    grad_out = torch.randn(q.shape).to(dtype)
    grad_lse = torch.randn(heads, q.shape[0])

    def kernel(*qkv):
        out, lse, s_dmask = lk.flash_attn_varlen_func(*qkv, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                      return_attn_probs=True, **options)
        assert s_dmask is None
        return out, lse

    def ref(*qkv):
        return reference.varlen_attention(*qkv, cu_q, cu_k, **options)

    out, lse, grads = _grads(kernel, (q, k, v), grad_out, grad_lse)
    oracle_out, oracle_lse, oracle_grads = _grads(ref, [t.double() for t in (q, k, v)], grad_out.double(),
                                                  grad_lse.double())
    same_out, same_lse, same_grads = _grads(ref, (q, k, v), grad_out, grad_lse)
    assert out.dtype == dtype and lse.shape == (heads, q.shape[0]) and lse.dtype == torch.float32
    assert_fully_written(out, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(oracle_lse)) and not lse.isnan().any()
    assert_within_reference_error(out, same_out, oracle_out)
    finite = torch.isfinite(oracle_lse)
    assert_within_reference_error(lse[finite], same_lse[finite], oracle_lse[finite], name="lse")
    for name, a, o, s in zip(("dq", "dk", "dv"), grads, oracle_grads, same_grads):
        assert a.shape == s.shape and a.dtype == s.dtype
        assert_fully_written(a, name)
        assert_within_reference_error(a, s, o, factor=3.0, name=name)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_matches_float64_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("case", ["causal-window-empty-rows-mqa", "softcap-alibi-gqa", *CPU_CASES])
def test_cpu_path_matches_float64_reference(monkeypatch, case):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check(case, torch.float32)


def test_queries_without_keys_give_zeros_and_minus_inf():
    # Causal with Lq > Lk leaves the first queries without keys; a key sequence can be empty.
    q, k, v, cu_q, cu_k = _inputs(16, 2, 1, [6, 3], [2, 0], torch.float32)
    q.requires_grad_(True)
    out, lse, _ = lk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 2, causal=True, return_attn_probs=True)
    (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    blind = torch.tensor([True] * 4 + [False] * 2 + [True] * 3)
    assert torch.equal(torch.isneginf(lse), blind[None].expand_as(lse))
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.equal(q.grad[blind], torch.zeros_like(q.grad[blind])) and not q.grad.isnan().any()


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_flash_attention_style_positional_call(monkeypatch, interpret):
    """The call site of a FlashAttention user, unchanged but for the import."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    from lookwhen_kernels import flash_attn_varlen_func

    lengths_q, lengths_k = [70, 1], [90, 147]
    q, k, v, cu_q, cu_k = _inputs(64, 4, 2, lengths_q, lengths_k, torch.float16)
    out, softmax_lse, s_dmask = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), 0.0, None,
                                                       True, (64, 64), 0.0, None, False, True)
    oracle, oracle_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True,
                                                    window_size=(64, 64))
    same, _ = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=True, window_size=(64, 64))
    assert s_dmask is None and softmax_lse.shape == (4, sum(lengths_q))
    assert_within_reference_error(out, same, oracle)
    torch.testing.assert_close(softmax_lse.double(), oracle_lse, atol=2e-3, rtol=0)


@pytest.mark.parametrize("window_size, same_as", [
    (torch.tensor([5, 2]), (5, 2)),  # FlashAttention's own tests draw it with torch.randint
    ((torch.tensor(3, dtype=torch.int32), -1), (3, -1)),
    ((-7, 0), (-1, 0)),  # any negative side is unbounded
    ((2**40, 1), (-1, 1)),  # past every int32 length: unbounded
])
def test_window_size_takes_what_flash_attention_takes(window_size, same_as):
    q, k, v, cu_q, cu_k = _inputs(16, 2, 1, [9, 4], [13, 4], torch.float32)
    out, lse, _ = lk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 13, window_size=window_size,
                                            return_attn_probs=True)
    expected, expected_lse, _ = lk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 13, window_size=same_as,
                                                          return_attn_probs=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


def test_packed_and_padded_variants_agree_with_varlen():
    batch, length, heads, kv_heads, head_dim = 2, 11, 4, 2, 24
    qkv = torch.randn(batch, length, 3, heads, head_dim)
    kv = torch.randn(batch, length + 3, 2, kv_heads, head_dim)
    cu = cu_seqlens_from_lengths([length] * batch)
    cu_k = cu_seqlens_from_lengths([length + 3] * batch)
    options = dict(causal=True, window_size=(4, 1), softcap=2.0, alibi_slopes=torch.rand(batch, heads))
    varlen = [lk.flash_attn_varlen_func(*qkv.flatten(0, 1).unbind(1), cu, cu, length, length, 0.0, None,
                                        return_attn_probs=True, **options)]
    varlen.append(lk.flash_attn_varlen_func(qkv[:, :, 0].flatten(0, 1), *kv.flatten(0, 1).unbind(1), cu, cu_k, length,
                                            length + 3, return_attn_probs=True, **options))
    packed = [
        lk.flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, length, return_attn_probs=True, **options),
        lk.flash_attn_varlen_kvpacked_func(qkv[:, :, 0].flatten(0, 1), kv.flatten(0, 1), cu, cu_k, length,
                                           length + 3, return_attn_probs=True, **options),
    ]
    padded = [
        lk.flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **options),
        lk.flash_attn_kvpacked_func(qkv[:, :, 0], kv, return_attn_probs=True, **options),
    ]
    assert torch.equal(lk.flash_attn_func(*qkv.unbind(2), **options), padded[0][0])
    for (out, lse, _), (p_out, p_lse, _), (d_out, d_lse, _) in zip(varlen, packed, padded):
        torch.testing.assert_close(p_out, out, rtol=0, atol=0)
        torch.testing.assert_close(p_lse, lse, rtol=0, atol=0)
        # FlashAttention's padded layouts: out [B, L, H, Dh], softmax_lse [B, H, L].
        assert d_lse.shape == (batch, heads, length)
        torch.testing.assert_close(d_out, out.view(d_out.shape), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(d_lse, lse.view(heads, batch, length).transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_deterministic_backward_is_bitwise_reproducible():
    q, k, v, cu_q, cu_k = _inputs(40, 4, 2, [19, 6], [25, 6], torch.float16)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        lk.flash_attn_varlen_func(*leaves, cu_q, cu_k, 19, 25, causal=True, softcap=3.0,
                                  deterministic=True).float().square().sum().backward()
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a: lk.flash_attn_varlen_func(*a, 4, 4, 0.1), "dropout_p"),
        (lambda a: lk.flash_attn_varlen_func(*a, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32)),
         "block_table"),
        (lambda a: lk.flash_attn_varlen_func(*a, 4, 4, window_size=(3,)), "window_size"),
        (lambda a: lk.flash_attn_varlen_func(*a, 4, 4, alibi_slopes=torch.ones(2, dtype=torch.float64)),
         "alibi_slopes"),
        (lambda a: lk.flash_attn_varlen_qkvpacked_func(a[0], a[3], 4), "qkv"),
        (lambda a: lk.flash_attn_func(a[0][None], a[1][None], a[2][None], 0.5), "dropout_p"),
    ],
)
def test_unsupported_arguments_raise_value_error(call, message):
    q, k, v, cu_q, cu_k = _inputs(8, 2, 1, [4], [4], torch.float32)
    with pytest.raises(ValueError, match=message):
        call((q, k, v, cu_q, cu_k))


@pytest.mark.parametrize("window_size", [(-1, 0), (3, 1), (0, -1), (2, 2)])
def test_flops_count_the_pairs_the_window_keeps(window_size):
    from lookwhen_kernels.ops.attention import attention_flops

    lengths_q, lengths_k = [5, 1, 9, 0], [8, 7, 3, 2]
    pairs = sum(int(reference.attention_mask(a, b, window_size).sum()) for a, b in zip(lengths_q, lengths_k))
    assert attention_flops((sum(lengths_q), 3, 16), cu_seqlens_from_lengths(lengths_q),
                           cu_seqlens_from_lengths(lengths_k), *window_size) == 4 * pairs * 3 * 16


def test_compiles_with_every_score_modifier(monkeypatch):
    # The CPU path, as torch.compile traces it (the interpreter needs real data).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, cu_q, cu_k = _inputs(16, 4, 2, [5, 7], [9, 6], torch.float32)
    slopes = torch.rand(4)

    def attend(q, k, v):
        return lk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, 0.0, None, True, (3, -1), 2.0, slopes)

    torch.testing.assert_close(torch.compile(attend, fullgraph=True)(q, k, v), attend(q, k, v), rtol=0, atol=0)
