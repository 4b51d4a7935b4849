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
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from .measure import fastest_of_rounds, peak_memory, wall_and_cpu_ms
from .skeletons import transformer_blocks

__all__ = ["VARIANTS", "checkpoint_blocks", "trainable_grads", "count_block_forwards", "compare_checkpointing"]

# name: (checkpoint the blocks?, reentrant?, enable_input_require_grads?)
VARIANTS = {
    "no checkpointing": (False, False, False),
    "reentrant": (True, True, False),
    "reentrant + enable_input_require_grads": (True, True, True),
    "non-reentrant": (True, False, False),
}


def checkpoint_blocks(model: nn.Module, use_reentrant: bool = True, block_type: type | None = None) -> nn.Module:
    """Wrap every transformer block (default: the type of the first of `transformer_blocks`) in checkpointing."""
    block_type = block_type or type(transformer_blocks(model)[0])
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


def count_block_forwards(model: nn.Module) -> list[int]:
    """Count every forward of each transformer block, recomputations included: a list that the hooks keep up to date.

    Call before `checkpoint_blocks`; the hooks sit on the blocks themselves, inside any wrapper.
    """
    blocks = transformer_blocks(model)
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _variant(build: Callable[[], nn.Module], input_ids: torch.Tensor, ckpt: bool, reentrant: bool,
             input_grads: bool):
    """(model, row) of one variant after one step: its error and warning, or its gradients and forwards per block."""
    model = build().train()
    counts = count_block_forwards(model)
    if ckpt:
        checkpoint_blocks(model, use_reentrant=reentrant)
    if input_grads:
        model.enable_input_require_grads()
    row = {"error": None, "warning": None, "forwards_per_step": None, "grads": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            row["grads"] = trainable_grads(model, input_ids)
            row["forwards_per_step"] = list(counts)
        except RuntimeError as err:
            row["error"] = str(err).strip().splitlines()[0]
    if caught:
        row["warning"] = str(caught[0].message)
    return model, row


def compare_checkpointing(build: Callable[[], nn.Module], input_ids: torch.Tensor, rounds: int = 7) -> dict[str, dict]:
    """Each of `VARIANTS` on a fresh `build()` (a LoRA model): the error, or what one step costs and does.

    Returns {variant: {"error": first line or None, "warning": first warning or None,
    "forwards_per_step" (per block: how many times its forward ran in one step), "peak_bytes",
    "ms" and "cpu_ms" (wall-clock and process CPU time of a forward and backward, fastest round),
    "max_grad_diff" (against no checkpointing)}}. Peak memory is measured on the CPU around
    one step, gradients freed first. Each variant keeps its fastest of `rounds` interleaved
    rounds (`measure.fastest_of_rounds`).
    """
    out, timings, reference = {}, {}, None
    for name, flags in VARIANTS.items():
        model, row = _variant(build, input_ids, *flags)
        grads = row.pop("grads")
        row |= {"peak_bytes": None, "ms": None, "cpu_ms": None, "max_grad_diff": None}
        if row["error"] is None:
            reference = reference or grads
            row["max_grad_diff"] = max((grads[k] - reference[k]).abs().max().item() for k in reference)

            def timed(model=model) -> tuple[float, float]:  # (wall ms, CPU ms) of one step, gradients freed first
                return wall_and_cpu_ms(lambda: (model.zero_grad(set_to_none=True), _step(model, input_ids)))

            model.zero_grad(set_to_none=True)
            _, row["peak_bytes"] = peak_memory(lambda: _step(model, input_ids), device="cpu")
            timings[name] = timed
        out[name] = row
    for name, (ms, cpu_ms) in fastest_of_rounds(timings, rounds).items():
        out[name] |= {"ms": ms, "cpu_ms": cpu_ms}
    return out
