"""LoRA from scratch, in plain PyTorch.

A frozen pretrained weight W0 (out x in) gets a trainable low-rank update:

    h = W0 x + (alpha / r) * B A x,     A: (r, in),  B: (out, r),  r << min(in, out)

B starts at zero, so at step 0 the adapted layer computes exactly what W0 did.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021),
arXiv:2106.09685; Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning
with LoRA" (rsLoRA, 2023), arXiv:2312.03732. Names follow the paper and Hugging Face
PEFT (`r`, `lora_alpha` -> `alpha`, `scaling`, `lora_A`, `lora_B`, `target_modules`),
so that what is learned here reads the same in PEFT.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRALinear",
    "lora_scaling",
    "matches_target",
    "add_lora",
    "inject_adapters",
    "merge_lora",
    "lora_layers",
    "count_parameters",
    "print_trainable_parameters",
    "trainable_parameters_line",
]


def _conv1d_class():
    """transformers' `Conv1D` (GPT-2's linear layer, weight stored in x out), if installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the from-scratch layer
        return None
    return Conv1D


def _is_conv1d(layer: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(layer, conv1d)


def _check_hyperparameters(in_features: int, out_features: int, r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int (the rank of the update), got {r!r}")
    if r < 1:
        raise ValueError(f"r must be at least 1, got r={r}; r=8 is a common start")
    if r > min(in_features, out_features):
        raise ValueError(
            f"r={r} exceeds min(in_features, out_features) = {min(in_features, out_features)} "
            f"for a {out_features}x{in_features} weight; a rank-{r} update cannot exist "
            f"there. Use r <= {min(in_features, out_features)} (LoRA wants r much smaller)."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got alpha={alpha!r}; alpha=2*r is a common start")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}; use 0.0 for none, 0.05 is common")


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B A: alpha / r, or rsLoRA's alpha / sqrt(r), which keeps the update's size stable as r grows."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update (alpha/r) * B @ A.

    `LoRALinear(in_features, out_features)` builds its own frozen base layer (an
    `nn.Linear` initialised as PyTorch does); `LoRALinear.from_linear(layer)` wraps an
    existing pretrained `nn.Linear` or transformers `Conv1D` without copying its weight.
    The base layer sits at `base_layer`, as in PEFT, so its weight keeps its values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        *,
        base_layer: nn.Module | None = None,
    ):
        super().__init__()
        _check_hyperparameters(in_features, out_features, r, alpha, dropout)
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        # GPT-2's Conv1D stores its weight as (in, out): PEFT calls that fan_in_fan_out.
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r))  # (out, r)
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        layer: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> "LoRALinear":
        """Wrap a pretrained `nn.Linear` or `Conv1D`; its weight is shared, not copied."""
        if isinstance(layer, LoRALinear):
            raise TypeError("this layer already carries LoRA; merge_lora() it first or train the existing adapter")
        if isinstance(layer, nn.Linear):
            in_features, out_features = layer.in_features, layer.out_features
        elif _is_conv1d(layer):
            in_features, out_features = layer.weight.shape  # Conv1D weight: (in, out)
        else:
            raise TypeError(
                f"LoRALinear wraps nn.Linear or transformers' Conv1D, got {type(layer).__name__}; "
                "choose target_modules that name linear layers (print(model) lists them)"
            )
        return cls(
            in_features, out_features, r=r, alpha=alpha, dropout=dropout,
            use_rslora=use_rslora, base_layer=layer,
        )

    def reset_lora_parameters(self) -> None:
        """A as PEFT's default (nn.Linear's Kaiming-uniform, a=sqrt(5)); B = 0, so B A = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def W0(self) -> torch.Tensor:
        """The base weight as (out, in), whatever layout the base layer stores."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self) -> torch.Tensor:
        """The update dW = scaling * B @ A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        return result + F.linear(h, self.lora_B) * self.scaling  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one matmul at inference, no extra cost."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; call unmerge() before merging again")
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight += delta.T if self.fan_in_fan_out else delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; there is nothing to unmerge")
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight -= delta.T if self.fan_in_fan_out else delta
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
        )


def matches_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex on the full name; a list matches the full name or a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _no_match_error(model: nn.Module, target_modules) -> ValueError:
    names = [n for n, m in model.named_modules() if _adaptable(m)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    close = sorted({c for t in wanted for c in difflib.get_close_matches(str(t), leaves, n=3, cutoff=0.4)})
    hint = f" Did you mean {close}?" if close else ""
    return ValueError(
        f"target_modules={target_modules!r} matched no module in {type(model).__name__}.{hint} "
        f"Linear layers it has: {leaves}"
    )


def inject_adapters(
    model: nn.Module,
    target_modules: str | Iterable[str],
    wrap: Callable[[nn.Module], nn.Module],
) -> nn.Module:
    """Replace every Linear/Conv1D that `target_modules` matches with `wrap(layer)`; freeze the rest.

    The model surgery shared by `add_lora` and `fused.add_fused_lora` (PEFT calls it
    `inject_adapter`). Every match is checked before anything changes.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty; name at least one layer, e.g. ['c_attn'] for GPT-2")
    matched = [(n, m) for n, m in model.named_modules() if n and matches_target(n, target_modules)]
    if not matched:
        raise _no_match_error(model, target_modules)
    for name, module in matched:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already carries LoRA; call merge_lora(model) before adding another")
        if not _adaptable(module):
            raise TypeError(
                f"target {name} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                "LoRA here adapts linear layers: name those in target_modules"
            )
    flags = {p: p.requires_grad for _, m in matched for p in m.parameters()}
    try:  # wrap every match before changing the model, so bad r/alpha leave it as it was
        wrapped = [(name, wrap(module).to(module.weight.device)) for name, module in matched]
    except Exception:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    adapters = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():  # freeze the base model; adapters added earlier keep their setting
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, layer in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model


def add_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Replace every matching Linear/Conv1D with a `LoRALinear`, in place; freeze the rest.

    `target_modules` matches as in PEFT: a list of names matching a module's full name or
    its dotted suffix (`"c_attn"` matches `transformer.h.0.attn.c_attn`), or a string
    taken as a regex on the full name. Returns the model.
    """
    return inject_adapters(
        model, target_modules,
        lambda layer: LoRALinear.from_linear(layer, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora),
    )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in the model, by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain layer back."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRALinear layers to merge; did you call add_lora?")
    for name, lora in layers.items():
        if not lora.merged:
            lora.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lora.base_layer)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on the meta device (no memory needed)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's summary line, character for character."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line, e.g. `trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622`."""
    print(trainable_parameters_line(model))
