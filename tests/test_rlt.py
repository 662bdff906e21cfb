"""RLT on the dense baseline: the packed model is the dense model when every
token is kept, clips do not see each other, and on a static background only
the moving object's tokens (and frame 0) are kept."""
import numpy as np
import pytest
import torch

from lookwhen import build_model
from lookwhen.models.rlt import RLTDense
from lookwhen.data.synthetic import synthetic_clip
from helpers import DENSE_TINY

TINY = dict(DENSE_TINY, frames=3, image_size=56, width=64)


@pytest.fixture(scope="module")
def base():
    return build_model("internvideo2-b14", **TINY).eval()


def _clips(batch=2):
    clip = torch.randint(0, 256, (batch, 3, 56, 56, 3), dtype=torch.uint8)
    clip[-1, 1:] = clip[-1, 0]
    return clip


@torch.no_grad()
def test_keeping_every_token_is_the_dense_model(base):
    clip = _clips()
    out = RLTDense(base, threshold=0.0)(clip)
    assert out.tokens_per_clip.tolist() == [48, 48] and out.run_lengths.tolist() == [1] * 96
    torch.testing.assert_close(out.embedding, base(clip), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_clips_in_one_pack_do_not_see_each_other(base):
    clip = _clips(3)
    model = RLTDense(base)
    together = model(clip)
    assert together.tokens_per_clip.tolist()[-1] == 16  # the static clip: frame 0 only
    for b in range(3):
        torch.testing.assert_close(together.embedding[b], model(clip[b: b + 1]).embedding[0], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_static_background_keeps_the_moving_object(base):
    """RLT's premise, at its default threshold: frame 0 plus the tokens the
    object covers now or covered one frame ago."""
    sample = synthetic_clip(np.random.default_rng(7), frames=3, size=56, object_size=14, speed=7.0)
    out = RLTDense(base)(sample.clip[None])
    covered = sample.object_tokens(14).view(3, -1)
    touched = (covered[1:] | covered[:-1]).sum()
    kept = int(out.tokens_per_clip[0])
    print(f"RLT kept {kept} of {3 * 16} tokens: frame 0 (16) + {kept - 16} of the {int(touched)} the object touched")
    assert 16 < kept <= 16 + int(touched)


def test_run_length_embedding_is_learned(base):
    model = RLTDense(base, encode_length=True)
    clip = _clips()
    embedding = model(clip).embedding
    # A random direction: the embedding ends in a LayerNorm, whose plain sum has no gradient.
    (embedding * torch.randn_like(embedding)).sum().backward()
    assert model.length_embed.grad is not None and model.length_embed.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(model(clip).embedding, RLTDense(base)(clip).embedding)


def test_bad_clip(base):
    with pytest.raises(ValueError, match="clip"):
        RLTDense(base)(torch.zeros(1, 3, 56, 56, 3))
