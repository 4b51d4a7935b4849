"""Model skeletons on the meta device: real module structure and shapes, no bytes of weights.

`torch.device("meta")` makes every tensor a shape without storage, so a 7-billion-parameter
LLaMA builds in a second and `count_parameters` counts it exactly. Nothing is downloaded:
each model is built from a transformers config object.

`MODELS` is the one registry of published shapes the course counts (notebooks 05, 07, 09),
each with the layers LoRA adapts in our tables. Configs: LLaMA-7B is transformers' default
`LlamaConfig()` (Touvron et al., 2023, arXiv:2302.13971); GPT-2 sizes are those of Radford
et al. (2019) as published with the Hugging Face checkpoints; the GPT-3 175B shape is Brown
et al. (2020), arXiv:2005.14165, Table 2.1 (96 layers, d_model 12288, 96 heads, context
2048), built as a GPT-2 stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from .lora import add_lora, count_parameters, lora_layers

__all__ = ["GPT2_SIZES", "MODELS", "MODEL_PRESETS", "ModelShape", "gpt2_config", "gpt3_175b_config",
           "llama_7b_config", "llama_13b_config", "llama_70b_config", "meta_model", "meta_gpt2", "meta_llama_7b",
           "meta_lora_counts", "lora_counts", "preset_shape", "transformer_blocks"]

# name: (n_layer, n_embd, n_head)
GPT2_SIZES = {
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def gpt2_config(size: str = "small", **overrides):
    """The `GPT2Config` of a published GPT-2 size (`small`, `medium`, `large`, `xl`)."""
    if size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {list(GPT2_SIZES)}")
    n_layer, n_embd, n_head = GPT2_SIZES[size]
    return GPT2Config(**{"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, **overrides})


def gpt3_175b_config():
    """GPT-3 175B's shape as a `GPT2Config` (same block design: pre-LN, fused q,k,v, 4 d MLP)."""
    return GPT2Config(n_layer=96, n_embd=12288, n_head=96, n_positions=2048)


def llama_7b_config():
    """transformers' default `LlamaConfig()`: LLaMA-7B (32 layers, d 4096, MLP 11008, vocab 32000)."""
    return LlamaConfig()


def meta_model(config) -> nn.Module:
    """Build the causal-LM model of `config` on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_lora_counts(config, adapt: Callable[[nn.Module], Any]) -> dict[str, int]:
    """Parameters of `config`'s model after `adapt(model)` adds LoRA, counted on the meta device.

    `adapt` is e.g. `lambda m: add_lora(m, ["q_proj", "v_proj"], r=8)`; it runs under
    `torch.device("meta")`, so even GPT-3's shape costs no memory. Returns
    {"trainable", "total", "base" (total without the adapter), "lora_A", "lora_B"}.
    """
    return _counts(_adapted(config, adapt))


def _adapted(config, adapt: Callable[[nn.Module], Any]) -> nn.Module:
    model = meta_model(config)
    with torch.device("meta"):
        adapt(model)
    if not lora_layers(model):
        raise ValueError("adapt(model) added no LoRA layer; it should call add_lora or add_fused_lora on the model")
    return model


def _counts(model: nn.Module) -> dict[str, int]:
    layers = lora_layers(model).values()
    trainable, total = count_parameters(model)
    n_a = sum(layer.lora_A.numel() for layer in layers)
    n_b = sum(layer.lora_B.numel() for layer in layers)
    return {"trainable": trainable, "total": total, "base": total - n_a - n_b, "lora_A": n_a, "lora_B": n_b}


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a GPT-2 (`transformer.h`) or LLaMA (`model.layers`) causal LM."""
    for path in ("transformer.h", "model.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has neither transformer.h (GPT-2) nor model.layers (LLaMA)")


def meta_gpt2(size: str = "small") -> nn.Module:
    """A GPT-2 of a published size on the meta device."""
    return meta_model(gpt2_config(size))


def meta_llama_7b() -> nn.Module:
    """LLaMA-7B on the meta device: 6,738,415,616 parameters, zero bytes."""
    return meta_model(llama_7b_config())


def llama_13b_config():
    """LLaMA-13B's shape (Touvron et al., 2023, Table 2): 40 layers, d 5120, 40 heads, MLP 13824."""
    return LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)


def llama_70b_config():
    """A 70B LLaMA shape (Llama 2 70B, Touvron et al., 2023b): 80 layers, d 8192, 64 heads (8 for k, v), MLP 28672."""
    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8)


@dataclass(frozen=True)
class ModelShape:
    """A published model shape: its config, built on demand, and the layers LoRA adapts in our tables."""

    config: Callable[[], Any]
    lora_targets: tuple[str, ...]  # GPT-2 stacks: the fused q,k,v projection; LLaMA: q and v, as the LoRA paper


GPT2_TARGETS, LLAMA_TARGETS = ("c_attn",), ("q_proj", "v_proj")
MODELS = {
    "GPT-2 small (124M)": ModelShape(lambda: gpt2_config("small"), GPT2_TARGETS),
    "GPT-2 large (774M)": ModelShape(lambda: gpt2_config("large"), GPT2_TARGETS),
    "LLaMA-7B": ModelShape(llama_7b_config, LLAMA_TARGETS),
    "LLaMA-13B": ModelShape(llama_13b_config, LLAMA_TARGETS),
    "LLaMA-70B": ModelShape(llama_70b_config, LLAMA_TARGETS),
    "GPT-3 175B": ModelShape(gpt3_175b_config, GPT2_TARGETS),
}

# The models notebook 05's memory widget offers: a selection of `MODELS`, by name.
MODEL_PRESETS = {name: MODELS[name].config
                 for name in ("GPT-2 small (124M)", "GPT-2 large (774M)", "LLaMA-7B", "LLaMA-13B", "GPT-3 175B")}


def _shape(name: str) -> ModelShape:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    return MODELS[name]


_SHAPES: dict[str, tuple[int, int, int]] = {}
_COUNTS: dict[tuple[str, int], dict[str, int]] = {}


def preset_shape(name: str) -> tuple[int, int, int]:
    """(parameter count, d_model, n_layers) of a `MODELS` model, counted on the meta device (cached)."""
    if name not in _SHAPES:
        config = _shape(name).config()
        n_params = sum(p.numel() for p in meta_model(config).parameters())
        d = getattr(config, "hidden_size", None) or config.n_embd
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        _SHAPES[name] = (n_params, d, layers)
    return _SHAPES[name]


def lora_counts(name: str, r: int = 8) -> dict[str, int]:
    """`meta_lora_counts` of a `MODELS` model with LoRA of rank `r` on its `lora_targets` (cached).

    Adds the block structure, for sharding per block: "blocks" (how many), "block" and
    "block_trainable" (parameters in one block, all and trainable), "root" (the rest:
    embeddings, final norm, head).
    """
    if (name, r) not in _COUNTS:
        targets = list(_shape(name).lora_targets)
        model = _adapted(_shape(name).config(), lambda m: add_lora(m, targets, r=r))
        counts, block = _counts(model), transformer_blocks(model)[0]
        block_trainable, block_total = count_parameters(block)
        n_blocks = len(transformer_blocks(model))
        counts |= {"blocks": n_blocks, "block": block_total, "block_trainable": block_trainable,
                   "root": counts["total"] - n_blocks * block_total}
        _COUNTS[name, r] = counts
    return _COUNTS[name, r]
