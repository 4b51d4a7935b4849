"""Notebook 05 (LoRA in a transformer): the memory-budget sliders and the exercise checkers."""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
import torch

from ..fused import FusedLoRALinear
from ..layers import Conv1D
from ..lora import add_lora
from ..memory import compare_budgets, training_budget
from ..skeletons import MODEL_PRESETS, llama_7b_config, meta_lora_counts, preset_shape
from ..validate import is_int
from .common import is_blank, not_filled_in, report

__all__ = ["MEMORY_TARGETS", "memory_budget_view", "memory_budget_widget", "check_llama_qkvo_params",
           "check_full_finetune_bytes", "check_fused_untouched_rows"]


# Targets offered by the memory widget: how many square d x d attention projections per layer.
MEMORY_TARGETS = {"q": 1, "q, v": 2, "q, k, v": 3, "q, k, v, o": 4}


def memory_budget_view(model: str = "LLaMA-7B", r: int = 8, targets: str = "q, v", precision: str = "fp16",
                       master_weights: bool = False) -> dict:
    """The two training budgets the memory widget draws, as numbers (GB = 1e9 bytes).

    Returns {"full": MemoryBudget, "lora": MemoryBudget, "trainable", "saving",
    "bars": {"full fine-tuning": {part: GB}, "LoRA": {part: GB}}, "title"}. The model is
    counted on the meta device (`lora_course.skeletons.preset_shape`); activations are left out.
    """
    if targets not in MEMORY_TARGETS:
        raise ValueError(f"targets must be one of {list(MEMORY_TARGETS)}, got {targets!r}")
    n_params, d, layers = preset_shape(model)
    c = compare_budgets(n_params, d, layers, r=r, n_targets=MEMORY_TARGETS[targets], precision=precision,
                        master_weights=master_weights)
    c["bars"] = {
        "full fine-tuning": {k: v / 1e9 for k, v in c["full"].parts().items()},
        "LoRA": {k: v / 1e9 for k, v in c["lora"].parts().items()},
    }
    c["title"] = (f"{model}: full {c['full'].total / 1e9:.1f} GB vs LoRA {c['lora'].total / 1e9:.1f} GB "
                  f"({c['saving']:.1f}x less; {c['trainable']:,d} trainable)")
    return c


def memory_budget_widget(model: str = "LLaMA-7B", r: int = 8, targets: str = "q, v", precision: str = "fp16"):
    """Sliders for model size, rank, targets and precision; stacked bars of the two budgets."""
    colors = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer": "tab:red", "master_weights": "tab:purple"}

    def show(model, r, targets, precision, master_weights):
        view = memory_budget_view(model, r, targets, precision, master_weights)
        fig, ax = plt.subplots(figsize=(7, 2.6))
        for row, (label, parts) in enumerate(view["bars"].items()):
            left = 0.0
            for part, gb in parts.items():
                first = row == 0 or part not in view["bars"]["full fine-tuning"]
                ax.barh(row, gb, left=left, color=colors[part], label=part if first else None)
                left += gb
        ax.set_yticks([0, 1], list(view["bars"]))
        ax.set_xlabel("GB (1e9 bytes), activations not included")
        ax.set_title(view["title"], fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        plt.tight_layout()
        plt.show()

    return w.interactive(
        show,
        model=w.SelectionSlider(options=list(MODEL_PRESETS), value=model, description="model"),
        r=w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=r, description="r"),
        targets=w.SelectionSlider(options=list(MEMORY_TARGETS), value=targets, description="targets"),
        precision=w.ToggleButtons(options=["fp32", "bf16", "fp16"], value=precision, description="precision"),
        master_weights=w.Checkbox(value=False, description="fp32 master weights"),
    )


# ----------------------------------------------------------------------------- exercise checkers

def check_llama_qkvo_params(answer) -> bool:
    """Exercise 05.1: trainable parameters of LoRA r=16 on q_proj, k_proj, v_proj, o_proj of LLaMA-7B."""
    if is_blank(answer):
        return not_filled_in("the number of trainable parameters (an int)")
    if not is_int(answer):
        return report(False, f"you gave {answer!r}; answer with a whole number of parameters (an int).")
    truth = meta_lora_counts(llama_7b_config(),
                             lambda m: add_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16))["trainable"]
    if answer == truth:
        return report(True, f"{truth:,d} = 32 layers x 4 projections x r (d_in + d_out).")
    return report(False, f"you gave {answer:,d}. Each adapted (d_out x d_in) weight adds r (d_in + d_out); "
                         "count layers and targets.")


def check_full_finetune_bytes(answer) -> bool:
    """Exercise 05.2: bytes of weights + gradients + AdamW state for full fp32 fine-tuning of GPT-2 small."""
    if is_blank(answer):
        return not_filled_in("the number of bytes (an int)")
    if not is_int(answer):
        return report(False, f"you gave {answer!r}; answer with a whole number of bytes (an int).")
    n_params = preset_shape("GPT-2 small (124M)")[0]
    truth = training_budget(n_params, precision="fp32", optimizer="adamw").total
    if answer == truth:
        return report(True, f"{truth:,d} bytes = 16 bytes x {n_params:,d} parameters.")
    return report(False, f"you gave {answer:,d}. In fp32 a weight is 4 bytes, its gradient 4, AdamW's two moments 8: "
                         "multiply by the parameter count (tied embeddings count once).")


def check_fused_untouched_rows(start, stop, d: int = 768) -> bool:
    """Exercise 05.3: which output features [start, stop) of GPT-2's c_attn does a q,v fused adapter never change?"""
    if is_blank(start) or is_blank(stop):
        return not_filled_in("start and stop (two ints, the untouched rows are start..stop-1)")
    layer = FusedLoRALinear.from_linear(Conv1D(3 * d, d), r=1, alpha=1)
    torch.nn.init.ones_(layer.lora_B)
    zero_rows = (layer.delta_weight() == 0).all(dim=1).nonzero().flatten()
    truth = (int(zero_rows[0]), int(zero_rows[-1]) + 1)
    if (start, stop) == truth:
        return report(True, f"rows {truth[0]}..{truth[1] - 1}, the k slice, get exactly zero update.")
    return report(False, "c_attn's output is [q | k | v], each d wide; which slice did enable_lora=(True, False, True) "
                         "leave out?")
