"""lora_course: the helper package of the LoRA-from-scratch notebook course.

Each module holds one concept; the notebooks import from them and assert their claims.
"""

from .lora import (
    LoRALinear,
    add_lora,
    count_parameters,
    lora_layers,
    merge_lora,
    print_trainable_parameters,
    trainable_parameters_line,
)
from .runtime import by_mode, get_device, is_fast_mode, seed_everything

__all__ = [
    "LoRALinear",
    "add_lora",
    "merge_lora",
    "lora_layers",
    "count_parameters",
    "print_trainable_parameters",
    "trainable_parameters_line",
    "by_mode",
    "get_device",
    "is_fast_mode",
    "seed_everything",
]
