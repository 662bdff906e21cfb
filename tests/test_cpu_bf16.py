"""bfloat16 on the CPU: the native kernels take bfloat16 inputs and run their
matrix products in bfloat16 (oneDNN, float32 accumulation), the prepacked
linear layers run bfloat16 under autocast, and the models' bfloat16
embeddings stay close to their float32 ones.

Each native result is held to the tolerance rule against the float64 oracle,
with the same-precision reference (the PyTorch reference on the same
bfloat16 inputs, which computes in float32) as the yardstick and bfloat16's
floor. The Triton interpreter cannot run bfloat16, so only the native
backend is tested here."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lookwhen_kernels as lk
from lookwhen import build_model
from lookwhen.models.cpu_inference import PrepackedLinear, onednn_available, prepack_linears
from lookwhen_kernels import native, reference, set_cpu_backend
from lookwhen_kernels.testing import DEFAULT_FLOOR, assert_within_reference_error, magnitude_floor

BF16 = torch.bfloat16


@pytest.fixture
def native_backend():
    if not native.available():
        pytest.skip(f"native CPU backend {native.status()}")
    previous = set_cpu_backend("native")
    yield
    set_cpu_backend(previous)


def _head(dim, hidden):
    """score_tokens' parameters at trained-network scales, bfloat16."""
    params = (1 + 0.3 * torch.randn(dim), 0.2 * torch.randn(dim), torch.randn(hidden, dim) / dim**0.5,
              0.2 * torch.randn(hidden), torch.randn(1, hidden) / hidden**0.5, 0.2 * torch.randn(1))
    return [p.to(BF16) for p in params]


def _grads(fn, inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(2, 70, 80, 130), (1, 1, 80, 40), (3, 5, 5, 17), (1, 0, 16, 8)])
def test_score_tokens_forward_and_backward(native_backend, shape):
    torch.manual_seed(0)
    batch, n_tokens, dim, hidden = shape
    x = ((torch.randn(batch, n_tokens, dim) * 2 + 3)).to(BF16)
    params = _head(dim, hidden)
    got = _grads(lk.score_tokens, [x, *params])
    oracle = _grads(reference.score_tokens, [t.double() for t in (x, *params)])
    same = _grads(reference.score_tokens, [x, *params])
    assert got[0].dtype == torch.float32 and got[1].dtype == BF16
    for name, g, s, o in zip(("scores", "dx", "d_norm_weight", "d_norm_bias", "d_w1", "d_b1", "d_w2", "d_b2"),
                             got, same, oracle):
        # The scores are float32 whatever the input: the floor is the input's.
        assert_within_reference_error(g, s, o, floor=magnitude_floor(o, DEFAULT_FLOOR[BF16]), name=name)


@pytest.mark.parametrize("layout", ["fixed", "packed", "all"])
def test_gather_patch_embed_forward_and_backward(native_backend, layout):
    torch.manual_seed(1)
    dim, patch = 80, 4
    clip = torch.randint(0, 256, (2, 3, 20, 28, 3), dtype=torch.uint8)
    n_tokens = 3 * 5 * 7
    weight = (torch.randn(dim, 3, patch, patch) / (3 * patch * patch) ** 0.5).to(BF16)
    bias, pos = (0.2 * torch.randn(dim)).to(BF16), (0.2 * torch.randn(n_tokens, dim)).to(BF16)
    cu = None
    if layout == "fixed":
        indices = torch.sort(torch.randperm(n_tokens)[:9]).values.int().repeat(2, 1).contiguous()
    elif layout == "packed":
        # An empty clip, then a single token.
        indices, cu = torch.tensor([17], dtype=torch.int32), torch.tensor([0, 0, 1], dtype=torch.int32)
    else:
        indices = None
    kwargs = dict(patch_size=patch, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), cu_seqlens=cu)
    call = lambda w, b, p: lk.gather_patch_embed(clip, indices, w, b, p, **kwargs)  # noqa: E731
    got = _grads(call, [weight, bias, pos])
    oracle = _grads(lambda w, b, p: reference.gather_patch_embed(clip, indices, w, b, p, **kwargs),
                    [t.double() for t in (weight, bias, pos)])
    set_cpu_backend("reference")
    same = _grads(call, [weight, bias, pos])
    assert got[0].dtype == BF16
    for name, g, s, o in zip(("tokens", "d_weight", "d_bias", "d_pos"), got, same, oracle):
        assert_within_reference_error(g, s, o, name=name)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(2, 37, 80), (1, 1, 16), (1, 300, 24)])
def test_nn_uniqueness(native_backend, metric, shape):
    torch.manual_seed(2)
    # Every token has a near twin: the case where the neighbour's choice needs float32 products.
    base = torch.randn(shape[0], (shape[1] + 1) // 2, shape[2])
    x = torch.cat([base, base + 0.05 * torch.randn_like(base)], 1)[:, : shape[1]].to(BF16)
    out = lk.nn_uniqueness(x, metric=metric)
    oracle = reference.nn_uniqueness(x.double(), metric=metric)
    assert_within_reference_error(out, reference.nn_uniqueness(x, metric=metric), oracle, floor=1e-5)


def test_frame_normalize(native_backend):
    torch.manual_seed(3)
    x = (torch.randn(2, 3, 7, 80) * 3 + 5).to(BF16)
    got = _grads(lk.frame_normalize, [x])
    oracle = _grads(reference.frame_normalize, [x.double()])
    same = _grads(reference.frame_normalize, [x])
    for name, g, s, o in zip(("out", "dx"), got, same, oracle):
        assert_within_reference_error(g, s, o, name=name)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN packed linear")
@pytest.mark.parametrize("autocast", [True, False])
def test_prepacked_linear_bf16(autocast):
    torch.manual_seed(4)
    layer = PrepackedLinear.from_linear(nn.Linear(37, 61))
    x = torch.randn(7, 2 * 37)[:, ::2]  # strided
    if not autocast:
        layer, x = layer.to(BF16), x.to(BF16)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = layer(x)
        assert out.dtype == BF16 and layer._packed is not None
        same = F.linear(x, layer.weight, layer.bias)
        assert layer(x[:0]).shape == (0, 61)
    with torch.no_grad():
        oracle = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert_within_reference_error(out, same, oracle)
    # Training under autocast takes autograd's path.
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        layer(x.requires_grad_()).float().sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["lookwhen-b16", "internvideo2-b14"])
def test_bf16_embeddings_match_fp32(native_backend, name):
    """The real presets' widths at half their depth and a quarter of their
    frames (so the test stays cheap; ``python -m bench e2e --dtype bf16``
    reports the full models): bfloat16 autocast against float32, cosine per
    clip >= 0.999 and, for LookWhen, the same selection but for a few
    near-tied tokens (a swapped token moves the embedding by about 1/K: the
    cosine bound needs K in the tens, not a handful)."""
    model = prepack_linears(build_model(name, frames=4, depth=6).eval())
    cfg = model.config
    clip = torch.randint(0, 256, (2, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))
    kwargs = {"keep_ratio": 0.1} if cfg.kind == "lookwhen" else {}
    with torch.inference_mode():
        full = model(clip, **kwargs)
        with torch.autocast("cpu", dtype=BF16):
            low = model(clip, **kwargs)
    if cfg.kind == "lookwhen":
        overlap = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(full.indices, low.indices)]
        assert min(overlap) >= 0.95, overlap
        full, low = full.embedding, low.embedding
    cosine = F.cosine_similarity(low.float(), full.float(), dim=-1)
    assert cosine.min() >= 0.999, cosine
