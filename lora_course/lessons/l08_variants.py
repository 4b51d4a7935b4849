"""Notebook 08 (DoRA, PiSSA, many adapters on one base): the style tasks, serving costs, the widget, the checkers.

Three adapters learn three *styles* of answer to notebook 06's records (the same prompt,
`name: sorted | kind: function | args: 2`), so that serving them from one base shows at
a glance which adapter wrote which row:

    sentence   sorted is a function that takes two arguments.      (notebook 06's target)
    call       sorted(a, b)  # function
    question   What is sorted? A function with two arguments.

`play` (from `common`) is re-exported, so that the notebook imports its own lesson module only.
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..data import ARGS_IN_WORDS, Record, batches, format_prompt, format_target, generate
from ..dora import DoRALinear
from ..lora import add_lora
from ..pissa import pissa_factors
from ..runtime import seed_everything
from ..serving import MultiAdapterModel, mixed_rows
from ..train import TrainConfig, optimizer_step, train
from .common import Problem, call, checker, one_word, play

__all__ = ["STYLES", "style_target", "style_matches", "train_style_adapter", "style_scores", "row_texts",
           "magnitude_direction_change", "draw_style_scores", "serving_widget",
           "check_mixed_rows", "check_dora_forward", "check_pissa_init", "check_pissa_prediction", "play"]

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


def train_style_adapter(model: nn.Module, tokenizer, records: Sequence[Record], style: str, steps: int,
                        lr: float = 1e-2, batch_size: int = 16, seed: int = 0) -> list[float]:
    """AdamW on the model's trainable parameters (its adapter) for `steps` batches of `style`; the losses."""
    seed_everything(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    data = batches(tokenizer, records, batch_size, seed=seed, target=lambda r: style_target(r, style))
    model.train()
    losses = [optimizer_step(model(**next(data)).loss, optimizer, grad_clip=1.0) for _ in range(steps)]
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

    mean over output rows of |  ||W_i|| - ||W0_i||  | and of 1 - cos(W_i, W0_i)."""
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

    sliders = {key: w.SelectionSlider(options=options, value=value, description=key.replace("_", " "),
                                      continuous_update=False)
               for key, value in zip(("row_1", "row_2", "row_3"), show.__defaults__)}
    return w.interactive(show, **sliders)


# ----------------------------------------------------------------------------- the mixed batch

@checker("your mixed_rows function", function=True)
def check_mixed_rows(fn) -> str:
    """Build step: `fn(x, result, rows, output)` serves a mixed batch as `serving.mixed_rows` does."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(6, 3, 4, generator=g), {n: torch.randn(4, 5, generator=g) for n in "abc"}  # (B, T, in)
    result = torch.randn(6, 3, 5, generator=g)  # (B, T, out): the base output
    rows = ["a", None, "b", "a", "c", None]
    calls = []

    def output(name, x_rows, result_rows):  # an adapter: the base output plus x W_name
        calls.append((name, len(x_rows)))
        return result_rows + x_rows @ W[name]

    kept = result.clone()
    got = call("your mixed_rows", fn, x, result, rows, output)
    if not torch.equal(result, kept):
        raise Problem("you changed `result` in place; build the output in a copy (result.clone())")
    want = mixed_rows(x, kept, rows, lambda n, xr, rr: rr + xr @ W[n])
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise Problem(f"return the batch's output, shape {tuple(want.shape)}; got {getattr(got, 'shape', got)}")
    wrong = [i for i in range(len(rows)) if not torch.allclose(got[i], want[i], atol=1e-6)]
    if wrong:
        i = wrong[0]
        raise Problem(f"row {i} (adapter {rows[i]!r}) is wrong: " + ("a None row keeps the base output"
                      if rows[i] is None else "it should be output(its adapter, its x, its base output)"))
    if len(calls) != len(set(n for n in rows if n is not None)):
        raise Problem(f"the rows are right, but you called the adapters {len(calls)} times for 3 distinct adapters: "
                      "gather each adapter's rows and call it once, so the cost follows the adapters, not the rows")
    return "each row got its own adapter, each adapter ran once on its rows, and the base rows kept the base output."


# ----------------------------------------------------------------------------- exercise checkers

@checker("your dora_forward function", function=True)
def check_dora_forward(dora_forward) -> str:
    """Exercise 1: `dora_forward(x, W0, bias, lora_A, lora_B, magnitude, scaling)` must equal DoRALinear's output."""
    for seed in (0, 1):  # a random DoRA layer (6 -> 5, r = 2) with a non-zero B and magnitudes off ||W0||_row
        g, layer = torch.Generator().manual_seed(seed), DoRALinear(6, 5, r=2, alpha=4).eval()
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(5, generator=g))
        x = torch.randn(3, 6, generator=g)
        args = (x, layer.W0.detach(), layer.base_layer.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(),
                layer.lora_magnitude_vector.detach(), layer.scaling)
        got = call("your dora_forward", dora_forward, *args)
        want = layer(x).detach()
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise Problem(f"return a tensor of shape {tuple(want.shape)} (batch, out), got "
                          f"{getattr(got, 'shape', type(got).__name__)}")
        if not torch.allclose(got, want, atol=1e-5):
            plain = x @ (layer.W0 + layer.delta_weight()).T.detach() + layer.base_layer.bias
            if torch.allclose(got, plain, atol=1e-5):
                raise Problem("that is plain LoRA's output; scale each output row by m / ||W0 + s B A||_row")
            raise Problem(f"off by up to {(got - want).abs().max().item():.3g}; the norm is over the input dimension "
                          "of the (out, in) weight (dim=1), and the bias is added unscaled")
    return "your forward equals DoRALinear's (and so PEFT's) on two random layers."


@checker("your pissa_init_from_svd function", function=True)
def check_pissa_init(pissa_init_from_svd) -> str:
    """Exercise 2: `pissa_init_from_svd(W0, r, scaling)` -> (A (r, in), B (out, r), W_res (out, in)) as PEFT's."""
    W0 = torch.randn(7, 10, generator=torch.Generator().manual_seed(2))
    r, scaling = 3, 2.0
    got = call("your pissa_init_from_svd", pissa_init_from_svd, W0.clone(), r, scaling)
    if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(t, torch.Tensor) for t in got)):
        raise Problem("return a tuple of three tensors: (A, B, W_res)")
    A, B, W_res = got
    want_A, want_B = pissa_factors(W0, r, scaling)
    if A.shape != (r, 10) or B.shape != (7, r) or W_res.shape != W0.shape:
        raise Problem(f"shapes: A must be (r, in) = ({r}, 10), B (out, r) = (7, {r}), W_res like W0; got "
                      f"{tuple(A.shape)}, {tuple(B.shape)}, {tuple(W_res.shape)}")
    if not torch.allclose(W_res + scaling * B @ A, W0, atol=1e-5):
        raise Problem("W_res + scaling * B @ A must give back W0 (the layer starts where the model was)")
    if not torch.allclose(scaling * B @ A, scaling * want_B @ want_A, atol=1e-5):
        raise Problem("scaling * B @ A must be W0's best rank-r part: the top r singular triplets")
    if not (torch.allclose(A, want_A, atol=1e-5) and torch.allclose(B, want_B, atol=1e-5)):
        raise Problem("the product is right but the split is not PEFT's: A = sqrt(S_r / scaling) Vh_r, "
                      "B = U_r sqrt(S_r / scaling)")
    return "A, B and the residual equal PEFT's PiSSA init."


@checker('your prediction, "yes" or "no"')
def check_pissa_prediction(prediction, base: nn.Module, tokenizer, records: Sequence[Record], r: int = 2,
                           steps: int = 20) -> str:
    """Exercise 3: at rank `r`, is PiSSA's mean loss over the first `steps` steps lower than LoRA's? Measured."""
    prediction = one_word(prediction, ("yes", "no"))
    early = {}
    for init in (True, "pissa"):
        seed_everything(0)
        model = add_lora(copy.deepcopy(base), ["c_attn"], r=r, alpha=2 * r, init_lora_weights=init)
        run = train(model, tokenizer, records, records, TrainConfig(steps=steps, batch_size=16, lr=1e-2, n_eval=16,
                                                                    progress=False))
        early[init] = sum(run.losses) / steps
    measured = "yes" if early["pissa"] < early[True] else "no"
    numbers = f"at r = {r}, mean loss over the first {steps} steps: PiSSA {early['pissa']:.3f}, LoRA {early[True]:.3f}"
    why = {"yes": f"even {r} principal directions of W0 are a better start than B = 0",
           "no": f"at r = {r} the principal part PiSSA hands the adapter is too small to help"}[measured]
    if prediction != measured:
        raise Problem(f"{numbers}, so the answer is {measured!r}: {why}.")
    return f"{numbers}: {why}."
