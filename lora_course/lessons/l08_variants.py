"""Notebook 08 (DoRA, PiSSA, many adapters on one base): the style tasks, the serving widget, the checkers.

Three adapters learn three *styles* of answer to notebook 06's records (the same prompt,
`name: sorted | kind: function | args: 2`), so that serving them from one base shows at
a glance which adapter wrote which row:

    sentence   sorted is a function that takes two arguments.      (notebook 06's target)
    call       sorted(a, b)  # function
    question   What is sorted? A function with two arguments.

`play` (from `common`) is re-exported, so that the notebook imports its own lesson module only.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..data import ARGS_IN_WORDS, Record, format_prompt, format_target, generate
from ..dora import DoRALinear
from ..pissa import pissa_factors
from ..runtime import seed_everything
from ..serving import MultiAdapterModel
from .common import call_learner, is_blank, not_filled_in, play, report

__all__ = ["STYLES", "style_target", "style_matches", "style_batches", "train_style_adapter", "style_scores",
           "row_texts", "magnitude_direction_change", "draw_style_scores", "serving_widget", "check_dora_forward",
           "check_pissa_init", "check_dora_extra_params", "play"]

STYLES = ("sentence", "call", "question")


def style_target(record: Record, style: str) -> str:
    """What a `style` adapter should write for `record` (leading space, as after the prompt's newline)."""
    if style == "sentence":
        return format_target(record)
    if style == "call":
        return f" {record.name}({', '.join('abc'[:int(record.args)])})  # {record.kind}"
    if style == "question":
        return f" What is {record.name}? A {record.kind} with {ARGS_IN_WORDS[record.args]}."
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


# The shape of each style's answer, whatever the fields: which style a text is written in.
_FORMS = {
    "sentence": re.compile(r"\S+ is an? \w+ that takes [\w ]+\.$"),
    "call": re.compile(r"\S+\([a-c, ]*\)\s+# \w+$"),
    "question": re.compile(r"What is \S+\? An? \w+ with [\w ]+\.$"),
}


def style_matches(text: str, record: Record, style: str, exact: bool = True) -> bool:
    """Did the model write the `style` answer for `record` (exact), or any answer in that style (exact=False)?"""
    if style not in _FORMS:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if exact:
        return text.strip() == style_target(record, style).strip()
    return _FORMS[style].fullmatch(text.strip()) is not None


def style_batches(tokenizer, records: Sequence[Record], style: str, batch_size: int, seed: int = 0):
    """Endless shuffled batches of prompt + style answer + EOS; the loss sees the answer only."""
    rng = random.Random(seed)
    order = list(range(len(records)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = []
            for i in order[start:start + batch_size]:
                prompt = tokenizer(format_prompt(records[i]))["input_ids"]
                answer = tokenizer(style_target(records[i], style))["input_ids"] + [tokenizer.eos_token_id]
                rows.append((prompt + answer, [-100] * len(prompt) + answer))
            length = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), length), tokenizer.eos_token_id)  # (B, T), right-padded
            labels = torch.full((len(rows), length), -100)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for j, (ids, lab) in enumerate(rows):
                input_ids[j, :len(ids)], labels[j, :len(lab)], mask[j, :len(ids)] = \
                    torch.tensor(ids), torch.tensor(lab), 1
            yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_style_adapter(model: nn.Module, tokenizer, records: Sequence[Record], style: str, steps: int,
                        lr: float = 1e-2, batch_size: int = 16, seed: int = 0) -> list[float]:
    """AdamW on the model's trainable parameters (its adapter) for `steps` batches of `style`; the losses."""
    seed_everything(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = style_batches(tokenizer, records, style, batch_size, seed=seed)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**next(data)).loss
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def style_scores(server: MultiAdapterModel, tokenizer, records: Sequence[Record], adapters: Sequence[str | None],
                 exact: bool = False) -> dict[str | None, dict[str, float]]:
    """For each adapter (None: the base model), the share of `records` it answers in each style (`style_matches`)."""
    before = server.active_adapter
    scores = {}
    try:
        for adapter in adapters:
            server.set_adapter(adapter)
            texts = generate(server, tokenizer, records, max_new_tokens=24)
            scores[adapter] = {s: sum(style_matches(t, r, s, exact) for t, r in zip(texts, records)) / len(records)
                               for s in STYLES}
    finally:
        server.set_adapter(before)
    return scores


def row_texts(server: MultiAdapterModel, tokenizer, records: Sequence[Record], adapter_names: Sequence,
              max_new_tokens: int = 24) -> list[str]:
    """Greedy answers for a mixed batch: row i is `records[i]` answered by `adapter_names[i]` (None: the base)."""
    with server.mixed_batch(adapter_names):
        return generate(server, tokenizer, records, max_new_tokens=max_new_tokens)


@torch.no_grad()
def magnitude_direction_change(W0: torch.Tensor, W: torch.Tensor) -> tuple[float, float]:
    """DoRA paper's (delta M, delta D) of a fine-tuned weight W against W0, both (out, in):

    mean over output rows of |  ||W_i|| - ||W0_i||  | and of 1 - cos(W_i, W0_i).
    """
    W0, W = W0.float(), W.float()
    dM = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean().item()
    dD = (1 - nn.functional.cosine_similarity(W, W0, dim=1)).mean().item()
    return dM, dD


def draw_style_scores(scores: dict, ax=None):
    """A heat map: rows are adapters (None: the base), columns the styles, cells the exact-match share."""
    ax = ax or plt.subplots(figsize=(4.8, 2.8))[1]
    names = list(scores)
    grid = [[scores[a][s] for s in STYLES] for a in names]
    ax.imshow(grid, vmin=0, vmax=1, cmap="Greens")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center")
    ax.set_xticks(range(len(STYLES)), STYLES)
    ax.set_yticks(range(len(names)), ["base" if a is None else a for a in names])
    ax.set(xlabel="style of the answer", ylabel="adapter", title="answers in each style, by adapter")
    return ax


def serving_widget(server: MultiAdapterModel, tokenizer, records: Sequence[Record]) -> w.interactive:
    """Three rows of one batch, each with its own adapter (or none): pick them and see what each row gets."""
    records = list(records)[:3]
    options = ["none", *server.adapters]  # "none": the base model alone

    def show(row_1=server.adapters[0], row_2=server.adapters[1 % len(server.adapters)], row_3="none"):
        from IPython.display import HTML, display

        names = [None if n == "none" else n for n in (row_1, row_2, row_3)]
        texts = row_texts(server, tokenizer, records, names)
        cells = "".join(
            f"<tr><td>{i + 1}</td><td><code>{format_prompt(r).strip()}</code></td><td>{n or 'none'}</td>"
            f"<td><code>{t.strip()}</code></td></tr>" for i, (r, n, t) in enumerate(zip(records, names, texts)))
        display(HTML("<table><tr><th>row</th><th>prompt</th><th>adapter</th><th>answer</th></tr>"
                     f"{cells}</table><p>one batch, one forward per token: {names}</p>"))

    controls = {}
    for key, value in zip(("row_1", "row_2", "row_3"), show.__defaults__):
        controls[key] = w.SelectionSlider(options=options, value=value, description=key.replace("_", " "),
                                          continuous_update=False)
    return w.interactive(show, **controls)


# ----------------------------------------------------------------------------- exercise checkers

def _dora_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layer = DoRALinear(6, 5, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(5, generator=g))
    return layer.eval(), torch.randn(3, 6, generator=g)


def check_dora_forward(dora_forward) -> bool:
    """`dora_forward(x, W0, bias, lora_A, lora_B, magnitude, scaling)` must equal DoRALinear's output."""
    for seed in (0, 1):
        layer, x = _dora_case(seed)
        args = (x, layer.W0.detach(), layer.base_layer.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(),
                layer.lora_magnitude_vector.detach(), layer.scaling)
        got, problem = call_learner(dora_forward, *args)
        if problem:
            return report(False, problem)
        if is_blank(got):
            return not_filled_in("dora_forward's return value")
        want = layer(x).detach()
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return report(False, f"return a tensor of shape {tuple(want.shape)} (batch, out), got "
                                 f"{getattr(got, 'shape', type(got).__name__)}")
        if not torch.allclose(got, want, atol=1e-5):
            plain = x @ (layer.W0 + layer.delta_weight()).T.detach() + layer.base_layer.bias
            if torch.allclose(got, plain, atol=1e-5):
                return report(False, "that is plain LoRA's output; scale each output row by m / ||W0 + s B A||_row")
            return report(False, f"off by up to {(got - want).abs().max().item():.3g}; the norm is over the input "
                                 "dimension of the (out, in) weight (dim=1), and the bias is added unscaled")
    return report(True, "your forward equals DoRALinear's (and so PEFT's) on two random layers.")


def check_pissa_init(pissa_init_from_svd) -> bool:
    """`pissa_init_from_svd(W0, r, scaling)` must return (A (r, in), B (out, r), W_res (out, in)) as PEFT does."""
    W0 = torch.randn(7, 10, generator=torch.Generator().manual_seed(2))
    r, scaling = 3, 2.0
    got, problem = call_learner(pissa_init_from_svd, W0.clone(), r, scaling)
    if problem:
        return report(False, problem)
    if is_blank(got):
        return not_filled_in("the (A, B, W_res) your function returns")
    if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(t, torch.Tensor) for t in got)):
        return report(False, "return a tuple of three tensors: (A, B, W_res)")
    A, B, W_res = got
    want_A, want_B = pissa_factors(W0, r, scaling)
    if A.shape != (r, 10) or B.shape != (7, r) or W_res.shape != W0.shape:
        return report(False, f"shapes: A must be (r, in) = ({r}, 10), B (out, r) = (7, {r}), W_res like W0; got "
                             f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(W_res.shape)}")
    if not torch.allclose(W_res + scaling * B @ A, W0, atol=1e-5):
        return report(False, "W_res + scaling * B @ A must give back W0 (the layer starts where the model was)")
    if not torch.allclose(scaling * B @ A, scaling * want_B @ want_A, atol=1e-5):
        return report(False, "scaling * B @ A must be W0's best rank-r part: the top r singular triplets")
    if not (torch.allclose(A, want_A, atol=1e-5) and torch.allclose(B, want_B, atol=1e-5)):
        return report(False, "the product is right but the split is not PEFT's: A = sqrt(S_r / scaling) Vh_r, "
                             "B = U_r sqrt(S_r / scaling)")
    return report(True, "A, B and the residual equal PEFT's PiSSA init.")


def check_dora_extra_params(answer) -> bool:
    """DoRA's extra trainable parameters over LoRA for r=8 on c_attn of GPT-2 124M: one m per output, 12 x 2304."""
    if is_blank(answer):
        return not_filled_in("answer (an int)")
    want = 12 * 3 * 768
    if answer == want:
        return report(True, f"{want:,d}: one magnitude per output row of each c_attn, whatever r is.")
    if answer == 12 * 768:
        return report(False, "that counts one magnitude per input; m has one entry per output row (3 x 768)")
    if answer == 12 * 8 * (768 + 3 * 768) + want:
        return report(False, "that is LoRA's count plus DoRA's; give only what DoRA adds")
    return report(False, f"got {answer!r}; m holds one number per output row of each adapted layer")
