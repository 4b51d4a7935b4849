"""LoRA from scratch, in plain PyTorch.

A frozen pretrained weight W0 (out x in) gets a trainable low-rank update:

    h = W0 x + (alpha / r) * B A x,     A: (r, in),  B: (out, r),  r << min(in, out)

B starts at zero, so at step 0 the adapted layer computes exactly what W0 did.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021),
arXiv:2106.09685; Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning
with LoRA" (rsLoRA, 2023), arXiv:2312.03732. Names follow the paper and Hugging Face
PEFT (`r`, `lora_alpha`, `lora_dropout`, `scaling`, `lora_A`, `lora_B`, `target_modules`,
`use_rslora`, `init_lora_weights`), so that what is learned here reads the same in PEFT.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import is_adaptable, is_conv1d, linear_features, replace_module, transpose
from .validate import check_fraction, check_int, check_positive

__all__ = [
    "LoRAConfig",
    "make_config",
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

# init_lora_weights, as in PEFT: True (A Kaiming-uniform, B = 0), False (B random too, so the layer
# does not start at W0: for demos only), or one of these named schemes.
NAMED_INITS = ("gaussian", "pissa")  # gaussian: A ~ N(0, 1/r^2), B = 0; pissa: from W0's SVD (pissa.py)


@dataclass(frozen=True)
class LoRAConfig:
    """What a LoRA adapter is: PEFT's `LoraConfig` names, validated here once.

    `r` is the rank of the update, `lora_alpha` its scale (the update is multiplied by
    `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`), `lora_dropout` the
    dropout on the adapter's input, `target_modules` which layers to adapt (a list of
    names or dotted suffixes, or one regex on the full name). `alpha` and `dropout` are
    accepted wherever settings are given as keywords (`make_config`).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self):
        check_int("r", self.r, minimum=1, hint="r is the rank of the update; r=8 is a common start")
        check_positive("lora_alpha", self.lora_alpha, hint="lora_alpha=2*r is a common start")
        check_fraction("lora_dropout", self.lora_dropout, upper_inclusive=False,
                       hint="use 0.0 for none; 0.05 is common")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or isinstance(init, str) and init in NAMED_INITS):
            raise ValueError(f"init_lora_weights must be True, False or one of {list(NAMED_INITS)}, got {init!r}")
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str):
            targets = tuple(targets)
            if not targets:
                raise ValueError("target_modules is empty; name at least one layer, e.g. ['c_attn'] for GPT-2 "
                                 "or ['q_proj', 'v_proj'] for LLaMA")
            if not all(isinstance(t, str) for t in targets):
                raise TypeError(f"target_modules must be layer names (strings), got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)

    @property
    def alpha(self) -> float:
        return self.lora_alpha

    @property
    def dropout(self) -> float:
        return self.lora_dropout

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)


_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def make_config(config: LoRAConfig | None = None, **settings) -> LoRAConfig:
    """`config` (default `LoRAConfig()`) with `settings` replacing its fields; `alpha=`/`dropout=` accepted."""
    if config is not None and not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    for short, name in _ALIASES.items():
        if short in settings:
            if name in settings:
                raise TypeError(f"give {short} or {name}, not both")
            settings[name] = settings.pop(short)
    unknown = sorted(set(settings) - {f.name for f in fields(LoRAConfig)})
    if unknown:
        raise TypeError(f"unknown LoRA setting(s) {unknown}; LoRAConfig takes "
                        f"{[f.name for f in fields(LoRAConfig)]} (alpha and dropout also work)")
    config = config if config is not None else LoRAConfig()
    return replace(config, **settings) if settings else config


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B A: alpha / r, or rsLoRA's alpha / sqrt(r), which keeps the update's size stable as r grows."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update scaling * B @ A.

    `LoRALinear(in_features, out_features, r=8, alpha=16)` builds its own frozen base
    layer (an `nn.Linear` initialised as PyTorch does); `LoRALinear.from_linear(layer, ...)`
    wraps an existing pretrained `nn.Linear` or transformers `Conv1D` without copying its
    weight. Settings come as a `LoRAConfig` or as keywords. The base layer sits at
    `base_layer`, as in PEFT.
    """

    supports_dora = False  # DoRA lives in dora.DoRALinear

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig | None = None, *,
                 bias: bool = True, base_layer: nn.Module | None = None, **settings):
        super().__init__()
        config = make_config(config, **settings)
        if config.r > min(in_features, out_features):
            raise ValueError(
                f"r={config.r} exceeds min(in_features, out_features) = {min(in_features, out_features)} for a "
                f"{out_features}x{in_features} weight; a rank-{config.r} update cannot exist there. "
                f"Use r <= {min(in_features, out_features)} (LoRA wants r much smaller)."
            )
        if config.use_dora and not self.supports_dora:
            raise NotImplementedError(f"use_dora=True (DoRA) is not available in {type(self).__name__}; "
                                      "use lora_course.dora.DoRALinear (add_lora(..., use_dora=True) picks it)")
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias)
        self.base_layer = base_layer.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = config.r, config.lora_alpha, config.use_rslora
        self.scaling = config.scaling
        self.fan_in_fan_out = is_conv1d(base_layer)  # GPT-2's Conv1D stores (in, out)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        shape_A, shape_B = self.lora_shapes()
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(shape_A, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(shape_B, device=device))  # (out, r)
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, layer: nn.Module, config: LoRAConfig | None = None, **settings) -> "LoRALinear":
        """Wrap a pretrained `nn.Linear` or `Conv1D`; its weight is shared, not copied."""
        if isinstance(layer, LoRALinear):
            raise TypeError("this layer already carries LoRA; merge_lora() it first or train the existing adapter")
        in_features, out_features = linear_features(layer)
        if cls is LoRALinear and make_config(config, **settings).use_dora:  # DoRA: the subclass in dora.py
            from .dora import DoRALinear
            cls = DoRALinear
        return cls(in_features, out_features, config, base_layer=layer, **settings)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of lora_A and lora_B: (r, in) and (out, r)."""
        return (self.r, self.in_features), (self.out_features, self.r)

    def reset_lora_parameters(self) -> None:
        """`init_lora_weights=True`: A as PEFT's default (nn.Linear's Kaiming-uniform, a=sqrt(5)), B = 0."""
        init = self.config.init_lora_weights
        if init == "pissa":  # A, B from W0's top-r singular triplets; the base keeps the residual
            from .pissa import pissa_init
            return pissa_init(self)
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:  # B random too: the layer no longer starts at W0
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    @property
    def W0(self) -> torch.Tensor:
        """The base weight as (out, in), whatever layout the base layer stores."""
        return transpose(self.base_layer.weight, self.fan_in_fan_out)

    def delta_weight(self) -> torch.Tensor:
        """The update dW = scaling * B @ A, shape (out, in), in fp32 or the factors' wider dtype."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling  # (out, r) @ (r, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        x = self.lora_dropout(x)
        h = F.linear(x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        if h.dtype != result.dtype:  # e.g. an fp16 base with fp32 factors: add in the base's dtype
            return result + (F.linear(h, self.lora_B) * self.scaling).to(result.dtype)
        # One fused op on the flattened tokens: result + scaling * h @ B^T.
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.T,
                          alpha=self.scaling)  # (N, out)
        return out.view(result.shape)

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor) -> None:
        """W0 += delta (out, in), computed in fp32 and rounded once to the base's dtype."""
        if getattr(self.base_layer, "is_quantized", False):  # a 4-bit base (quant.Linear4bit): dequantize, add, round
            self.base_layer.add_to_weight(transpose(delta.float(), self.fan_in_fan_out))
            return
        W = self.base_layer.weight
        W.copy_((W.float() + transpose(delta.float(), self.fan_in_fan_out)).to(W.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one matmul at inference, no extra cost."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; call unmerge() before merging again")
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to one rounding of the base's dtype)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; there is nothing to unmerge")
        self._add_to_base(-self.delta_weight())
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


def _no_match_error(model: nn.Module, target_modules) -> ValueError:
    names = [n for n, m in model.named_modules() if is_adaptable(m)]
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
    `inject_adapter`). Every match is checked and wrapped before anything changes.
    """
    if target_modules is None:
        raise ValueError("name target_modules, the layers to adapt: e.g. ['c_attn'] for GPT-2, "
                         "['q_proj', 'v_proj'] for LLaMA (print(model) lists the layer names)")
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
        if not is_adaptable(module):
            raise TypeError(
                f"target {name} is a {type(module).__name__}, not nn.Linear or Conv1D; "
                "LoRA here adapts linear layers: name those in target_modules"
            )
    flags = {p: p.requires_grad for _, m in matched for p in m.parameters()}
    try:  # wrap every match before changing the model, so bad settings leave it as it was
        wrapped = [(name, wrap(module)) for name, module in matched]
    except Exception:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    adapters = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                for n, p in m.named_parameters() if not n.startswith("base_layer.")}  # A, B (and DoRA's m)
    for p in model.parameters():  # freeze the base model; adapters added earlier keep their setting
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, layer in wrapped:
        replace_module(model, name, layer)
    return model


def _targeted_config(config, settings: dict, default_targets=None) -> LoRAConfig:
    """A LoRAConfig from add_lora's arguments: a config, or target_modules, plus keyword settings."""
    if config is not None and not isinstance(config, LoRAConfig):  # add_lora(model, ["c_attn"], r=8)
        if "target_modules" in settings:
            raise TypeError("target_modules given twice (as the second argument and as a keyword)")
        settings["target_modules"] = config
        config = None
    config = make_config(config, **settings)
    if config.target_modules is None and default_targets is not None:
        config = replace(config, target_modules=default_targets)
    return config


def add_lora(model: nn.Module, config: LoRAConfig | str | Iterable[str] | None = None, *,
             quantize_base: str | None = None, **settings) -> nn.Module:
    """Replace every matching Linear/Conv1D with a `LoRALinear`, in place; freeze the rest.

    Either `add_lora(model, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))` or
    the keyword form `add_lora(model, ["c_attn"], r=8, alpha=16)`. `target_modules`
    matches as in PEFT: a list of names matching a module's full name or its dotted
    suffix (`"c_attn"` matches `transformer.h.0.attn.c_attn`), or a string taken as a
    regex on the full name. Returns the model.

    `quantize_base="nf4"` is QLoRA: every linear layer of the frozen base (but the output
    head) is stored in 4-bit NF4 with double quantization (`lora_course.quant`), and the
    adapters train on top in full precision.
    """
    config = _targeted_config(config, settings)
    if quantize_base is None:
        return inject_adapters(model, config.target_modules, lambda layer: LoRALinear.from_linear(layer, config))
    from .quant import quantize_base_layer, quantize_model

    quantize = quantize_base_layer(quantize_base)  # checks the setting before anything changes
    if config.init_lora_weights == "pissa":  # its SVD would rewrite W0, which a 4-bit layer only stores rounded
        raise ValueError("init_lora_weights='pissa' with quantize_base is not built here: PiSSA needs the SVD of the "
                         "full-precision weight before the residual is quantized; use quantize_base=None")
    inject_adapters(model, config.target_modules, lambda layer: LoRALinear.from_linear(quantize(layer), config))
    return quantize_model(model, quant_type=quantize_base)  # the frozen layers LoRA does not wrap


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in the model, by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def update_norm(model: nn.Module) -> float:
    """||Delta W||_F of all the model's LoRA updates together: sqrt of the sum over layers of ||scaling B A||_F^2."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRALinear layers; did you call add_lora?")
    with torch.no_grad():
        return math.sqrt(sum(layer.delta_weight().float().pow(2).sum().item() for layer in layers.values()))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain layer back."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRALinear layers to merge; did you call add_lora?")
    for name, lora in layers.items():
        if not lora.merged:
            lora.merge()
        replace_module(model, name, lora.base_layer)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on the meta device (no memory needed)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for m in model.modules():  # a 4-bit base layer (quant.Linear4bit) keeps its frozen weight as codes, not a parameter
        if getattr(m, "is_quantized", False):
            total += m.in_features * m.out_features
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's summary line, character for character."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line, e.g. `trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622`."""
    print(trainable_parameters_line(model))
