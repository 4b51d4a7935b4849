"""Run-time switches every notebook shares: fast vs full mode, seeding, device choice, progress bars.

Fast mode (`LORA_COURSE_FAST=1`, what `pytest` sets) shrinks the *work* a notebook does
(steps, sweep sizes, model size) but never the claims it asserts.
"""

from __future__ import annotations

import os
import random
import sys
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["is_fast_mode", "by_mode", "seed_everything", "get_device", "num_threads", "progress_bar"]


def is_fast_mode() -> bool:
    """True when `LORA_COURSE_FAST` is set to 1/true/yes (the test default)."""
    return os.environ.get("LORA_COURSE_FAST", "0").strip().lower() in {"1", "true", "yes"}


def by_mode(fast, full):
    """Pick the fast-mode or the full-mode value of a setting."""
    return fast if is_fast_mode() else full


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so a cell reproduces."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, then Apple MPS, then CPU; `prefer` overrides the choice."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def num_threads(n: int):
    """Run a block with `n` intra-op threads, then restore the previous setting.

    Small matrices run fastest on one thread, and a shared machine is not oversubscribed.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None, disable: bool = False,
                 leave: bool = True):
    """A text tqdm bar that appears only for work longer than a second and ends at 100%.

    Text, not a widget, so that a saved notebook shows the finished bar instead of the
    widget's first frame; in a notebook it goes to stdout (a normal output), elsewhere to
    stderr as usual.
    """
    from tqdm.std import tqdm

    stream = sys.stdout if "ipykernel" in sys.modules else sys.stderr
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=leave, file=stream, delay=1.0,
                mininterval=0.5)
