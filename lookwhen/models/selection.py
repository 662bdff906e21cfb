"""How LookWhen chooses the tokens its extractor sees: one value, checked
once, that the model, the embedding loops and the command all take.

The ways of choosing are exclusive: a keep ratio (the config's by default),
per-clip ``budgets``, token ``indices`` chosen outside the model, or
budgets from the scores (``budget_mass``), or one window of tokens per
frame where the scores sum highest (``window``, Uni-AdaFocus's one
informative patch per frame). On top of a keep ratio,
``sigma`` makes the top-K differentiable (STTS's perturbed top-K) and
``motion`` takes the tokens that move fastest by the decoder's motion
vectors (:func:`lookwhen.data.motion.motion_forward` turns them into
``indices``) instead of the selector's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# The ways of choosing how many (or which) tokens, of which one at most is given.
CHOICES = ("keep_ratio", "budgets", "indices", "budget_mass", "window")


def _same(name: str) -> str:
    return name


@dataclass(frozen=True, eq=False)
class Selection:
    """``keep_ratio``: the fraction of tokens each clip keeps (``None``: the
    config's). ``budgets``: tokens per clip (int32 ``[B]``, a list or a
    tensor). ``indices``: the token ids, int32 ``[B, K]`` ascending per
    clip; with ``run_selector=False`` the selector does not run at all.
    ``budget_mass``: per-clip budgets, the fewest tokens holding that mass
    of the scores' softmax at ``budget_temperature``. ``window``: ``(h, w)``
    tokens of the extractor's grid (an int: square) per frame, placed where
    the scores sum highest. ``sigma`` (training,
    with a keep ratio): the perturbed top-K's noise, ``n_samples`` noisy
    samples per clip. ``motion``: the motion selector chooses (at a keep
    ratio). ``spell`` names the fields in error messages (the command
    passes its option names)."""

    keep_ratio: Optional[float] = None
    budgets: object = None
    indices: Optional[torch.Tensor] = None
    budget_mass: Optional[float] = None
    budget_temperature: float = 1.0
    window: object = None
    sigma: Optional[float] = None
    n_samples: int = 500
    run_selector: bool = True
    motion: bool = False
    spell: Callable[[str], str] = field(default=_same, repr=False, compare=False)

    def __post_init__(self):
        name = self.spell
        given = [name(choice) for choice in CHOICES if getattr(self, choice) is not None]
        if len(given) > 1:
            raise ValueError(f"{', '.join(given[:-1])} and {given[-1]}: give one way of choosing tokens, not both")
        if self.indices is None and not self.run_selector:
            raise ValueError(f"{name('run_selector')}: False needs a selection made outside the model (indices)")
        if self.budget_temperature != 1.0 and self.budget_mass is None:
            raise ValueError(f"{name('budget_temperature')}: only with {name('budget_mass')}")
        if self.sigma is not None and any(getattr(self, c) is not None for c in CHOICES if c != "keep_ratio"):
            raise ValueError(f"{name('sigma')}: the perturbed top-K keeps a fixed ratio of tokens (no budgets, "
                             "indices or windows)")
        if self.motion and (self.sigma is not None
                            or any(getattr(self, c) is not None for c in CHOICES if c != "keep_ratio")):
            raise ValueError(f"{name('motion')}: the motion selector keeps a fixed ratio of tokens by the decoder's "
                             "motion vectors (no budgets, indices, windows or budgets from the learned selector's "
                             "scores)")

    @property
    def chooses(self) -> bool:
        """Whether anything but the model's own default is asked for (what a
        dense model, which keeps every token, refuses)."""
        return (any(getattr(self, choice) is not None for choice in CHOICES) or self.sigma is not None
                or self.motion or not self.run_selector)

    def check_model(self, config) -> None:
        """Refuse a selection for a dense model, which keeps every token."""
        if config.kind != "lookwhen" and self.chooses:
            raise ValueError(f"{config.name} is a dense model: it keeps every token and selects nothing")


def selection_of(selection: Optional[Selection], **fields) -> Selection:
    """``selection``, or a Selection of the keyword arguments (the older
    spelling every caller still has): not both."""
    given = Selection(**fields)
    if selection is None:
        return given
    if given.chooses:
        raise ValueError("selection: give a Selection or its keyword arguments, not both")
    return selection
