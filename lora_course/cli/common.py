"""What the command lines share: one usage-error path, and the models they build.

Bad input raises `UsageError` with one line saying what to change; `run_command` prints it
as `error: ...` and returns status 2. argparse's own errors (`Parser`) look the same. Every
check runs before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..methods import Method
from ..models import load_model, toy_gpt2
from ..skeletons import gpt2_config

__all__ = ["UsageError", "Parser", "run_command", "print_error", "check_at_least", "split_targets", "build_model",
           "adapt"]


class UsageError(Exception):
    """Bad input from the command line: the message says what to change."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ... (<command> --help lists the options)`, and status 2."""

    def __init__(self, command: str, **kwargs):
        super().__init__(**kwargs)
        self.command = command

    def error(self, message):
        self.exit(2, f"error: {message} ({self.command} --help lists the options)\n")


def print_error(err: UsageError) -> None:
    print(f"error: {err}", file=sys.stderr)


def run_command(fn: Callable, *args, report: Callable[[UsageError], None] = print_error) -> int:
    """`fn(*args)` as a command: its status (0 unless it returns an int), or 2 after `report` says what was wrong."""
    try:
        status = fn(*args)
    except UsageError as err:
        report(err)
        return 2
    return status if isinstance(status, int) else 0


def check_at_least(**minimums: tuple[int, int]) -> None:
    """`check_at_least(steps=(args.steps, 1))`: a UsageError naming the first option below its minimum."""
    for name, (value, low) in minimums.items():
        if value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def split_targets(text: str) -> list[str]:
    """"c_attn, c_proj" -> ["c_attn", "c_proj"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def build_model(name: str, seed: int = 0, device="cpu"):
    """(model, tokenizer, a sentence saying what was loaded, whether it is the shipped model).

    "gpt2-random" is GPT-2 124M's shape with random weights (seeded), for speed and smoke
    runs; the shipped tokenizer's BPE ids all fit its vocabulary. Any other name goes to
    `models.load_model`.
    """
    if name == "gpt2-random":
        _, tokenizer, _ = load_model("tiny-gpt2", device="cpu", verbose=False)
        model = toy_gpt2(gpt2_config("small"), seed=seed).to(device)
        return model, tokenizer, "Built GPT-2 124M's shape with random weights (gpt2-random).", False
    model, tokenizer, info = load_model(name, device=device, fast=False, verbose=False)
    return model, tokenizer, info.summary(), info.is_shipped


def adapt(model, method: str, targets: str, r: int, alpha: float, use_rslora: bool = False):
    """The model to train, in place: LoRA on `targets` (comma-separated), or every parameter for "full" (a `Method`)."""
    spec = Method(method, targets=None if method == "full" else tuple(split_targets(targets)), r=r, alpha=alpha,
                  use_rslora=use_rslora)
    try:
        return spec.build(model, in_place=True)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
