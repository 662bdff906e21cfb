"""LookWhere's released image model (``lookwhere-dinov2``): the checkpoint
layout loads with nothing missing or unexpected, and with random weights in
that layout our selection and features match a reimplementation of the
authors' forward, written here from their description (timm's DINOv2 ViTs
as the backbones, as in their code; the glue between them below)."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lookwhen import build_model
from lookwhen.models.config import IMAGENET_MEAN, IMAGENET_STD, PRESETS
from lookwhen.io.weights import load_lookwhere
from lookwhen.models.lookwhere import load_lookwhere_state_dict
from lookwhen_kernels import reference

# A small LookWhere: 70-px images (5 x 5 patches of 14 px), the selector on
# 42 px (3 x 3), so r = ceil(5 / 3) = 2 and the 6 x 6 logit map is resized
# to 5 x 5. Two blocks each, 32 wide.
DIM, HEADS, HIGH, LOW, PATCH = 32, 2, 70, 42, 14
R = math.ceil((HIGH // PATCH) / (LOW // PATCH))
SMALL = dict(image_size=HIGH, selector_image_size=LOW, width=DIM, heads=HEADS, depth=2, selector_width=DIM,
             selector_heads=HEADS, selector_depth=2, score_hidden=4 * DIM, score_outputs=R * R)


def _dinov2(depth, size, dim=DIM, heads=HEADS):
    vit = timm.create_model("vit_base_patch14_reg4_dinov2", depth=depth, img_size=size, embed_dim=dim,
                            num_heads=heads, num_classes=0, pretrained=False)
    # Random weights at every scale that matters (LayerScale's 1e-5 would
    # hide the blocks): norms near 1, everything else around 0.
    with torch.no_grad():
        for name, param in vit.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    return vit.eval()


def _released_layout():
    """(selector backbone, head, extractor) and the checkpoint dict of them."""
    selector = _dinov2(2, LOW)
    head = nn.ModuleDict({"w1": nn.Linear(DIM, 4 * DIM), "w2": nn.Linear(4 * DIM, R * R)})
    extractor = _dinov2(2, HIGH)
    checkpoint = {"selector": {"backbone": selector.state_dict(), "head": head.state_dict()},
                  "extractor": extractor.state_dict()}
    return (selector, head, extractor), checkpoint


@torch.no_grad()
def lookwhere_forward(selector, head, extractor, images, k):
    """The authors' forward, as their modeling.py describes it: ``images``
    normalised float ``[B, 3, H, W]``. Returns (selector map ``[B, h*w]`` on
    the high-resolution grid, top-k ids in score order, CLS ``[B, D]``,
    patch features ``[B, k, D]`` in that order)."""
    batch = images.shape[0]
    low = F.interpolate(images, size=(LOW, LOW), mode="bilinear", align_corners=False)
    x = selector.patch_embed(low) + selector.pos_embed
    prefix = torch.cat([selector.cls_token, selector.reg_token], 1).expand(batch, -1, -1)
    x = selector.norm(selector.blocks(torch.cat([prefix, x], 1)))
    n_prefix = prefix.shape[1]
    prefix_tokens, patches = x[:, :n_prefix], x[:, n_prefix:]
    logits = head["w2"](F.gelu(head["w1"](patches)))  # [B, g*g, r*r]
    side = LOW // PATCH
    # "b (h w) (i j) -> b 1 (h i) (w j)"
    grid = logits.view(batch, side, side, R, R).permute(0, 1, 3, 2, 4).reshape(batch, 1, side * R, side * R)
    fine = HIGH // PATCH
    selector_map = F.interpolate(grid, size=(fine, fine), mode="bilinear", align_corners=False).flatten(1)
    keep = torch.topk(selector_map, k=k, sorted=True).indices
    e = extractor.patch_embed(images) + extractor.pos_embed
    e = e[torch.arange(batch)[:, None], keep]
    e = extractor.norm(extractor.blocks(torch.cat([prefix_tokens, e], 1)))
    return selector_map, keep, e[:, 0], e[:, n_prefix:]


def _images(batch):
    pixels = torch.randint(0, 256, (batch, 1, HIGH, HIGH, 3), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    normalised = ((pixels[:, 0].float() / 255 - mean) / std).permute(0, 3, 1, 2).contiguous()
    return pixels, normalised


def test_released_model_matches_the_authors_forward():
    (selector, head, extractor), checkpoint = _released_layout()
    model = build_model("lookwhere-dinov2", **SMALL).eval()
    report = load_lookwhere_state_dict(model, checkpoint)
    assert report.ok and report.skipped == ["extractor.cls_token", "extractor.reg_token"]
    pixels, images = _images(2)
    for k in (1, 7, 25):
        selector_map, keep, cls, patches = lookwhere_forward(selector, head, extractor, images, k)
        with torch.no_grad():
            out = model(pixels, budgets=[k, k])
        assert out.scores.shape == (2, 9, R * R)
        ours_map = reference.upsample_scores(out.scores, (1, 3, 3), (1, 5, 5))
        torch.testing.assert_close(ours_map, selector_map, rtol=1e-4, atol=1e-4)
        order = keep.sort(dim=1)
        assert torch.equal(out.indices.view(2, k).long(), order.values)
        torch.testing.assert_close(out.embedding, cls, rtol=1e-4, atol=1e-4)
        in_id_order = torch.gather(patches, 1, order.indices[..., None].expand(-1, -1, DIM))
        torch.testing.assert_close(out.tokens.view(2, k, DIM), in_id_order, rtol=1e-4, atol=1e-4)
    # Deterministic: the same call, the same numbers.
    with torch.no_grad():
        again = model(pixels, budgets=[7, 7])
        once = model(pixels, budgets=[7, 7])
    assert torch.equal(again.embedding, once.embedding) and torch.isfinite(once.tokens).all()


def test_a_keep_ratio_keeps_int_of_ratio_times_patches_as_the_authors_do():
    # Their README: k = int(k_ratio * num_high_res_patches).
    cfg = PRESETS["lookwhere-dinov2"]
    assert [cfg.tokens_kept(r) for r in (0.1, 0.3, 0.0001)] == [136, 410, 1]
    assert PRESETS["lookwhen-b16"].tokens_kept(0.1) == 314  # 313.6, to nearest
    (selector, head, extractor), checkpoint = _released_layout()
    model = build_model("lookwhere-dinov2", **SMALL).eval()
    load_lookwhere_state_dict(model, checkpoint)
    pixels, images = _images(2)
    # 0.35 x 25 = 8.75: the authors keep 8.
    _, keep, cls, _ = lookwhere_forward(selector, head, extractor, images, int(0.35 * 25))
    with torch.no_grad():
        out = model(pixels, keep_ratio=0.35)
    assert out.indices.numel() == 2 * 8
    torch.testing.assert_close(out.embedding, cls, rtol=1e-4, atol=1e-4)


def test_the_full_size_layout_loads_with_nothing_missing_or_unexpected():
    with torch.device("meta"):
        model = build_model("lookwhere-dinov2")
        selector = timm.create_model("vit_base_patch14_reg4_dinov2", depth=3, img_size=154, num_classes=0,
                                     pretrained=False)
        head = nn.ModuleDict({"w1": nn.Linear(768, 3072), "w2": nn.Linear(3072, 16)})
        extractor = timm.create_model("vit_base_patch14_reg4_dinov2", img_size=518, num_classes=0, pretrained=False)
    checkpoint = {"selector": {"backbone": selector.state_dict(), "head": head.state_dict()},
                  "extractor": extractor.state_dict()}
    report = load_lookwhere_state_dict(model, checkpoint)
    assert report.ok and report.missing == [] and report.unexpected == []
    cfg = PRESETS["lookwhere-dinov2"]
    assert cfg.selector_grid == (1, 11, 11) and cfg.grid == (1, 37, 37) and cfg.n_context == 5


def test_loader_reports_what_does_not_fit(tmp_path):
    _, checkpoint = _released_layout()
    model = build_model("lookwhere-dinov2", **SMALL)
    del checkpoint["selector"]["head"]["w2.bias"]
    checkpoint["extractor"]["mask_token"] = torch.zeros(1, DIM)
    with pytest.raises(ValueError, match=r"missing keys \['selector.score_head.fc2.bias'\].*extractor.mask_token"):
        load_lookwhere_state_dict(model, checkpoint)
    report = load_lookwhere_state_dict(model, checkpoint, strict=False)
    assert report.missing == ["selector.score_head.fc2.bias"] and report.unexpected == ["extractor.mask_token"]
    checkpoint["extractor"]["pos_embed"] = torch.zeros(1, 36, DIM)
    with pytest.raises(ValueError, match=r"extractor.pos_embed.spatial: \[36, 32\] for \[25, 32\]"):
        load_lookwhere_state_dict(model, checkpoint, strict=False)
    with pytest.raises(ValueError, match="not LookWhere's layout"):
        load_lookwhere_state_dict(build_model("lookwhen-b16", frames=2, image_size=64, width=32, heads=2,
                                              selector_width=32, selector_heads=2, depth=1, selector_depth=1),
                                  checkpoint)
    # From a file, as torch.save wrote it.
    _, checkpoint = _released_layout()
    path = tmp_path / "lookwhere_dinov2.pt"
    torch.save(checkpoint, path)
    loaded, report = load_lookwhere(path, **SMALL)
    assert report.ok
    torch.testing.assert_close(loaded.selector.score_head.fc2.weight, checkpoint["selector"]["head"]["w2.weight"])
    torch.testing.assert_close(loaded.selector.score_head.norm.weight, checkpoint["selector"]["backbone"]["norm.weight"])
