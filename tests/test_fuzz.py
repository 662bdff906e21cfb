"""Differential fuzzing of the ops' Python API: the three CPU backends (the
Triton kernels in the interpreter, the native C++ kernels, the PyTorch
reference) on random valid inputs with NaN, inf, ties, signed zeros and
extreme scales mixed in, held to one another and to the rules of
docs/ops.md ("NaN and inf").

Hypothesis draws the cases from a fixed seed (``derandomize``), so every run
checks the same cases; ``LOOKWHEN_FUZZ_EXAMPLES`` (default 12 per op) sets
how many, e.g. 500 for a longer hunt. A failure prints the smallest input
found.
"""
import contextlib
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lookwhen_kernels as lk
from lookwhen_kernels import native
from lookwhen_kernels.layout import cu_seqlens_from_lengths

EXAMPLES = int(os.environ.get("LOOKWHEN_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = ("triton", "native", "reference") if native.available() else ("triton", "reference")
INF, NAN = float("inf"), float("nan")


@contextlib.contextmanager
def _backend(name):
    previous = lk.set_cpu_backend(name)
    try:
        yield
    finally:
        lk.set_cpu_backend(previous)


def _on_every_backend(call):
    """``call()`` on each backend: {backend: result}."""
    results = {}
    for name in BACKENDS:
        with _backend(name):
            results[name] = call()
    return results


def _assert_same_values(results, *, rtol=1e-4, atol=1e-5, what=""):
    """Float results agree: the same NaN and inf positions, the rest close
    (relative to the reference's magnitude)."""
    expected = results["reference"]
    for name, got in results.items():
        assert torch.equal(got.isnan(), expected.isnan()), f"{what}{name}: NaN positions differ"
        finite = expected.isfinite()
        assert torch.equal(got[~finite & ~got.isnan()], expected[~finite & ~expected.isnan()]), f"{what}{name}: inf"
        scale = float(expected[finite].abs().max()) if finite.any() else 1.0
        torch.testing.assert_close(got[finite], expected[finite], rtol=rtol, atol=atol * max(scale, 1.0),
                                   msg=f"{what}{name}")


def _assert_same_ids(results):
    expected = results["reference"]
    for name, got in results.items():
        assert torch.equal(got, expected), f"{name}: {got.tolist()} != reference {expected.tolist()}"


# Values: ordinary draws, exact ties (a few levels), signed zeros, extremes.
SCALES = st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e15])


@st.composite
def scores(draw, shape, *, nan=False, inf=False):
    """Scores of ``shape``: continuous or quantised to a few levels (ties),
    times a scale, with signed zeros and (when allowed) NaN and +-inf."""
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        values = values.mul(2).round()  # ties
    values = (values * draw(SCALES)).float()
    specials = [0.0, -0.0] + ([NAN] if nan else []) + ([INF, -INF] if inf else [])
    count = draw(st.integers(0, min(n, 4)))
    for _ in range(count):
        values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(specials))
    return values.view(shape)


@given(st.data())
@FUZZ
def test_topk_tokens(data):
    batch, n = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 70))
    # Infinite scores are ranked as numbers without upsampling; NaN is
    # refused, and unchecked it ranks first.
    s = data.draw(scores((batch, n), inf=True, nan=True))
    k = data.draw(st.integers(0, n))
    _assert_same_ids(_on_every_backend(lambda: lk.topk_tokens(s, k, validate=False)))
    budgets = torch.tensor([data.draw(st.integers(0, n)) for _ in range(batch)], dtype=torch.int32)
    results = _on_every_backend(lambda: lk.topk_tokens_budgets(s, budgets, validate=False))
    _assert_same_ids({name: torch.cat([ids, cu]) for name, (ids, cu, _) in results.items()})


@given(st.data())
@FUZZ
def test_topk_tokens_upsampled(data):
    frames, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 5)), data.draw(st.integers(2, 5))
    out_h, out_w = data.draw(st.integers(h, 2 * h)), data.draw(st.integers(w, 2 * w))
    # Continuous scores, and no axis upsampled from one row or past 2x,
    # where several positions are near-copies of one score: an upsampled tie
    # may round apart between F.interpolate and the kernels (the op table's
    # exception).
    seed = data.draw(st.integers(0, 2**31 - 1))
    s = torch.randn(2, frames * h * w, generator=torch.Generator().manual_seed(seed))
    k = data.draw(st.integers(0, frames * out_h * out_w))
    _assert_same_ids(_on_every_backend(
        lambda: lk.topk_tokens(s, k, grid=(frames, h, w), out_grid=(frames, out_h, out_w))))


@given(st.data())
@FUZZ
def test_budgets_from_scores(data):
    batch, n = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 60))
    s = data.draw(scores((batch, n), inf=True, nan=True))
    mass = data.draw(st.sampled_from([0.25, 0.5, 0.9, 1.0]))
    results = _on_every_backend(lambda: lk.budgets_from_scores(s, mass=mass, validate=False))
    expected = results["reference"]
    for name, got in results.items():
        # A clip whose cumulative mass lands on ``mass`` within float32
        # rounding may take one token more or less.
        close = (got - expected).abs() <= 1
        assert close.all(), f"{name}: {got.tolist()} != reference {expected.tolist()}"
        for b in torch.nonzero(got != expected).flatten().tolist():
            probs = torch.softmax(s[b].double().nan_to_num(INF, INF, -INF), 0).sort(descending=True).values.cumsum(0)
            assert abs(float(probs[min(got[b], expected[b]) - 1]) - mass) < 1e-5, f"{name}: clip {b}"


@given(st.data())
@FUZZ
def test_select_windows(data):
    frames, h, w = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    window = (data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    # Finite sums (a window of +inf and -inf has none); ties and unchecked NaN.
    s = data.draw(scores((2, frames * h * w), nan=True))
    _assert_same_ids(_on_every_backend(lambda: lk.select_windows(s, window, grid=(frames, h, w), validate=False)))


@given(st.data())
@FUZZ
def test_nn_uniqueness(data):
    batch, n, dim = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 40)), data.draw(st.integers(1, 20))
    x = data.draw(scores((batch, n, dim), nan=True))
    if data.draw(st.booleans()) and n > 1:
        x[:, n - 1] = x[:, 0]  # an exact duplicate: distance 0
    metric = data.draw(st.sampled_from(["l2", "cosine"]))
    # The kernels pick neighbours through |q|^2 + |k|^2 - 2 q.k, which cancels
    # digits: tolerances relative to the clip's spread.
    _assert_same_values(_on_every_backend(lambda: lk.nn_uniqueness(x, metric=metric)), rtol=2e-3, atol=2e-3)


@given(st.data())
@FUZZ
def test_score_tokens(data):
    batch, n, dim = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 30)), data.draw(st.integers(2, 40))
    hidden = data.draw(st.integers(1, 48))
    x = data.draw(scores((batch, n, dim), nan=True))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    params = (1 + 0.3 * torch.randn(dim, generator=generator), 0.2 * torch.randn(dim, generator=generator),
              torch.randn(hidden, dim, generator=generator) / dim**0.5, 0.2 * torch.randn(hidden, generator=generator),
              torch.randn(1, hidden, generator=generator) / hidden**0.5, 0.2 * torch.randn(1, generator=generator))
    # A token of equal features has no spread: LayerNorm's eps decides, and
    # near-ties of tiny scales are all rounding.
    _assert_same_values(_on_every_backend(lambda: lk.score_tokens(x, *params)), rtol=1e-3, atol=1e-3)


@given(st.data())
@FUZZ
def test_frame_normalize(data):
    shape = tuple(data.draw(st.integers(1, n)) for n in (2, 3, 12, 20))
    x = data.draw(scores(shape, nan=True))
    _assert_same_values(_on_every_backend(lambda: lk.frame_normalize(x)), rtol=1e-3, atol=1e-3)


@given(st.data())
@FUZZ
def test_varlen_attention(data):
    batch = data.draw(st.integers(1, 3))
    lengths_q = [data.draw(st.integers(0, 12)) for _ in range(batch)]
    lengths_k = [data.draw(st.integers(0, 12)) for _ in range(batch)]
    kv_heads = data.draw(st.integers(1, 2))
    heads = kv_heads * data.draw(st.integers(1, 2))
    head_dim = data.draw(st.sampled_from([16, 24, 32]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=generator)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    options = data.draw(st.sampled_from([{}, {"causal": True}, {"window_size": (3, 1)}, {"softcap": 5.0}]))
    # Under a causal or window mask a NaN of v also reaches the queries of
    # its tile that do not see it (0 * NaN, as in FlashAttention): v's NaN
    # rule holds without masks.
    for tensor in (q, k) + ((v,) if "causal" not in options and "window_size" not in options else ()):
        if tensor.numel() and data.draw(st.integers(0, 3)) == 0:
            tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] = NAN
    cu_q, cu_k = cu_seqlens_from_lengths(lengths_q), cu_seqlens_from_lengths(lengths_k)
    results = _on_every_backend(lambda: lk.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options))
    _assert_same_values({name: out for name, (out, _) in results.items()}, rtol=1e-4, atol=1e-4, what="out ")
    _assert_same_values({name: lse for name, (_, lse) in results.items()}, rtol=1e-4, atol=1e-4, what="lse ")


@given(st.data())
@FUZZ
def test_gather_patch_embed(data):
    batch, frames = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    patch, downsample = data.draw(st.sampled_from([2, 4])), data.draw(st.sampled_from([1, 2]))
    grid_h, grid_w, dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 20))
    window = patch * downsample
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    clip = torch.randint(0, 256, (batch, frames, grid_h * window, grid_w * window, 3), dtype=torch.uint8,
                         generator=generator)
    n = frames * grid_h * grid_w
    weight = torch.randn(dim, 3, patch, patch, generator=generator) / patch
    bias, pos = torch.randn(dim, generator=generator), torch.randn(n, dim, generator=generator)
    k = data.draw(st.integers(0, n))
    indices = torch.randint(0, n, (batch, k), generator=generator, dtype=torch.int32)
    call = lambda: lk.gather_patch_embed(clip, indices, weight, bias, pos, patch_size=patch,  # noqa: E731
                                         mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], downsample=downsample)
    _assert_same_values(_on_every_backend(call), rtol=1e-4, atol=1e-4)


@given(st.data())
@FUZZ
def test_static_tokens(data):
    batch, frames = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 4))
    patch, grid_h, grid_w = data.draw(st.sampled_from([2, 3])), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    clip = torch.randint(0, 256, (batch, frames, grid_h * patch, grid_w * patch, 3), dtype=torch.uint8,
                         generator=generator)
    if frames > 1 and data.draw(st.booleans()):
        clip[:, 1] = clip[:, 0]  # a still frame: its tokens are dropped
    # Thresholds whose boundary no byte sum can hit (see tests/test_static_tokens.py).
    threshold = (data.draw(st.integers(0, 400)) + 0.5) / (255 * 3 * patch * patch)
    results = _on_every_backend(lambda: torch.cat(lk.static_tokens(clip, patch_size=patch, threshold=threshold)))
    _assert_same_ids(results)


def test_the_fuzzer_switches_the_backends_it_compares():
    """Not a vacuous pass: each backend runs its own path."""
    from lookwhen_kernels.ops._common import native_kernel, use_triton

    x = torch.zeros(1, 2, 3)
    with _backend("reference"):
        assert not use_triton(x) and native_kernel("nn_uniqueness", x) is None
    with _backend("triton"):
        assert use_triton(x)
    if "native" in BACKENDS:
        with _backend("native"):
            assert not use_triton(x) and native_kernel("nn_uniqueness", x) is not None
