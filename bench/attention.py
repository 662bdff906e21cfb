"""``varlen_attention`` against the ways to do without it.

Every provider takes the same packed inputs ``q [total, H, Dh]``, ``k, v
[total, H_kv, Dh]`` and returns the packed output ``[total, H, Dh]``:

- ``varlen_attention``: the op (Triton on a GPU; on a CPU without the
  interpreter, its PyTorch reference path, as the model runs it there).
- ``sdpa_padded``: pad to ``[B, H, L_max, Dh]``, ``scaled_dot_product_attention``
  with a key-padding mask, unpad: what a model without varlen attention does.
  The pad/unpad copies are O(total) next to the O(B * L_max^2) attention.
- ``sdpa_loop``: one ``scaled_dot_product_attention`` call per sequence.
- ``xformers_blockdiag``: xformers' ``memory_efficient_attention`` with a
  ``BlockDiagonalMask`` (when xformers is importable).
- ``flash_attn_varlen``: FlashAttention's ``flash_attn_varlen_func`` (when
  importable, on CUDA, fp16/bf16).

Two more peers, what a PyTorch user would pick today (:func:`build_peers`):

- ``flex_attention``: ``torch.nn.attention.flex_attention`` over the packed
  tokens as one sequence (``[1, H, total, Dh]``) with a document mask (the
  sequence of each token, plus the window), compiled for the case's shapes.
- ``sdpa_njt``: ``scaled_dot_product_attention`` on nested jagged tensors
  made from the packed tensors and ``cu_seqlens`` (no windows).

Whether a peer runs depends on the torch version, device, dtype and case, so
:func:`check_providers` calls each one first (which also compiles) and leaves
out what fails, with the reason. It also checks every provider's output and
gradients against the op.

With ``window_size`` (FlashAttention's ``(left, right)``; causal is ``(-1,
0)``) every provider applies the same local mask (xformers and the jagged
SDPA are left out).

``python -m bench ops --kernels varlen_attention`` times them at the models'
shapes (add ``--lengths`` for any other set of sequences).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import lookwhen_kernels as lk
from lookwhen_kernels import reference
from lookwhen_kernels.layout import cu_seqlens_from_lengths

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_inputs(lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, *, device, dtype, seed: int = 0):
    """Packed ``q, k, v`` for self-attention over sequences of ``lengths``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    return tuple(
        torch.randn(total, h, head_dim, generator=generator).to(device=device, dtype=dtype)
        for h in (heads, kv_heads, kv_heads)
    )


def build_providers(lengths: Sequence[int], heads: int, kv_heads: int, *, device, dtype,
                    window_size: Tuple[int, int] = (-1, -1)) -> Dict[str, Provider]:
    """Name -> ``fn(q, k, v) -> out [total, H, Dh]`` for self-attention over
    sequences of ``lengths``; the op first."""
    window_size = tuple(window_size)
    local = window_size != (-1, -1)
    device = torch.device(device)
    lengths = [int(n) for n in lengths]
    cu = cu_seqlens_from_lengths(lengths, device=device)
    longest = max(lengths, default=0)
    gqa = heads != kv_heads
    starts = cu.tolist()
    # Padded layout: row r of the packed tensor sits at [batch_of[r], pos_of[r]].
    batch_of = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device), output_size=sum(lengths))
    pos_of = torch.arange(sum(lengths), device=device) - cu[:-1].long()[batch_of]
    # An empty sequence keeps one (padding) key so its padding queries do not
    # produce NaN; they are cut off anyway.
    key_mask = (torch.arange(longest, device=device)[None, :]
                < torch.tensor(lengths, device=device).clamp(min=1)[:, None])[:, None, None, :]
    if local:
        # Self-attention: bottom-right and top-left alignment agree, so the
        # padded layout takes the same window. Padding queries keep key 0, so
        # that no row of the padded batch is empty (NaN).
        padding_query = (torch.arange(longest, device=device)[None, :]
                         >= torch.tensor(lengths, device=device)[:, None])[:, None, :, None]
        first_key = torch.arange(longest, device=device) == 0
        key_mask = key_mask & reference.attention_mask(longest, longest, window_size, device) \
            | padding_query & first_key

    def ours(q, k, v):
        return lk.varlen_attention(q, k, v, cu, cu, longest, longest, window_size=window_size, validate=False)

    def padded(q, k, v):
        def pad(t):
            out = t.new_zeros((len(lengths), longest) + tuple(t.shape[1:]))
            out[batch_of, pos_of] = t
            return out.transpose(1, 2)

        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask, enable_gqa=gqa)
        return out.transpose(1, 2)[batch_of, pos_of]

    def loop(q, k, v):
        outs = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), enable_gqa=gqa,
                attn_mask=reference.attention_mask(b - a, b - a, window_size, device) if local else None,
            ).transpose(0, 1)
            for a, b in zip(starts[:-1], starts[1:]) if b > a
        ]
        return torch.cat(outs) if outs else q.new_empty(q.shape)

    providers: Dict[str, Provider] = {"varlen_attention": ours, "sdpa_padded": padded, "sdpa_loop": loop}
    xformers = None if local else _xformers_provider(lengths, heads, kv_heads)
    if xformers is not None:
        providers["xformers_blockdiag"] = xformers
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_provider(cu, longest, window_size)
        if flash is not None:
            providers["flash_attn_varlen"] = flash
    return providers


def _xformers_provider(lengths, heads, kv_heads) -> Optional[Provider]:
    try:
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError:
        return None
    bias = BlockDiagonalMask.from_seqlens(list(lengths))
    group = heads // kv_heads

    def blockdiag(q, k, v):
        total, _, head_dim = q.shape
        # Grouped-query heads in xformers' [B, M, G, H, K] layout, kv broadcast over the group.
        shape = (1, total, kv_heads, group, head_dim)
        out = memory_efficient_attention(
            q.view(shape), k[None, :, :, None].expand(shape), v[None, :, :, None].expand(shape), attn_bias=bias
        )
        return out.reshape(q.shape)

    return blockdiag


def _flash_attn_provider(cu, longest, window_size) -> Optional[Provider]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, window_size=window_size)


def build_peers(lengths: Sequence[int], heads: int, kv_heads: int, *, device,
                window_size: Tuple[int, int] = (-1, -1)) -> Tuple[Dict[str, Provider], Dict[str, str]]:
    """``flex_attention`` and ``sdpa_njt`` for self-attention over sequences of
    ``lengths`` (not yet called), and name -> why for a peer that cannot be
    built here (an older torch, a window the peer cannot express)."""
    lengths = [int(n) for n in lengths]
    peers, why = {}, {}
    for name, make in (("flex_attention", _flex_provider), ("sdpa_njt", _njt_provider)):
        try:
            peers[name] = make(lengths, heads, kv_heads, device=torch.device(device), window_size=tuple(window_size))
        except Exception as error:  # an old torch, an unsupported case: a reason, not a crash
            why[name] = _reason(error)
    return peers, why


def _flex_provider(lengths, heads, kv_heads, *, device, window_size) -> Provider:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = sum(lengths)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device), output_size=total)
    left, right = window_size

    def same_document(batch, head, q_idx, kv_idx):
        keep = document[q_idx] == document[kv_idx]
        # Within one sequence, packed indices differ as the positions do.
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    block_mask = create_block_mask(same_document, None, None, total, total, device=device)
    # Static shapes: the kernel a model with these shapes would get, the
    # best case for the peer (one compile per case and grad mode). Full
    # graph: where a grad mode cannot be compiled (the backward on CPU), the
    # call raises; a graph break would instead make dynamo skip
    # flex_attention from then on, running the compiled mode eager too.
    attend = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    gqa = heads != kv_heads

    def flex(q, k, v):
        out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     block_mask=block_mask, enable_gqa=gqa)
        return out[0].transpose(0, 1)

    return flex


def _njt_provider(lengths, heads, kv_heads, *, device, window_size) -> Provider:
    if window_size != (-1, -1):
        raise NotImplementedError(f"window_size {window_size}: scaled_dot_product_attention on jagged "
                                  "tensors takes no attention mask")
    offsets = cu_seqlens_from_lengths(lengths, device=device).long()
    shortest, longest = min(lengths), max(lengths)
    gqa = heads != kv_heads

    def jagged(t):
        # Given the bounds, the nested tensor need not read them back from
        # the offsets (a device sync) in every call.
        return torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=shortest,
                                                      max_seqlen=longest).transpose(1, 2)

    def njt(q, k, v):
        out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), enable_gqa=gqa)
        return out.transpose(1, 2).values()

    return njt


def _reason(error: BaseException) -> str:
    # Compilers wrap the error that says what is unsupported.
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# Largest max abs error against the op, as a fraction of the op's largest
# magnitude (at least 1), of a provider that computes the same attention:
# some units in the last place of the dtype, summed over a softmax row.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class Checked:
    """What :func:`check_providers` found for one case.

    ``providers``: those that ran and agree with the op, the op first; a peer
    whose backward failed is marked ``forward_only = True``. ``errors``: (name,
    ``"forward"`` or ``"backward"``) -> max abs error against the op, of the
    output or of the gradients of q, k and v. ``left_out``: (name, pass, why)
    for a peer left out of that pass and the ones after it. ``disagree``:
    (name, pass, error, allowed) for a provider above :data:`TOLERANCE`,
    which is left out too."""

    providers: Dict[str, Provider]
    errors: Dict[Tuple[str, str], float] = field(default_factory=dict)
    left_out: List[Tuple[str, str, str]] = field(default_factory=list)
    disagree: List[Tuple[str, str, float, float]] = field(default_factory=list)


def check_providers(lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, *, device, dtype,
                    window_size: Tuple[int, int] = (-1, -1)) -> Checked:
    """The providers and peers of one case, each called once on one input
    set as the bench calls it: forward without grad, then forward and
    backward. The first calls compile the peers, so that no timing pays for
    it; a peer that fails is left out with the reason, a provider that does
    not compute what the op computes is left out as disagreeing."""
    # Its tensors must be able to join autograd even when the caller runs in
    # inference mode (roofline): the providers keep some of them.
    with torch.inference_mode(False):
        return _check_providers(lengths, heads, kv_heads, head_dim, device=device, dtype=dtype,
                                window_size=window_size)


def _check_providers(lengths, heads, kv_heads, head_dim, *, device, dtype, window_size) -> Checked:
    import torch._dynamo

    if sum(lengths) == 0:
        raise ValueError("lengths: the sequences hold no token")
    device = torch.device(device)
    providers = build_providers(lengths, heads, kv_heads, device=device, dtype=dtype, window_size=window_size)
    peers, why = build_peers(lengths, heads, kv_heads, device=device, window_size=window_size)
    checked = Checked({}, left_out=[(name, "forward", reason) for name, reason in why.items()])
    inputs = make_inputs(lengths, heads, kv_heads, head_dim, device=device, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(1)
    grad = torch.randn(inputs[0].shape, generator=generator).to(device=device, dtype=dtype)
    (ours, op), *others = providers.items()
    expected = {stage: run(op, inputs, grad) for stage, run in STAGES}
    checked.providers[ours] = op
    # FlexAttention is compiled once per case and grad mode, more often than
    # dynamo's per-function recompile limit allows. The limit is checked on a
    # cache miss only: the timed calls hit the entries compiled here.
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.accumulated_recompile_limit):
        for name, fn in [*others, *peers.items()]:
            results = {}
            for stage, run in STAGES:
                try:
                    results[stage] = run(fn, inputs, grad)
                except Exception as error:  # a peer that cannot run this case is left out, with the reason
                    if name not in peers:
                        raise
                    checked.left_out.append((name, stage, _reason(error)))
                    break
            agrees = bool(results)
            for stage, values in results.items():
                error, allowed = _max_error(values, expected[stage], dtype)
                checked.errors[(name, stage)] = error
                if error > allowed:
                    checked.disagree.append((name, stage, error, allowed))
                    agrees = False
            if agrees:
                if "backward" not in results:
                    fn.forward_only = True
                checked.providers[name] = fn
    return checked


def _forward(fn, inputs, grad):
    with torch.no_grad():
        return [fn(*inputs)]


def _gradients(fn, inputs, grad):
    with torch.enable_grad():  # the caller may be under no_grad (roofline's FLOP count)
        leaves = [t.detach().requires_grad_() for t in inputs]
        fn(*leaves).backward(grad)
    return [t.grad for t in leaves]


STAGES = (("forward", _forward), ("backward", _gradients))


def _max_error(values, expected, dtype) -> Tuple[float, float]:
    """Max abs error of ``values`` against ``expected`` (lists of tensors),
    and the most that :data:`TOLERANCE` allows there."""
    error = max(float((a.double() - b.double()).abs().max()) for a, b in zip(values, expected))
    scale = max([1.0] + [float(b.abs().max()) for b in expected])
    return error, TOLERANCE[dtype] * scale
