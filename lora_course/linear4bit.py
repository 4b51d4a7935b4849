"""Linear layers whose frozen weight is stored in 4 bits (the format is `quant`'s), for QLoRA.

`Linear4bit` keeps a `Weight4bit` as buffers and dequantizes it in each pass, forward and
backward (`Linear4bitFunction`, as bitsandbytes' `MatMul4Bit`), so a 4-bit base costs 4 bits a
weight while LoRA trains on top. It registers with the base-weight seam (`lora_course.layers`),
so LoRA, DoRA, PiSSA and serving read and merge into it like any base layer; `QuantizedBase`
registers the `quantize_base` formats ("nf4", "int4") that `add_lora` accepts. `quantize_model`
stores a whole model's linear layers in 4 bits (the output head kept in 16, as in QLoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import register_base_format
from .layers import BaseLayerKind, base_weight, fan_in_fan_out, is_linear, register_base_layer, replace_module
from .quant import QUANT_TYPES, Weight4bit, check_block_size, quantize_4bit, weight4bit_nbytes

__all__ = ["Linear4bitFunction", "Linear4bit", "QuantizedBase", "quantize_model", "quantized_layers", "weight_bytes",
           "base_bytes_by_format"]


class Linear4bitFunction(torch.autograd.Function):
    """y = x W^T + b with W held as 4-bit codes, dequantized in forward and again in backward.

    A plain `F.linear(x, W.dequantize())` would make autograd keep every layer's dequantized
    W (32 or 16 bits a weight) alive until the backward pass, so a 4-bit base would save
    nothing while it trains. Here the only thing kept between the passes is the `Weight4bit`
    itself (4 bits a weight, shared with the layer): backward dequantizes W once more to get
    dL/dx = dL/dy W. The frozen W needs no gradient, so x is not kept either. This is what
    bitsandbytes' `MatMul4Bit` does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: Weight4bit, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.quantized = quantized  # the codes, not the dequantized weight
        ctx.bias_shape = None if bias is None else bias.shape
        W = quantized.dequantize(x.dtype)  # (out, in), freed when forward returns
        return F.linear(x, W, None if bias is None else bias.to(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out: (..., out)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.quantized.dequantize(grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight (out, in) is stored as a `Weight4bit`.

    Forward runs `Linear4bitFunction`: the weight is dequantized in the input's dtype (the
    compute dtype) for each pass and never kept, so training LoRA on top costs 4 bits a
    base weight. The codes and constants are buffers (they move with `.to()` and appear in
    `state_dict()`), not parameters. The layer is read and written only through the
    base-weight seam (`lora_course.layers`, registered below): writing re-quantizes, so a
    merge rounds once. A GPT-2 `Conv1D` is stored as (out, in) too; `fan_in_fan_out`
    remembers the original layout (for PEFT's adapter config).
    """

    def __init__(self, quantized: Weight4bit, bias: torch.Tensor | None = None, fan_in_fan_out: bool = False):
        super().__init__()
        if not isinstance(quantized, Weight4bit) or len(quantized.shape) != 2:
            raise TypeError("Linear4bit holds a 2-D Weight4bit (out, in); build it with Linear4bit.from_linear(layer)")
        self.out_features, self.in_features = quantized.shape
        self.block_size, self.quant_type = quantized.block_size, quantized.quant_type
        self.weight_dtype = quantized.dtype
        self.fan_in_fan_out = fan_in_fan_out
        self._store(quantized)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: nn.Module, block_size: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True) -> "Linear4bit":
        """Quantize an `nn.Linear` or `Conv1D` (its weight as (out, in)); the original layer is left as it was."""
        if isinstance(layer, Linear4bit):
            raise TypeError("this layer is already stored in 4 bits")
        if not is_linear(layer):  # an embedding stays in 16 bits, as in QLoRA
            raise TypeError(f"only linear layers are stored in 4 bits, not a {type(layer).__name__}")
        W = base_weight(layer).detach()  # (out, in); TypeError for anything but a base layer
        quantized = quantize_4bit(W, block_size, quant_type, double_quant)
        return cls(quantized, layer.bias, fan_in_fan_out=fan_in_fan_out(layer))

    def _store(self, quantized: Weight4bit) -> None:
        for name in ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset"):
            self._buffers.pop(name, None)
        for name, tensor in quantized.tensors().items():
            self.register_buffer(name, tensor)

    @property
    def quantized(self) -> Weight4bit:
        """The stored weight as a `Weight4bit` (views of this layer's buffers)."""
        b = self._buffers
        return Weight4bit(b["packed"], b.get("absmax"), (self.out_features, self.in_features), self.weight_dtype,
                          self.block_size, self.quant_type, b.get("absmax_codes"), b.get("absmax_scale"),
                          b.get("absmax_offset"))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), in the original dtype: a new tensor to read (write through the seam)."""
        return self.quantized.dequantize()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (codes and constants; the bias is not included)."""
        return self.quantized.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        return Linear4bitFunction.apply(x, self.quantized, self.bias)  # (..., out)

    @torch.no_grad()
    def store_weight(self, W: torch.Tensor) -> None:
        """Quantize and keep W (out, in) with this layer's settings: what a merge writes."""
        old = self.quantized
        W = W.to(old.packed.device, old.dtype)
        self._store(quantize_4bit(W, old.block_size, old.quant_type, old.double_quant))

    def extra_repr(self) -> str:
        dq = ", double_quant" if "absmax_codes" in self._buffers else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, block_size={self.block_size}{dq}")


register_base_layer(Linear4bit, BaseLayerKind(
    features=lambda layer: (layer.in_features, layer.out_features),
    read=lambda layer: layer.quantized.dequantize(),
    write=lambda layer, W: layer.store_weight(W),
    fan_in_fan_out=lambda layer: layer.fan_in_fan_out,
    weight_is_parameter=False,
))


def _skip_head(model: nn.Module):
    """The output head (tied to the embeddings in GPT-2): QLoRA, like bitsandbytes, keeps it in 16 bits."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


@dataclass(frozen=True)
class QuantizedBase:
    """How `add_lora(..., quantize_base=quant_type)` stores a frozen base: `layer` for one layer,
    `replacements` for the rest of a model (checked and built, not yet put in)."""

    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quantize_base must be one of {list(QUANT_TYPES)} or None, got {self.quant_type!r} "
                             "(\"nf4\" is QLoRA's)")
        check_block_size(self.block_size)

    def layer(self, layer: nn.Module) -> Linear4bit:
        return Linear4bit.from_linear(layer, self.block_size, self.quant_type, self.double_quant)

    def replacements(self, model: nn.Module, skip=()) -> list[tuple[str, Linear4bit]]:
        """(name, 4-bit layer) for every base layer of `model` but the output head, 4-bit ones and `skip` (names)."""
        head = _skip_head(model)
        targets = [(n, m) for n, m in model.named_modules()
                   if n and is_linear(m) and not isinstance(m, Linear4bit) and m is not head and n not in skip]
        lora_parents = {n.rsplit(".", 1)[0] for n, _ in targets if n.endswith(".base_layer")}
        if lora_parents:
            raise ValueError(f"{sorted(lora_parents)[0]} already carries LoRA; quantize the base model first, "
                             "then add LoRA (or use add_lora(..., quantize_base='nf4'))")
        return [(n, self.layer(m)) for n, m in targets]


for _quant_type in QUANT_TYPES:
    register_base_format(_quant_type, QuantizedBase(_quant_type))


def quantize_model(model: nn.Module, block_size: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Store every `nn.Linear`/`Conv1D` of `model` in 4 bits, in place; returns the model.

    The output head (`lm_head`) and the layers named in `skip` (full names) keep their
    precision, as in QLoRA. Quantize before adding LoRA (or use `add_lora(...,
    quantize_base="nf4")`, which does both). Every layer is quantized before any is
    replaced, so a bad setting changes nothing.
    """
    for name, layer in QuantizedBase(quant_type, block_size, double_quant).replacements(model, skip):
        replace_module(model, name, layer)
    return model


def quantized_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """Every `Linear4bit` in the model, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored weights: every parameter once (tied ones once) plus the 4-bit codes and constants."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(m.nbytes for m in quantized_layers(model).values())


def base_bytes_by_format(model: nn.Module, block_size: int = 64) -> dict[str, int]:
    """Bytes of a model's weights stored as fp32, fp16, NF4 and NF4 with double quantization (arithmetic only).

    Linear layers (but the output head) take the 4-bit formats; embeddings, norms, biases
    and the head stay in 16 bits, as in QLoRA. Works on the meta device (no weights needed).
    """
    head = _skip_head(model)
    n_total = sum(p.numel() for p in model.parameters())
    linear = [m.weight.numel() for n, m in model.named_modules() if n and is_linear(m) and m is not head]
    n_rest = n_total - sum(linear)
    out = {"fp32": 4 * n_total, "fp16": 2 * n_total}
    for label, dq in (("nf4", False), ("nf4 + double quant", True)):
        out[label] = sum(weight4bit_nbytes(n, block_size, dq) for n in linear) + 2 * n_rest
    return out
