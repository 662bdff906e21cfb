"""Argument types of the ``lookwhen`` command, which the benchmark's
command uses too, its ``KEY=VALUE`` options, and how it reports usage
errors."""
from __future__ import annotations

import argparse
import ast
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Optional

if TYPE_CHECKING:
    import torch

from lookwhen.data.decoders import DECODERS

EXIT_USAGE = 2


class CommandError(ValueError):
    """A problem with the user's input: reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def number_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def keep_ratio_arg(text: str) -> float:
    value = number_arg(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def positive_float_arg(text: str) -> float:
    value = number_arg(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
    return value


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int_arg(text: str) -> int:
    value = int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def decoder_arg(parser: argparse.ArgumentParser) -> None:
    """``--decoder``: which library decodes the videos (all give the same pixels)."""
    parser.add_argument("--decoder", choices=("auto", *DECODERS), default="auto",
                        help="video decoder: auto (PyAV where installed, the fastest on CPU; else decord), pyav, "
                             "decord or torchcodec (needs FFmpeg's shared libraries); the same pixels from each")


def literal(key: str, text: str):
    """A Python literal (``4``, ``True``, ``(1, 2)``); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_key_values(items: Optional[Iterable[str]],
                     value: Callable[[str, str], object] = literal) -> Dict[str, object]:
    """``["depth=4", ...]`` (command-line ``KEY=VALUE`` items) -> ``{key:
    value(key, text)}``; ``ValueError`` for an item without ``=``."""
    out: Dict[str, object] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        out[key] = value(key, text)
    return out


def parse_overrides(items: Optional[Iterable[str]]) -> Dict[str, object]:
    """``["depth=2", "frames=4"]`` -> config overrides, typed as the fields."""
    from lookwhen.models.config import coerce_field

    return parse_key_values(items, coerce_field)


def checked_device(name: str) -> "torch.device":
    """``--device``: cpu or cuda[:N], refused when this machine lacks it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device: only cpu and cuda are supported, got {name!r}")
    return device
