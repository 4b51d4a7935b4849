"""Wall-clock timing with `torch.utils.benchmark`: medians that handle warm-up and threads.

Timings depend on the machine and on what else runs on it: compare ratios measured in
one run, never absolute numbers across runs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import benchmark

__all__ = ["median_ms", "generation_ms"]


def median_ms(fn: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median milliseconds of `fn()`, repeated for at least `min_run_time` seconds (CUDA synchronised)."""
    if torch.cuda.is_available():
        fn()
        torch.cuda.synchronize()
        stmt = "fn(); torch.cuda.synchronize()"
    else:
        stmt = "fn()"
    timer = benchmark.Timer(stmt=stmt, globals={"fn": fn, "torch": torch})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def generation_ms(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int = 16,
                  min_run_time: float = 0.2) -> tuple[float, torch.Tensor]:
    """Median milliseconds of greedy `model.generate(prompt)`, and the tokens it generated.

    Sampling is off and exactly `max_new_tokens` are generated, so every repeat does the
    same work.
    """
    def generate():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=0)

    model.eval()
    tokens = generate()
    return median_ms(generate, min_run_time), tokens
