"""Notebook 06 (fine-tuning GPT-2): its experiments, the comparison widget and the exercise checkers.

The experiments are small functions so that the notebook reads as the lesson: `run_method`
trains one configuration (LoRA on chosen weights, or full fine-tuning) and scores it;
`LearnForget` records task quality against forgetting along a run; `add_attention_lora`
adapts any of W_q, W_k, W_v (slices of GPT-2's fused `c_attn`) and W_o (`attn.c_proj`).
"""

from __future__ import annotations

import copy
import html
import statistics
from dataclasses import dataclass, field, replace

import ipywidgets as w
import torch
from IPython.display import HTML, display
from torch import nn

from ..data import ApiRecord, evaluate_task, format_prompt, generate, slot_phrases, slots_realized
from ..fused import add_fused_lora
from ..lora import LoRAConfig, add_lora, count_parameters, lora_layers, update_norm
from ..models import toy_gpt2, toy_gpt2_config
from ..skeletons import meta_gpt2
from ..train import TrainConfig, text_loss, train
from .common import call_learner, is_blank, not_filled_in, report

__all__ = ["WEIGHT_SETS", "add_attention_lora", "Result", "run_method", "LearnForget", "forgetting_at_quality",
           "mean_spread", "finetune_outputs_view", "finetune_compare_widget", "check_gpt2_c_attn_lora_params",
           "check_task_sentence", "check_lora_step", "check_adapter_state"]

# The LoRA paper's Table 5 at one budget: r = 8 on one weight type, 4 on two, 2 on all four.
WEIGHT_SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "W_q": (("q",), 8), "W_k": (("k",), 8), "W_v": (("v",), 8), "W_o": (("o",), 8),
    "W_q, W_k": (("q", "k"), 4), "W_q, W_v": (("q", "v"), 4), "all four": (("q", "k", "v", "o"), 2),
}


def add_attention_lora(model: nn.Module, weights, r: int, alpha: float | None = None,
                       use_rslora: bool = False) -> nn.Module:
    """LoRA of rank r on the chosen attention weights: any of "q", "k", "v" (slices of `c_attn`) and "o" (`c_proj`)."""
    weights = tuple(weights)
    unknown = set(weights) - {"q", "k", "v", "o"}
    if unknown or not weights:
        raise ValueError(f"weights must be a non-empty subset of 'q', 'k', 'v', 'o'; got {weights!r}")
    config = LoRAConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, use_rslora=use_rslora)
    qkv = tuple(s in weights for s in "qkv")
    if any(qkv):
        add_fused_lora(model, replace(config, target_modules=["c_attn"]), enable_lora=qkv)
    if "o" in weights:  # W_o is the attention's c_proj (the MLP has a c_proj too)
        add_lora(model, replace(config, target_modules=["attn.c_proj"]))
    return model


@dataclass
class Result:
    """One trained configuration: its run record, its test scores, ||Delta W||_F (LoRA) and (if kept) the model."""

    name: str
    seed: int
    run: object
    scores: dict
    model: nn.Module | None = None
    curve: list = field(default_factory=list)
    update_norm: float = float("nan")  # ||Delta W||_F of all adapters together; NaN for full fine-tuning

    @property
    def quality(self) -> float:
        return self.scores["slot_accuracy"]


def run_method(base: nn.Module, tokenizer, splits, *, name: str, seed: int, steps: int, lr: float,
               r: int | None = None, weights=("q", "k", "v"), alpha: float | None = None, use_rslora: bool = False,
               batch_size: int = 8, test=None, keep_model: bool = False, learn_forget=None,
               checkpoint_every: int = 0, progress: bool = False) -> Result:
    """Train a copy of `base`: LoRA of rank r on `weights` (r=None: full fine-tuning); score it on `test`."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if r is None:
        model.requires_grad_(True)
    elif tuple(weights) == ("q", "k", "v"):  # all of c_attn: the plain layer
        add_lora(model, ["c_attn"], r=r, alpha=2 * r if alpha is None else alpha, use_rslora=use_rslora)
    else:
        add_attention_lora(model, weights, r, alpha, use_rslora)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_eval=64, desc=f"{name} seed {seed}",
                         progress=progress)
    run = train(model, tokenizer, splits.train, splits.validation, config, method=name,
                checkpoint=learn_forget, checkpoint_every=checkpoint_every)
    scores = evaluate_task(model, tokenizer, list(test), max_new_tokens=48) if test is not None else {}
    curve = list(learn_forget.points) if learn_forget is not None else []
    norm = update_norm(model) if r is not None else float("nan")
    return Result(name, seed, run, scores, model if keep_model else None, curve, norm)


class LearnForget:
    """A `train` checkpoint: at each call, (step, task quality on `records`, held-out loss increase)."""

    def __init__(self, tokenizer, records, heldout_ids: torch.Tensor, base_loss: float, base_quality: float = 0.0,
                 max_blocks: int = 8):
        self.tokenizer, self.records, self.heldout_ids = tokenizer, list(records), heldout_ids
        self.base_loss, self.max_blocks = base_loss, max_blocks
        self.points: list[tuple[int, float, float]] = [(0, base_quality, 0.0)]  # the base model: step 0

    def __call__(self, step: int, model: nn.Module) -> None:
        quality = evaluate_task(model, self.tokenizer, self.records, max_new_tokens=48)["slot_accuracy"]
        forgot = text_loss(model, self.heldout_ids, block_size=128, max_blocks=self.max_blocks) - self.base_loss
        self.points.append((step, quality, forgot))


def forgetting_at_quality(curve, quality: float) -> float:
    """Forgetting where a run's curve of (step, quality, forgetting) first reaches `quality` (linear in between)."""
    for (_, q0, f0), (_, q1, f1) in zip(curve, curve[1:]):
        if q1 >= quality:
            t = 1.0 if q1 == q0 else (quality - q0) / (q1 - q0)
            return f0 + max(0.0, min(1.0, t)) * (f1 - f0)
    return float("nan")  # never reached it


def mean_spread(values) -> tuple[float, float]:
    """(mean, spread = max - min) of a few seeds' numbers."""
    values = list(values)
    return statistics.fmean(values), max(values) - min(values)


# ----------------------------------------------------------------------------- the widget

def finetune_outputs_view(models: dict, tokenizer, record) -> dict:
    """Greedy sentence and per-field check of each model for `record`.

    Returns {"record": record, "outputs": {name: {"text": str, "slots": {field: bool}, "slot_accuracy": float}}}.
    """
    outputs = {}
    for name, model in models.items():
        text = generate(model, tokenizer, [record], max_new_tokens=48)[0]
        slots = slots_realized(text, record)
        outputs[name] = {"text": text, "slots": slots, "slot_accuracy": sum(slots.values()) / len(slots)}
    return {"record": record, "outputs": outputs}


def finetune_compare_widget(models: dict, tokenizer, records, index: int = 0, model: str | None = None):
    """A slider over test records and buttons for a model: what that model writes, field by field."""
    records = list(records)
    names = list(models)

    def show(record, model):
        view = finetune_outputs_view({model: models[model]}, tokenizer, records[record])
        out = view["outputs"][model]
        marks = " ".join(f"{k} {'&#10003;' if ok else '&#10007;'}" for k, ok in out["slots"].items())
        display(HTML(
            f"<b>record {record}</b>: <code>{html.escape(format_prompt(records[record]).strip())}</code><br>"
            f"<b>{html.escape(model)}</b> (slot accuracy {out['slot_accuracy']:.2f}): "
            f"<code>{html.escape(out['text'])}</code><br><small>{marks}</small>"))

    return w.interactive(
        show,
        record=w.IntSlider(value=index, min=0, max=len(records) - 1, step=1, description="test record"),
        model=w.ToggleButtons(options=names, value=model or names[-1], description="model"),
    )


# ----------------------------------------------------------------------------- exercise checkers

def check_gpt2_c_attn_lora_params(answer, r: int = 8) -> bool:
    """Exercise 1: trainable parameters of LoRA rank r on c_attn of GPT-2 124M, counted on the meta device."""
    if is_blank(answer):
        return not_filled_in("the number of trainable parameters")
    model = meta_gpt2("small")
    with torch.device("meta"):
        add_lora(model, ["c_attn"], r=r)
    truth = count_parameters(model)[0]
    if answer == truth:
        return report(True, f"{truth:,d} = 12 layers x r x (768 + 2304): c_attn maps d to 3d.")
    if answer == 12 * r * 2 * 768:
        return report(False, f"you gave {answer:,d}, as if c_attn were 768 -> 768; it computes q, k and v at once.")
    if answer == r * (768 + 2304):
        return report(False, f"you gave {answer:,d}: that is one layer; GPT-2 124M has 12.")
    return report(False, f"you gave {answer!r}. One adapted (d_out x d_in) weight adds r (d_in + d_out); "
                         "c_attn is 768 -> 2304, in each of the 12 layers.")


def check_task_sentence(record, text) -> bool:
    """Exercise 2: does `text` realise every field of `record` (the notebook's slot accuracy)?"""
    if is_blank(text):
        return not_filled_in("a sentence for the record")
    if not isinstance(text, str):
        return report(False, f"write the sentence as a str, got {type(text).__name__}.")
    hits = slots_realized(text, record)
    missing = [k for k, ok in hits.items() if not ok]
    if not missing:
        return report(True, f"all {len(hits)} slots realised, slot accuracy 1.0.")
    wanted = ", ".join(repr(slot_phrases(record)[k].strip()) for k in missing)
    return report(False, f"slot accuracy {1 - len(missing) / len(hits):.2f}; missing {missing}: "
                         f"the metric looks for {wanted} word for word.")


def _tiny_lora_setup(seed: int = 0):
    """A small GPT-2 with LoRA on c_attn (B made nonzero), an AdamW over the adapters, and two batches."""
    torch.manual_seed(seed)
    model = add_lora(toy_gpt2(toy_gpt2_config(n_layer=2, n_embd=32, n_head=2), seed=seed), ["c_attn"], r=2)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.02)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 256, (3, 10), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100  # the prompt is not scored
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return model, batches


def _reference_step(model, batch, optimizer) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def check_lora_step(fn) -> bool:
    """Exercise 3: `fn(model, batch, optimizer) -> float` runs one training step and returns the loss."""
    if is_blank(fn):
        return not_filled_in("lora_step")
    ref, batches = _tiny_lora_setup()
    mine, start = copy.deepcopy(ref), copy.deepcopy(ref)
    frozen = {n: p.detach().clone() for n, p in mine.named_parameters() if not p.requires_grad}
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_mine = torch.optim.AdamW([p for p in mine.parameters() if p.requires_grad], lr=1e-2)
    for i, batch in enumerate(batches):
        want = _reference_step(ref, batch, opt_ref)
        got, problem = call_learner(fn, mine, batch, opt_mine)
        if problem:
            return report(False, problem)
        try:
            got = float(got)
        except (TypeError, ValueError, RuntimeError):
            return report(False, f"return the loss as a number (loss.item()), got {type(got).__name__}.")
        if abs(got - want) > 1e-5:
            return report(False, f"step {i + 1}: you returned loss {got:.4f}, expected {want:.4f}: return the loss "
                                 "of this batch, computed before the update.")
        if i == 0 and all(torch.equal(p, q) for p, q in zip(mine.parameters(), start.parameters())):
            return report(False, "the adapters did not move: call loss.backward() and then optimizer.step().")
        if any(not torch.allclose(p, q, atol=1e-7) for p, q in zip(mine.parameters(), ref.parameters())):
            hint = ("the second step went wrong: gradients from step 1 were still there. Clear them after "
                    "each step (optimizer.zero_grad()).") if i else "the step differs from AdamW's on this batch."
            return report(False, hint)
    if any(not torch.equal(p, frozen[n]) for n, p in mine.named_parameters() if n in frozen):
        return report(False, "a frozen weight changed; only the adapters (requires_grad=True) may train.")
    return report(True, "two steps give the same loss and the same adapters as the reference loop; "
                        "the frozen weights did not move.")


def check_adapter_state(fn) -> bool:
    """Exercise 4: `fn(model) -> dict` holds exactly the adapters' tensors, detached copies, enough to restore them."""
    if is_blank(fn):
        return not_filled_in("adapter_state")
    trained, _ = _tiny_lora_setup(seed=1)
    state, problem = call_learner(fn, trained)
    if problem:
        return report(False, problem)
    if not isinstance(state, dict):
        return report(False, f"return a dict of name -> tensor, got {type(state).__name__}.")
    want = {n for n, p in trained.named_parameters() if p.requires_grad}
    extra, missing = set(state) - want, want - set(state)
    if extra:
        return report(False, f"your dict holds {len(state)} tensors, {len(extra)} of them not adapters "
                             f"(e.g. {sorted(extra)[0]!r}): keep only the trainable ones, lora_A and lora_B.")
    if missing:
        return report(False, f"{len(missing)} adapter tensors are missing (e.g. {sorted(missing)[0]!r}).")
    params = dict(trained.named_parameters())
    if any(not isinstance(t, torch.Tensor) or t.shape != params[n].shape for n, t in state.items()):
        return report(False, "each value should be the parameter's tensor, of its shape.")
    if any(t.data_ptr() == params[n].data_ptr() or t.requires_grad for n, t in state.items()):
        return report(False, "your tensors share memory with the live parameters, so training on would change "
                             "your saved copy: return p.detach().clone().")
    fresh, _ = _tiny_lora_setup(seed=1)  # the same base ...
    with torch.no_grad():
        for layer in lora_layers(fresh).values():  # ... with other adapters
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    fresh.load_state_dict(state, strict=False)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        same = torch.allclose(fresh(ids).logits, trained(ids).logits, atol=1e-6)
    if not same:
        return report(False, "loading your dict into a fresh model does not reproduce the trained one's outputs.")
    n = sum(t.numel() for t in state.values())
    return report(True, f"{len(state)} tensors, {n:,d} numbers of {count_parameters(trained)[1]:,d}: loaded into "
                        "another model they reproduce its outputs.")


def sample_record() -> ApiRecord:
    """The record of exercise 2."""
    return ApiRecord(name="zip", module="builtins", kind="function", args="2", returns="iterator", raises="TypeError")
