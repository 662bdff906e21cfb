"""Fidelity of the architectures (issue 12): the block options against timm's
own ``Block`` and a float64 oracle, the faithful InternVideo2-B dense
baseline and its official checkpoint layout, and the image teachers.

Shapes are tiny: attention runs in Triton's interpreter.
"""
import pytest
import torch
import torch.nn.functional as F

from lookwhen.models.layers import Block
from lookwhen_kernels.testing import assert_within_reference_error
from helpers import DENSE_TINY


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
    ("lookwhen-b16", dict(attention="sdpa"), "options of the dense baseline"),
    ("internvideo2-b14", dict(pos_embed="joint", width=40, heads=2, pool_heads=2), "divisible by 16"),
])
def test_configs_refuse_bad_architecture_options(preset, bad, match):
    from lookwhen import get_config

    with pytest.raises(ValueError, match=match):
        get_config(preset, **bad)


# InternVideo2-B --------------------------------------------------------------------------
# A tiny InternVideo2 with the official model's proportions: 2 frames of 28 px
# (2 x 2 x 2 tokens + CLS), 2 blocks 32 wide, 2 heads, a 4-head pooling head.
IV2 = dict(DENSE_TINY, pool_heads=4)


def official_state_dict(width=32, depth=2, frames=2, side=2, patch=14, classes=5, seed=0):
    """Random tensors under the names and shapes of InternVideo2's
    ``internvideo2.py`` (joint position table, one-frame Conv3d patches,
    RMSNorm weights only, bias-free qkv, width-wide qk-norms, LayerScale,
    ``clip_projector`` with biased q/k/v, ``fc_norm``, ``head``), written out
    from their model code rather than from ours."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, around=0.0, scale=0.1):
        return around + scale * torch.randn(*shape, generator=g)

    d = width
    state = {
        "cls_token": rand(1, 1, d, scale=0.5),
        "pos_embed": rand(1, 1 + frames * side * side, d, scale=0.5),
        "patch_embed.proj.weight": rand(d, 3, 1, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rand(d),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": rand(d, around=1.0), p + "attn.qkv.weight": rand(3 * d, d, scale=0.2),
            p + "attn.q_norm.weight": rand(d, around=1.0), p + "attn.k_norm.weight": rand(d, around=1.0),
            p + "attn.proj.weight": rand(d, d, scale=0.2), p + "attn.proj.bias": rand(d),
            p + "ls1.gamma": rand(d, around=0.5), p + "norm2.weight": rand(d, around=1.0),
            p + "mlp.fc1.weight": rand(4 * d, d, scale=0.2), p + "mlp.fc1.bias": rand(4 * d),
            p + "mlp.fc2.weight": rand(d, 4 * d, scale=0.2), p + "mlp.fc2.bias": rand(d),
            p + "ls2.gamma": rand(d, around=0.5),
        })
    for name in ("norm1_q", "norm1_k", "norm1_v"):
        state[f"clip_projector.{name}.weight"] = rand(d, around=1.0)
        state[f"clip_projector.{name}.bias"] = rand(d)
    for name in ("q", "k", "v"):
        state[f"clip_projector.cross_attn.{name}.weight"] = rand(d, d, scale=0.2)
        state[f"clip_projector.cross_attn.{name}_bias"] = rand(d)
    state.update({
        "clip_projector.cross_attn.proj.weight": rand(d, d, scale=0.2), "clip_projector.cross_attn.proj.bias": rand(d),
        "fc_norm.weight": rand(d, around=1.0), "fc_norm.bias": rand(d),
        "head.weight": rand(classes, d), "head.bias": rand(classes),
    })
    return state


def internvideo2_oracle(state, clip, *, heads=2, pool_heads=4, dtype=torch.float64):
    """InternVideo2's forward to the pre-logits (``fc_norm``) written from
    their description, straight on the official state dict."""
    s = {k: v.to(dtype) for k, v in state.items()}
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=dtype).view(1, 3, 1, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), dtype=dtype).view(1, 3, 1, 1, 1)
    pixels = (clip.permute(0, 4, 1, 2, 3).to(dtype) / 255 - mean) / std  # [B, 3, T, H, W]
    weight = s["patch_embed.proj.weight"]
    x = F.conv3d(pixels, weight, s["patch_embed.proj.bias"], stride=(1, weight.shape[-2], weight.shape[-1]))
    batch, dim = x.shape[:2]
    x = x.flatten(3).permute(0, 2, 3, 1).reshape(batch, -1, dim)
    x = torch.cat([s["cls_token"].expand(batch, -1, -1), x], 1) + s["pos_embed"]

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def attend(q, k, v, n_heads):
        q, k, v = (t.view(batch, t.shape[1], n_heads, -1).transpose(1, 2) for t in (q, k, v))
        a = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(batch, q.shape[2], -1)

    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda name: s[f"blocks.{i}.{name}"]  # noqa: E731
        q, k, v = F.linear(rms(x, p("norm1.weight")), p("attn.qkv.weight")).chunk(3, -1)
        q, k = rms(q, p("attn.q_norm.weight")), rms(k, p("attn.k_norm.weight"))
        x = x + p("ls1.gamma") * F.linear(attend(q, k, v, heads), p("attn.proj.weight"), p("attn.proj.bias"))
        hidden = F.gelu(F.linear(rms(x, p("norm2.weight")), p("mlp.fc1.weight"), p("mlp.fc1.bias")), approximate="tanh")
        x = x + p("ls2.gamma") * F.linear(hidden, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    c = lambda name: s[f"clip_projector.{name}"]  # noqa: E731
    ln = lambda t, name: F.layer_norm(t, (dim,), c(f"{name}.weight"), c(f"{name}.bias"), 1e-5)  # noqa: E731
    q = F.linear(ln(x.mean(1, keepdim=True), "norm1_q"), c("cross_attn.q.weight"), c("cross_attn.q_bias"))
    k = F.linear(ln(x, "norm1_k"), c("cross_attn.k.weight"), c("cross_attn.k_bias"))
    v = F.linear(ln(x, "norm1_v"), c("cross_attn.v.weight"), c("cross_attn.v_bias"))
    pooled = F.linear(attend(q, k, v, pool_heads)[:, 0], c("cross_attn.proj.weight"), c("cross_attn.proj.bias"))
    return F.layer_norm(pooled, (dim,), s["fc_norm.weight"], s["fc_norm.bias"], 1e-5)


def _iv2(**extra):
    from lookwhen import build_model

    return build_model("internvideo2-b14", **{**IV2, **extra}).eval()


def _clip(cfg, batch):
    return torch.randint(0, 256, (batch, cfg.frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)


def test_preset_is_internvideo2_b14():
    from lookwhen import get_config

    cfg = get_config("internvideo2-b14")
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch_size, cfg.frames, cfg.tubelet) == (768, 12, 12, 14, 8, 1)
    assert (cfg.norm, cfg.qk_norm, cfg.qkv_bias, cfg.layer_scale) == ("rmsnorm", "width", False, 1e-5)
    assert (cfg.pos_embed, cfg.final_norm, cfg.pool_heads, cfg.attention) == ("joint", False, 16, "kernels")
    model = _iv2()
    # The table starts as InternVideo2's 3-D sin-cos: a zero CLS row; frame t
    # in the first quarter of the width (sin then cos), column then row in the rest.
    table = model.pos_embed.detach()[0]
    assert not table[0].any()
    n = 1 + 1 * 4 + 1 * 2 + 0  # frame 1, row 1, column 0
    omega = 10000.0 ** -(torch.arange(4) / 4)
    torch.testing.assert_close(table[n, :8], torch.cat([omega.sin(), omega.cos()]), rtol=0, atol=1e-6)
    column, row = table[n, 8:20], table[n, 20:]
    assert torch.equal(column[:6], torch.zeros(6)) and torch.equal(column[6:], torch.ones(6))
    torch.testing.assert_close(row[0], torch.tensor(1.0).sin())


def test_a_deepspeed_checkpoint_loads(tmp_path):
    """DeepSpeed's mp_rank_00_model_states.pt, as InternVideo2's fine-tuning saves it."""
    from lookwhen.io.weights import load_internvideo2

    state = official_state_dict()
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": state, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
                "param_shapes": [{k: v.shape for k, v in state.items()}], "global_steps": 12,
                "ds_config": {"train_batch_size": 8}, "ds_version": "0.14.4"}, path)
    model, report = load_internvideo2(path, **IV2, num_classes=5)
    assert report.ok and report.missing == [] and report.unexpected == []
    assert torch.equal(model.head.weight, state["head.weight"])


def test_official_checkpoint_layout_loads_and_runs_like_internvideo2(tmp_path):
    from lookwhen.io.weights import load_internvideo2

    state = official_state_dict()
    path = tmp_path / "internvideo2_b14.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    model, report = load_internvideo2(path, **IV2, num_classes=5)
    assert report.ok and report.missing == [] and report.unexpected == [] and report.skipped == []
    model.eval()
    clip = _clip(model.config, 2)
    with torch.no_grad():
        out, again = model(clip), model(clip)
        ref32 = internvideo2_oracle(state, clip, dtype=torch.float32)
        ref64 = internvideo2_oracle(state, clip)
        logits = model.head(out)
    assert torch.isfinite(out).all() and torch.equal(out, again)
    assert_within_reference_error(out, ref32, ref64)
    torch.testing.assert_close(logits.double(), F.linear(ref64, state["head.weight"].double(),
                                                         state["head.bias"].double()), rtol=1e-4, atol=1e-4)
    # Without a classifier the head is reported as skipped, not unexpected.
    _, report = load_internvideo2(path, **IV2)
    assert report.ok and sorted(report.skipped) == ["head.bias", "head.weight"]


def test_official_loader_reports_missing_unexpected_and_bad_shapes():
    from lookwhen.models.baseline import load_internvideo2_state_dict

    model = _iv2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = official_state_dict()
    del state["blocks.1.ls2.gamma"]
    state["clip_decoder.0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.ls2.gamma'\].*clip_decoder"):
        load_internvideo2_state_dict(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = load_internvideo2_state_dict(model, state, strict=False)
    assert report.missing == ["blocks.1.ls2.gamma"] and report.unexpected == ["clip_decoder.0.weight"]
    assert not report.ok
    wide = official_state_dict(frames=3)
    with pytest.raises(ValueError, match=r"pos_embed: \[1, 13, 32\] for \[1, 9, 32\]"):
        load_internvideo2_state_dict(model, wide)
    deep = official_state_dict()
    deep["patch_embed.proj.weight"] = torch.zeros(32, 3, 2, 14, 14)
    with pytest.raises(ValueError, match="tubelet"):
        load_internvideo2_state_dict(model, deep)


def test_kernels_and_sdpa_paths_agree_and_train():
    kernels = _iv2()
    sdpa = _iv2(attention="sdpa")
    sdpa.load_state_dict(kernels.state_dict())
    clip = _clip(kernels.config, 2)
    with torch.no_grad():
        torch.testing.assert_close(kernels(clip), sdpa(clip), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kernels.forward_features(clip), sdpa.forward_features(clip), rtol=1e-4, atol=1e-5)
    # FLOP counts agree too: the custom op's formula covers the pooling's one-query attention.
    from lookwhen import count_flops

    one = clip[:1]
    assert count_flops(kernels, one) == pytest.approx(count_flops(sdpa, one), rel=1e-3)
    kernels.train()
    kernels(clip).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in kernels.parameters())


def test_forward_packed_runs_each_token_set_like_its_own_clip():
    model = _iv2()
    clip = _clip(model.config, 3)
    keep = [torch.tensor([0, 2, 3, 8]), torch.tensor([0]), torch.arange(9)]
    with torch.no_grad():
        rows = model.embed(clip)
        packed = torch.cat([rows[b, ids] for b, ids in enumerate(keep)])
        cu = torch.tensor([0, 4, 5, 14], dtype=torch.int32)
        out = model.forward_packed(packed, cu, 9)
        # Each clip alone through the PyTorch path on its kept rows.
        alone = torch.cat([model.fc_norm(model.clip_projector(model.trunk(rows[b: b + 1, ids])))
                           for b, ids in enumerate(keep)])
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2:], model(clip[2:]), rtol=1e-4, atol=1e-5)


def test_timm_loader_refuses_the_joint_position_table():
    from lookwhen.models.timm_weights import load_timm_state_dict, timm_state_dict

    model = _iv2()
    with pytest.raises(ValueError, match="joint position table"):
        load_timm_state_dict(model, {})
    with pytest.raises(ValueError, match="joint position table"):
        timm_state_dict(model)


def test_video_teacher_builds_internvideo2_from_an_official_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from lookwhen.models.baseline import load_internvideo2_state_dict
    from lookwhen.io.checkpoint import save_checkpoint
    from lookwhen.training.teachers import VideoTeacher

    state = official_state_dict()
    official = tmp_path / "official.safetensors"
    save_file(state, official)
    teacher = VideoTeacher.from_checkpoint(official, **IV2)
    assert teacher.module.config.name == "internvideo2-b14" and teacher.frames == 2
    reference = _iv2()
    load_internvideo2_state_dict(reference, state)
    clip = _clip(reference.config, 2)
    with torch.no_grad():
        expected = reference(clip)
    assert torch.equal(teacher(clip), expected)
    # Our own checkpoint of the same model rebuilds it from its config.
    ours = tmp_path / "ours.safetensors"
    save_checkpoint(reference, ours)
    assert torch.equal(VideoTeacher.from_checkpoint(ours)(clip), expected)
    del state["fc_norm.bias"]
    save_file(state, official)
    with pytest.raises(ValueError, match=r"missing keys \['fc_norm.bias'\]"):
        VideoTeacher.from_checkpoint(official, **IV2)


# Image teachers ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, size, own_size, patch, prefix", [
    ("vit_small_patch14_reg4_dinov2", 112, 518, 14, 5),  # 8 x 8 patches of 14 px -> our 4 x 4 grid
    ("vit_small_patch16_dinov3", 64, 256, 16, 5),        # 4 x 4 patches of 16 px, rotary positions
])
def test_dino_image_teachers_match_timm(tmp_path, name, size, own_size, patch, prefix):
    import timm
    from safetensors.torch import save_file

    from lookwhen.training.teachers import ImageTeacher

    tiny = dict(depth=1, embed_dim=32, num_heads=2)
    reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **tiny).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
    teacher = ImageTeacher(name, weights, image_size=size, **tiny)
    assert teacher.model.num_prefix_tokens == prefix and teacher.model.patch_embed.patch_size == (patch, patch)
    clip = torch.randint(0, 256, (1, 2, 64, 64, 3), dtype=torch.uint8)
    patches, frames = teacher(clip, (4, 4))
    assert patches.shape == (1, 2, 16, 32) and frames.shape == (1, 2, 32)
    x = clip[0].permute(0, 3, 1, 2).float() / 255
    if size != 64:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    with torch.no_grad():
        tokens = reference.forward_features((x - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    side = size // patch
    grid = tokens[:, prefix:].reshape(2, side, side, 32)
    # Each of our 16-px tokens averages the teacher patches covering it.
    block = side // 4
    expected = grid.view(2, 4, block, 4, block, 32).mean((2, 4)).reshape(2, 16, 32)
    torch.testing.assert_close(patches[0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(frames[0], tokens[:, 0])  # the upstream CLS token, not a patch average
    # Without an override, the teacher runs at the model's own resolution.
    assert ImageTeacher(name, weights, **tiny).image_size == own_size


def test_internvideo2_under_autocast_keeps_one_compute_dtype(monkeypatch):
    import lookwhen_kernels as lk

    seen = []
    attention = lk.varlen_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(lk, "varlen_attention", spy)
    model = _iv2()
    clip = _clip(model.config, 2)
    with torch.no_grad():
        exact = model(clip)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.float16):  # the interpreter cannot do bf16
            tokens = model.forward_features(clip)
            low = model(clip)
    # LayerScale and RMSNorm keep the residual stream and q/k/v in fp16 (the
    # op takes one dtype; float32 parameters would otherwise promote them).
    assert tokens.dtype == torch.float16 and seen and all(d == (torch.float16,) * 3 for d in seen)
    torch.testing.assert_close(low.float(), exact, rtol=0.05, atol=0.05)


def test_internvideo2_initialisation():
    model = _iv2(depth=3)
    stds = [float(block.mlp.fc2.weight.detach().std()) for block in model.blocks]
    # trunc_normal(0.02) divided by sqrt(2 * layer): 0.0141, 0.01, 0.0082.
    for layer, std in enumerate(stds, start=1):
        assert std == pytest.approx(0.02 / (2 * layer) ** 0.5, rel=0.15)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((32,), 1e-5))
    assert 0.005 < float(model.cls_token.detach().std()) < 0.04


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_internvideo2_kernels_on_the_gpu_match_sdpa(dtype):
    """The real width (12 heads of 64; the pooling's 16 heads of 48, one
    query per clip) through the GPU kernels under autocast, against the
    SDPA path of the same weights in float32."""
    kernels = _iv2(width=768, heads=12, pool_heads=16, frames=2, image_size=56).cuda()
    exact = _iv2(width=768, heads=12, pool_heads=16, frames=2, image_size=56, attention="sdpa").cuda()
    exact.load_state_dict(kernels.state_dict())
    clip = _clip(kernels.config, 3).cuda()
    with torch.no_grad():
        reference = exact(clip)
        with torch.autocast("cuda", dtype=dtype):
            low = kernels(clip)
            rows = kernels.embed(clip)
            keep = [torch.arange(0, 33, 2), torch.arange(33)]
            packed = torch.cat([rows[b, ids.cuda()] for b, ids in enumerate(keep)])
            cu = torch.tensor([0, 17, 50], dtype=torch.int32, device="cuda")
            subsets = kernels.forward_packed(packed, cu, 33)
    low, subsets = low.float(), subsets.float()
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low, reference, rtol=0.05, atol=0.05)
    torch.testing.assert_close(subsets[1], reference[1], rtol=0.05, atol=0.05)
    torch.testing.assert_close(subsets[0], exact.forward_packed(packed.float(), cu, 33)[0], rtol=0.05, atol=0.05)
