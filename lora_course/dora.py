"""DoRA: weight-decomposed low-rank adaptation, from scratch.

DoRA (Liu et al., 2024, arXiv:2402.09353) writes each output row of a weight as a length
times a direction, and lets LoRA move only the direction while a trainable vector m sets
the lengths:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row       m: (out,), one length per output

m starts at ||W0||_row, so at step 0 (B = 0) W' = W0. PEFT (and the paper, section 4.3)
treats the norm as a constant in the backward pass: the gradient flows into m, A and B
but not through the normalisation, which saves memory and changes little. The forward
follows PEFT's `DoraLinearLayer`, on top of the base layer's output:

    h = base(x) + (m / n - 1) * (W0 x) + (m / n) * s B A x,     n = ||W0 + s B A||_row (detached)

so that a bias is added once and not rescaled. PEFT calls the norm "column-wise": it is
taken over the input dimension of the (out, in) weight, giving one number per output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import transpose
from .lora import LoRAConfig, LoRALinear, make_config

__all__ = ["DoRALinear", "dora_weight_norm", "dora_layers"]


def dora_weight_norm(W0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta|| over the input dimension: one norm per output row.  W0, delta: (out, in) -> (out,)"""
    W = W0 + delta.to(W0.dtype)
    return torch.linalg.norm(W, dim=1).to(W.dtype)


class DoRALinear(LoRALinear):
    """A `LoRALinear` with DoRA: a trainable magnitude `lora_magnitude_vector` (out,) on the
    normalised direction W0 + scaling * B A. Built by `add_lora(model, ..., use_dora=True)`,
    or `DoRALinear.from_linear(layer, r=..., alpha=...)` for an `nn.Linear` or `Conv1D`."""

    supports_dora = True

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig | None = None, *,
                 bias: bool = True, base_layer: nn.Module | None = None, **settings):
        config = make_config(config, **settings)
        if not config.use_dora:
            config = make_config(config, use_dora=True)
        super().__init__(in_features, out_features, config, bias=bias, base_layer=base_layer)
        # m = ||W0 + s B A||_row: ||W0||_row with the default init (B = 0); PiSSA's A, B included as PEFT does.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (out,)
        self._merged_norm: torch.Tensor | None = None  # the norm used at merge time, needed to unmerge

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ||W0 + scaling * B A||_row, shape (out,), outside the autograd graph (PEFT detaches it)."""
        W0 = self.W0
        return dora_weight_norm(W0, self.delta_weight().to(W0.dtype))

    def dora_scale(self) -> torch.Tensor:
        """m / n, shape (out,): how much each output row is stretched. Gradient flows into m only."""
        return self.lora_magnitude_vector / self.weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base_layer(x)  # (..., out) = W0 x + b
        if self.merged:
            return result
        return result + self.dora_delta(x, result)

    def dora_delta(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output `result` (..., out) for input `x` (..., in)."""
        scale = self.dora_scale().to(result.dtype)  # (out,)
        dropped = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias  # W0 x, reusing the base output
        else:  # dropout changes x, so W0 x is recomputed on the dropped input, as PEFT does
            base = F.linear(dropped, self.W0)
        lora = F.linear(F.linear(dropped.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling  # (..., out)
        return (scale - 1) * base + scale * lora.to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = (m / n) * (W0 + scaling * B A), shape (out, in): the weight one plain layer would hold."""
        W0 = self.W0.float()
        delta = self.delta_weight().float()
        return (self.lora_magnitude_vector.float() / dora_weight_norm(W0, delta))[:, None] * (W0 + delta)

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the base weight by W' (one matmul at inference); the norm is kept to unmerge."""
        if self.merged:
            raise RuntimeError("this DoRALinear is already merged; call unmerge() before merging again")
        W0 = self.W0.float()
        delta = self.delta_weight().float()
        norm = dora_weight_norm(W0, delta)
        self._set_base(((self.lora_magnitude_vector.float() / norm)[:, None] * (W0 + delta)))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Recover W0 = W' / (m / n) - scaling * B A with the norm saved at merge (W' alone cannot give it)."""
        if not self.merged:
            raise RuntimeError("this DoRALinear is not merged; there is nothing to unmerge")
        scale = self.lora_magnitude_vector.float() / self._merged_norm  # (out,)
        self._set_base(self.W0.float() / scale[:, None] - self.delta_weight().float())
        self._merged_norm = None
        self.merged = False

    @torch.no_grad()
    def _set_base(self, W: torch.Tensor) -> None:
        """Write an (out, in) fp32 matrix into the base weight, in its layout and dtype."""
        weight = self.base_layer.weight
        weight.copy_(transpose(W, self.fan_in_fan_out).to(weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", use_dora=True"


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """Every `DoRALinear` in the model, by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
