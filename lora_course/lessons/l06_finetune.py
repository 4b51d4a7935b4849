"""Notebook 06 (fine-tuning GPT-2): the record-by-record comparison widget and the exercise checkers."""

from __future__ import annotations

import html

import ipywidgets as w
import torch
from IPython.display import display

from ..data import FIELD_NAMES, FIELD_VALUES, Record, format_prompt, generate, slot_phrases, slots_realized
from ..lora import add_lora, count_parameters
from ..memory import training_budget
from ..skeletons import meta_gpt2
from .common import is_blank, not_filled_in, report

__all__ = ["finetune_outputs_view", "finetune_compare_widget", "check_gpt2_c_attn_lora_params",
           "check_adam_moment_bytes", "check_task_sentence"]


def finetune_outputs_view(models: dict, tokenizer, **fields) -> dict:
    """Greedy sentence and per-field check of each model for the record built from `fields`.

    Returns {"record": Record, "outputs": {name: {"text": str, "slots": {field: bool}, "slot_accuracy": float}}}.
    """
    record = Record(**fields)
    outputs = {}
    for name, model in models.items():
        text = generate(model, tokenizer, [record])[0]
        slots = slots_realized(text, record)
        outputs[name] = {"text": text, "slots": slots, "slot_accuracy": sum(slots.values()) / len(slots)}
    return {"record": record, "outputs": outputs}


def finetune_compare_widget(models: dict, tokenizer, **fields):
    """Dropdowns for a record's fields; shows what every model writes and which slots it got."""


    start = {k: fields.get(k, FIELD_VALUES[k][0]) for k in FIELD_NAMES}

    def show(**values):
        view = finetune_outputs_view(models, tokenizer, **values)
        rows = [f"<b>prompt</b>: <code>{html.escape(format_prompt(view['record']).strip())}</code>"]
        for name, out in view["outputs"].items():
            marks = " ".join(f"{k} {'&#10003;' if ok else '&#10007;'}" for k, ok in out["slots"].items())
            rows.append(f"<b>{html.escape(name)}</b> (slot accuracy {out['slot_accuracy']:.2f}): "
                        f"<code>{html.escape(out['text'])}</code><br><small>{marks}</small>")
        display(w.HTML("<br>".join(rows)))

    controls = {k: w.Dropdown(options=list(FIELD_VALUES[k]), value=start[k], description=k) for k in FIELD_NAMES}
    return w.interactive(show, **controls)


# ----------------------------------------------------------------------------- exercise checkers

def check_gpt2_c_attn_lora_params(answer: int, r: int = 8) -> bool:
    """Exercise 06.1: trainable parameters of LoRA rank r on c_attn of GPT-2 124M, counted on the meta device."""
    if is_blank(answer):
        return not_filled_in("the number of trainable parameters")
    model = meta_gpt2("small")
    with torch.device("meta"):
        add_lora(model, ["c_attn"], r=r)
    truth = count_parameters(model)[0]
    if answer == truth:
        return report(True, f"{truth:,d} = 12 layers x r x (768 + 2304), c_attn mapping d to 3d.")
    return report(False, f"you gave {answer!r}. One adapted (d_out x d_in) weight adds r (d_in + d_out); "
                         "c_attn is 768 -> 2304, in 12 layers.")


def check_adam_moment_bytes(answer: int, n_trainable: int) -> bool:
    """Exercise 06.2: bytes of AdamW's two fp32 moments for `n_trainable` trainable parameters."""
    if is_blank(answer):
        return not_filled_in("the bytes of AdamW's state")
    truth = training_budget(n_trainable, precision="fp32", optimizer="adamw").optimizer
    if answer == truth:
        return report(True, f"{truth:,d} bytes = 2 moments x 4 bytes x {n_trainable:,d} trainable parameters.")
    return report(False, f"you gave {answer!r}. AdamW keeps exp_avg and exp_avg_sq, each fp32 (4 bytes), "
                         "per trainable parameter.")


def check_task_sentence(record, text: str) -> bool:
    """Exercise 06.3: does `text` realise every field of `record` (notebook 06's slot accuracy)?"""
    if is_blank(text):
        return not_filled_in("a sentence for the record")
    if not isinstance(text, str):
        return report(False, f"write the sentence as a str, got {type(text).__name__}.")
    hits = slots_realized(text, record)
    missing = [k for k, ok in hits.items() if not ok]
    if not missing:
        return report(True, f"all {len(hits)} slots realised, slot accuracy 1.0.")
    wanted = ", ".join(repr(slot_phrases(record)[k]) for k in missing)
    return report(False, f"slot accuracy {1 - len(missing) / len(hits):.2f}; missing {missing}: "
                         f"the metric looks for {wanted}.")
