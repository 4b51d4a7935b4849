"""Save and load LoRA adapters in Hugging Face PEFT's on-disk format.

A PEFT adapter is a folder with two files:

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, in)
                                 base_model.model.<module>.lora_B.weight  (out, r)

Only the adapter travels (a few MB), never the base model. `save_adapter` writes what
`peft.PeftModel.from_pretrained` reads; `load_adapter` reads what PEFT's `save_pretrained`
writes. Loading checks everything (config, every key, every shape) *before* it touches the
model, so a bad file raises `AdapterError` and leaves the model exactly as it was.

A `FusedLoRALinear` (q and v of GPT-2's `c_attn`, k untouched) has an exact PEFT twin: one
LoRA of rank k r on the whole `c_attn`, with A = [A_q; A_v] and B block-diagonal (B_q top
left, zeros for k, B_v bottom right), and alpha scaled so that alpha / r stays the same.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .fused import FusedLoRALinear
from .layers import is_adaptable, is_conv1d, linear_features, replace_module
from .lora import LoRALinear, lora_layers, lora_scaling, matches_target

__all__ = ["AdapterError", "CONFIG_NAME", "WEIGHTS_NAME", "adapter_state_dict", "adapter_config",
           "save_adapter", "load_adapter", "copy_lora_to_peft", "copy_lora_from_peft"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model


class AdapterError(ValueError):
    """An adapter that cannot be saved or loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------- saving

def _peft_rank_alpha(layer: LoRALinear) -> tuple[int, float]:
    """The (r, lora_alpha) of the PEFT LoRA that computes the same update as `layer`."""
    if isinstance(layer, FusedLoRALinear):
        k = sum(layer.enable_lora)
        alpha = layer.alpha * (math.sqrt(k) if layer.use_rslora else k)  # keeps scaling unchanged
        return k * layer.r, alpha
    return layer.r, layer.alpha


def _peft_tensors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r', in), lora_B (out, r')) in PEFT's layout; fused layers become block matrices."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if isinstance(layer, FusedLoRALinear):
        r, s = layer.r, layer.slice_size
        full_B = B.new_zeros(layer.out_features, A.shape[0])  # (out, k r)
        for j, (i, _, b) in enumerate(layer.slice_pairs()):
            full_B[i * s:(i + 1) * s, j * r:(j + 1) * r] = b.detach()
        B = full_B
    return A.contiguous().clone(), B.contiguous().clone()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA matrix under PEFT's key names, e.g. `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("this model has no LoRA layers to save; call add_lora(model, ...) first")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise AdapterError(f"{merged[0]} is merged into its base weight; unmerge() it before saving the adapter")
    state = {}
    for name, layer in layers.items():
        A, B = _peft_tensors(layer)
        state[f"{_PREFIX}{name}.lora_A.weight"] = A.cpu()
        state[f"{_PREFIX}{name}.lora_B.weight"] = B.cpu()
        if getattr(layer, "lora_magnitude_vector", None) is not None:  # DoRA's m (out,); PEFT's key has no .weight
            state[f"{_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().cpu().clone()
    return state


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
    rank_alpha = {n: _peft_rank_alpha(layer) for n, layer in layers.items()}
    r, alpha = Counter(rank_alpha.values()).most_common(1)[0][0]
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise AdapterError("some layers use rsLoRA and some do not; PEFT's config holds one use_rslora for all")
    dropouts = {layer.config.lora_dropout for layer in layers.values()}
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
        "fan_in_fan_out": all(is_conv1d(layer.base_layer) or getattr(layer.base_layer, "fan_in_fan_out", False)
                              for layer in layers.values()),  # a 4-bit base remembers if it was a Conv1D
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": _one_setting(layers, "use_dora"),
        "modules_to_save": None,
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

def _read_config(path: Path) -> dict:
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
        "modules_to_save": bool(config.get("modules_to_save")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "lora_bias": bool(config.get("lora_bias")),
    }
    init = config.get("init_lora_weights", True)
    unsupported[f"init_lora_weights={init!r}"] = not (isinstance(init, bool) or init in ("gaussian", "pissa"))
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterError(f"this adapter uses {bad}, which lora_course does not implement; load it with PEFT instead")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

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


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (in place) and return it.

    A model without LoRA gets `LoRALinear` layers where the config's `target_modules`
    point. A model that already carries LoRA layers (e.g. `add_fused_lora`) must have
    exactly the adapter's layers, with matching rank and scaling; a fused layer accepts a
    PEFT adapter only if that adapter leaves the disabled slices (k) exactly zero.
    Everything is checked first: on any error the model is unchanged.
    """
    path = Path(path)
    config = _read_config(path)
    weights = _read_weights(path)
    r0, alpha0 = config["r"], config["lora_alpha"]
    rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    init = "pissa" if config.get("init_lora_weights") == "pissa" else True  # "pissa": redo the SVD, as PEFT does
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    existing = lora_layers(model)
    if existing:
        targets = dict(existing)
    else:
        tm = config["target_modules"]
        tm = tm if isinstance(tm, str) else list(tm)
        targets = {n: m for n, m in model.named_modules() if n and is_adaptable(m) and matches_target(n, tm)}
        if not targets:
            raise AdapterError(f"target_modules={config['target_modules']!r} matches no linear layer of "
                               f"{type(model).__name__}; this adapter was made for another architecture")

    plan = []  # (name, module, A (r, in), B (out, r), r, alpha): nothing is changed until all pass
    expected = set()
    for name, module in targets.items():
        r = _pattern_value(config.get("rank_pattern") or {}, name, r0)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, alpha0)
        key_a, key_b = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
        key_m = f"{_PREFIX}{name}.lora_magnitude_vector"  # DoRA's magnitude m (out,)
        expected |= {key_a, key_b} | ({key_m} if use_dora else set())
        for key in (key_a, key_b) + ((key_m,) if use_dora else ()):
            if key not in weights:
                raise AdapterError(f"the adapter has no {key!r}: it was saved for a different model or target_modules "
                                   f"({len(weights)} tensors in the file)")
        A, B = weights[key_a], weights[key_b]
        if isinstance(module, LoRALinear):
            in_f, out_f = module.in_features, module.out_features
        else:
            in_f, out_f = linear_features(module)
        if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            raise AdapterError(
                f"{name}: adapter holds lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but this model's layer "
                f"needs ({r}, {in_f}) and ({out_f}, {r}) for r={r}: the adapter belongs to a model of another shape"
            )
        M = weights[key_m] if use_dora else None
        if M is not None and tuple(M.shape) != (out_f,):
            raise AdapterError(f"{name}: DoRA magnitude {tuple(M.shape)} but the layer has {out_f} outputs: "
                               "the adapter belongs to a model of another shape")
        if not all(torch.isfinite(t).all() for t in (A, B) + ((M,) if M is not None else ())):
            raise AdapterError(f"{name}: the adapter holds NaN or inf values; it is corrupt")
        if isinstance(module, LoRALinear):
            A, B = _into_existing(name, module, A, B, r, alpha, rslora)
            _check_variant(name, module, use_dora, init)
        plan.append((name, module, A, B, r, alpha, M))
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise AdapterError(f"the adapter holds {len(unexpected)} tensor(s) this model has no place for, "
                           f"e.g. {unexpected[0]!r}; it was saved for a different model or target_modules")

    # Every check passed: now change the model.
    if not existing:
        model.requires_grad_(False)
    for name, module, A, B, r, alpha, M in plan:
        if not isinstance(module, LoRALinear):
            layer = LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora,
                                           use_dora=use_dora, init_lora_weights=init)
            replace_module(model, name, layer)
            module = layer
        with torch.no_grad():
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)
            if M is not None:
                module.lora_magnitude_vector.copy_(M)
    return model


def _check_variant(name, layer: LoRALinear, use_dora: bool, init) -> None:
    """An adapter loaded into an existing LoRA layer must be of the same kind (DoRA or not, PiSSA or not)."""
    if use_dora != layer.config.use_dora:
        raise AdapterError(f"{name}: the adapter has use_dora={use_dora} but the model's layer has "
                           f"use_dora={layer.config.use_dora}; load it into a model without LoRA")
    if (init == "pissa") != (layer.config.init_lora_weights == "pissa"):
        raise AdapterError(f"{name}: a PiSSA adapter needs a PiSSA layer (its base holds the residual) and "
                           "a plain adapter a plain one; load it into a model without LoRA")


def _into_existing(name, layer: LoRALinear, A, B, r, alpha, rslora):
    """Check a PEFT (A, B) against a LoRA layer already in the model; return tensors in its layout."""
    want_r, _ = _peft_rank_alpha(layer)
    scaling = lora_scaling(alpha, r, rslora)
    if r != want_r or not math.isclose(scaling, layer.scaling, rel_tol=1e-6):
        raise AdapterError(f"{name}: adapter r={r}, lora_alpha={alpha} (scaling {scaling:g}) but "
                           f"the model's layer has r={want_r}, scaling {layer.scaling:g}; rebuild the layer to match")
    if not isinstance(layer, FusedLoRALinear):
        return A, B
    # PEFT's single (out, k r) B must be our block structure: zero outside the enabled slices' blocks.
    s, lr = layer.slice_size, layer.r
    expected_zero = torch.ones_like(B, dtype=torch.bool)
    blocks = []
    for j, i in enumerate(layer.enabled_slices):
        expected_zero[i * s:(i + 1) * s, j * lr:(j + 1) * lr] = False
        blocks.append(B[i * s:(i + 1) * s, j * lr:(j + 1) * lr])
    if (B[expected_zero] != 0).any():
        raise AdapterError(
            f"{name}: this adapter changes slices {layer.enable_lora} disables (e.g. k), or mixes the slices' ranks; "
            "a fused q,v layer cannot hold it. Load it into a model without LoRA (plain add_lora on the whole layer)"
        )
    return A, torch.cat(blocks, dim=0)  # (k r, in), (k out/n, r)


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
