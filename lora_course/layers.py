"""The frozen base layers LoRA adapts, read and written through one seam; model surgery by name.

Three kinds of layer hold the same linear map h = W x + b, and an embedding is one too:

    nn.Linear            weight (out, in)
    transformers Conv1D  weight (in, out)   GPT-2's layers; PEFT calls this fan_in_fan_out
    linear4bit.Linear4bit  4-bit codes of (out, in), dequantized on the fly (registered by linear4bit.py)
    nn.Embedding         weight (in, out) = (num_embeddings, embedding_dim): h = W^T onehot(id),
                         not a linear layer (`is_linear` is False: never quantized, no `linear_features`)

Every path that touches a base weight (LoRA's merge, DoRA's, PiSSA's residual, serving,
conversions to PEFT) reads and writes it here, as an (out, in) matrix, through the
`BaseLayerKind` registered for the layer's type. Writing rounds once to whatever the layer
stores (its dtype, or 4 bits). A new kind of base layer registers itself once, and every
variant handles it; `transpose` is the one place that knows the Conv1D layout, as in PEFT's
`tuners/lora/layer.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["Conv1D", "BaseLayerKind", "register_base_layer", "base_kind", "is_conv1d", "is_adaptable",
           "is_linear", "base_features", "linear_features", "fan_in_fan_out", "transpose", "base_weight",
           "write_base_weight", "add_to_base_weight", "stored_weight_numel", "replace_module"]


@dataclass(frozen=True)
class BaseLayerKind:
    """How one type of base layer holds its (out, in) weight.

    `features(layer)` -> (in, out); `read(layer)` -> the weight (out, in) in the layer's own
    dtype, a view where the layer stores it so; `write(layer, W)` stores an (out, in) matrix,
    rounded once; `fan_in_fan_out(layer)`: True if the layer was a Conv1D (PEFT's config
    flag); `weight_is_parameter`: False when the weight is not an `nn.Parameter` (4-bit codes
    are buffers), so parameter counts add it by hand; `linear`: False for a layer whose input
    is not a vector (an embedding's token ids), which is never quantized.
    """

    features: Callable[[nn.Module], tuple[int, int]]
    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None]
    fan_in_fan_out: Callable[[nn.Module], bool]
    weight_is_parameter: bool = True
    linear: bool = True


BASE_LAYERS: dict[type, BaseLayerKind] = {}


def register_base_layer(cls: type, kind: BaseLayerKind) -> None:
    """Teach the seam a new type of base layer (a subclass is matched by its closest registered type)."""
    BASE_LAYERS[cls] = kind


def base_kind(layer: nn.Module) -> BaseLayerKind | None:
    """The `BaseLayerKind` of `layer`'s type (the closest registered class), or None."""
    for cls in type(layer).__mro__:
        if cls in BASE_LAYERS:
            return BASE_LAYERS[cls]
    return None


def _kind(layer: nn.Module) -> BaseLayerKind:
    kind = base_kind(layer)
    if kind is None:
        kinds = ", ".join(cls.__name__ for cls in BASE_LAYERS)
        raise TypeError(f"LoRA here wraps linear layers and embeddings ({kinds}), got {type(layer).__name__}; "
                        "choose target_modules that name those (print(model) lists them)")
    return kind


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2's linear layer, weight stored as (in, out))."""
    return isinstance(layer, Conv1D)


def is_adaptable(layer: nn.Module) -> bool:
    """True for the layers LoRA wraps: those a `BaseLayerKind` is registered for."""
    return base_kind(layer) is not None


def is_linear(layer: nn.Module) -> bool:
    """True for the linear base layers (nn.Linear, Conv1D, Linear4bit): what quantization and serving take."""
    kind = base_kind(layer)
    return kind is not None and kind.linear


def base_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of any base layer, an embedding's (num_embeddings, embedding_dim) included; TypeError otherwise."""
    return _kind(layer).features(layer)


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear base layer; TypeError for anything else (an embedding too)."""
    if not is_linear(layer):
        kinds = ", ".join(cls.__name__ for cls, kind in BASE_LAYERS.items() if kind.linear)
        raise TypeError(f"LoRA here wraps linear layers ({kinds}) with this class, got {type(layer).__name__}; "
                        "choose target_modules that name linear layers (print(model) lists them)")
    return _kind(layer).features(layer)


def fan_in_fan_out(layer: nn.Module) -> bool:
    """PEFT's `fan_in_fan_out` for this layer: True for a Conv1D (or a 4-bit layer made from one)."""
    return _kind(layer).fan_in_fan_out(layer)


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A stored weight as (out, in), or an (out, in) matrix in the stored layout: W.T if fan_in_fan_out."""
    return weight.T if fan_in_fan_out else weight


def base_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight W0 as (out, in), in `dtype` (default: its own; a view for nn.Linear and Conv1D)."""
    W = _kind(layer).read(layer)
    return W if dtype is None else W.to(dtype)


def _checked(layer: nn.Module, W: torch.Tensor) -> BaseLayerKind:
    kind = _kind(layer)
    in_features, out_features = kind.features(layer)
    if tuple(W.shape) != (out_features, in_features):
        raise ValueError(f"a weight of shape {tuple(W.shape)} does not fit this {out_features}x{in_features} layer "
                         "(weights are written as (out, in))")
    return kind


@torch.no_grad()
def write_base_weight(layer: nn.Module, W: torch.Tensor) -> None:
    """Store `W` (out, in) as the layer's weight, in its layout and format, rounding once."""
    _checked(layer, W).write(layer, W)


@torch.no_grad()
def add_to_base_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """W0 += delta (out, in), added in fp32 and rounded once to what the layer stores (merging an update)."""
    _checked(layer, delta).write(layer, base_weight(layer, torch.float32) + delta.float())


def stored_weight_numel(layer: nn.Module) -> int:
    """Weight numbers the layer holds outside its parameters (4-bit codes): what parameter counts must add."""
    kind = base_kind(layer)
    if kind is None or kind.weight_is_parameter:
        return 0
    in_features, out_features = kind.features(layer)
    return in_features * out_features


def _write_parameter(layer: nn.Module, W: torch.Tensor, fan_in_fan_out: bool) -> None:
    weight = layer.weight
    weight.copy_(transpose(W, fan_in_fan_out).to(weight.device, weight.dtype))


register_base_layer(nn.Linear, BaseLayerKind(
    features=lambda layer: (layer.in_features, layer.out_features),
    read=lambda layer: layer.weight,
    write=lambda layer, W: _write_parameter(layer, W, False),
    fan_in_fan_out=lambda layer: False,
))
register_base_layer(Conv1D, BaseLayerKind(
    features=lambda layer: tuple(layer.weight.shape),  # Conv1D stores (in, out)
    read=lambda layer: layer.weight.T,
    write=lambda layer, W: _write_parameter(layer, W, True),
    fan_in_fan_out=lambda layer: True,
))

register_base_layer(nn.Embedding, BaseLayerKind(
    features=lambda layer: (layer.num_embeddings, layer.embedding_dim),  # stored (in, out), as Conv1D
    read=lambda layer: layer.weight.T,
    write=lambda layer, W: _write_parameter(layer, W, True),
    fan_in_fan_out=lambda layer: True,
    linear=False,
))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model.get_submodule(name)` is (its full dotted name)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
