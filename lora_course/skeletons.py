"""Model skeletons on the meta device: real module structure and shapes, no bytes of weights.

`torch.device("meta")` makes every tensor a shape without storage, so a 7-billion-parameter
LLaMA builds in a second and `count_parameters` counts it exactly. Nothing is downloaded:
each model is built from a transformers config object.

Configs: LLaMA-7B is transformers' default `LlamaConfig()` (Touvron et al., 2023,
arXiv:2302.13971); GPT-2 sizes are those of Radford et al. (2019) as published with the
Hugging Face checkpoints; the GPT-3 175B shape is Brown et al. (2020), arXiv:2005.14165,
Table 2.1 (96 layers, d_model 12288, 96 heads, context 2048), built as a GPT-2 stack.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["GPT2_SIZES", "MODEL_PRESETS", "gpt2_config", "gpt3_175b_config", "llama_7b_config", "llama_13b_config",
           "meta_model", "meta_gpt2", "meta_llama_7b", "meta_lora_counts", "preset_shape", "llama_70b_config"]

# name: (n_layer, n_embd, n_head)
GPT2_SIZES = {
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def gpt2_config(size: str = "small", **overrides):
    """The `GPT2Config` of a published GPT-2 size (`small`, `medium`, `large`, `xl`)."""
    from transformers import GPT2Config

    if size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {list(GPT2_SIZES)}")
    n_layer, n_embd, n_head = GPT2_SIZES[size]
    return GPT2Config(**{"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, **overrides})


def gpt3_175b_config():
    """GPT-3 175B's shape as a `GPT2Config` (same block design: pre-LN, fused q,k,v, 4 d MLP)."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=96, n_embd=12288, n_head=96, n_positions=2048)


def llama_7b_config():
    """transformers' default `LlamaConfig()`: LLaMA-7B (32 layers, d 4096, MLP 11008, vocab 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig()


def meta_model(config) -> nn.Module:
    """Build the causal-LM model of `config` on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_lora_counts(config, adapt: Callable[[nn.Module], Any]) -> dict[str, int]:
    """Parameters of `config`'s model after `adapt(model)` adds LoRA, counted on the meta device.

    `adapt` is e.g. `lambda m: add_lora(m, ["q_proj", "v_proj"], r=8)`; it runs under
    `torch.device("meta")`, so even GPT-3's shape costs no memory. Returns
    {"trainable", "total", "base" (total without the adapter), "lora_A", "lora_B"}.
    """
    from .lora import count_parameters, lora_layers

    model = meta_model(config)
    with torch.device("meta"):
        adapt(model)
    layers = lora_layers(model).values()
    if not layers:
        raise ValueError("adapt(model) added no LoRA layer; it should call add_lora or add_fused_lora on the model")
    trainable, total = count_parameters(model)
    n_a = sum(layer.lora_A.numel() for layer in layers)
    n_b = sum(layer.lora_B.numel() for layer in layers)
    return {"trainable": trainable, "total": total, "base": total - n_a - n_b, "lora_A": n_a, "lora_B": n_b}


def meta_gpt2(size: str = "small") -> nn.Module:
    """A GPT-2 of a published size on the meta device."""
    return meta_model(gpt2_config(size))


def meta_llama_7b() -> nn.Module:
    """LLaMA-7B on the meta device: 6,738,415,616 parameters, zero bytes."""
    return meta_model(llama_7b_config())


def llama_13b_config():
    """LLaMA-13B's shape (Touvron et al., 2023, Table 2): 40 layers, d 5120, 40 heads, MLP 13824."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)


def llama_70b_config():
    """A 70B LLaMA shape (Llama 2 70B, Touvron et al., 2023b): 80 layers, d 8192, 64 heads (8 for k, v), MLP 28672."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8)


# Models the memory widget offers; each is built on the meta device and counted when first asked.
MODEL_PRESETS = {
    "GPT-2 small (124M)": lambda: gpt2_config("small"),
    "GPT-2 large (774M)": lambda: gpt2_config("large"),
    "LLaMA-7B": llama_7b_config,
    "LLaMA-13B": llama_13b_config,
    "GPT-3 175B": gpt3_175b_config,
}

_SHAPES: dict[str, tuple[int, int, int]] = {}


def preset_shape(name: str) -> tuple[int, int, int]:
    """(parameter count, d_model, n_layers) of a `MODEL_PRESETS` model, counted on the meta device."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_PRESETS)}")
    if name not in _SHAPES:
        config = MODEL_PRESETS[name]()
        n_params = sum(p.numel() for p in meta_model(config).parameters())
        d = getattr(config, "hidden_size", None) or config.n_embd
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        _SHAPES[name] = (n_params, d, layers)
    return _SHAPES[name]
