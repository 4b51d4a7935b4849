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
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import (
    BASE_FORMATS,
    CONFIG_NAMES,
    INIT_SCHEMES,
    LAYER_CLASSES,
    LAYER_VARIANTS,
    MODEL_STEPS,
    LoRAConfig,
    lora_scaling,
    make_config,
    registered,
    targeted_config,
)
from .layers import (
    add_to_base_weight,
    base_features,
    base_weight,
    fan_in_fan_out,
    is_adaptable,
    is_linear,
    linear_features,
    replace_module,
    stored_weight_numel,
)

__all__ = ["LoRAConfig",  # from config.py, where it lives, for `from lora_course.lora import LoRAConfig`
           "make_config", "targeted_config", "lora_scaling", "LoRALinear", "variant_class", "peft_suffix",
           "matches_target", "matched_modules", "add_lora", "inject_adapters", "merge_lora", "lora_layers",
           "update_norm", "count_parameters", "print_trainable_parameters", "trainable_parameters_line"]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update scaling * B @ A.

    `LoRALinear(in_features, out_features, r=8, alpha=16)` builds its own frozen base
    layer (an `nn.Linear` initialised as PyTorch does); `LoRALinear.from_linear(layer, ...)`
    wraps an existing pretrained `nn.Linear`, transformers `Conv1D` or 4-bit `Linear4bit`
    without copying its weight. Settings come as a `LoRAConfig` or as keywords. The base
    layer sits at `base_layer`, as in PEFT, and is read and written only through the
    base-weight seam (`lora_course.layers`), so every kind of base merges the same way.
    `base_format` (a function layer -> layer, e.g. 4-bit storage) is applied to the base
    after the factors are initialised: PiSSA decomposes the full-precision weight first.
    `untied_from`: modules that share the base weight but not the update (ensure_weight_tying=False);
    merging then writes W0 + dW into a copy, so they keep W0.
    """

    factor_names = ("lora_A", "lora_B")  # a subclass may store its factors under PEFT's other names

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig | None = None, *,
                 bias: bool = True, base_layer: nn.Module | None = None,
                 base_format: Callable[[nn.Module], nn.Module] | None = None, **settings):
        super().__init__()
        config = make_config(config, **settings)
        if base_layer is not None and not self.accepts(base_layer):
            raise TypeError(f"{type(self).__name__} does not wrap a {type(base_layer).__name__}; LoRA here wraps "
                            "linear layers (LoRALinear.from_linear picks the class for an embedding)")
        if config.r > min(in_features, out_features):
            raise ValueError(
                f"r={config.r} exceeds min(in_features, out_features) = {min(in_features, out_features)} for a "
                f"{out_features}x{in_features} weight; a rank-{config.r} update cannot exist there. "
                f"Use r <= {min(in_features, out_features)} (LoRA wants r much smaller)."
            )
        for flag in _set_flags(config):
            needed = LAYER_VARIANTS.get(flag)
            if needed is None or not isinstance(self, needed):
                where = f"use {needed.__module__}.{needed.__name__}" if needed else "its module is not imported"
                raise NotImplementedError(f"{flag}=True is not available in {type(self).__name__}; {where} "
                                          f"(add_lora(..., {flag}=True) picks it)")
        if base_layer is None:
            base_layer = nn.Linear(in_features, out_features, bias=bias)
        self.base_layer = base_layer.requires_grad_(False)  # W0 (and its bias) stay frozen
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = config.r, config.lora_alpha, config.use_rslora
        self.scaling = config.scaling
        self.fan_in_fan_out = fan_in_fan_out(base_layer)  # GPT-2's Conv1D stores (in, out)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        shape_A, shape_B = self.lora_shapes()
        device = _device_of(base_layer)
        setattr(self, self.factor_names[0], nn.Parameter(torch.empty(shape_A, device=device)))  # A: (r, in)
        setattr(self, self.factor_names[1], nn.Parameter(torch.empty(shape_B, device=device)))  # B: (out, r)
        self.merged = False
        self._merge_state = None  # what a variant's unmerge needs (DoRA: the norm at merge time)
        self.untied_from, self._shared_weight = (), None  # see the class docstring
        self.reset_lora_parameters()
        if base_format is not None:  # e.g. 4-bit storage, of W0 or of PiSSA's residual
            self.base_layer = base_format(self.base_layer).requires_grad_(False)
            self.fan_in_fan_out = fan_in_fan_out(self.base_layer)

    @classmethod
    def from_linear(cls, layer: nn.Module, config: LoRAConfig | None = None, *,
                    base_format: Callable[[nn.Module], nn.Module] | None = None, **settings) -> "LoRALinear":
        """Wrap a pretrained base layer; its weight is shared, not copied. A variant flag (use_dora) picks its class."""
        if isinstance(layer, LoRALinear):
            raise TypeError("this layer already carries LoRA; merge_lora() it first or train the existing adapter")
        in_features, out_features = base_features(layer)  # TypeError for a layer LoRA does not wrap
        extra = {k: settings.pop(k) for k in list(settings) if k not in CONFIG_NAMES}  # a subclass's own arguments
        config = make_config(config, **settings)
        if cls is LoRALinear:
            cls = variant_class(config, layer)
        return cls(in_features, out_features, config, base_layer=layer, base_format=base_format, **extra)

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        """True for the base layers this class wraps: the linear ones."""
        return is_linear(layer)

    def lora_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of lora_A and lora_B: (r, in) and (out, r)."""
        return (self.r, self.in_features), (self.out_features, self.r)

    def reset_lora_parameters(self) -> None:
        """`init_lora_weights=True`: A as PEFT's default (nn.Linear's Kaiming-uniform, a=sqrt(5)), B = 0."""
        init = self.config.init_lora_weights
        if isinstance(init, str) and init in INIT_SCHEMES:  # e.g. PiSSA: A, B from W0's SVD, the base keeps the rest
            return INIT_SCHEMES[init](self)
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
        """The base weight as (out, in), whatever layout or format the base layer stores."""
        return base_weight(self.base_layer)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors in PEFT's layout, by name: lora_A (r, in), lora_B (out, r); a variant adds its own."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        """The update dW = scaling * B @ A, shape (out, in), in fp32 or the factors' wider dtype."""
        return self.delta_of(self.tensors(), self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        return self.output_of(self.base_layer, x, result, self.tensors(), self.scaling, self.lora_dropout)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one matmul at inference, no extra cost."""
        if self.merged:
            raise RuntimeError(f"this {type(self).__name__} is already merged; call unmerge() before merging again")
        if self.untied_from:  # W0 is also theirs and they keep it: merge into a copy
            self._shared_weight = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(self._shared_weight.detach().clone(), requires_grad=False)
        self._merge_state = self.merge_into(self.base_layer, self.tensors(), self.scaling)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to one rounding of what the base stores)."""
        if not self.merged:
            raise RuntimeError(f"this {type(self).__name__} is not merged; there is nothing to unmerge")
        if self._shared_weight is not None:  # put the shared W0 back, exactly
            self.base_layer.weight, self._shared_weight = self._shared_weight, None
        else:
            self.unmerge_from(self.base_layer, self.tensors(), self.scaling, self._merge_state)
        self._merge_state, self.merged = None, False

    # -- the arithmetic of one adapter, on any base layer and tensors: the instance methods above and
    #    serving.MultiAdapterLinear (many adapters on one base) both use exactly these
    @classmethod
    def delta_of(cls, tensors: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
        """dW = scaling * B @ A, (out, r) @ (r, in) -> (out, in), in fp32 or the factors' wider dtype."""
        A, B = (tensors[name] for name in cls.factor_names)
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * scaling

    @classmethod
    def output_of(cls, base_layer: nn.Module, x: torch.Tensor, result: torch.Tensor, tensors: dict[str, torch.Tensor],
                  scaling: float, dropout: nn.Module | None = None) -> torch.Tensor:
        """The adapted output for input x (..., in), given the base's output `result` = base_layer(x) (..., out):
        result + scaling * B A dropout(x)."""
        A, B = tensors["lora_A"], tensors["lora_B"]
        if dropout is not None:
            x = dropout(x)
        h = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A)  # (..., r)
        if h.dtype != result.dtype:  # e.g. an fp16 base with fp32 factors: add in the base's dtype
            return result + (F.linear(h, B) * scaling).to(result.dtype)
        # One fused op on the flattened tokens: result + scaling * h @ B^T.
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=scaling)
        return out.view(result.shape)  # (..., out)

    @classmethod
    def merge_into(cls, base_layer: nn.Module, tensors: dict[str, torch.Tensor], scaling: float):
        """W0 <- W0 + dW through the base-weight seam; returns what unmerging needs (nothing, for LoRA)."""
        add_to_base_weight(base_layer, cls.delta_of(tensors, scaling))

    @classmethod
    def unmerge_from(cls, base_layer: nn.Module, tensors: dict[str, torch.Tensor], scaling: float, state) -> None:
        """W0 <- W0 - dW."""
        add_to_base_weight(base_layer, -cls.delta_of(tensors, scaling))

    # -- the adapter as PEFT stores it (`tensors()` gives it): what adapters.py saves, loads and converts
    def peft_rank_alpha(self) -> tuple[int, float]:
        """The (r, lora_alpha) of the PEFT LoRA that computes this layer's update."""
        return self.r, self.alpha

    def tensor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """The shapes a rank-r adapter in PEFT's layout has at this layer, by tensor name."""
        return {"lora_A": (r, self.in_features), "lora_B": (self.out_features, r)}

    @classmethod
    def peft_shapes(cls, base_layer: nn.Module, r: int, use_dora: bool = False) -> dict[str, tuple[int, ...]]:
        """The tensors (name -> shape) a rank-r PEFT adapter holds for a base layer this class would wrap:
        A (r, in), B (out, r), and DoRA's magnitude (out,)."""
        in_f, out_f = linear_features(base_layer)
        shapes = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        return {**shapes, "lora_magnitude_vector": (out_f,)} if use_dora else shapes

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's trainable parameters (all but the base layer's)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def from_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An adapter's tensors in PEFT's layout (shapes checked) in this layer's own; ValueError if it cannot."""
        return dict(tensors)

    @torch.no_grad()
    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors in this layer's layout (from `from_peft_tensors`) into its own, by name."""
        own = dict(self.named_parameters(recurse=False))
        for name, tensor in tensors.items():
            own[name].copy_(tensor)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
        )


def peft_suffix(name: str) -> str:
    """PEFT's key suffix of an adapter tensor: `lora_A` -> `lora_A.weight` (its nn.Linear); a vector keeps its name."""
    return f"{name}.weight" if name.startswith(("lora_A", "lora_B")) else name


def variant_class(config: LoRAConfig, layer: nn.Module | None = None) -> type:
    """The LoRA layer class a config asks for on `layer`: the class registered for the layer's type (an
    embedding's), else `LoRALinear` or the registered variant of a flag the config sets."""
    for base_type in type(layer).__mro__ if layer is not None else ():
        if base_type in LAYER_CLASSES:
            return LAYER_CLASSES[base_type]  # it refuses the variants it cannot do
    cls = LoRALinear
    for flag in _set_flags(config):
        if flag not in LAYER_VARIANTS:
            raise NotImplementedError(f"{flag}=True needs its variant's module, which is not imported")
        cls = LAYER_VARIANTS[flag]
    return cls


def _set_flags(config: LoRAConfig) -> list[str]:
    """The variant flags (boolean config fields that pick a layer class, e.g. use_dora) this config sets."""
    return [flag for flag in dict.fromkeys(("use_dora", *LAYER_VARIANTS)) if getattr(config, flag, False) is True]


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    tensor = tensor if tensor is not None else next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


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
    return ValueError(f"target_modules={target_modules!r} matched no module in {type(model).__name__}.{hint} "
                      f"Layers LoRA can adapt it has: {leaves}")


def matched_modules(model: nn.Module, target_modules: str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs `target_modules` picks for LoRA, checked: every one a plain base layer."""
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
            raise TypeError(f"target {name} is a {type(module).__name__}, not nn.Linear, Conv1D or nn.Embedding; "
                            "LoRA here adapts those: name them in target_modules")
    return matched


def inject_adapters(
    model: nn.Module,
    target_modules: str | Iterable[str],
    wrap: Callable[[nn.Module], nn.Module],
    config: LoRAConfig | None = None,
) -> nn.Module:
    """Replace every layer that `target_modules` matches with `wrap(layer)`; freeze the rest.

    The model surgery shared by `add_lora` and `fused.add_fused_lora` (PEFT calls it
    `inject_adapter`). Given the `config`, the registered model steps then adjust the
    replacements (tied weights, modules_to_save). Every match is checked and wrapped before
    anything changes.
    """
    matched = matched_modules(model, target_modules)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:  # wrap every match before changing the model, so bad settings leave it as it was
        wrapped = [(name, wrap(module)) for name, module in matched]
        for step in MODEL_STEPS if config is not None else ():
            wrapped = step(model, config, wrapped)
    except Exception:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    adapters = {id(p) for m in model.modules() if hasattr(m, "adapter_parameters")
                for p in m.adapter_parameters()}  # A, B (and DoRA's m), trained copies
    for p in model.parameters():  # freeze the base model; adapters added earlier keep their setting
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, layer in wrapped:
        replace_module(model, name, layer)
    return model


def add_lora(model: nn.Module, config: LoRAConfig | str | Iterable[str] | None = None, *,
             quantize_base: str | None = None, **settings) -> nn.Module:
    """Replace every matching Linear/Conv1D/Embedding with a `LoRALinear` (an embedding's is a
    `LoRAEmbedding`), in place; freeze the rest.

    Either `add_lora(model, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))` or
    the keyword form `add_lora(model, ["c_attn"], r=8, alpha=16)`. `target_modules`
    matches as in PEFT: a list of names matching a module's full name or its dotted
    suffix (`"c_attn"` matches `transformer.h.0.attn.c_attn`), or a string taken as a
    regex on the full name. Returns the model.

    `quantize_base="nf4"` is QLoRA: every linear layer of the frozen base (but the output
    head) is stored in 4-bit NF4 with double quantization (`lora_course.linear4bit`), and the
    adapters train on top in full precision. Everything is checked before the model changes.

    `modules_to_save=["wte"]` trains a full copy of those modules too; `ensure_weight_tying`
    (default True) keeps a tied head tied (see `LoRAConfig` and `lora_course.embedding`).
    """
    config = targeted_config(config, settings)
    if quantize_base is None:
        return inject_adapters(model, config.target_modules, lambda layer: LoRALinear.from_linear(layer, config),
                               config)
    base_format = registered(BASE_FORMATS, quantize_base, "quantize_base", "'nf4' is QLoRA's")
    targets = {name for name, _ in matched_modules(model, config.target_modules)}
    rest = base_format.replacements(model, skip=targets)  # the frozen layers LoRA does not wrap, quantized
    inject_adapters(model, config.target_modules,
                    lambda layer: LoRALinear.from_linear(layer, config, base_format=base_format.layer), config)
    for name, layer in rest:
        if is_linear(model.get_submodule(name)):  # not a module a model step wrapped (modules_to_save)
            replace_module(model, name, layer)
    return model


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
    """Fold every LoRA update into its base weight and put the plain layer back (and a trained copy in its
    module's place: PEFT's merge_and_unload)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRALinear layers to merge; did you call add_lora?")
    untied = any(getattr(m, "untied_from", ()) for m in model.modules())
    for name, lora in layers.items():
        if not lora.merged:
            lora.merge()
        replace_module(model, name, lora.base_layer)
    for name, saved in [(n, m) for n, m in model.named_modules() if hasattr(m, "modules_to_save")]:
        replace_module(model, name, saved.modules_to_save)
    if untied and hasattr(model, "config"):
        model.config.tie_word_embeddings = False  # the merged weights differ now; PEFT says so too
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on the meta device (no memory needed)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + sum(stored_weight_numel(m) for m in model.modules())  # + 4-bit codes
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's summary line, character for character."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line, e.g. `trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622`."""
    print(trainable_parameters_line(model))
