"""Notebooks 06 and 06b (fine-tuning GPT-2): the methods compared, the runs, the comparison widget, the checkers.

A `Method` (the library's, `lora_course.methods`) is one way to fine-tune; `run_method`
trains a copy of the base model with it and scores it; `sweep` picks a method's learning
rate by validation loss; `LearnForget` records task quality and forgetting along a run.
"""

from __future__ import annotations

import copy
import html
import statistics
from dataclasses import dataclass, field

import ipywidgets as w
import torch
from IPython.display import HTML, display
from torch import nn

from ..data import ApiRecord, evaluate_task, format_prompt, generate, slot_phrases, slots_realized
from ..lora import add_lora, count_parameters, lora_layers, update_norm
from ..methods import Method
from ..models import toy_gpt2, toy_gpt2_config
from ..train import TrainConfig, optimizer_step, text_loss, train
from .common import Problem, call, call_number, checker, is_blank, not_filled_in, report

__all__ = ["ALL_LINEAR", "WEIGHT_SETS", "Method", "Result", "run_method", "sweep",
           "LearnForget", "forgetting_at_quality", "mean_spread", "finetune_compare_widget", "check_task_sentence",
           "check_lora_step", "check_adapter_state", "check_head_start_prediction", "check_table5_prediction",
           "sample_record"]

ALL_LINEAR = ("c_attn", "c_proj", "c_fc")  # GPT-2's linear layers in each block (c_proj: attention's and MLP's)
# The LoRA paper's Table 5 at one budget: r = 8 on one weight type, 4 on two, 2 on all four.
WEIGHT_SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "W_q": (("q",), 8), "W_k": (("k",), 8), "W_v": (("v",), 8), "W_o": (("o",), 8),
    "W_q, W_k": (("q", "k"), 4), "W_q, W_v": (("q", "v"), 4), "all four": (("q", "k", "v", "o"), 2),
}


@dataclass
class Result:
    """One trained run: its method, seed and lr, its run record, test scores, ||Delta W||_F, curve and model."""

    method: Method
    seed: int
    lr: float
    run: object
    scores: dict
    model: nn.Module | None = None
    curve: list = field(default_factory=list)
    update_norm: float = float("nan")  # ||Delta W||_F of all LoRA updates together; NaN without LoRA

    @property
    def quality(self) -> float:
        return self.scores["slot_accuracy"]

    @property
    def share(self) -> float:
        """Trainable parameters as a share of the base model's (a trained copy of a module counts in full)."""
        return self.run.trainable_params / self.base_params

    base_params: int = 0


def run_method(base: nn.Module, tokenizer, splits, method: Method, *, seed: int, steps: int, lr: float,
               test=None, keep_model: bool = False, learn_forget=None, checkpoint_every: int = 0,
               max_new_tokens: int = 32) -> Result:
    """Train `method` on a copy of `base` (batch 8) and score it on `test` (greedy, slot accuracy)."""
    torch.manual_seed(seed)
    model = method.build(base)
    config = TrainConfig(steps=steps, batch_size=8, lr=lr, seed=seed, n_eval=64, progress=False)
    run = train(model, tokenizer, splits.train, splits.validation, config, method=method.label,
                checkpoint=learn_forget, checkpoint_every=checkpoint_every)
    test = None if test is None else list(test)
    if learn_forget is not None and learn_forget.records == test and max_new_tokens == learn_forget.max_new_tokens:
        scores = learn_forget.scores  # its checkpoint after the last step scored these records on this model
    else:
        scores = evaluate_task(model, tokenizer, test, max_new_tokens) if test is not None else {}
    curve = list(learn_forget.points) if learn_forget is not None else []
    norm = update_norm(model) if lora_layers(model) else float("nan")
    return Result(method, seed, lr, run, scores, model if keep_model else None, curve, norm,
                  base_params=count_parameters(base)[1])


def sweep(base: nn.Module, tokenizer, splits, method: Method, lrs, *, steps: int, seed: int = 0,
          **kwargs) -> dict[float, Result]:
    """One run per learning rate; the best is the one with the lowest validation loss."""
    return {lr: run_method(base, tokenizer, splits, method, seed=seed, steps=steps, lr=lr, **kwargs) for lr in lrs}


class LearnForget:
    """A `train` checkpoint: at each call, (step, task quality on `records`, held-out loss increase)."""

    def __init__(self, tokenizer, records, heldout_ids: torch.Tensor, base_loss: float, base_quality: float = 0.0,
                 max_blocks: int = 8, max_new_tokens: int = 32):
        self.tokenizer, self.records, self.heldout_ids = tokenizer, list(records), heldout_ids
        self.base_loss, self.max_blocks, self.max_new_tokens = base_loss, max_blocks, max_new_tokens
        self.scores, self.points = {}, [(0, base_quality, 0.0)]  # the latest scores; (step, quality, forgot) from 0

    def __call__(self, step: int, model: nn.Module) -> None:
        self.scores = evaluate_task(model, self.tokenizer, self.records, max_new_tokens=self.max_new_tokens)
        forgot = text_loss(model, self.heldout_ids, block_size=128, max_blocks=self.max_blocks) - self.base_loss
        self.points.append((step, self.scores["slot_accuracy"], forgot))


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


def finetune_compare_widget(models: dict, tokenizer, records, index: int = 0):
    """A slider over test records: what every model writes for the record, and which fields it got right."""
    records = list(records)
    texts = {name: generate(model, tokenizer, records, max_new_tokens=32) for name, model in models.items()}

    def show(record):
        rows = []
        for name in models:
            slots = slots_realized(texts[name][record], records[record])
            marks = " ".join(f"{k} {'&#10003;' if ok else '&#10007;'}" for k, ok in slots.items())
            rows.append(f"<tr><td><b>{html.escape(name)}</b></td><td><code>{html.escape(texts[name][record])}"
                        f"</code></td><td><small>{marks}</small></td></tr>")
        display(HTML(f"<b>record {record}</b>: <code>{html.escape(format_prompt(records[record]).strip())}</code>"
                     f"<table>{''.join(rows)}</table>"))

    return w.interactive(show, record=w.IntSlider(value=index, min=0, max=len(records) - 1, description="test record"))


@checker("a sentence for the record", answers=("text",))
def check_task_sentence(record, text) -> bool:
    """Exercise 1: does `text` realise every field of `record` (the notebook's slot accuracy)?"""
    if not isinstance(text, str):
        raise Problem(f"write the sentence as a str, got {type(text).__name__}.")
    hits = slots_realized(text, record)
    missing = [k for k, ok in hits.items() if not ok]
    if missing:
        wanted = ", ".join(repr(slot_phrases(record)[k].strip()) for k in missing)
        raise Problem(f"slot accuracy {1 - len(missing) / len(hits):.2f}; missing {missing}: "
                      f"the metric looks for {wanted} word for word.")
    return f"all {len(hits)} slots realised, slot accuracy 1.0."


def _tiny_lora_setup(seed: int = 0):
    """A small GPT-2 with LoRA on c_attn (B made nonzero), an AdamW over the adapters, and two batches."""
    torch.manual_seed(seed)
    model = add_lora(toy_gpt2(toy_gpt2_config(n_layer=2, n_embd=32, n_head=2), seed=seed), ["c_attn"], r=2)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.02)
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 256, (3, 10), generator=g) for _ in range(2)]  # two batches of (3, 10)
    labels = [torch.where(torch.arange(10) < 5, -100, x) for x in ids]  # the prompt (5 tokens) is not scored
    return model, [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y} for x, y in zip(ids, labels)]


@checker("lora_step")
def check_lora_step(fn) -> bool:
    """Exercise 2: `fn(model, batch, optimizer) -> float` runs one training step and returns the loss."""
    ref, batches = _tiny_lora_setup()
    mine, start = copy.deepcopy(ref), copy.deepcopy(ref)
    frozen = {n: p.detach().clone() for n, p in mine.named_parameters() if not p.requires_grad}
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_mine = torch.optim.AdamW([p for p in mine.parameters() if p.requires_grad], lr=1e-2)
    for i, batch in enumerate(batches):
        want = optimizer_step(ref(**batch).loss, opt_ref)
        got = call_number("your lora_step", fn, mine, batch, opt_mine)
        if abs(got - want) > 1e-5:
            raise Problem(f"step {i + 1}: you returned loss {got:.4f}, expected {want:.4f}: return the loss of "
                          "this batch, computed before the update.")
        if i == 0 and all(torch.equal(p, q) for p, q in zip(mine.parameters(), start.parameters())):
            raise Problem("the adapters did not move: call loss.backward() and then optimizer.step().")
        if any(not torch.allclose(p, q, atol=1e-7) for p, q in zip(mine.parameters(), ref.parameters())):
            raise Problem("the second step went wrong: gradients from step 1 were still there. Clear them after "
                          "each step (optimizer.zero_grad())." if i else "the step differs from AdamW's on this batch.")
    if any(not torch.equal(p, frozen[n]) for n, p in mine.named_parameters() if n in frozen):
        raise Problem("a frozen weight changed; only the adapters (requires_grad=True) may train.")
    return "two steps give the same loss and the same adapters as the reference loop; the frozen weights did not move."


@checker("adapter_state")
def check_adapter_state(fn) -> bool:
    """Exercise 3: `fn(model) -> dict` holds exactly the adapters' tensors, detached copies, enough to restore them."""
    trained, _ = _tiny_lora_setup(seed=1)
    state = call("your adapter_state", fn, trained)
    if not isinstance(state, dict):
        raise Problem(f"return a dict of name -> tensor, got {type(state).__name__}.")
    want = {n for n, p in trained.named_parameters() if p.requires_grad}
    extra, missing = set(state) - want, want - set(state)
    if extra:
        raise Problem(f"your dict holds {len(state)} tensors, {len(extra)} of them not adapters (e.g. "
                      f"{sorted(extra)[0]!r}): keep only the trainable ones, lora_A and lora_B.")
    if missing:
        raise Problem(f"{len(missing)} adapter tensors are missing (e.g. {sorted(missing)[0]!r}).")
    params = dict(trained.named_parameters())
    if any(not isinstance(t, torch.Tensor) or t.shape != params[n].shape for n, t in state.items()):
        raise Problem("each value should be the parameter's tensor, of its shape.")
    if any(t.data_ptr() == params[n].data_ptr() or t.requires_grad for n, t in state.items()):
        raise Problem("your tensors share memory with the live parameters, so training on would change your saved "
                      "copy: return p.detach().clone().")
    fresh, _ = _tiny_lora_setup(seed=1)  # the same base ...
    with torch.no_grad():
        for layer in lora_layers(fresh).values():  # ... with other adapters
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    fresh.load_state_dict(state, strict=False)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        if not torch.allclose(fresh(ids).logits, trained(ids).logits, atol=1e-6):
            raise Problem("loading your dict into a fresh model does not reproduce the trained one's outputs.")
    n = sum(t.numel() for t in state.values())
    return (f"{len(state)} tensors, {n:,d} numbers of {count_parameters(trained)[1]:,d}: loaded into another model "
            "they reproduce its outputs.")


def _prediction(prediction, options, what, measure, explain) -> bool:
    """A predict-then-measure exercise: the prediction (one of `options`) against `measure()` -> (answer, numbers)."""
    if is_blank(prediction):
        return not_filled_in(f"your prediction, one of {list(options)}")
    if prediction not in options:
        return report(False, f"predict one of {list(options)}, got {prediction!r}")
    answer, numbers = measure()
    why = explain[answer]
    if prediction == answer:
        return report(True, f"{numbers}: {why}.")
    return report(False, f"{numbers}, so {what} is {answer!r}: {why}.")


def check_head_start_prediction(prediction, base, tokenizer, splits, lrs: dict, steps: int = 50, test=None) -> bool:
    """Exercise 4: after `steps` steps, is LoRA + the trained embedding "ahead" of full fine-tuning or "behind"?"""
    test = list(splits.test[:32]) if test is None else test

    def measure():
        q = {label: run_method(base, tokenizer, splits, method, seed=0, steps=steps, lr=lrs[label], test=test).quality
             for label, method in (("lora", Method("LoRA + embedding", train_embedding=True)),
                                   ("full", Method("full", targets=None)))}
        answer = "ahead" if q["lora"] > q["full"] else "behind"
        return answer, f"after {steps} steps: LoRA + embedding {q['lora']:.3f}, full fine-tuning {q['full']:.3f}"

    return _prediction(prediction, ("ahead", "behind"), "LoRA + embedding", measure, {
        "ahead": "early on, LoRA's larger learning rate moves the embedding and the adapters further per step than "
                 "full fine-tuning's rate moves its weights",
        "behind": "full fine-tuning's larger change pays off even this early"})


def check_table5_prediction(prediction, base, tokenizer, splits, lr: float, steps: int, seeds=(0,)) -> bool:
    """Exercise (06b): at twice the budget (r 16 / 8 / 4), does "all four" still beat "W_q, W_v"? "yes" or "no"."""
    def measure():
        loss = {}
        for name in ("W_q, W_v", "all four"):
            weights, r = WEIGHT_SETS[name]
            method = Method(name, r=2 * r, weights=weights)
            loss[name] = statistics.fmean(run_method(base, tokenizer, splits, method, seed=s, steps=steps,
                                                     lr=lr).run.final_val_loss for s in seeds)
        answer = "yes" if loss["all four"] < loss["W_q, W_v"] else "no"
        return answer, f"validation loss: all four {loss['all four']:.3f}, W_q, W_v {loss['W_q, W_v']:.3f}"

    return _prediction(prediction, ("yes", "no"), "the answer", measure, {
        "yes": "spreading the budget over all four weights still wins at twice the budget",
        "no": "with more rank per weight, the choice of weights matters less than it did"})


def sample_record() -> ApiRecord:
    """The record of exercise 1."""
    return ApiRecord(name="zip", module="builtins", kind="function", args="2", returns="iterator", raises="TypeError")
