"""What a LoRA adapter is: its settings (`LoRAConfig`, PEFT's names, validated once) and the
registries through which variants attach to the core.

    scaling = lora_alpha / r     (or lora_alpha / sqrt(r) with use_rslora, Kalajdzievski 2023)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

from torch import nn

from .validate import check_fraction, check_int, check_positive

__all__ = ["LoRAConfig", "make_config", "targeted_config", "lora_scaling", "CONFIG_NAMES", "LAYER_VARIANTS",
           "INIT_SCHEMES", "BASE_FORMATS", "LAYER_CLASSES", "MODEL_STEPS", "register_layer_variant",
           "register_init_scheme", "register_base_format", "register_layer_class", "register_model_step", "registered"]


# ----------------------------------------------------------------------------- variants
# Variants attach to the core from their own modules, as PEFT's LoraVariant does, so this file
# imports none of them and adding a variant is adding a file:
#   LAYER_VARIANTS  a LoRAConfig flag -> the LoRALinear subclass it needs   ("use_dora": dora.DoRALinear)
#   INIT_SCHEMES    an init_lora_weights name -> fn(layer) filling A and B, maybe rewriting W0
#                   through the base-weight seam                          ("pissa": pissa.pissa_init)
#   BASE_FORMATS    a quantize_base name -> how the frozen base is stored  ("nf4", "int4": linear4bit.py)
#   LAYER_CLASSES   a base layer type -> the LoRA layer class that wraps it, where it is not LoRALinear
#                   (nn.Embedding: embedding.LoRAEmbedding)
#   MODEL_STEPS     fn(model, config, wrapped) -> wrapped, run by add_lora after wrapping the targets and
#                   before changing the model: tied weights, modules_to_save (embedding.py)
# init_lora_weights itself, as in PEFT: True (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r^2),
# B = 0), False (B random too, so the layer does not start at W0: for demos only), or a registered scheme.
LAYER_VARIANTS: dict[str, type] = {}
INIT_SCHEMES: dict[str, Callable[[nn.Module], None]] = {}
BASE_FORMATS: dict[str, object] = {}
LAYER_CLASSES: dict[type, type] = {}
MODEL_STEPS: list[Callable] = []


def register_layer_variant(flag: str, cls: type) -> None:
    """`LoRALinear.from_linear` builds `cls` when the config's boolean field `flag` is set."""
    LAYER_VARIANTS[flag] = cls


def register_init_scheme(name: str, init: Callable[[nn.Module], None]) -> None:
    """`init_lora_weights=name` calls `init(layer)` to fill the layer's factors."""
    INIT_SCHEMES[name] = init


def register_base_format(name: str, base_format) -> None:
    """`add_lora(..., quantize_base=name)` stores the frozen base with `base_format`: an object with
    `layer(module) -> base layer` and `replacements(model, skip) -> [(name, base layer)]` (checked, not applied)."""
    BASE_FORMATS[name] = base_format


def register_layer_class(base_type: type, cls: type) -> None:
    """`add_lora` wraps a layer of `base_type` (or a subclass) with `cls` instead of `LoRALinear`."""
    LAYER_CLASSES[base_type] = cls


def register_model_step(step: Callable) -> None:
    """`add_lora` calls `step(model, config, wrapped) -> wrapped` on the [(name, new module)] it is about to put in."""
    if step not in MODEL_STEPS:
        MODEL_STEPS.append(step)


def registered(table: dict, name, what: str, hint: str):
    if name not in table:
        raise ValueError(f"{what}={name!r} is not available; choose one of {sorted(table)} ({hint})")
    return table[name]


@dataclass(frozen=True)
class LoRAConfig:
    """What a LoRA adapter is: PEFT's `LoraConfig` names, validated here once.

    `r` is the rank of the update, `lora_alpha` its scale (the update is multiplied by
    `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`), `lora_dropout` the
    dropout on the adapter's input, `target_modules` which layers to adapt (a list of
    names or dotted suffixes, or one regex on the full name). `alpha` and `dropout` are
    accepted wherever settings are given as keywords (`make_config`).

    `modules_to_save`: modules (names a full name ends with, PEFT's rule) trained and saved
    in full: a trainable copy runs, the original stays frozen. `ensure_weight_tying`: when a
    targeted module shares its weight with another (GPT-2's `lm_head` is `transformer.wte`'s
    weight), True keeps the tie: one adapter (or one trained copy) on the embedding, which the
    tied head uses too; False adapts only the named module, the other keeps W0. PEFT's default
    is False (and PEFT ties only modules named `embed_tokens`/`lm_head`); ours is True.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: tuple[str, ...] | None = None
    ensure_weight_tying: bool = True

    def __post_init__(self):
        check_int("r", self.r, minimum=1, hint="r is the rank of the update; r=8 is a common start")
        check_positive("lora_alpha", self.lora_alpha, hint="lora_alpha=2*r is a common start")
        check_fraction("lora_dropout", self.lora_dropout, upper_inclusive=False,
                       hint="use 0.0 for none; 0.05 is common")
        for name in ("use_rslora", "use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        init = self.init_lora_weights
        named = ["gaussian", *INIT_SCHEMES]
        if not (isinstance(init, bool) or isinstance(init, str) and init in named):
            raise ValueError(f"init_lora_weights must be True, False or one of {named}, got {init!r}")
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str):
            targets = tuple(targets)
            if not targets:
                raise ValueError("target_modules is empty; name at least one layer, e.g. ['c_attn'] for GPT-2 "
                                 "or ['q_proj', 'v_proj'] for LLaMA")
            if not all(isinstance(t, str) for t in targets):
                raise TypeError(f"target_modules must be layer names (strings), got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)
        saved = self.modules_to_save
        if saved is not None:
            saved = (saved,) if isinstance(saved, str) else tuple(saved)
            if not saved or not all(isinstance(n, str) and n for n in saved):
                raise TypeError(f"modules_to_save must be module names, e.g. ['wte'], or None; "
                                f"got {self.modules_to_save!r}")
            object.__setattr__(self, "modules_to_save", saved)

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


def targeted_config(config, settings: dict, default_targets=None) -> LoRAConfig:
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


CONFIG_NAMES = {f.name for f in fields(LoRAConfig)} | set(_ALIASES)
