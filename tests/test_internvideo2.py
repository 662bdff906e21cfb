"""Fidelity of the architectures (issue 12): the block options against timm's
own ``Block`` and a float64 oracle, the faithful InternVideo2-B dense
baseline and its official checkpoint layout, and the image teachers.

Shapes are tiny: attention runs in Triton's interpreter.
"""
import pytest
import torch
import torch.nn.functional as F

from lookwhen.layers import Block
from lookwhen_kernels.testing import assert_within_reference_error


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _oracle_block(block, x):
    """InternVideo2's block written out: RMSNorm, no qkv bias, RMS qk-norm
    over the whole width, LayerScale, tanh GELU."""
    batch, length, dim = x.shape
    heads = block.attn.heads
    q, k, v = F.linear(_rms(x, block.norm1), block.attn.qkv.weight).chunk(3, dim=-1)
    q, k = _rms(q, block.attn.q_norm), _rms(k, block.attn.k_norm)
    q, k, v = (t.view(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
    attn = ((q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(-1)
    out = F.linear((attn @ v).transpose(1, 2).reshape(batch, length, dim), block.attn.proj.weight,
                   block.attn.proj.bias)
    x = x + block.ls1.gamma * out
    hidden = F.gelu(F.linear(_rms(x, block.norm2), block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh")
    return x + block.ls2.gamma * F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)


def _packed(block, x):
    batch, length, dim = x.shape
    cu = torch.arange(batch + 1, dtype=torch.int32) * length
    return block(x.reshape(-1, dim), cu, length).view(batch, length, dim)


def test_block_options_match_timm_block():
    from timm.models.vision_transformer import Block as TimmBlock

    theirs = TimmBlock(48, 3, qkv_bias=False, qk_norm=True, init_values=0.3).eval()
    ours = Block(48, 3, qkv_bias=False, qk_norm="head", layer_scale=1e-5).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the initial norms and gammas
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_packed(ours, x), expected, rtol=1e-4, atol=1e-4)


def test_internvideo2_block_options_match_an_oracle():
    block = Block(32, 2, norm="rmsnorm", qkv_bias=False, qk_norm="width", layer_scale=1e-5, mlp_act="gelu_tanh")
    assert "attn.qkv.bias" not in block.state_dict()
    assert block.attn.q_norm.weight.shape == (32,) and block.ls1.gamma.shape == (32,)
    assert torch.equal(block.ls2.gamma, torch.full((32,), 1e-5))
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        got, packed = block(x), _packed(block, x)
        ref32 = _oracle_block(block, x)
        ref64 = _oracle_block(block.double(), x.double())
    assert_within_reference_error(got, ref32, ref64)
    assert_within_reference_error(packed, ref32, ref64)


@pytest.mark.parametrize("bad, match", [
    (dict(norm="batchnorm"), "norm"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(mlp_act="relu"), "mlp_act"),
    (dict(layer_scale=-1.0), "layer_scale"),
])
def test_block_refuses_unknown_options(bad, match):
    with pytest.raises(ValueError, match=match):
        Block(32, 2, **bad)


@pytest.mark.parametrize("preset, bad, match", [
    ("lookwhen-b16", dict(norm="batchnorm"), "norm must be one of"),
    ("lookwhen-b16", dict(attention="flash"), "attention must be one of"),
    ("lookwhen-b16", dict(layer_scale=-1e-5), "layer_scale"),
    ("lookwhen-b16", dict(pos_embed="joint"), "options of the dense baseline"),
    ("internvideo2-b14", dict(pos_embed="joint", width=40, heads=2, pool_heads=2), "divisible by 16"),
])
def test_configs_refuse_bad_architecture_options(preset, bad, match):
    from lookwhen import get_config

    with pytest.raises(ValueError, match=match):
        get_config(preset, **bad)
