"""lora_course: LoRA from scratch, and the lessons of the notebook course built on it.

The library (what you would import outside the course), one concept per module:

    lora        LoRAConfig, LoRALinear, add_lora, merge_lora, counting (the from-scratch LoRA)
    dora        DoRA: a trainable magnitude on LoRA's normalised direction (use_dora=True)
    pissa       PiSSA: A, B from W0's top singular triplets (init_lora_weights="pissa"), and its LoRA conversion
    serving     many named adapters on one base: switch, merge, mixed batches, delete
    fused       LoRA on chosen slices of a fused projection (q and v of GPT-2's c_attn)
    embedding   LoRA on embeddings (LoRAEmbedding) and on a tied output head (ensure_weight_tying)
    modules_to_save  modules trained and saved in full beside LoRA (PEFT's ModulesToSaveWrapper)
    adapters    adapters in PEFT's on-disk format, and copying adapters to and from PEFT models
    layers      the layers LoRA wraps (nn.Linear, GPT-2's Conv1D, nn.Embedding) and model surgery by name
    lowrank     SVD, Eckart-Young-Mirsky, spectra, effective/stable rank, subspace similarity
    memory      the memory arithmetic of fine-tuning, predicted and measured
    timing      wall-clock medians with torch.utils.benchmark
    skeletons   models built on the meta device (LLaMA-7B, GPT-2 sizes) for counting
    models      load GPT-2 (or the small GPT-2 shipped in the package), small random GPT-2s
    data        the fine-tuning task: records to documentation sentences, and its metric
    train       one training loop for LoRA and full fine-tuning
    runtime     fast/full mode, seeding, device choice, thread scoping
    validate    argument checks shared by every module

The lessons, `lora_course.lessons.lNN_*`: one module per notebook, holding that
notebook's widgets, exercise checkers, toy data and lesson-only experiments.
"""

# The variants attach themselves to the core when their modules are imported (lora.py imports none of
# them): DoRA (use_dora), PiSSA (init_lora_weights="pissa"), the 4-bit base (quantize_base, Linear4bit),
# LoRA on nn.Embedding and tied heads, modules_to_save.
from . import dora, embedding, modules_to_save, pissa, quant  # noqa: F401  (imported for their registrations)
from .adapters import AdapterError, copy_lora_from_peft, copy_lora_to_peft, load_adapter, save_adapter
from .dora import DoRALinear
from .embedding import LoRAEmbedding, TiedLoRAHead
from .fused import FusedLoRALinear, add_fused_lora
from .lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    count_parameters,
    inject_adapters,
    lora_layers,
    lora_scaling,
    make_config,
    matches_target,
    merge_lora,
    print_trainable_parameters,
    trainable_parameters_line,
    update_norm,
)
from .measure import optimizer_state_bytes, peak_memory
from .memory import training_budget
from .models import load_model, shipped_model_path
from .modules_to_save import ModulesToSaveWrapper
from .runtime import by_mode, get_device, is_fast_mode, num_threads, seed_everything
from .serving import MultiAdapterModel

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "make_config",
    "add_lora",
    "merge_lora",
    "inject_adapters",
    "lora_layers",
    "lora_scaling",
    "matches_target",
    "count_parameters",
    "update_norm",
    "print_trainable_parameters",
    "trainable_parameters_line",
    "FusedLoRALinear",
    "add_fused_lora",
    "save_adapter",
    "load_adapter",
    "copy_lora_to_peft",
    "copy_lora_from_peft",
    "AdapterError",
    "peak_memory",
    "training_budget",
    "optimizer_state_bytes",
    "load_model",
    "shipped_model_path",
    "by_mode",
    "get_device",
    "is_fast_mode",
    "num_threads",
    "seed_everything",
    "DoRALinear",
    "LoRAEmbedding",
    "TiedLoRAHead",
    "ModulesToSaveWrapper",
    "MultiAdapterModel",
]
