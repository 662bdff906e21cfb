"""``python -m bench ops``: every fused op against the eager PyTorch
composition it replaces, at the shapes the models run it with.

The op itself (on a GPU the Triton kernel, on a CPU without the interpreter
its native C++ kernel where one is built, else its PyTorch reference path, as
the model runs it) is the baseline of each case's speedups: ``other time / op
time``. With the native CPU backend built, the ops it covers also show the
reference path it replaces (provider ``reference path``). Differentiable ops are also timed backward-only and
forward+backward.

``varlen_attention``'s providers are first called once each and checked
against the op (max abs error of the output and of the input gradients): a
provider that disagrees is not timed and the run exits 1; a peer that cannot
run a case (see :mod:`bench.attention`) is left out of it, with the reason
under the table.
"""
from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lookwhen_kernels as lk
from lookwhen_kernels import native, reference
from . import BenchError, attention
from .configs import DTYPES, parse_overrides, parse_shapes
from .report import Record, Result, format_table
from .timing import Stats, noise, peak_memory, rotating, sample
from lookwhen.cli.args import keep_ratio_arg, positive_float_arg, positive_int_arg
from lookwhen.models.config import ModelConfig
from lookwhen_kernels import keep_ratio_to_k, set_cpu_backend, sub_grid_map
from lookwhen_kernels.ops.perturbed_topk import sample_noise

MODES = ("fwd", "bwd", "fwd+bwd")
FLOAT_BYTES = 2  # the roofline assumes fp16/bf16 tensors on the GPU


@dataclass
class Case:
    """One op at one shape. ``make_inputs(device, dtype)`` builds a fresh input
    tuple; ``providers(device, dtype)`` maps each provider's name to
    ``fn(*inputs) -> Tensor`` (which alternatives exist can depend on the
    device), ``fused`` names the op itself; ``grad_inputs`` are the input
    positions that receive gradients (empty: forward only). ``bytes_moved``:
    the least memory traffic of the forward at 2-byte floats (every input read
    once, every output written once). ``checked(device, dtype)``, where
    given, says which providers agree with the op, how closely, and which
    were left out and why (:func:`bench.attention.check_providers`); a
    provider marked ``forward_only`` is timed forward only. ``op_alone``, where
    given, builds the op without its alternatives (:meth:`op`)."""

    kernel: str
    label: str
    make_inputs: Callable[[torch.device, torch.dtype], tuple]
    providers: Callable[[torch.device, torch.dtype], Dict[str, Callable[..., torch.Tensor]]]
    grad_inputs: Tuple[int, ...] = ()
    bytes_moved: int = 0
    fused: str = "fused"
    checked: Optional[Callable[[torch.device, torch.dtype], attention.Checked]] = None
    op_alone: Optional[Callable[[torch.device, torch.dtype], Callable[..., torch.Tensor]]] = None

    def op(self, device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
        """The op itself, for a caller that runs nothing else (the roofline):
        building every provider can mean checking and compiling the peers."""
        if self.op_alone is not None:
            return self.op_alone(device, dtype)
        return self.providers(device, dtype)[self.fused]

    @property
    def modes(self) -> Tuple[str, ...]:
        return MODES if self.grad_inputs else MODES[:1]

    def provider_modes(self, provider: Callable[..., torch.Tensor]) -> Tuple[str, ...]:
        return self.modes[:1] if getattr(provider, "forward_only", False) else self.modes


def _fixed(providers: Dict[str, Callable[..., torch.Tensor]]):
    """Providers that are the same on every device."""
    return lambda device, dtype: providers


def _on_cpu_backend(fn, backend: str):
    """``fn`` with the ops' CPU path forced to ``backend`` while it runs; the
    mark lets the timing loop force it around backward steps too."""
    def call(*args):
        previous = set_cpu_backend(backend)
        try:
            return fn(*args)
        finally:
            set_cpu_backend(previous)
    call.cpu_backend = backend
    return call


def _with_reference_path(providers):
    """On CPU with the native backend built, also the op on its PyTorch
    reference path: what the native kernel replaces."""
    def bind(device, dtype):
        bound = dict(providers(device, dtype))
        if device.type == "cpu" and native.available():
            bound["reference path"] = _on_cpu_backend(bound["fused"], "reference")
        return bound
    return bind


def _params(device, dtype, *shapes, scale=0.02):
    return tuple((torch.randn(s, device=device, dtype=torch.float32) * scale).to(dtype) for s in shapes)


# score_tokens ----------------------------------------------------------------

def _eager_score(x, norm_weight, norm_bias, w1, b1, w2, b2):
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps=1e-6)
    return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2).squeeze(-1).float()


def score_case(cfg: ModelConfig, batch: int) -> Case:
    n, dim, hidden, outputs = cfg.n_selector_tokens, cfg.selector_width, cfg.score_hidden, cfg.score_outputs

    def make(device, dtype):
        x = torch.randn(batch, n, dim, device=device, dtype=dtype)
        ones = torch.ones(dim, device=device, dtype=dtype)
        return (x, ones, torch.zeros_like(ones),
                *_params(device, dtype, (hidden, dim), (hidden,), (outputs, hidden), (outputs,)))

    traffic = (batch * n * (dim * FLOAT_BYTES + 4 * outputs)
               + (2 * dim + hidden * dim + hidden + outputs * (hidden + 1)) * FLOAT_BYTES)
    label = f"B{batch} n{n} D{dim} hidden{hidden}" + (f" R{outputs}" if outputs > 1 else "")
    return Case("score_tokens", label, make,
                _with_reference_path(_fixed({"fused": lambda *a: lk.score_tokens(*a),
                                             "layernorm+linear+gelu+linear": _eager_score})),
                grad_inputs=tuple(range(7)), bytes_moved=traffic)


# topk_tokens -----------------------------------------------------------------

def topk_case(cfg: ModelConfig, batch: int, keep_ratio: float) -> Case:
    # The scores as the model hands them over: on score_grid (each selector
    # frame repeated for the frames it stands for), r x r per token with
    # score_outputs = r*r.
    grid, out_grid, outputs = cfg.score_grid, cfg.grid, cfg.score_outputs
    n, n_out = math.prod(grid), cfg.n_tokens
    shape = (batch, n) if outputs == 1 else (batch, n, outputs)
    k = keep_ratio_to_k(keep_ratio, n_out)

    def eager(scores):
        if scores.dim() == 3:
            scores = sub_grid_map(scores, grid)
        r = math.isqrt(outputs)
        frames, h, w = grid
        planes = scores.view(batch, frames, h * r, w * r)
        fine = F.interpolate(planes, size=out_grid[1:], mode="bilinear", align_corners=False)
        return fine.reshape(batch, n_out).topk(k, dim=1).indices.sort(dim=1).values.to(torch.int32)

    return Case("topk_tokens", f"B{batch} n{n}->{n_out} K{k}" + (f" R{outputs}" if outputs > 1 else ""),
                lambda device, dtype: (torch.randn(*shape, device=device),),
                _with_reference_path(_fixed({"fused": lambda s: lk.topk_tokens(s, k, grid=grid, out_grid=out_grid),
                                             "interpolate+topk+sort": eager})),
                bytes_moved=batch * (n * outputs + k) * 4)


# gather_patch_embed ----------------------------------------------------------

def _eager_patch_embed(clip, indices, weight, bias, pos_embed, *, patch, mean, std, downsample):
    """Normalise the whole clip in float, cut every patch, keep the selected
    ones, project: what a model without the fused op does."""
    batch, frames = clip.shape[:2]
    x = clip.permute(0, 1, 4, 2, 3).to(weight.dtype).div(255)
    x = (x - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    if downsample > 1:
        x = F.avg_pool2d(x.flatten(0, 1), downsample).unflatten(0, (batch, frames))
    patches = x.unfold(3, patch, patch).unfold(4, patch, patch)  # [B, T, 3, Hp, Wp, p, p]
    patches = patches.permute(0, 1, 3, 4, 2, 5, 6).reshape(batch, -1, 3 * patch * patch)
    if indices is None:
        rows, pos = patches.flatten(0, 1), pos_embed.repeat(batch, 1)
    else:
        ids = indices.long()
        rows = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1])).flatten(0, 1)
        pos = pos_embed[ids.flatten()]
    return F.linear(rows, weight.reshape(weight.shape[0], -1), bias) + pos


def patch_embed_case(cfg: ModelConfig, batch: int, keep_ratio=None, *, selector: bool = False) -> Case:
    """The selector's embedding of every coarse token (``selector=True``), the
    extractor's of the selected tokens (``keep_ratio``), or the dense model's
    of every token (``keep_ratio=None``)."""
    frames = cfg.selector_grid[0] if selector else cfg.frames
    size, patch = cfg.image_size, cfg.patch_size
    downsample = cfg.selector_downsample if selector else 1
    dim = cfg.selector_width if selector else cfg.width
    n = cfg.n_selector_tokens if selector else cfg.n_tokens
    k = keep_ratio_to_k(keep_ratio, n) if keep_ratio is not None else None
    mean, std = cfg.mean, cfg.std

    def make(device, dtype):
        clip = torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, device=device)
        if k is None:
            indices = None
        else:
            indices = torch.rand(batch, n, device=device).argsort(dim=1)[:, :k].sort(dim=1).values.to(torch.int32)
        return (clip, indices, *_params(device, dtype, (dim, 3, patch, patch), (dim,), (n, dim)))

    def fused(clip, indices, weight, bias, pos):
        return lk.gather_patch_embed(clip, indices, weight, bias, pos, patch_size=patch, mean=mean, std=std,
                                     downsample=downsample)

    def eager(clip, indices, weight, bias, pos):
        stats = [torch.tensor(v, device=clip.device, dtype=weight.dtype) for v in (mean, std)]
        return _eager_patch_embed(clip, indices, weight, bias, pos, patch=patch, mean=stats[0], std=stats[1],
                                  downsample=downsample)

    rows = batch * (n if k is None else k)
    traffic = (rows * 3 * (downsample * patch) ** 2 + (dim * 3 * patch * patch + dim) * FLOAT_BYTES
               + rows * dim * 2 * FLOAT_BYTES)  # pixels, weights, positional rows in, tokens out
    what = "all" if k is None else f"K{k}"
    label = f"B{batch} T{frames} {size}px p{patch}{f' /{downsample}' if downsample > 1 else ''} {what} D{dim}"
    return Case("gather_patch_embed", label, make,
                _with_reference_path(_fixed({"fused": fused, "unfold+normalise+index+linear": eager})),
                grad_inputs=(2, 3, 4), bytes_moved=traffic)


# gather_tokens ---------------------------------------------------------------

def gather_case(cfg: ModelConfig, batch: int, keep_ratio: float) -> Case:
    n, dim = cfg.n_tokens, cfg.width
    k = keep_ratio_to_k(keep_ratio, n)

    def make(device, dtype):
        x = torch.randn(batch, n, dim, device=device, dtype=dtype)
        return x, torch.rand(batch, n, device=device).argsort(dim=1)[:, :k].sort(dim=1).values.to(torch.int32)

    def eager(x, indices):
        return torch.gather(x, 1, indices.long()[..., None].expand(-1, -1, dim)).reshape(-1, dim)

    return Case("gather_tokens", f"B{batch} N{n} K{k} D{dim}", make,
                _fixed({"fused": lambda x, i: lk.gather_tokens(x, i), "torch.gather": eager}),
                grad_inputs=(0,), bytes_moved=batch * k * (2 * dim * FLOAT_BYTES + 4))


# nn_uniqueness ---------------------------------------------------------------

def _eager_uniqueness(x):
    d = torch.cdist(x.float(), x.float())
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.amin(dim=2)


def uniqueness_case(cfg: ModelConfig, batch: int) -> Case:
    # A training target over the extractor's candidate tokens of a clip.
    n, dim = cfg.n_tokens, cfg.width
    return Case("nn_uniqueness", f"B{batch} N{n} D{dim}",
                lambda device, dtype: (torch.randn(batch, n, dim, device=device, dtype=dtype),),
                _with_reference_path(_fixed({"fused": lambda x: lk.nn_uniqueness(x), "cdist+min": _eager_uniqueness})),
                bytes_moved=batch * n * (dim * FLOAT_BYTES + 4))


# frame_normalize -------------------------------------------------------------

def _eager_frame_normalize(x):
    return (x - x.mean(dim=2, keepdim=True)) * torch.rsqrt(x.var(dim=2, unbiased=False, keepdim=True) + 1e-6)


def frame_normalize_case(cfg: ModelConfig, batch: int) -> Case:
    # Teacher features: one frame's tokens of the extractor's grid.
    frames, h, w = cfg.grid
    dim = cfg.width
    return Case("frame_normalize", f"B{batch} T{frames} n{h * w} D{dim}",
                lambda device, dtype: (torch.randn(batch, frames, h * w, dim, device=device, dtype=dtype),),
                _with_reference_path(_fixed({"fused": lambda x: lk.frame_normalize(x),
                                             "mean+var+normalise": _eager_frame_normalize})),
                grad_inputs=(0,), bytes_moved=2 * batch * frames * h * w * dim * FLOAT_BYTES)


# static_tokens ---------------------------------------------------------------

def static_tokens_case(cfg: ModelConfig, batch: int) -> Case:
    """RLT's selection for the dense model: half of every frame repeats the
    frame before it (a static background), the other half changes."""
    frames, size, patch = cfg.frames, cfg.image_size, cfg.patch_size

    def make(device, dtype):
        first = torch.randint(0, 256, (batch, 1, size, size, 3), dtype=torch.uint8, device=device)
        clip = first.repeat(1, frames, 1, 1, 1)
        clip[:, 1:, :, : size // 2] = torch.randint(0, 256, (batch, frames - 1, size, size // 2, 3),
                                                    dtype=torch.uint8, device=device)
        return (clip,)

    def fused(clip):
        return lk.static_tokens(clip, patch_size=patch, threshold=0.1, std=cfg.std)

    def eager(clip):
        return reference.static_tokens(clip, patch_size=patch, threshold=0.1, std=cfg.std)

    # Two frames read per later frame, a keep byte per token, ids and run lengths out.
    traffic = batch * ((frames - 1) * 2 * size * size * 3 + cfg.n_tokens * 9)
    return Case("static_tokens", f"B{batch} T{frames} {size}px p{patch}", make,
                _fixed({"fused": fused, "int16 diff+pool+nonzero+cummin": eager}), bytes_moved=traffic)

# seed-method selection strategies (STTS, Uni-AdaFocus) ----------------------

STTS_SAMPLES, STTS_SIGMA = 500, 0.05


class _EagerPerturbedTopK(torch.autograd.Function):
    """STTS's own composition: materialised noise and one-hot indicators
    ``[B, n, K, N]``, both kept for the backward."""

    @staticmethod
    def forward(ctx, scores, noise, k, sigma):
        ids = (scores[:, None, :] + sigma * noise).topk(k, dim=2).indices.sort(dim=2).values
        onehot = F.one_hot(ids, scores.shape[1]).float()
        ctx.save_for_backward(onehot, noise)
        ctx.sigma = sigma
        return onehot.mean(dim=1)

    @staticmethod
    def backward(ctx, grad):
        onehot, noise = ctx.saved_tensors
        expected = torch.einsum("bnkd,bnd->bkd", onehot, noise) / (noise.shape[1] * ctx.sigma)
        return torch.einsum("bkd,bkd->bd", grad, expected), None, None, None


def perturbed_topk_case(cfg: ModelConfig, batch: int, keep_ratio: float) -> Case:
    # STTS's setting on the selector's coarse scores.
    n = cfg.n_selector_tokens
    k = keep_ratio_to_k(keep_ratio, n)

    def make(device, dtype):
        return torch.randn(batch, n, device=device), torch.randint(2**31 - 1, (1,), device=device)

    def fused(scores, seed):
        return torch.ops.lookwhen.perturbed_topk(scores, seed, k, STTS_SAMPLES, STTS_SIGMA)

    def eager(scores, seed):
        # The same samples as the op (sample_noise), so only the top-K differs.
        return _EagerPerturbedTopK.apply(scores, sample_noise(seed, batch, STTS_SAMPLES, n), k, STTS_SIGMA)

    return Case("perturbed_topk", f"B{batch} n{n} K{k} samples{STTS_SAMPLES}", make,
                _fixed({"fused": fused, "noise+topk+sort+one_hot+mean": eager}),
                grad_inputs=(0,), bytes_moved=batch * n * 4 * (1 + k))


def select_windows_case(cfg: ModelConfig, batch: int) -> Case:
    # AdaFocus's patch: a quarter of the fine frame, from the coarse scores.
    grid, out_grid = cfg.score_grid, cfg.grid
    n_scores = math.prod(grid)
    frames, height, width = out_grid
    window = (height // 2, width // 2)
    cols = width - window[1] + 1

    def eager(scores):
        planes = F.interpolate(scores.view(batch, frames, *grid[1:]), size=out_grid[1:], mode="bilinear",
                               align_corners=False)
        best = F.avg_pool2d(planes, window, stride=1).flatten(2).argmax(dim=2)
        offsets = (torch.arange(window[0], device=scores.device)[:, None] * width
                   + torch.arange(window[1], device=scores.device)).flatten()
        starts = torch.arange(frames, device=scores.device) * (height * width) + (best // cols) * width + best % cols
        return (starts[:, :, None] + offsets).flatten(1).to(torch.int32)

    return Case("select_windows", f"B{batch} n{n_scores}->{cfg.n_tokens} window{window[0]}x{window[1]}",
                lambda device, dtype: (torch.randn(batch, n_scores, device=device),),
                _fixed({"fused": lambda s: lk.select_windows(s, window, grid=grid, out_grid=out_grid),
                        "interpolate+avg_pool+argmax": eager}),
                bytes_moved=batch * (n_scores + frames * window[0] * window[1]) * 4)


def budgets_case(cfg: ModelConfig, batch: int, mass: float = 0.9) -> Case:
    grid, out_grid, n_out = cfg.score_grid, cfg.grid, cfg.n_tokens
    n_scores = math.prod(grid)

    def eager(scores):
        fine = F.interpolate(scores.view(batch, grid[0], *grid[1:]), size=out_grid[1:], mode="bilinear",
                             align_corners=False).reshape(batch, n_out)
        ranked = torch.softmax(fine, dim=1).sort(dim=1, descending=True).values
        return ((torch.cumsum(ranked, dim=1) - ranked) < mass).sum(dim=1).clamp(1, n_out).to(torch.int32)

    return Case("budgets_from_scores", f"B{batch} n{n_scores}->{n_out} mass{mass}",
                lambda device, dtype: (torch.randn(batch, n_scores, device=device),),
                _fixed({"fused": lambda s: lk.budgets_from_scores(s, mass=mass, grid=grid, out_grid=out_grid),
                        "interpolate+softmax+sort+cumsum": eager}),
                bytes_moved=batch * (n_scores + 1) * 4)


def seed_selection_cases(cfg: ModelConfig, batch: int, keep_ratio: float) -> List[Case]:
    """The selection strategies of the seed methods, on the selector's scores."""
    return [perturbed_topk_case(cfg, batch, keep_ratio), select_windows_case(cfg, batch),
            budgets_case(cfg, batch)]


# varlen_attention ------------------------------------------------------------

def _attention_case(lengths: List[int], heads: int, head_dim: int, what: str, window_size=(-1, -1)) -> Case:
    """Self-attention over packed sequences of ``lengths`` against its
    alternatives (padded SDPA, an SDPA loop, FlexAttention and SDPA on jagged
    tensors where they run, and xformers and flash-attn where importable):
    the providers of :mod:`bench.attention`, checked against the op;
    ``window_size`` as FlashAttention's (causal: ``(-1, 0)``)."""

    def make(device, dtype):
        seed = int(torch.randint(0, 2**31 - 1, ()))
        return attention.make_inputs(lengths, heads, heads, head_dim, device=device, dtype=dtype, seed=seed)

    # Once per device and dtype: the peers compile on their first call.
    @functools.lru_cache(maxsize=None)
    def checked(device, dtype):
        return attention.check_providers(lengths, heads, heads, head_dim, device=device, dtype=dtype,
                                         window_size=window_size)

    if len(set(lengths)) == 1:
        shown = f"L{lengths[0]} x{len(lengths)}"
    elif len(lengths) <= 4:
        shown = "L" + ",".join(map(str, lengths))
    else:
        shown = f"{len(lengths)} seqs L{min(lengths)}..{max(lengths)} total {sum(lengths)}"
    return Case("varlen_attention", f"{what} {shown} H{heads} Dh{head_dim}", make,
                lambda device, dtype: checked(device, dtype).providers, grad_inputs=(0, 1, 2),
                bytes_moved=4 * sum(lengths) * heads * head_dim * FLOAT_BYTES, fused="varlen_attention",
                checked=checked,
                op_alone=lambda device, dtype: attention.build_providers(
                    lengths, heads, heads, device=device, dtype=dtype, window_size=window_size)["varlen_attention"])


def attention_cases(cfg: ModelConfig, batch: int, keep_ratio: float) -> List[Case]:
    """The attention shapes of a model: the dense model's full sequences; the
    LookWhen extractor's selected tokens plus context, its selector's coarse
    tokens, and clips with different budgets (the varlen case proper)."""
    head_dim = cfg.width // cfg.heads
    if cfg.kind == "dense":
        return [_attention_case([1 + cfg.n_tokens] * batch, cfg.heads, head_dim, "dense")]
    k = keep_ratio_to_k(keep_ratio, cfg.n_tokens)
    budgets = [cfg.n_context + keep_ratio_to_k(r, cfg.n_tokens) for r in (0.05, 0.1, 0.2, 0.3)] * batch
    return [
        _attention_case([cfg.n_context + k] * batch, cfg.heads, head_dim, "extractor"),
        _attention_case([1 + cfg.registers + cfg.n_selector_tokens] * batch, cfg.selector_heads,
                        cfg.selector_width // cfg.selector_heads, "selector"),
        _attention_case(budgets, cfg.heads, head_dim, "budgets"),
        # Masked variants at the same shapes: the skipped tiles' share of the time.
        _attention_case(budgets, cfg.heads, head_dim, "budgets causal", window_size=(-1, 0)),
        _attention_case(budgets, cfg.heads, head_dim, "budgets local64", window_size=(64, 64)),
    ]


# The sweep -------------------------------------------------------------------

def cases_for(cfg: ModelConfig, batch: int, keep_ratio: float) -> List[Case]:
    """The ops a model runs, at its shapes (plus the training-only ones for
    LookWhen)."""
    if cfg.kind == "dense":
        return [patch_embed_case(cfg, batch), static_tokens_case(cfg, batch),
                *attention_cases(cfg, batch, keep_ratio)]
    return [
        patch_embed_case(cfg, batch, selector=True),
        score_case(cfg, batch),
        topk_case(cfg, batch, keep_ratio),
        patch_embed_case(cfg, batch, keep_ratio),
        *attention_cases(cfg, batch, keep_ratio),
        gather_case(cfg, batch, keep_ratio),
        uniqueness_case(cfg, batch),
        frame_normalize_case(cfg, batch),
        *seed_selection_cases(cfg, batch, keep_ratio),
    ]


@dataclass
class Timed:
    """One provider in one mode of one case, timed twice (two sample lists)."""

    model: str
    case: Case
    provider: str
    mode: str
    samples: List[List[float]] = field(default_factory=list)
    peak_bytes: int = 0
    max_abs_error: Optional[float] = None


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def make_step(case: Case, provider: str, mode: str, device: torch.device, dtype: torch.dtype, rotate: int):
    """A zero-argument callable running one call, cycling over ``rotate``
    input sets so no call finds its data already in cache."""
    fn = case.op(device, dtype) if provider == case.fused else case.providers(device, dtype)[provider]
    sets = [case.make_inputs(device, dtype) for _ in range(rotate)]
    if mode == "fwd":
        def forward(inputs):
            with torch.no_grad():
                fn(*inputs)
        return rotating(forward, [(inputs,) for inputs in sets])
    sets = [tuple(t.detach().requires_grad_() if j in case.grad_inputs else t for j, t in enumerate(inputs))
            for inputs in sets]
    leaves = [[inputs[j] for j in case.grad_inputs] for inputs in sets]
    if mode == "bwd":
        # The graph is recorded once per input set, outside the timed region.
        outs = [_first_tensor(fn(*inputs)) for inputs in sets]

        def backward(out, grad, params):
            for leaf in params:
                leaf.grad = None
            out.backward(grad, retain_graph=True)
        return rotating(backward, [(out, torch.randn_like(out), ls) for out, ls in zip(outs, leaves)])
    grads = [torch.randn_like(_first_tensor(fn(*inputs))) for inputs in sets]

    def forward_backward(inputs, grad, params):
        for leaf in params:
            leaf.grad = None
        _first_tensor(fn(*inputs)).backward(grad)
    return rotating(forward_backward, list(zip(sets, grads, leaves)))


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="+", default=["lookwhen-b16", "internvideo2-b14"], metavar="PRESET[:K=V,...]",
                        help="model shapes to run each op at (default: lookwhen-b16 internvideo2-b14)")
    parser.add_argument("--batch", nargs="+", type=positive_int_arg, help="batch sizes (default: 1 on CPU, 1 8 32 on CUDA, 8 with --quick)")
    parser.add_argument("--keep-ratio", nargs="+", type=keep_ratio_arg, help="keep ratios (default: each config's)")
    parser.add_argument("--kernels", nargs="+", default=[], metavar="WORD", help="only kernels containing a word")
    parser.add_argument("--lengths", nargs="+", type=positive_int_arg, metavar="L",
                        help="also time varlen_attention over sequences of these lengths "
                             "(heads and head dim of the first --shapes model)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--min-run-time", type=positive_float_arg, help="seconds per timing (default: 0.3, --quick 0.05)")
    parser.add_argument("--rotate", type=positive_int_arg, default=3, help="input sets cycled through (default: 3)")


def _time_all(timed: List[Timed], device, dtype, *, min_run_time: float, rotate: int, progress) -> None:
    """Two passes over everything: the second pass repeats the first at a
    later time, so their difference is the noise band of each number."""
    for _ in range(2):
        for t in timed:
            step = make_step(t.case, t.provider, t.mode, device, dtype, rotate)
            backend = getattr(t.case.providers(device, dtype)[t.provider], "cpu_backend", None)
            if backend is not None:
                step = _on_cpu_backend(step, backend)
            expected = Stats.from_samples(t.samples[0]).median if t.samples else None
            t.samples.append(sample(step, device, min_run_time=min_run_time, expected=expected))
            if len(t.samples) == 1:
                t.peak_bytes = peak_memory(step, device)
            progress.update()


def run(args, device: torch.device) -> Result:
    dtype = DTYPES[args.dtype]
    configs = parse_shapes(args.shapes, parse_overrides(args.set))
    # --quick on a GPU: the middle batch alone (three batches time 600-odd cases).
    batches = args.batch or (([8] if args.quick else [1, 8, 32]) if device.type == "cuda" else [1])
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    cases = [(cfg.name, case) for cfg in configs for batch in batches
             for ratio in (args.keep_ratio or [cfg.keep_ratio]) for case in cases_for(cfg, batch, ratio)]
    if args.lengths:
        cfg = configs[0]
        cases.append((cfg.name, _attention_case(args.lengths, cfg.heads, cfg.width // cfg.heads, "--lengths")))
    cases = [(m, c) for m, c in cases if not args.kernels or any(word in c.kernel for word in args.kernels)]
    # A LookWhen case that does not depend on the keep ratio is run once.
    unique = {}
    for model, case in cases:
        unique.setdefault((model, case.kernel, case.label), (model, case))
    cases = list(unique.values())
    if not cases:
        raise BenchError("ops: no kernel matched --kernels " + " ".join(args.kernels))
    timed = [Timed(model, case, name, mode) for model, case in cases for mode in case.modes if mode in args.modes
             for name, provider in case.providers(device, dtype).items() if mode in case.provider_modes(provider)]
    if not timed:
        raise BenchError(f"ops: the chosen kernels have none of the modes {' '.join(args.modes)} (index ops are forward only)")
    checks = {(model, case.label): case.checked(device, dtype) for model, case in cases if case.checked}
    for t in timed:
        if t.case.checked:
            errors = checks[(t.model, t.case.label)].errors
            t.max_abs_error = errors.get((t.provider, "forward" if t.mode == "fwd" else "backward"))
    with tqdm(total=2 * len(timed), desc="ops", unit="timing", leave=False) as progress:
        _time_all(timed, device, dtype, min_run_time=min_run_time, rotate=args.rotate, progress=progress)
    return _result(timed, checks)


def _result(timed: List[Timed], checks: Dict[Tuple[str, str], attention.Checked]) -> Result:
    fused = {(id(t.case), t.mode): Stats.from_samples(t.samples[0] + t.samples[1])
             for t in timed if t.provider == t.case.fused}
    rows, payload, records = [], [], []
    for t in timed:
        stats = Stats.from_samples(t.samples[0] + t.samples[1])
        band = noise(Stats.from_samples(t.samples[0]), Stats.from_samples(t.samples[1]))
        ref = fused[(id(t.case), t.mode)]
        speedup = None if t.provider == t.case.fused else stats.median / ref.median
        x = f"{t.model} {t.case.label}"
        rows.append((t.case.kernel, x, t.mode, t.provider, f"{stats.median * 1e3:.3f}",
                     f"{stats.q20 * 1e3:.3f}-{stats.q80 * 1e3:.3f}", f"{band * 100:.1f}%",
                     f"{t.peak_bytes / 2**20:.1f}", "-" if speedup is None else f"{speedup:.2f}x",
                     "-" if t.max_abs_error is None else f"{t.max_abs_error:.1e}"))
        payload.append({"kernel": t.case.kernel, "model": t.model, "shape": t.case.label,
                        "mode": t.mode, "provider": t.provider, **stats.as_dict(), "noise": band,
                        "peak_bytes": t.peak_bytes, "fused_speedup": speedup, "max_abs_error": t.max_abs_error})
        records.append(Record(t.case.kernel, t.provider, t.mode, "time_s", x, stats.median, stats.q20, stats.q80))
        records.append(Record(t.case.kernel, t.provider, t.mode, "peak_bytes", x, t.peak_bytes))
        records.append(Record(t.case.kernel, t.provider, t.mode, "noise", x, band))
        if speedup is not None:
            records.append(Record(t.case.kernel, t.provider, t.mode, "fused_speedup", x, speedup))
        if t.max_abs_error is not None:
            records.append(Record(t.case.kernel, t.provider, t.mode, "max_abs_error", x, t.max_abs_error))
    table = format_table(
        ("kernel", "shape", "mode", "provider", "median ms", "q20-q80 ms", "noise", "peak MiB", "fused speedup",
         "max abs err"), rows,
        title="Fused op vs the eager composition it replaces (speedup = provider time / fused time; max abs err: "
              "of the output (fwd) or the input gradients (bwd, fwd+bwd) against the op)")
    left_out = [{"model": model, "shape": label, "provider": name, "pass": stage, "reason": reason}
                for (model, label), check in checks.items() for name, stage, reason in check.left_out]
    disagree = [{"model": model, "shape": label, "provider": name, "pass": stage, "max_abs_error": error,
                 "allowed": allowed}
                for (model, label), check in checks.items() for name, stage, error, allowed in check.disagree]
    return Result("ops", table + _notes(left_out, disagree), payload, records, plot=lambda fig: _plot(fig, payload),
                  extra={"left_out": left_out, "disagree": disagree}, exit_code=1 if disagree else 0)


def _notes(left_out, disagree) -> str:
    """Below the table: the peers left out (one line per reason) and the
    providers that disagree with the op."""
    reasons = collections.Counter((e["provider"], e["pass"], e["reason"]) for e in left_out)
    lines = [f"left out: {name}{' backward' if stage == 'backward' else ''} in {count} case(s): {reason}"
             for (name, stage, reason), count in reasons.items()]
    lines += [f"DISAGREES with the op, not timed: {d['model']} {d['shape']} {d['provider']} {d['pass']}: "
              f"max abs error {d['max_abs_error']:.2e} > {d['allowed']:.2e}" for d in disagree]
    return "".join("\n" + line for line in lines)


def _plot(figure, payload) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    bars = [(f"{p['kernel']} [{p['mode']}] vs {p['provider']}\n{p['model']} {p['shape']}", p["fused_speedup"])
            for p in payload if p["fused_speedup"] is not None]
    ax = figure.add_subplot()
    labels = [b[0] for b in bars]
    values = [b[1] for b in bars]
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(range(len(bars)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("speedup of the fused op (other time / fused time)")
    figure.set_size_inches(9, max(3.0, 0.32 * len(bars) + 1.5))
