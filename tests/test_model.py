"""The model layer: presets, LookWhen's packed path against a dense masked
oracle built from the same weights, gradients, mixed precision, budgets, the
dense baseline, timm weights, checkpoints and FLOP counting.

Models are tiny here because the ops run in Triton's interpreter; one test
runs the real ``lookwhen-b16`` once with the interpreter off.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lookwhen
from lookwhen import DenseBaseline, LookWhen, build_model, count_flops, get_config
from lookwhen.io.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from lookwhen.models.config import PRESETS
from lookwhen.models.timm_weights import load_timm_state_dict, timm_state_dict
from lookwhen_kernels.testing import assert_within_reference_error
from helpers import DENSE_TINY, TINY as LOOKWHEN_TINY

TINY = {
    # The default shrunk; its selector stays on every second frame, the
    # narrower selector needs the projection.
    "lookwhen-b16": LOOKWHEN_TINY,
    "lookwhen-b16-light": LOOKWHEN_TINY,
    # The same shrink, keeping this preset's point: a selector as wide as the extractor.
    "lookwhere-b16": dict(LOOKWHEN_TINY, frames=3, depth=1, selector_width=32, selector_depth=2, score_hidden=32,
                          registers=4),
    "internvideo2-b14": DENSE_TINY,
}
# The default's own points at test size: a selector as wide as the extractor,
# unprojected, on every second of 4 frames; and with LookWhere's 2 x 2 head.
DEFAULT_SHAPE = dict(frames=4, selector_width=32, context_projection=False)
SUB_GRID_HEAD = dict(DEFAULT_SHAPE, score_outputs=4)


def tiny(name, **extra):
    return build_model(name, **{**TINY[name], **extra})


def random_clip(config, batch):
    shape = (batch, config.frames, config.image_size, config.image_size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8)


# The oracle: the same weights, plain dense PyTorch, padded batches with masks.
def _ln(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _lin(x, linear):
    return F.linear(x, linear.weight, linear.bias)


def ref_block(block, x, valid):
    """``x [B, L, D]``; keys outside ``valid [B, L]`` are masked out."""
    batch, length, dim = x.shape
    heads = block.attn.heads
    qkv = _lin(_ln(x, block.norm1), block.attn.qkv).view(batch, length, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5
    attn = logits.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    x = x + _lin((attn @ v).transpose(1, 2).reshape(batch, length, dim), block.attn.proj)
    return x + _lin(F.gelu(_lin(_ln(x, block.norm2), block.mlp.fc1)), block.mlp.fc2)


def ref_patches(clip, config, downsample, dtype):
    """Normalised patches ``[B, N, 3*p*p]`` in ``(c, y, x)`` order."""
    batch, frames, height, width, _ = clip.shape
    mean = torch.tensor(config.mean, dtype=dtype)
    std = torch.tensor(config.std, dtype=dtype)
    x = (clip.to(dtype) / 255 - mean) / std
    if downsample > 1:
        x = x.view(batch, frames, height // 2, 2, width // 2, 2, 3).mean(dim=(3, 5))
    p = config.patch_size
    h, w = x.shape[2] // p, x.shape[3] // p
    x = x.reshape(batch, frames, h, p, w, p, 3).permute(0, 1, 2, 4, 6, 3, 5)
    return x.reshape(batch, frames * h * w, 3 * p * p)


def _embed(patches, trunk):
    weight = trunk.patch_embed.proj.weight
    return F.linear(patches, weight.reshape(weight.shape[0], -1), trunk.patch_embed.proj.bias) + trunk.pos_embed.table()


def reference_lookwhen(model, clip, selections, dtype):
    """Dense masked LookWhen in ``dtype`` on the given selections (one int64
    tensor of token ids per clip), with autograd through a copy of the
    weights. Returns (outputs, the copy)."""
    m = copy.deepcopy(model).to(dtype)
    sel, ext, cfg = m.selector, m.extractor, m.config
    batch = clip.shape[0]
    seen = clip[:, :: cfg.selector_frame_stride]
    x = _embed(ref_patches(seen, cfg, cfg.selector_downsample, dtype), sel)
    prefix = torch.cat([sel.cls_token, sel.reg_token], 1).expand(batch, -1, -1)
    x = torch.cat([prefix, x], 1)
    every = torch.ones(x.shape[:2], dtype=torch.bool)
    for block in sel.blocks:
        x = ref_block(block, x, every)
    n_prefix = prefix.shape[1]
    context = _ln(x[:, :n_prefix], sel.norm)
    if cfg.context_projection:
        context = _lin(context, sel.context_proj)
    head = sel.score_head
    scores = _lin(F.gelu(_lin(_ln(x[:, n_prefix:], head.norm), head.fc1)), head.fc2)
    if cfg.score_outputs == 1:
        scores = scores[..., 0]

    tokens = _embed(ref_patches(clip, cfg, 1, dtype), ext)
    start = 1 + n_prefix
    length = start + max(len(s) for s in selections)
    seq = tokens.new_zeros(batch, length, cfg.width)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    rows = []
    for b, ids in enumerate(selections):
        rows.append(torch.cat([ext.cls_token[0], context[b], tokens[b, ids]]))
        valid[b, : start + len(ids)] = True
    seq = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
    for block in ext.blocks:
        seq = ref_block(block, seq, valid)
    seq = _ln(seq, ext.norm)
    picked = [seq[b, start: start + len(ids)] for b, ids in enumerate(selections)]
    pooled = torch.stack([p.mean(0) if len(p) else p.new_zeros(cfg.width) for p in picked])
    out = {"embedding": seq[:, 0], "tokens": torch.cat(picked), "pooled": pooled, "scores": scores}
    return out, m


def selections_of(out):
    if out.indices.dim() == 2:
        return [row.long() for row in out.indices]
    cu = out.cu_seqlens.tolist()
    return [out.indices[a:b].long() for a, b in zip(cu[:-1], cu[1:])]


def expected_selection(scores, config, keep):
    """Top-``keep`` of the scores upsampled to the extractor grid, ascending:
    r x r logits laid out per token, each selector frame repeated for the
    frames it stands for, each frame resized bilinearly."""
    frames, h, w = config.selector_grid
    r = math.isqrt(config.score_outputs)
    planes = scores.reshape(-1, frames, h, w, r, r).permute(0, 1, 2, 4, 3, 5).reshape(-1, frames, h * r, w * r)
    planes = planes.repeat_interleave(config.selector_frame_stride, dim=1).flatten(0, 1)
    fine = F.interpolate(planes[:, None], size=config.grid[1:], mode="bilinear", align_corners=False)
    fine = fine.view(scores.shape[0], -1)
    # Repeated frames tie: the lower id wins (a stable descending sort).
    return fine.sort(dim=1, descending=True, stable=True).indices[:, :keep].sort(dim=1).values


def check_against_oracle(model, clip, out, keys=("embedding", "tokens", "pooled", "scores")):
    selections = selections_of(out)
    oracle, _ = reference_lookwhen(model, clip, selections, torch.float64)
    same, _ = reference_lookwhen(model, clip, selections, torch.float32)
    for key in keys:
        assert_within_reference_error(getattr(out, key).detach(), same[key].detach(), oracle[key].detach(), name=key)


# Presets and configs --------------------------------------------------------------------
def test_presets_have_the_papers_shapes():
    lw = PRESETS["lookwhen-b16"]
    assert (lw.width, lw.depth, lw.heads, lw.patch_size) == (768, 12, 12, 16)
    assert lw.grid == (16, 14, 14) and lw.n_tokens == 3136
    assert lw.selector_grid == (8, 7, 7) and (lw.selector_width, lw.selector_depth, lw.selector_heads) == (768, 3, 12)
    assert lw.score_grid == (16, 7, 7) and not lw.context_projection
    assert lw.keep_ratio == 0.1 and lw.n_context == 6
    light = PRESETS["lookwhen-b16-light"]
    assert light.selector_grid == (16, 7, 7) and (light.selector_width, light.selector_depth) == (384, 3)
    assert PRESETS["lookwhere-b16"].selector_width == 768
    dense = PRESETS["internvideo2-b14"]
    assert dense.kind == "dense" and dense.grid == (8, 16, 16) and dense.n_tokens == 2048
    assert get_config().name == "lookwhen-b16"
    small = get_config("lookwhen-b16", depth=2, width=96, selector_width=96)
    assert (small.depth, small.width, small.heads) == (2, 96, 12) and PRESETS["lookwhen-b16"].depth == 12
    assert lookwhen.ModelConfig.from_json(small.to_json()) == small


@pytest.mark.parametrize("bad, match", [
    (dict(width=100), "divisible by heads"),
    (dict(image_size=48), "selector_downsample"),
    (dict(keep_ratio=0.0), "keep_ratio"),
    (dict(tubelet=2), "tubelet"),
    (dict(kind="sparse"), "kind"),
    (dict(frames=3), "selector_frame_stride"),
    (dict(score_outputs=3), "score_outputs must be a square"),
    (dict(score_outputs=0), "score_outputs must be positive"),
    (dict(selector_width=384, selector_heads=6), "context_projection=False needs selector_width == width"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        get_config("lookwhen-b16", **bad)


def test_get_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("vit-huge")
    with pytest.raises(ValueError, match="unknown config fields"):
        get_config("lookwhen-b16", depht=2)


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = tiny("lookwhen-b16"), tiny("lookwhen-b16")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = tiny("lookwhen-b16", seed=1)
    assert not torch.equal(a.extractor.blocks[0].attn.qkv.weight, c.extractor.blocks[0].attn.qkv.weight)
    assert isinstance(tiny("internvideo2-b14"), DenseBaseline)


# LookWhen forward -------------------------------------------------------------------------
@pytest.mark.parametrize("preset, extra", [
    ("lookwhen-b16", {}), ("lookwhen-b16-light", {}), ("lookwhere-b16", {}), ("lookwhen-b16", DEFAULT_SHAPE),
    ("lookwhen-b16", SUB_GRID_HEAD),
])
def test_packed_forward_matches_dense_masked_oracle(preset, extra):
    model = tiny(preset, **extra).eval()
    cfg = model.config
    clip = random_clip(cfg, 2)
    with torch.no_grad():
        out = model(clip)
    keep = max(1, round(cfg.keep_ratio * cfg.n_tokens))
    assert out.embedding.shape == (2, cfg.width) and out.pooled.shape == (2, cfg.width)
    assert out.indices.shape == (2, keep) and out.indices.dtype == torch.int32
    assert out.tokens.shape == (2 * keep, cfg.width)
    outputs = () if cfg.score_outputs == 1 else (cfg.score_outputs,)
    assert out.scores.shape == (2, cfg.n_selector_tokens, *outputs) and out.scores.dtype == torch.float32
    assert out.cu_seqlens.tolist() == [0, keep, 2 * keep] and out.logits is None
    assert torch.equal(out.indices.long(), expected_selection(out.scores, cfg, keep))
    check_against_oracle(model, clip, out)


def test_keep_ratio_per_call():
    model = tiny("lookwhen-b16").eval()
    clip = random_clip(model.config, 1)
    with torch.no_grad():
        out = model(clip, keep_ratio=0.5)
    assert out.indices.shape == (1, 16)
    check_against_oracle(model, clip, out, keys=("embedding",))


def test_per_clip_budgets_with_an_empty_clip():
    model = tiny("lookwhen-b16", num_classes=5).eval()
    cfg = model.config
    clip = random_clip(cfg, 3)
    budgets = torch.tensor([5, 0, 12], dtype=torch.int32)
    with torch.no_grad():
        out = model(clip, budgets=budgets)
    assert out.cu_seqlens.tolist() == [0, 5, 5, 17]
    assert out.indices.shape == (17,) and out.tokens.shape == (17, cfg.width)
    assert out.logits.shape == (3, 5)
    for b, ids in enumerate(selections_of(out)):
        assert torch.equal(ids, expected_selection(out.scores[b:b + 1], cfg, int(budgets[b]))[0])
    assert torch.equal(out.pooled[1], torch.zeros(cfg.width))
    check_against_oracle(model, clip, out)
    # Equal budgets give what the keep-ratio path gives.
    with torch.no_grad():
        fixed = model(clip[:2], keep_ratio=0.25)
        varlen = model(clip[:2], budgets=[8, 8])
    assert torch.equal(varlen.indices.view(2, 8), fixed.indices)
    for key in ("embedding", "tokens", "pooled", "logits"):
        torch.testing.assert_close(getattr(varlen, key), getattr(fixed, key), rtol=1e-5, atol=1e-5)


def test_budgeted_sequences_past_one_attention_tile_with_their_prefix():
    """126 selected tokens and 4 prefix tokens are 130 rows: past the
    interpreter's 128-row attention tiles only with the prefix, so a packed
    max_seqlen counted without it would leave the last rows of every
    sequence out of the attention. Budgets against the fixed layout on the
    same ids, forward and backward."""
    model = tiny("lookwhen-b16", frames=4, image_size=128, num_classes=3).eval()
    cfg = model.config
    assert cfg.n_context == 4 and cfg.n_tokens >= 126
    clip = random_clip(cfg, 2)

    def run(**selection):
        model.zero_grad()
        out = model(clip, **selection)
        (out.logits.square().sum() + out.tokens.sum()).backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    budgeted, budgeted_grads = run(budgets=[126, 126])
    fixed, fixed_grads = run(indices=budgeted.indices.view(2, 126))
    for key in ("embedding", "tokens", "logits"):
        torch.testing.assert_close(getattr(budgeted, key), getattr(fixed, key), rtol=1e-5, atol=1e-5, msg=key)
    assert budgeted_grads.keys() == fixed_grads.keys()
    for name, grad in fixed_grads.items():
        torch.testing.assert_close(budgeted_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("preset, extra", [("lookwhen-b16", {}), ("lookwhere-b16", {}), ("lookwhen-b16", SUB_GRID_HEAD)])
def test_backward_matches_oracle_gradients(preset, extra):
    """Train mode: gradients reach the extractor, both patch embeddings and
    the selector (score head through the scores, the rest also through the
    context tokens), and agree with the oracle's."""
    model = tiny(preset, **extra).train()
    clip = random_clip(model.config, 2)
    out = model(clip)
    weights = {k: torch.randn_like(getattr(out, k)) for k in ("embedding", "pooled", "scores")}

    def loss_of(o):
        return sum((o[k] * w.to(o[k].dtype)).sum() for k, w in weights.items())

    loss_of(vars(out)).backward()
    selections = selections_of(out)
    oracle, m64 = reference_lookwhen(model, clip, selections, torch.float64)
    loss_of(oracle).backward()
    same, m32 = reference_lookwhen(model, clip, selections, torch.float32)
    loss_of(same).backward()
    grads64, grads32 = dict(m64.named_parameters()), dict(m32.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
        scale = float(grads64[name].grad.abs().max())
        assert_within_reference_error(
            param.grad, grads32[name].grad, grads64[name].grad, floor=1e-5 * max(scale, 1.0), name=name
        )


def check_autocast(dtype, score_tol, embedding_tol):
    """Forward and backward under CPU autocast; the result stays close to
    fp32 (the embedding only when both pick the same tokens: low-precision
    scores may reorder near-ties, which changes the embedding legitimately)."""
    model = tiny("lookwhen-b16").train()
    clip = random_clip(model.config, 2)
    with torch.autocast("cpu", dtype=dtype):
        out = model(clip)
        (out.embedding.float().sum() + out.pooled.float().sum() + out.scores.sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert torch.isfinite(out.tokens).all() and out.scores.dtype == torch.float32
    with torch.no_grad():
        full = model(clip)
    torch.testing.assert_close(out.scores, full.scores, rtol=0, atol=score_tol)
    if torch.equal(full.indices, out.indices):
        torch.testing.assert_close(out.embedding.float(), full.embedding, rtol=0, atol=embedding_tol)


def test_fp16_autocast_forward_and_backward():
    check_autocast(torch.float16, 1e-2, 5e-2)


def test_bf16_autocast_forward_and_backward(monkeypatch):
    """The interpreter cannot run bf16, so the ops take their CPU path here."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_autocast(torch.bfloat16, 5e-2, 2e-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_whole_model_in_low_precision(monkeypatch, dtype):
    """``model.to(dtype)`` (no autocast), as the benchmark runs it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("lookwhen-b16", "internvideo2-b14"):
        model = tiny(name).to(dtype).eval()
        with torch.no_grad():
            out = model(random_clip(model.config, 2))
        embedding = out if isinstance(out, torch.Tensor) else out.embedding
        assert embedding.dtype == dtype and torch.isfinite(embedding).all()


def test_stage_timer_wraps_the_stages_in_order():
    model = tiny("lookwhen-b16").eval()
    seen = []

    class Stage:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            seen.append(("enter", self.name))

        def __exit__(self, *exc):
            seen.append(("exit", self.name))

    with torch.no_grad():
        model(random_clip(model.config, 1), stage_timer=Stage)
    names = ["selection", "selector", "selection", "extractor"]
    assert seen == [(event, n) for n in names for event in ("enter", "exit")]


def test_bad_inputs():
    model = tiny("lookwhen-b16").eval()
    cfg = model.config
    clip = random_clip(cfg, 2)
    with pytest.raises(ValueError, match="uint8"):
        model(clip.float())
    with pytest.raises(ValueError, match=r"clip: expected shape \[B, 2, 64, 64, 3\]"):
        model(clip[:, :1])
    with pytest.raises(ValueError, match="empty"):
        model(clip[:0])
    with pytest.raises(ValueError, match="not both"):
        model(clip, keep_ratio=0.1, budgets=[1, 2])
    with pytest.raises(ValueError, match="keep_ratio"):
        model(clip, keep_ratio=1.5)
    with pytest.raises(ValueError, match="budgets"):
        model(clip, budgets=[1, 2, 3])
    with pytest.raises(ValueError, match="budgets"):
        model(clip, budgets=[1, cfg.n_tokens + 1])
    with pytest.raises(ValueError, match="not a LookWhen"):
        LookWhen(get_config("internvideo2-b14"))
    with pytest.raises(ValueError, match="not a dense"):
        DenseBaseline(get_config("lookwhen-b16"))


# The paper's LookWhen: 106 M parameters, 40 and 108 GMACs per view at keep
# ratios 0.1 and 0.3 (docs/models.md, "Presets"). Exact counts pin the preset; the
# bounds are the tolerances (2% and 5%).
DEFAULT_PARAMETERS = 108_010_753
DEFAULT_FLOPS = {0.1: 77_509_450_752, 0.3: 214_042_242_048}


def test_real_size_forward_and_the_defaults_cost(monkeypatch):
    """The real lookwhen-b16 once (ops on their CPU path: the interpreter is
    far too slow for ViT-B), with its FLOPs counted on the way."""
    from torch.utils.flop_counter import FlopCounterMode

    from lookwhen.models.flops import gmacs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = build_model("lookwhen-b16").eval()
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == DEFAULT_PARAMETERS and abs(parameters / 106e6 - 1) <= 0.02
    clip = random_clip(model.config, 1)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = model(clip)
    assert counter.get_total_flops() == DEFAULT_FLOPS[0.1] and abs(gmacs(DEFAULT_FLOPS[0.1]) / 40 - 1) <= 0.05
    assert count_flops(model, clip, keep_ratio=0.3) == DEFAULT_FLOPS[0.3]
    assert abs(gmacs(DEFAULT_FLOPS[0.3]) / 108 - 1) <= 0.05
    assert out.embedding.shape == (1, 768) and out.indices.shape == (1, 314)
    assert out.tokens.shape == (314, 768) and out.scores.shape == (1, 392)
    assert torch.isfinite(out.embedding).all() and torch.isfinite(out.tokens).all()
    assert torch.equal(out.indices.long(), expected_selection(out.scores, model.config, 314))


# timm weights -------------------------------------------------------------------------------
def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw).eval()


def test_timm_weights_run_like_timm():
    vit = _timm_vit(num_classes=0)
    state = vit.state_dict()
    # The dense baseline as a plain ViT (what timm image weights describe).
    plain_vit = dict(norm="layernorm", qkv_bias=True, qk_norm="none", layer_scale=0.0, mlp_act="gelu",
                     pos_embed="separable", final_norm=True)
    model = build_model("internvideo2-b14", frames=1, image_size=32, patch_size=8, width=32, depth=2, heads=2,
                        pool_heads=2, **plain_vit).eval()
    assert load_timm_state_dict(model, state) == []
    clip = random_clip(model.config, 3)
    mean = torch.tensor(model.config.mean).view(3, 1, 1)
    std = torch.tensor(model.config.std).view(3, 1, 1)
    images = (clip[:, 0].permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(clip), vit.forward_features(images), rtol=1e-4, atol=1e-5)


def test_timm_state_dict_round_trips_through_the_extractor():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    state = vit.state_dict()
    model = build_model("lookwhen-b16", **TINY["lookwhen-b16"], num_classes=7)
    assert load_timm_state_dict(model.extractor, state) == []
    exported = timm_state_dict(model.extractor)
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        if key not in ("cls_token", "pos_embed"):
            assert torch.equal(exported[key], value), key
    # The CLS position row is folded into the CLS token: same sum, same model.
    torch.testing.assert_close(exported["cls_token"] + exported["pos_embed"][:, :1],
                               state["cls_token"] + state["pos_embed"][:, :1])
    assert torch.equal(exported["pos_embed"][:, 1:], state["pos_embed"][:, 1:])
    # ours -> timm -> ours is exact.
    again = build_model(model.config)
    load_timm_state_dict(again.extractor, exported)
    for key, value in model.extractor.state_dict().items():
        assert torch.equal(again.extractor.state_dict()[key], value), key


def test_timm_mapping_resamples_position_grid_and_refuses_misfits():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    model = build_model("lookwhen-b16", **TINY["lookwhen-b16"])  # 4 x 4 grid, no classifier
    assert load_timm_state_dict(model.extractor, vit.state_dict()) == ["head.weight", "head.bias"]
    assert model.extractor.pos_embed.spatial.shape == (16, 32)
    state = vit.state_dict()
    with pytest.raises(ValueError, match="missing key"):
        load_timm_state_dict(model.extractor, {k: v for k, v in state.items() if not k.startswith("blocks.1.")})
    with pytest.raises(ValueError, match="no place"):
        load_timm_state_dict(model.extractor, {**state, "blocks.0.ls1.gamma": torch.ones(32)})
    with pytest.raises(ValueError, match="pos_embed"):
        load_timm_state_dict(model.extractor, {**state, "pos_embed": torch.zeros(1, 6, 32)})
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_timm_state_dict(model.extractor, _timm_vit(num_classes=0).state_dict())  # 8-px patches
    with torch.no_grad():
        model.extractor.pos_embed.temporal.add_(1.0)
    with pytest.raises(ValueError, match="temporal"):
        timm_state_dict(model.extractor)


def test_position_table_is_kept_in_inference_and_rebuilt_for_training():
    from lookwhen.models.layers import SeparablePosEmbed

    pos = SeparablePosEmbed(3, 5, 4)
    expected = lambda: (pos.temporal[:, None] + pos.spatial[None]).flatten(0, 1).detach()  # noqa: E731
    with torch.inference_mode():
        first = pos.table()
        assert pos.table() is first and torch.equal(first, expected())
    # Built under inference_mode, usable where autograd records (frozen factors).
    assert not first.is_inference()
    x = torch.randn(15, 4, requires_grad=True)
    (x * pos.requires_grad_(False).table()).sum().backward()
    torch.testing.assert_close(x.grad, expected())
    pos.requires_grad_(True)
    with torch.no_grad():
        pos.temporal.add_(1.0)
        assert torch.equal(pos.table(), expected())
    trained = pos.table()
    assert trained.grad_fn is not None
    trained.sum().backward()
    torch.testing.assert_close(pos.temporal.grad, torch.full_like(pos.temporal, 5.0))
    pos.double()
    with torch.no_grad():
        assert pos.table().dtype == torch.float64 and torch.equal(pos.table(), expected())
    # In another dtype: the cast is kept too, and redone when asked for another.
    with torch.inference_mode():
        half = pos.table(torch.bfloat16)
        assert pos.table(torch.bfloat16) is half and torch.equal(half, expected().to(torch.bfloat16))
        assert pos.table().dtype == torch.float64


def test_patch_projection_cast_is_kept_in_inference_only():
    from lookwhen.models.layers import PatchEmbed

    embed = PatchEmbed(4, 8)
    with torch.inference_mode():
        weight, bias = embed.weights(torch.bfloat16)
        assert embed.weights(torch.bfloat16)[0] is weight and torch.equal(weight, embed.proj.weight.bfloat16())
        assert embed.weights(torch.float32)[0] is embed.proj.weight
    with torch.no_grad():
        embed.proj.weight.mul_(2)  # an in-place update invalidates the cast
        assert torch.equal(embed.weights(torch.bfloat16)[0], embed.proj.weight.bfloat16())
    # Where autograd records, a fresh cast that gradients flow through.
    cast, _ = embed.weights(torch.bfloat16)
    cast.float().sum().backward()
    assert torch.equal(embed.proj.weight.grad, torch.ones_like(embed.proj.weight))


# Checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["lookwhen-b16", "internvideo2-b14"])
def test_checkpoint_round_trip(tmp_path, preset):
    model = tiny(preset, seed=3, num_classes=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # weights no fresh build could have
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    assert read_config(path) == model.config
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    clip = random_clip(model.config, 1)
    with torch.no_grad():
        a, b = model(clip), loaded.eval()(clip)
    a = a if isinstance(a, torch.Tensor) else a.embedding
    b = b if isinstance(b, torch.Tensor) else b.embedding
    assert torch.equal(a, b)


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="without a lookwhen config"):
        load_checkpoint(bare)
    model = tiny("lookwhen-b16")
    wrong = tmp_path / "wrong.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("extractor.norm")}
    save_file(tensors, wrong, metadata={"lookwhen_config": model.config.to_json()})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(wrong)
    # A config of the wrong types, or one far larger than the file's tensors
    # (about 51 GB of parameters): one error, nothing allocated.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for change, message in (({"width": 32.0}, "width must be an int, got 32.0"),
                            ({"keep_ratio": float("nan")}, "keep_ratio must be a finite float"),
                            ({"qkv_bias": 1}, "qkv_bias must be a bool"),
                            ({"width": 16384, "heads": 16, "depth": 48}, "do not fit the config .*other shapes")):
        config = json.dumps(model.config.to_dict() | change)
        save_file(tensors, wrong, metadata={"lookwhen_config": config})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(wrong)


# FLOPs --------------------------------------------------------------------------------------------
def test_flop_count_includes_custom_ops_and_cpu_attention():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny("lookwhen-b16").eval()
    clip = random_clip(model.config, 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(clip)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    for op in ("lookwhen.gather_patch_embed", "lookwhen.score_tokens", "lookwhen.varlen_attention"):
        assert counts.get(op, 0) > 0, op
    assert count_flops(model, clip) == counter.get_total_flops()
    assert count_flops(model, clip, keep_ratio=0.5) > count_flops(model, clip, keep_ratio=0.25)
    # CPU SDPA is counted with PyTorch's attention formula: 2 matmuls of 2*L*L*Dh per head.
    q = torch.randn(1, 2, 10, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 10 * 10 * 8)
    dense = tiny("internvideo2-b14").eval()
    assert count_flops(dense, random_clip(dense.config, 1)) > 0
