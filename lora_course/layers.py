"""The linear layers LoRA adapts, whatever their layout, and model surgery by name.

Two layouts hold the same linear map h = W x + b:

    nn.Linear            weight (out, in)
    transformers Conv1D  weight (in, out)   GPT-2's layers; PEFT calls this fan_in_fan_out

Every path that touches a base weight (reading W0, merging, unmerging, converting to
PEFT) goes through `transpose`, as PEFT's `tuners/lora/layer.py` does, so the layout is
decided in one place.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["Conv1D", "is_conv1d", "is_adaptable", "linear_features", "transpose", "replace_module"]


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2's linear layer, weight stored as (in, out))."""
    return isinstance(layer, Conv1D)


def is_adaptable(layer: nn.Module) -> bool:
    """True for the layers LoRA wraps here: `nn.Linear` and `Conv1D`."""
    return isinstance(layer, (nn.Linear, Conv1D))


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or `Conv1D`; TypeError for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D: (in, out)
        return in_features, out_features
    raise TypeError(
        f"LoRA here wraps nn.Linear or transformers' Conv1D, got {type(layer).__name__}; "
        "choose target_modules that name linear layers (print(model) lists them)"
    )


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A stored weight as (out, in), or an (out, in) matrix in the stored layout: W.T if fan_in_fan_out."""
    return weight.T if fan_in_fan_out else weight


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model.get_submodule(name)` is (its full dotted name)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
