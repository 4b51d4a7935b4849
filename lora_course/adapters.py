"""Save and load LoRA adapters in Hugging Face PEFT's on-disk format.

A PEFT adapter is a folder with two files:

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                 base_model.model.<module>.lora_B.weight  (out, r)

Only the adapter travels (a few MB), never the base model. `save_adapter` writes what
`peft.PeftModel.from_pretrained` reads; `load_adapter` reads what PEFT's `save_pretrained`
writes. Loading checks everything (config, every key, every shape) *before* it touches the
model, so a bad file raises `AdapterError` and leaves the model exactly as it was.

Each kind of LoRA layer says how it looks in PEFT's format (`peft_rank_alpha`,
`peft_tensors`, `from_peft_tensors`), so this module knows no variant: a `FusedLoRALinear`
(q and v of GPT-2's `c_attn`) becomes its exact PEFT twin, one LoRA of rank k r on the whole
`c_attn` with a block-diagonal B; a `DoRALinear` adds its magnitude vector; a `LoRAEmbedding`
saves `lora_embedding_A`, `lora_embedding_B`. Trained copies (`modules_to_save`) are saved in
full under their module's keys, and tied heads as PEFT saves them (`lora_course.modules_to_save`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import INIT_SCHEMES, LoRAConfig, lora_scaling
from .embedding import tying_setting
from .layers import is_adaptable
from .lora import LoRALinear, lora_layers, matches_target, peft_suffix, variant_class
from .modules_to_save import adapter_state_of_saved, plan_saved, saved_names

__all__ = ["AdapterError", "CONFIG_NAME", "WEIGHTS_NAME", "adapter_key", "adapter_state_dict", "adapter_config",
           "save_adapter", "read_config", "read_weights", "LayerPlan", "AdapterPlan", "expected_tensors",
           "plan_adapter", "target_modules_of", "read_adapter", "load_adapter", "copy_lora_to_peft",
           "copy_lora_from_peft"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model


def adapter_key(module_name: str) -> str:
    """PEFT's key stem for a module: `base_model.model.<module>` (then `.lora_A.weight`, ...)."""
    return PREFIX + module_name


class AdapterError(ValueError):
    """An adapter that cannot be saved or loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------- saving

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA tensor under PEFT's key names, e.g. `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("this model has no LoRA layers to save; call add_lora(model, ...) first")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise AdapterError(f"{merged[0]} is merged into its base weight; unmerge() it before saving the adapter")
    state = {f"{adapter_key(name)}.{peft_suffix(t)}": tensor.detach().cpu().contiguous().clone()
             for name, layer in layers.items() for t, tensor in layer.tensors().items()}
    return {**state, **{adapter_key(k): t for k, t in adapter_state_of_saved(model).items()}}  # trained copies


def _target_names(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    """Short names (`c_attn`) when they pick exactly the adapted layers, else full names."""
    inside = tuple(f"{n}." for n in layers)
    candidates = [n for n, m in model.named_modules() if n and not n.startswith(inside)
                  and (is_adaptable(m) or isinstance(m, LoRALinear))]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if {n for n in candidates if matches_target(n, leaves)} == set(layers):
        return leaves
    return sorted(layers)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None,
                   task_type: str | None = "auto") -> dict:
    """The `adapter_config.json` content PEFT needs to rebuild this model's adapter."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("this model has no LoRA layers to save; call add_lora(model, ...) first")
    rank_alpha = {n: layer.peft_rank_alpha() for n, layer in layers.items()}
    r, alpha = Counter(rank_alpha.values()).most_common(1)[0][0]
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise AdapterError("some layers use rsLoRA and some do not; PEFT's config holds one use_rslora for all")
    dropouts = {layer.config.lora_dropout for layer in layers.values()}
    try:
        ensure_weight_tying = tying_setting(model)  # True where a tie is kept: PEFT then ties on loading
    except ValueError as err:
        raise AdapterError(str(err)) from None
    if task_type == "auto":
        cls = type(model).__name__
        task_type = "CAUSAL_LM" if cls.endswith(("ForCausalLM", "LMHeadModel")) else None
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or getattr(config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_names(model, layers),
        "lora_dropout": max(dropouts),
        "fan_in_fan_out": all(layer.fan_in_fan_out for layer in layers.values()),  # Conv1D (or 4-bit made from one)
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": _one_setting(layers, "use_dora"),
        "modules_to_save": saved_names(model),
        "ensure_weight_tying": ensure_weight_tying,
        "init_lora_weights": _one_setting(layers, "init_lora_weights"),  # "pissa": loaders redo the SVD
        "rank_pattern": {n: ra[0] for n, ra in rank_alpha.items() if ra[0] != r},
        "alpha_pattern": {n: ra[1] for n, ra in rank_alpha.items() if ra[1] != alpha},
        "inference_mode": True,
    }


def _one_setting(layers: dict[str, LoRALinear], name: str):
    """The value of config setting `name` shared by every layer (PEFT's config holds one)."""
    values = {getattr(layer.config, name) for layer in layers.values()}
    if len(values) > 1:
        raise AdapterError(f"layers differ in {name} ({sorted(map(str, values))}); PEFT's config holds one for all")
    return values.pop()


def save_adapter(model: nn.Module, path, base_model_name_or_path: str | None = None) -> Path:
    """Write `path/adapter_config.json` and `path/adapter_model.safetensors`; returns the folder."""
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    config = adapter_config(model, base_model_name_or_path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------- loading

def read_config(path) -> dict:
    """The adapter folder's `adapter_config.json`, checked to be a LoRA config this package can load."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterError(f"{path} is not a folder; an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not file.is_file():
        raise AdapterError(f"{file} is missing; save the adapter with save_adapter() or PEFT's save_pretrained()")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{file} is not valid JSON ({err}); the file is corrupt, save the adapter again") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{file} is not a LoRA adapter config (peft_type={peft_type!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{file} lacks {key!r}; it is not a complete PEFT LoRA config")
    unsupported = {
        "bias": config.get("bias", "none") != "none",
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "lora_bias": bool(config.get("lora_bias")),
    }
    init = config.get("init_lora_weights", True)
    unsupported[f"init_lora_weights={init!r}"] = not (isinstance(init, bool) or init in ("gaussian", *INIT_SCHEMES))
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterError(f"this adapter uses {bad}, which lora_course does not implement; load it with PEFT instead")
    return config


def read_weights(path) -> dict[str, torch.Tensor]:
    """The adapter folder's tensors, by PEFT key."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        old_format = (path / "adapter_model.bin").exists()
        hint = " (a .bin adapter? re-save it with safe_serialization=True)" if old_format else ""
        raise AdapterError(f"{file} is missing{hint}")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types (and wording) for truncated/garbled files
        raise AdapterError(f"{file} could not be read as safetensors: the file is corrupt or truncated, "
                           "save the adapter again (the reader's own error is chained below)") from err


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern: a key matches a module name or its dotted suffix (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(frozen=True)
class LayerPlan:
    """One layer's share of an adapter file, checked: its rank, alpha, scaling and tensors by name, in PEFT's
    layout (`lora_A` (r, in), `lora_B` (out, r), DoRA's `lora_magnitude_vector` (out,))."""

    name: str
    module: nn.Module
    r: int
    lora_alpha: float
    scaling: float
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterPlan:
    """An adapter file read and checked against a model, before anything changes: its config and one
    `LayerPlan` per target. `load_adapter`, `MultiAdapterModel.load_adapter` and PiSSA's conversion apply it."""

    config: dict
    layers: tuple[LayerPlan, ...]

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    @property
    def init_lora_weights(self):
        """True, or "pissa": a loader then redoes the SVD, as PEFT does."""
        return "pissa" if self.config.get("init_lora_weights") == "pissa" else True

    @property
    def lora_dropout(self) -> float:
        return float(self.config.get("lora_dropout", 0.0) or 0.0)


def expected_tensors(module: nn.Module, r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) a rank-r adapter holds for `module`: a LoRA layer says itself, a base
    layer (or a layer wrapping one at `.base_layer`) what the LoRA class that would wrap it says: A (r, in),
    B (out, r) and DoRA's m (out,), or an embedding's lora_embedding_A, lora_embedding_B."""
    if isinstance(module, LoRALinear):
        return module.tensor_shapes(r)
    base = getattr(module, "base_layer", module)
    return variant_class(LoRAConfig(), base).peft_shapes(base, r, use_dora)


def plan_adapter(config: dict, weights: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> AdapterPlan:
    """Check an adapter's tensors against the layers it targets (`modules`, by name); every error before any change.

    The rank and alpha of each layer follow `rank_pattern` / `alpha_pattern`; every tensor
    the layer needs must be there, with its shape and finite values, and no tensor may be
    left over.
    """
    use_dora = bool(config.get("use_dora", False))
    layers, expected = [], set()
    for name, module in modules.items():
        r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        try:
            shapes = expected_tensors(module, r, use_dora)
        except ValueError as err:
            raise AdapterError(f"{name}: {err}") from None
        keys = {t: f"{adapter_key(name)}.{peft_suffix(t)}" for t in shapes}
        expected |= set(keys.values())
        missing = [k for k in keys.values() if k not in weights]
        if missing:
            raise AdapterError(f"the adapter has no {missing[0]!r}: it was saved for a different model or "
                               f"target_modules ({len(weights)} tensors in the file)")
        tensors = {suffix: weights[key] for suffix, key in keys.items()}
        wrong = {s: tuple(t.shape) for s, t in tensors.items() if tuple(t.shape) != shapes[s]}
        if wrong:
            raise AdapterError(f"{name}: the adapter holds {wrong} but this model's layer needs "
                               f"{ {s: shapes[s] for s in wrong} } for r={r}: the adapter belongs to a model of "
                               "another shape")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise AdapterError(f"{name}: the adapter holds NaN or inf values; it is corrupt")
        layers.append(LayerPlan(name, module, r, alpha, lora_scaling(alpha, r, bool(config.get("use_rslora"))),
                                tensors))
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise AdapterError(f"the adapter holds {len(unexpected)} tensor(s) this model has no place for, "
                           f"e.g. {unexpected[0]!r}; it was saved for a different model or target_modules")
    return AdapterPlan(config, tuple(layers))


def target_modules_of(model: nn.Module, config: dict, include: Callable[[nn.Module], bool] = is_adaptable,
                      ) -> dict[str, nn.Module]:
    """The modules an adapter config's `target_modules` picks in `model` (outside layers already wrapped)."""
    targets = config["target_modules"]
    targets = targets if isinstance(targets, str) else list(targets)
    chosen, inside = {}, ()
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue
        if include(module) and matches_target(name, targets):
            chosen[name] = module
            inside = (*inside, f"{name}.")
    if not chosen:
        raise AdapterError(f"target_modules={config['target_modules']!r} matches no linear layer of "
                           f"{type(model).__name__}; this adapter was made for another architecture")
    return chosen


def read_adapter(path, model: nn.Module, modules: dict[str, nn.Module] | None = None,
                 include: Callable[[nn.Module], bool] = is_adaptable) -> AdapterPlan:
    """Read the adapter folder at `path` and plan it onto `model`: onto `modules` (by name) if given, else onto
    the modules its `target_modules` picks among those `include` accepts (default: base layers)."""
    config = read_config(path)
    weights = read_weights(path)
    return plan_adapter(config, weights, target_modules_of(model, config, include) if modules is None else modules)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (in place) and return it.

    A model without LoRA gets `LoRALinear` layers where the config's `target_modules`
    point. A model that already carries LoRA layers (e.g. `add_fused_lora`) must have
    exactly the adapter's layers, with matching rank and scaling; a fused layer accepts a
    PEFT adapter only if that adapter leaves the disabled slices (k) exactly zero.
    Embeddings get a `LoRAEmbedding`, `modules_to_save` a trained copy each, and a tie is kept
    where the adapter keeps it (`lora_course.modules_to_save.plan_saved`).
    Everything is checked first: on any error the model is unchanged.
    """
    config = read_config(path)
    existing = lora_layers(model)
    for name, layer in existing.items():
        _check_variant(name, layer, config)
    modules = dict(existing) if existing else target_modules_of(model, config)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:  # plan and build every layer before changing the model (building freezes base layers: undone on error)
        saved = plan_saved(model, config, read_weights(path), modules, adapter_key)
        plan = plan_adapter(config, saved.weights, saved.modules)
        tensors = {layer.name: _into_existing(layer) for layer in plan.layers if isinstance(layer.module, LoRALinear)}
        saved.check_tied(plan.layers)
        built = [(layer.name, _built(layer, plan, saved.tie)) for layer in plan.layers]
    except (ValueError, TypeError, NotImplementedError) as err:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if isinstance(err, AdapterError):
            raise
        raise AdapterError(str(err)) from None
    # Every check passed: now change the model.
    if not existing:
        model.requires_grad_(False)
    for (name, module), layer in zip(built, plan.layers):
        module.set_tensors(tensors.get(name, layer.tensors))
    saved.apply(model, built)
    return model


def _built(layer: LayerPlan, plan: AdapterPlan, tie: bool) -> LoRALinear:
    """The LoRA layer that will hold `layer`'s share of the adapter: the model's own, or a new one."""
    if isinstance(layer.module, LoRALinear):
        return layer.module
    return LoRALinear.from_linear(layer.module, r=layer.r, alpha=layer.lora_alpha, dropout=plan.lora_dropout,
                                  use_rslora=plan.use_rslora, use_dora=plan.use_dora,
                                  init_lora_weights=plan.init_lora_weights, ensure_weight_tying=tie)


def _check_variant(name: str, layer: LoRALinear, config: dict) -> None:
    """An adapter loaded into an existing LoRA layer must be of the same kind (DoRA or not, PiSSA or not)."""
    use_dora = bool(config.get("use_dora", False))
    if use_dora != layer.config.use_dora:
        raise AdapterError(f"{name}: the adapter has use_dora={use_dora} but the model's layer has "
                           f"use_dora={layer.config.use_dora}; load it into a model without LoRA")
    if (config.get("init_lora_weights") == "pissa") != (layer.config.init_lora_weights == "pissa"):
        raise AdapterError(f"{name}: a PiSSA adapter needs a PiSSA layer (its base holds the residual) and "
                           "a plain adapter a plain one; load it into a model without LoRA")


def _into_existing(plan: LayerPlan) -> dict[str, torch.Tensor]:
    """Check an adapter's layer against the LoRA layer already in the model; return tensors in its layout."""
    name, layer = plan.name, plan.module
    want_r, _ = layer.peft_rank_alpha()
    if plan.r != want_r or not math.isclose(plan.scaling, layer.scaling, rel_tol=1e-6):
        raise AdapterError(f"{name}: adapter r={plan.r}, lora_alpha={plan.lora_alpha} (scaling {plan.scaling:g}) but "
                           f"the model's layer has r={want_r}, scaling {layer.scaling:g}; rebuild the layer to match")
    try:
        return layer.from_peft_tensors(plan.tensors)
    except ValueError as err:
        raise AdapterError(f"{name}: {err}") from None


# ----------------------------------------------------------------------------- PEFT models in memory

def _peft_pairs(ours: nn.Module, peft_model: nn.Module, adapter_name: str):
    """(name, our LoRALinear, PEFT's lora_A weight, PEFT's lora_B weight) for every layer of `ours`."""
    layers = lora_layers(ours)
    if not layers:
        raise ValueError("our model has no LoRALinear layers; call add_lora on it first")
    inner = peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model
    for name, layer in layers.items():
        try:
            ref = inner.get_submodule(name)
            ref_A, ref_B = ref.lora_A[adapter_name].weight, ref.lora_B[adapter_name].weight
        except (AttributeError, KeyError) as err:
            raise ValueError(
                f"the PEFT model has no LoRA adapter {adapter_name!r} at {name}; build it with "
                "the same target_modules from the same base model"
            ) from err
        if ref_A.shape != layer.lora_A.shape or ref_B.shape != layer.lora_B.shape:
            raise ValueError(
                f"{name}: PEFT's A {tuple(ref_A.shape)} / B {tuple(ref_B.shape)} do not match ours "
                f"{tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}; use the same r"
            )
        yield name, layer, ref_A, ref_B


@torch.no_grad()
def copy_lora_to_peft(ours: nn.Module, peft_model: nn.Module, adapter_name: str = "default") -> int:
    """Copy every `LoRALinear`'s A (r, in) and B (out, r) into the matching layer of a PEFT model.

    Use it right after `add_lora` and `get_peft_model` on two copies of the same base
    model, so both start from identical adapters and any later difference comes from
    the implementations. Returns the number of layers copied.
    """
    pairs = list(_peft_pairs(ours, peft_model, adapter_name))
    for _, layer, ref_A, ref_B in pairs:
        ref_A.copy_(layer.lora_A)
        ref_B.copy_(layer.lora_B)
    return len(pairs)


@torch.no_grad()
def copy_lora_from_peft(peft_model: nn.Module, ours: nn.Module, adapter_name: str = "default") -> int:
    """The other direction: PEFT's A and B into our matching `LoRALinear` layers. Returns the count."""
    pairs = list(_peft_pairs(ours, peft_model, adapter_name))
    for _, layer, ref_A, ref_B in pairs:
        layer.lora_A.copy_(ref_A)
        layer.lora_B.copy_(ref_B)
    return len(pairs)
