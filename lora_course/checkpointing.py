"""Activation checkpointing with LoRA: the "does not require grad" error, its two fixes, and what they cost.

Checkpointing a transformer block keeps only the block's input during the forward pass and
runs the block again in the backward pass to rebuild what autograd needs: less memory, one
more forward of time. PyTorch's original ("reentrant") checkpoint computes gradients only
if some *input* of the block requires grad. With LoRA the base is frozen and the
embeddings' output does not require grad, so the checkpointed blocks look constant:

    RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn

(with a warning first: "None of the inputs have requires_grad=True"). Two standard fixes:

- `model.enable_input_require_grads()` (transformers; PEFT calls it for you): a hook marks
  the embeddings' output as requiring grad, so gradients flow into the checkpoints;
- non-reentrant checkpointing (`use_reentrant=False`), which tracks the parameters used
  inside the block, not only its inputs. transformers' `activation_checkpointing_enable`
  defaults to it and also calls `enable_input_require_grads` (5.x); the error shows with
  PyTorch's reentrant checkpointing (`checkpoint(..., use_reentrant=True)`, or
  `apply_activation_checkpointing` with `CheckpointImpl.REENTRANT`), or with older releases.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import nn

from .memory import peak_memory
from .timing import median_ms

__all__ = ["VARIANTS", "checkpoint_blocks", "trainable_grads", "compare_checkpointing"]

# name: (checkpoint the blocks?, reentrant?, enable_input_require_grads?)
VARIANTS = {
    "no checkpointing": (False, False, False),
    "reentrant": (True, True, False),
    "reentrant + enable_input_require_grads": (True, True, True),
    "non-reentrant": (True, False, False),
}


def checkpoint_blocks(model: nn.Module, use_reentrant: bool = True, block_type: type | None = None) -> nn.Module:
    """Wrap every transformer block (default: the type of `model.transformer.h[0]`) in activation checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    block_type = block_type or type(model.transformer.h[0])
    impl = CheckpointImpl.REENTRANT if use_reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                                                  checkpoint_impl=impl),
                                   check_fn=lambda m: isinstance(m, block_type))
    return model


def _step(model: nn.Module, input_ids: torch.Tensor) -> None:
    """One forward and backward of the causal-LM loss (labels = inputs)."""
    model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()


def trainable_grads(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters after one step, by name (checkpoint wrappers left out of names)."""
    model.zero_grad(set_to_none=True)
    _step(model, input_ids)
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def compare_checkpointing(build: Callable[[], nn.Module], input_ids: torch.Tensor,
                          min_run_time: float = 0.2) -> dict[str, dict]:
    """Each of `VARIANTS` on a fresh `build()` (a LoRA model): the error, or peak memory, time and gradients.

    Returns {variant: {"error": first line or None, "warning": first warning or None,
    "peak_bytes", "ms" (median forward + backward), "max_grad_diff" (against no checkpointing)}}.
    Peak memory is measured on the CPU around one forward and backward, gradients freed first.
    """
    out, reference = {}, None
    for name, (ckpt, reentrant, input_grads) in VARIANTS.items():
        model = build().train()
        if ckpt:
            checkpoint_blocks(model, use_reentrant=reentrant)
        if input_grads:
            model.enable_input_require_grads()
        row = {"error": None, "warning": None, "peak_bytes": None, "ms": None, "max_grad_diff": None}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                grads = trainable_grads(model, input_ids)
            except RuntimeError as err:
                row["error"] = str(err).strip().splitlines()[0]
        if caught:
            row["warning"] = str(caught[0].message)
        if row["error"] is None:
            reference = reference or grads
            row["max_grad_diff"] = max((grads[k] - reference[k]).abs().max().item() for k in reference)
            model.zero_grad(set_to_none=True)
            _, row["peak_bytes"] = peak_memory(lambda: _step(model, input_ids), device="cpu")

            def timed():
                model.zero_grad(set_to_none=True)
                _step(model, input_ids)

            row["ms"] = median_ms(timed, min_run_time=min_run_time)
        out[name] = row
    return out
