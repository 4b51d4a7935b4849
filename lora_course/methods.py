"""A fine-tuning method as data: what to train, built onto a base model in one call.

`Method(label, targets=("c_attn",), r=8)` is LoRA of rank r (alpha = 2r unless given) on
the named modules; `weights=("q", "v")` puts it on chosen attention slices instead
(`fused.add_attention_lora`); `train_embedding=True` also trains the token embedding in full
beside it (PEFT's `modules_to_save`, tied to the output head as GPT-2 ties them) and
`embedding_r=32` adapts it with LoRA instead. `targets=None` is full fine-tuning, minus the
modules named in `frozen`. Notebook 06's comparison and the `finetune` command line build
their models from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .fused import add_attention_lora
from .lora import add_lora

__all__ = ["Method"]


@dataclass(frozen=True)
class Method:
    """One way to fine-tune (see the module docstring); `build(base)` returns the model to train."""

    label: str
    targets: tuple[str, ...] | None = ("c_attn",)
    r: int = 8
    alpha: float | None = None
    use_rslora: bool = False
    weights: tuple[str, ...] | None = None
    train_embedding: bool = False
    embedding_r: int | None = None
    frozen: tuple[str, ...] = ()

    def build(self, base: nn.Module, in_place: bool = False) -> nn.Module:
        """A copy of `base` (or `base` itself with `in_place`) with this method's trainable parts."""
        model = base if in_place else copy.deepcopy(base)
        if self.targets is None:
            model.requires_grad_(True)
            for name in self.frozen:  # e.g. transformer.wte: the tied head freezes with it
                model.get_submodule(name).requires_grad_(False)
            return model
        alpha = 2 * self.r if self.alpha is None else self.alpha
        if self.weights is not None:
            return add_attention_lora(model, self.weights, self.r, alpha, self.use_rslora)
        add_lora(model, list(self.targets), r=self.r, alpha=alpha, use_rslora=self.use_rslora,
                 modules_to_save=["wte"] if self.train_embedding else None)
        if self.embedding_r is not None:
            add_lora(model, ["wte"], r=self.embedding_r, alpha=2 * self.embedding_r)
        return model
