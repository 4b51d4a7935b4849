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

from .config import LoRAConfig, make_config, register_layer_variant
from .layers import base_weight, write_base_weight
from .lora import LoRALinear

__all__ = ["DoRALinear", "dora_weight_norm", "dora_delta", "dora_merge", "dora_unmerge", "dora_layers"]


def dora_weight_norm(W0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta|| over the input dimension: one norm per output row.  W0, delta: (out, in) -> (out,)"""
    W = W0 + delta.to(W0.dtype)
    return torch.linalg.norm(W, dim=1).to(W.dtype)


def dora_delta(x: torch.Tensor, result: torch.Tensor, *, W0: torch.Tensor, bias: torch.Tensor | None,
               lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
               dropped: torch.Tensor | None = None) -> torch.Tensor:
    """What DoRA adds to a base output `result` (..., out) = W0 x + b for input x (..., in).

    (m / n - 1) W0 x + (m / n) s B A x with n = ||W0 + s B A||_row detached. `dropped`: the
    input after LoRA dropout, if dropout is active (then W0 x is recomputed on it, as PEFT does).
    """
    with torch.no_grad():
        norm = dora_weight_norm(W0, (lora_B.to(W0.dtype) @ lora_A.to(W0.dtype)) * scaling)  # (out,)
    scale = (magnitude / norm).to(result.dtype)  # (out,): gradient flows into m only
    if dropped is None:
        dropped, base = x, (result if bias is None else result - bias)  # W0 x, reusing the base output
    else:
        base = F.linear(dropped, W0)
    lora = F.linear(F.linear(dropped.to(lora_A.dtype), lora_A), lora_B) * scaling  # (..., r) -> (..., out)
    return (scale - 1) * base + scale * lora.to(result.dtype)


@torch.no_grad()
def dora_merge(W0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', n): the merged weight W' = (m / n) (W0 + delta), all (out, in) in fp32, and the norm n (out,) to unmerge."""
    W0, delta = W0.float(), delta.float()
    norm = dora_weight_norm(W0, delta)
    return (magnitude.float() / norm)[:, None] * (W0 + delta), norm


@torch.no_grad()
def dora_unmerge(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """W0 = W' / (m / n) - delta, with the n saved at merge time (W' alone does not give it back)."""
    return W.float() / (magnitude.float() / norm)[:, None] - delta.float()


class DoRALinear(LoRALinear):
    """A `LoRALinear` with DoRA: a trainable magnitude `lora_magnitude_vector` (out,) on the
    normalised direction W0 + scaling * B A. Built by `add_lora(model, ..., use_dora=True)`,
    or `DoRALinear.from_linear(layer, r=..., alpha=...)` for an `nn.Linear` or `Conv1D`."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig | None = None, *,
                 bias: bool = True, base_layer: nn.Module | None = None, base_format=None, **settings):
        config = make_config(config, **settings)
        if not config.use_dora:
            config = make_config(config, use_dora=True)
        super().__init__(in_features, out_features, config, bias=bias, base_layer=base_layer, base_format=base_format)
        # m = ||W0 + s B A||_row: ||W0||_row with the default init (B = 0); PiSSA's A, B included as PEFT does.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (out,)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ||W0 + scaling * B A||_row, shape (out,), outside the autograd graph (PEFT detaches it)."""
        W0 = self.W0
        delta = self.delta_of({"lora_A": self.lora_A, "lora_B": self.lora_B}, self.scaling)  # before m exists too
        return dora_weight_norm(W0, delta.to(W0.dtype))

    def dora_scale(self) -> torch.Tensor:
        """m / n, shape (out,): how much each output row is stretched. Gradient flows into m only."""
        return self.lora_magnitude_vector / self.weight_norm()

    def tensors(self) -> dict[str, torch.Tensor]:
        """LoRA's A and B, and the magnitude m (out,) (PEFT's key for it has no `.weight`)."""
        return {**super().tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = (m / n) * (W0 + scaling * B A), shape (out, in): the weight one plain layer would hold."""
        return dora_merge(self.W0, self.delta_weight(), self.lora_magnitude_vector)[0]

    @classmethod
    def output_of(cls, base_layer, x, result, tensors, scaling, dropout=None):
        """result + (m / n - 1) W0 x + (m / n) s B A x (see `dora_delta`); W0 x is recomputed on the dropped
        input only while dropout is active, as PEFT does."""
        active = dropout is not None and not isinstance(dropout, nn.Identity) and dropout.training
        return result + dora_delta(x, result, W0=base_weight(base_layer), bias=base_layer.bias,
                                   lora_A=tensors["lora_A"], lora_B=tensors["lora_B"],
                                   magnitude=tensors["lora_magnitude_vector"], scaling=scaling,
                                   dropped=dropout(x) if active else None)

    @classmethod
    def merge_into(cls, base_layer, tensors, scaling):
        """Replace the base weight by W' (one matmul at inference); returns the norm n, which unmerging needs."""
        merged, norm = dora_merge(base_weight(base_layer), cls.delta_of(tensors, scaling),
                                  tensors["lora_magnitude_vector"])
        write_base_weight(base_layer, merged)
        return norm

    @classmethod
    def unmerge_from(cls, base_layer, tensors, scaling, state) -> None:
        """Recover W0 = W' / (m / n) - scaling * B A with the norm n saved at merge (W' alone cannot give it)."""
        write_base_weight(base_layer, dora_unmerge(base_weight(base_layer), cls.delta_of(tensors, scaling),
                                                   tensors["lora_magnitude_vector"], state))

    def tensor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(r), "lora_magnitude_vector": (self.out_features,)}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", use_dora=True"


register_layer_variant("use_dora", DoRALinear)


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """Every `DoRALinear` in the model, by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
