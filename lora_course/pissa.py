"""PiSSA: start LoRA from the weight's principal singular directions, from scratch.

PiSSA (Meng et al., 2024, arXiv:2404.02948) splits a pretrained weight with its SVD
W0 = U S Vh (out x in) into its best rank-r part and the rest (Eckart-Young):

    B = U_r sqrt(S_r / s)    (out, r)       A = sqrt(S_r / s) Vh_r    (r, in)       s = scaling
    W_res = W0 - s B A       the frozen base: W0 without its top-r singular triplets

At step 0 the layer still computes W_res + s B A = W0, but the adapter now holds the
directions that matter most instead of zeros, so training moves the principal part.
`init_lora_weights="pissa"` in `LoRAConfig`/`add_lora` does this, as PEFT does.

The price: the base model is changed (it holds W_res). An adapter saved as it is only
works on that residual base (or on a loader that redoes the SVD, as PEFT and
`load_adapter` do when the file says "pissa"). To share one untouched base between many
adapters, convert: after training W_res + s B A = W0 + s (B A - B0 A0), a plain LoRA of
rank 2r on W0 with A' = [A; A0] (2r, in) and B' = [B, -B0] (out, 2r) at the same
scaling. PEFT does this in `save_pretrained(path_initial_model_for_weight_conversion=...)`;
here it is `pissa_to_lora_state` / `save_pissa_as_lora`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, adapter_config, adapter_key, adapter_state_dict
from .config import register_init_scheme
from .layers import write_base_weight
from .lora import lora_layers
from .lowrank import truncated_svd

__all__ = ["PISSA", "pissa_factors", "pissa_init", "is_pissa", "pissa_initial_state", "pissa_to_lora_state",
           "save_pissa_as_lora"]

PISSA = "pissa"  # the init_lora_weights value, as in PEFT


def pissa_factors(W0: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A (r, in), B (out, r)) for a weight W0 (out, in): s B A is W0's best rank-r approximation."""
    out_features, in_features = W0.shape
    if r > min(out_features, in_features):
        raise ValueError(f"PiSSA needs r <= min(out, in) = {min(out_features, in_features)} for a "
                         f"{out_features}x{in_features} weight (it keeps r singular triplets), got r={r}")
    U_r, S_r, Vh_r = truncated_svd(W0.float(), r)  # (out, r), (r,), (r, in)
    root = torch.sqrt(S_r / scaling)  # (r,): the scale is split evenly between A and B
    return root[:, None] * Vh_r, U_r * root  # A (r, in), B (out, r)


def is_pissa(layer: nn.Module) -> bool:
    """True for a LoRA layer built with `init_lora_weights="pissa"`."""
    config = getattr(layer, "config", None)
    return getattr(config, "init_lora_weights", None) == PISSA


@torch.no_grad()
def pissa_init(layer: nn.Module) -> None:
    """Fill `layer.lora_A`, `layer.lora_B` from W0's top-r singular triplets; the base keeps W_res.

    The base layer is copied before W_res is written (through the base-weight seam, so a 4-bit
    base re-quantizes the residual), so the caller's original layer (and any other model
    sharing it) keeps W0; only the returned LoRA layer holds the residual.
    """
    shape_A, shape_B = layer.lora_shapes()
    if (shape_A, shape_B) != ((layer.r, layer.in_features), (layer.out_features, layer.r)):
        raise TypeError(f"PiSSA decomposes a whole weight; {type(layer).__name__} adapts only slices of it. "
                        "Use add_lora (one LoRA on the whole layer) with init_lora_weights='pissa'")
    W0 = layer.W0.float()  # (out, in)
    A, B = pissa_factors(W0, layer.r, layer.scaling)
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    residual = W0 - layer.scaling * (B @ A)  # (out, in): W0 minus its best rank-r part
    layer.base_layer = copy.deepcopy(layer.base_layer)
    write_base_weight(layer.base_layer, residual)


register_init_scheme(PISSA, pissa_init)


def _pissa_layers(model: nn.Module) -> dict:
    layers = {n: m for n, m in lora_layers(model).items() if is_pissa(m)}
    if not layers:
        raise ValueError("this model has no PiSSA layers; build them with add_lora(..., init_lora_weights='pissa')")
    return layers


def pissa_initial_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every PiSSA layer's starting (A0, B0), by layer name: keep it to convert after training.

    PEFT keeps the same thing on disk (save the untrained adapter, then pass its folder as
    `path_initial_model_for_weight_conversion`).
    """
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in _pissa_layers(model).items()}


def pissa_to_lora_state(model: nn.Module, initial: dict) -> dict[str, torch.Tensor]:
    """PEFT-format tensors of the plain rank-2r LoRA that, on the original W0, equals the trained PiSSA model.

    s (B A - B0 A0) = s [B, -B0] [A; A0]: same scaling, twice the rank.
    """
    layers = _pissa_layers(model)
    missing = sorted(set(layers) - set(initial))
    if missing:
        raise AdapterError(f"no initial (A0, B0) for {missing[0]}; take pissa_initial_state(model) after add_lora")
    state = adapter_state_dict(model)
    for name, layer in layers.items():
        A0, B0 = initial[name]
        if A0.shape != layer.lora_A.shape or B0.shape != layer.lora_B.shape:
            raise AdapterError(f"{name}: the initial A0 {tuple(A0.shape)} / B0 {tuple(B0.shape)} do not match the "
                               f"layer's {tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}")
        key = adapter_key(name)
        state[f"{key}.lora_A.weight"] = torch.cat([state[f"{key}.lora_A.weight"], A0.cpu()], dim=0)  # (2r, in)
        state[f"{key}.lora_B.weight"] = torch.cat([state[f"{key}.lora_B.weight"], -B0.cpu()], dim=1)  # (out, 2r)
    return state


def save_pissa_as_lora(model: nn.Module, path, initial: dict, base_model_name_or_path: str | None = None) -> Path:
    """Save a trained PiSSA model as a plain rank-2r LoRA for the *original* base (PEFT's conversion).

    The folder loads with `load_adapter` or `PeftModel.from_pretrained` on an untouched base
    model, next to other adapters. Returns the folder.
    """
    from safetensors.torch import save_file

    state = pissa_to_lora_state(model, initial)
    config = adapter_config(model, base_model_name_or_path)
    if config["use_dora"]:
        raise ValueError("converting PiSSA with DoRA is not supported: DoRA's magnitude was fitted to W_res + B0 A0")
    if config["use_rslora"] and (config["rank_pattern"] or config["alpha_pattern"]):
        raise ValueError("converting PiSSA with use_rslora and per-layer ranks is not supported (PEFT refuses it too)")
    # Twice the rank at the same scaling: alpha doubles (alpha / r), or grows by sqrt(2) with rsLoRA (alpha / sqrt r).
    config.update(init_lora_weights=True, r=2 * config["r"],
                  lora_alpha=config["lora_alpha"] * (2 ** 0.5 if config["use_rslora"] else 2),
                  rank_pattern={k: 2 * v for k, v in config["rank_pattern"].items()},
                  alpha_pattern={k: 2 * v for k, v in config["alpha_pattern"].items()})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
