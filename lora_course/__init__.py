"""lora_course: LoRA from scratch, and the lessons of the notebook course built on it.

The library (what you would import outside the course), one concept per module:

    config      LoRAConfig (PEFT's names, validated once) and the registries variants attach to
    lora        LoRALinear, add_lora, merge_lora, counting (the from-scratch LoRA)
    dora        DoRA: a trainable magnitude on LoRA's normalised direction (use_dora=True)
    pissa       PiSSA: A, B from W0's top singular triplets (init_lora_weights="pissa"), and its LoRA conversion
    fused       LoRA on chosen slices of a fused projection (q and v of GPT-2's c_attn)
    embedding   LoRA on embeddings (LoRAEmbedding) and on a tied output head (ensure_weight_tying)
    modules_to_save  modules trained and saved in full beside LoRA (PEFT's ModulesToSaveWrapper)
    quant       NF4 and int4 from scratch: levels, blockwise absmax, packing, double quantization
    linear4bit  Linear4bit (a frozen base in 4 bits, dequantized again in backward), quantize_model
    layers      the base layers LoRA wraps (nn.Linear, Conv1D, Linear4bit, nn.Embedding), read and written
                through one seam, and model surgery by name
    adapters    adapters in PEFT's on-disk format (read, validated and planned once), copying to and from PEFT
    serving     many named adapters on one base: switch, merge, mixed batches, delete, weighted merges
    merging     combining adapters (linear, cat, svd, TIES, DARE), as pure functions on one layer
    lowrank     SVD, Eckart-Young-Mirsky, spectra, effective/stable rank, subspace similarity
    memory      the memory arithmetic of fine-tuning: budgets and the activation model (predictions)
    measure     what a step really costs: wall-clock medians and peak memory
    skeletons   models built on the meta device (LLaMA-7B, GPT-2 sizes) for counting
    models      load GPT-2 (or the small GPT-2 shipped in the package), small random GPT-2s
    tasks       the records-to-sentence tasks: each a record class with its prompt, target, slots, metric
    data        splits, training batches, greedy decoding to score a model
    methods     a fine-tuning method as data (LoRA targets, embedding, full with frozen parts), built in one call
    train       the one training loop (and optimizer_step, the one optimizer step) for LoRA and full fine-tuning
    distributed the bytes DDP and FSDP put on the wire, measured and on paper
    checkpointing  activation checkpointing with LoRA: the error and its two fixes, measured
    finetune    `python -m lora_course.finetune` (the command lines live in lora_course.cli)
    runtime     fast/full mode, seeding, device choice, thread scoping, progress bars
    notices     the library notices a setup cell silences, each named and explained
    validate    argument checks shared by every module

The lessons, `lora_course.lessons.lNN_*`: one module per notebook, holding that
notebook's widgets, exercise checkers, toy data and lesson-only experiments.
"""

# The variants attach themselves to the core when their modules are imported (lora.py imports none of
# them): DoRA (use_dora), PiSSA (init_lora_weights="pissa"), the 4-bit base (quantize_base, Linear4bit),
# LoRA on nn.Embedding and tied heads, modules_to_save.
from . import dora, embedding, linear4bit, modules_to_save, pissa  # noqa: F401  (imported for their registrations)
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
