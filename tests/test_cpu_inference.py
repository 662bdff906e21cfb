"""lookwhen.models.cpu_inference: the prepacked oneDNN linear computes nn.Linear's
function, takes its fast path only where it may, and follows its weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lookwhen import build_model, count_flops
from lookwhen.models.cpu_inference import PrepackedLinear, onednn_available, prepack_linears
from lookwhen_kernels.testing import assert_within_reference_error
from helpers import DENSE_TINY, TINY as LOOKWHEN_TINY

TINY = {"lookwhen-b16": LOOKWHEN_TINY, "internvideo2-b14": DENSE_TINY}


def tiny(name):
    return build_model(name, **TINY[name])


def random_clip(config, batch):
    return torch.randint(0, 256, (batch, config.frames, config.image_size, config.image_size, 3), dtype=torch.uint8)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN packed linear")


def _layer(in_features, out_features, bias=True):
    return PrepackedLinear.from_linear(nn.Linear(in_features, out_features, bias=bias))


@torch.no_grad()
def _oracle(layer, x):
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


@pytest.mark.parametrize("shape", [(1, 37), (163, 37), (2, 5, 37), (3, 1, 7, 37)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_in_inference(shape, bias):
    layer = _layer(37, 61, bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = layer(x)
        plain = F.linear(x, layer.weight, layer.bias)
    assert layer._packed is not None, "the oneDNN path was not taken"
    assert out.shape == (*shape[:-1], 61) and out.dtype == torch.float32
    assert_within_reference_error(out, plain, _oracle(layer, x))


def test_non_contiguous_input():
    layer = _layer(24, 9)
    x = torch.randn(24, 11).t()
    with torch.no_grad():
        assert_within_reference_error(layer(x), F.linear(x, layer.weight, layer.bias), _oracle(layer, x))
    assert layer._packed is not None


def test_empty_input_falls_back():
    layer = _layer(8, 3)
    with torch.no_grad():
        out = layer(torch.randn(0, 8))
    assert out.shape == (0, 3) and layer._packed is None


def test_gradients_take_the_plain_path():
    layer = _layer(16, 5)
    reference = nn.Linear(16, 5)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(7, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    assert layer._packed is None
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_input_requiring_grad_with_frozen_weights_keeps_its_gradient():
    layer = _layer(16, 5).requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(3, -1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_fall_back(dtype):
    layer = _layer(12, 4).to(dtype)
    x = torch.randn(5, 12, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._packed is None


def test_autocast_to_float16_falls_back():
    layer = _layer(12, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = layer(torch.randn(5, 12))
    assert out.dtype == torch.float16 and layer._packed is None


def test_follows_in_place_updates_and_loaded_weights():
    layer = _layer(10, 6)
    x = torch.randn(4, 10)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2.0)
        assert_within_reference_error(layer(x), F.linear(x, layer.weight, layer.bias), _oracle(layer, x))
        fresh = nn.Linear(10, 6)
        layer.load_state_dict(fresh.state_dict())
        assert_within_reference_error(layer(x), fresh(x), _oracle(layer, x))
        layer.weight = nn.Parameter(torch.randn(6, 10))
        assert_within_reference_error(layer(x), F.linear(x, layer.weight, layer.bias), _oracle(layer, x))


def test_dtype_move_drops_the_packed_copy():
    layer = _layer(10, 6)
    with torch.no_grad():
        layer(torch.randn(2, 10))
        assert layer._packed is not None
        layer.double()
        assert layer._packed is None
        x = torch.randn(2, 10, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_prepack_linears_keeps_parameters_and_names():
    model = tiny("lookwhen-b16")
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) is model
    assert sum(type(m) is PrepackedLinear for m in model.modules()) == n_linear > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(p is before[name] for name, p in model.named_parameters())


def test_prepack_linears_leaves_subclasses_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 2))
    prepack_linears(model)
    assert type(model[0]) is Scaled and type(model[1]) is PrepackedLinear


@pytest.mark.parametrize("name", ["lookwhen-b16", "internvideo2-b14"])
def test_prepacked_models_agree_and_count_the_same_flops(name):
    plain = tiny(name).eval()
    packed = prepack_linears(tiny(name).eval())
    clip = random_clip(plain.config, 2)
    with torch.inference_mode():
        a, b = plain(clip), packed(clip)
    a = a.embedding if name == "lookwhen-b16" else a
    b = b.embedding if name == "lookwhen-b16" else b
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert count_flops(packed, clip) == count_flops(plain, clip)
    assert any(m._packed is not None for m in packed.modules() if isinstance(m, PrepackedLinear))


def test_real_size_baseline_agrees():
    # This checks oneDNN against MKL at the benchmark's real sizes; with SDPA
    # the baseline runs no custom op, so the interpreter stays out of it.
    plain = build_model("internvideo2-b14", depth=1, attention="sdpa").eval()
    packed = prepack_linears(build_model("internvideo2-b14", depth=1, attention="sdpa").eval())
    clip = random_clip(plain.config, 1)
    with torch.inference_mode():
        torch.testing.assert_close(packed(clip), plain(clip), rtol=1e-4, atol=1e-4)
