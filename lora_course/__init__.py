"""lora_course: the helper package of the LoRA-from-scratch notebook course.

Each module holds one concept; the notebooks import from them and assert their claims.

    lora        LoRALinear, add_lora, merge_lora, counting (the from-scratch LoRA)
    fused       LoRA on chosen slices of a fused projection (q and v of GPT-2's c_attn)
    adapters    save/load adapters in PEFT's on-disk format
    lowrank     SVD, Eckart-Young-Mirsky, spectra, effective/stable rank, subspace similarity
    intrinsic, toy_tasks, weight_updates   notebook 02's experiments on intrinsic rank
    experiments notebook 04's controlled rank/alpha experiments
    memory      the memory arithmetic of fine-tuning, predicted and measured
    skeletons   models built on the meta device (LLaMA-7B, GPT-2 sizes) for counting
    models      load GPT-2, or the small GPT-2 shipped in the package when offline
    data, train notebook 06's fine-tuning task and training loop
    widgets     ipywidgets sliders, each a thin shell over a pure function
    checks      exercise checkers that tell the learner whether an answer holds
    runtime     fast/full mode, seeding, device choice
"""

from .adapters import AdapterError, load_adapter, save_adapter
from .fused import FusedLoRALinear, add_fused_lora
from .lora import (
    LoRALinear,
    add_lora,
    count_parameters,
    inject_adapters,
    lora_layers,
    lora_scaling,
    matches_target,
    merge_lora,
    print_trainable_parameters,
    trainable_parameters_line,
)
from .memory import optimizer_state_bytes, peak_memory, training_budget
from .models import load_model, shipped_model_path
from .runtime import by_mode, get_device, is_fast_mode, num_threads, seed_everything

__all__ = [
    "LoRALinear",
    "add_lora",
    "merge_lora",
    "inject_adapters",
    "lora_layers",
    "lora_scaling",
    "matches_target",
    "count_parameters",
    "print_trainable_parameters",
    "trainable_parameters_line",
    "FusedLoRALinear",
    "add_fused_lora",
    "save_adapter",
    "load_adapter",
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
]
