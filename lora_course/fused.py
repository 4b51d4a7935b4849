"""LoRA on chosen slices of a fused projection: q and v of GPT-2's `c_attn`, k untouched.

GPT-2 computes q, k and v with one layer, `c_attn` (d -> 3 d). LLaMA has separate
`q_proj`, `k_proj`, `v_proj`, and the LoRA paper adapts only Wq and Wv. The original
LoRA code (loralib's `MergedLinear`, `enable_lora=[True, False, True]`) gives each enabled
slice its own pair: slice i gets dW_i = (alpha / r) B_i A_i with A_i: (r, in) and
B_i: (out / n, r), and the disabled slices get nothing at all, so the update to k is
exactly zero (not merely small) by construction, and the parameter count equals that of
separate q_proj and v_proj adapters.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRAConfig, LoRALinear, add_lora, inject_adapters, targeted_config

__all__ = ["FusedLoRALinear", "add_fused_lora", "add_attention_lora"]


class FusedLoRALinear(LoRALinear):
    """A `LoRALinear` whose update touches only the enabled equal slices of the output.

    `enable_lora=(True, False, True)` on GPT-2's `c_attn` adapts q and v, not k.
    Parameters, as in loralib: `lora_A` stacks the enabled slices' A_i, shape (k r, in);
    `lora_B` stacks their B_i, shape (k out/n, r), where k = number of enabled slices.
    """

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig | None = None, *,
                 enable_lora: Sequence[bool] = (True, False, True), bias: bool = True,
                 base_layer: nn.Module | None = None, **settings):
        enable_lora = tuple(bool(e) for e in enable_lora)
        if not enable_lora or not any(enable_lora):
            raise ValueError(f"enable_lora={enable_lora!r} enables no slice; e.g. (True, False, True) adapts q and v")
        if out_features % len(enable_lora):
            raise ValueError(
                f"out_features={out_features} does not split into {len(enable_lora)} equal slices; "
                "enable_lora needs one flag per equal slice (3 for q, k, v)"
            )
        self.enable_lora = enable_lora
        self.slice_size = out_features // len(enable_lora)
        super().__init__(in_features, out_features, config, bias=bias, base_layer=base_layer, **settings)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(k r, in) and (k out/n, r): the enabled slices' A_i and B_i, stacked."""
        k = sum(self.enable_lora)
        return (k * self.r, self.in_features), (k * self.slice_size, self.r)

    @property
    def enabled_slices(self) -> list[int]:
        return [i for i, e in enumerate(self.enable_lora) if e]

    def slice_pairs(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(slice index, A_i (r, in), B_i (out/n, r)) for every enabled slice."""
        A = self.lora_A.split(self.r)
        B = self.lora_B.split(self.slice_size)
        return list(zip(self.enabled_slices, A, B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        x = self.lora_dropout(x)
        h = F.linear(x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype), self.lora_A)  # (..., k r)
        parts = [result.new_zeros(*result.shape[:-1], self.slice_size) for _ in self.enable_lora]
        for j, (i, _, b) in enumerate(self.slice_pairs()):
            h_j = h[..., j * self.r:(j + 1) * self.r]  # (..., r)
            parts[i] = (F.linear(h_j, b) * self.scaling).to(result.dtype)  # (..., out/n)
        return result + torch.cat(parts, dim=-1)  # disabled slices add exact zeros

    # -- the exact PEFT twin: one LoRA of rank k r on the whole layer, A = [A_i; ...], B block-diagonal
    def peft_rank_alpha(self) -> tuple[int, float]:
        """Rank k r, and alpha scaled so that the scaling (alpha / r, or alpha / sqrt r) stays the same."""
        k = sum(self.enable_lora)
        return k * self.r, self.alpha * (k ** 0.5 if self.use_rslora else k)

    def tensors(self) -> dict[str, torch.Tensor]:
        """A (k r, in) as stored; B (out, k r) with B_i in slice i's rows and block j's columns, zeros elsewhere."""
        r, s = self.r, self.slice_size
        B = self.lora_A.new_zeros(self.out_features, self.lora_A.shape[0])  # (out, k r)
        for j, (i, _, b) in enumerate(self.slice_pairs()):
            B[i * s:(i + 1) * s, j * r:(j + 1) * r] = b
        return {"lora_A": self.lora_A, "lora_B": B}

    def from_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's single (out, k r) B must be our block structure: zero outside the enabled slices' blocks."""
        B, s, r = tensors["lora_B"], self.slice_size, self.r
        outside = torch.ones_like(B, dtype=torch.bool)
        blocks = []
        for j, i in enumerate(self.enabled_slices):
            outside[i * s:(i + 1) * s, j * r:(j + 1) * r] = False
            blocks.append(B[i * s:(i + 1) * s, j * r:(j + 1) * r])
        if (B[outside] != 0).any():
            raise ValueError(
                f"this adapter changes slices {self.enable_lora} disables (e.g. k), or mixes the slices' ranks; "
                "a fused q,v layer cannot hold it. Load it into a model without LoRA (plain add_lora on the whole "
                "layer)"
            )
        return {**tensors, "lora_B": torch.cat(blocks, dim=0)}  # (k out/n, r)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", enable_lora={list(self.enable_lora)}"


def add_fused_lora(
    model: nn.Module,
    config: LoRAConfig | str | Iterable[str] | None = None,
    enable_lora: Sequence[bool] = (True, False, True),
    **settings,
) -> nn.Module:
    """Like `add_lora`, but each target (default `c_attn`) gets a `FusedLoRALinear` adapting only the enabled slices."""
    config = targeted_config(config, settings, default_targets=("c_attn",))
    return inject_adapters(model, config.target_modules,
                           lambda layer: FusedLoRALinear.from_linear(layer, config, enable_lora=enable_lora))


def add_attention_lora(model: nn.Module, weights, r: int, alpha: float | None = None,
                       use_rslora: bool = False) -> nn.Module:
    """LoRA of rank r on chosen attention weights of a GPT-2: any of "q", "k", "v" (slices of `c_attn`, one fused
    layer) and "o" (`attn.c_proj`), as the LoRA paper's Table 5 chooses them; alpha = 2r unless given."""
    weights = tuple(weights)
    unknown = set(weights) - {"q", "k", "v", "o"}
    if unknown or not weights:
        raise ValueError(f"weights must be a non-empty subset of 'q', 'k', 'v', 'o'; got {weights!r}")
    config = LoRAConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, use_rslora=use_rslora)
    qkv = tuple(s in weights for s in "qkv")
    if any(qkv):
        add_fused_lora(model, replace(config, target_modules=["c_attn"]), enable_lora=qkv)
    if "o" in weights:  # W_o is the attention's c_proj (the MLP has a c_proj too)
        add_lora(model, replace(config, target_modules=["attn.c_proj"]))
    return model
