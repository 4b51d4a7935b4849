"""Notebook 05 (LoRA in a transformer): the block picture, the build step's reference, memory pictures, checkers."""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from ..fused import FusedLoRALinear
from ..layers import linear_features
from ..lora import LoRALinear, add_lora, matches_target
from ..memory import compare_budgets
from ..models import toy_gpt2
from ..skeletons import MODEL_PRESETS, preset_shape
from ..train import measure_training_peak
from ..validate import is_int
from .common import Problem, call, checker, one_word, play

__all__ = ["MEMORY_TARGETS", "BUDGET_COLORS", "draw_gpt2_block", "row_runs", "fused_delta", "check_fused_delta",
           "draw_budgets", "draw_peaks", "memory_budget_view", "memory_budget_widget", "TARGET_QUIZ",
           "check_targets_prediction", "check_saving_prediction", "play"]


# ----------------------------------------------------------------------------- a GPT-2 block, drawn (bottom up)

_GPT2_FLOW = ("ln_1", "attn.c_attn", "attention", "attn.c_proj", "+", "ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj", "+")
_FROZEN, _TRAINED, _PLAIN = "#d9d9d9", "#f4a259", "#ffffff"


def _box(ax, x, y, width, height, text, color, fontsize=8.5):
    ax.add_patch(Rectangle((x, y - height / 2), width, height, fc=color, ec="k"))
    ax.text(x + width / 2, y, text, ha="center", va="center", fontsize=fontsize)


def _draw_lora_layer(ax, part, module, x0, width, side, y) -> list[tuple[int, int]]:
    """A LoRA layer: a title band over its output slices, its A and B beside it; returns the adapted rows."""
    _box(ax, x0, y + 0.25, width, 0.5, f"{part}   {type(module.base_layer).__name__}  {module.in_features} -> "
         f"{module.out_features}: frozen W0 + LoRA", _PLAIN)
    fused = isinstance(module, FusedLoRALinear)
    n = len(module.enable_lora) if fused else 1
    size = module.out_features // n
    name = (lambda i: "qkv"[i] if n == 3 else f"slice {i}") if fused else (lambda i: "")
    enabled = module.enabled_slices if fused else [0]
    for i in range(n):
        text = (f"{name(i)}: rows {i * size}..{(i + 1) * size - 1}" if fused else "") + (
            "" if i in enabled else "\nno adapter")
        _box(ax, x0 + i * width / n, y - 0.25, width / n, 0.5, text, _TRAINED if i in enabled else _FROZEN, 8)
    pairs = module.slice_pairs() if fused else [(0, module.lora_A, module.lora_B)]
    for i, a, b in pairs:
        tag, left = (f"_{name(i)}", (i + 0.5) / n < 0.5) if fused else ("", False)
        bx = x0 - side - 0.4 if left else x0 + width + 0.4
        _box(ax, bx, y - 0.25, side, 0.6, f"A{tag} {tuple(a.shape)}\nB{tag} {tuple(b.shape)}", _TRAINED, 8)
        ax.annotate("", (x0 if left else x0 + width, y - 0.25), (bx + side if left else bx, y - 0.25),
                    arrowprops=dict(arrowstyle="->", color="tab:orange", lw=1.5))
    return [(i * size, (i + 1) * size) for i in enabled]


def draw_gpt2_block(model: torch.nn.Module, block: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Draw block `block` of a GPT-2 (the meta device will do) and its LoRA adapters, as read from the model (a fused
    layer split into its output slices, enabled ones orange); returns per adapted layer the rows [start, stop) drawn."""
    prefix, (d, n_head) = f"transformer.h.{block}", (model.config.n_embd, model.config.n_head)
    h = model.get_submodule(prefix)
    fig, ax = plt.subplots(figsize=(10, 7.5))
    drawn: dict[str, list[tuple[int, int]]] = {}
    x0, width, side, mid = 3.4, 5.4, 2.6, 6.1  # the block's column (its middle), the adapters' boxes beside it
    ax.text(mid, 0.1, (f"x from block {block - 1}" if block else "x: token + position embeddings") + f", (B, T, {d})",
            ha="center", va="center", fontsize=9)
    top, residuals = 0.35, iter(["ln_1", "ln_2"])
    for part in _GPT2_FLOW:
        module = h.get_submodule(part) if part not in ("+", "attention") else None
        half = 0.5 if isinstance(module, LoRALinear) else 0.3
        y = top + 0.35 + half
        ax.annotate("", (mid, y - half), (mid, top), arrowprops=dict(arrowstyle="->"))
        top = y + half
        if part == "+":
            ax.plot(mid, y, "o", ms=15, mfc=_PLAIN, mec="k")
            ax.text(mid, y, "+", ha="center", va="center", fontsize=11)
            ax.text(mid + 0.35, y, f"residual: adds the input of {next(residuals)}", va="center", fontsize=8,
                    color="0.3")
        elif part == "attention":
            _box(ax, x0, y, width, 2 * half, f"attention: softmax(q k^T / sqrt({d // n_head})) v, {n_head} heads, "
                 "no weights", _PLAIN)
        elif isinstance(module, LoRALinear):
            drawn[f"{prefix}.{part}"] = _draw_lora_layer(ax, part, module, x0, width, side, y)
        elif getattr(module, "weight", None) is None:
            _box(ax, x0, y, width, 2 * half, f"{part}   {type(module).__name__}, no weights", _PLAIN)
        else:
            shape = "{} -> {}".format(*linear_features(module)) if module.weight.dim() == 2 else tuple(
                module.weight.shape)
            _box(ax, x0, y, width, 2 * half, f"{part}   {type(module).__name__}  {shape}   frozen", _FROZEN)
    ax.annotate("", (mid, top + 0.35), (mid, top), arrowprops=dict(arrowstyle="->"))
    ax.text(mid, top + 0.55, "to ln_f" if block + 1 == model.config.n_layer else f"to block {block + 1}",
            ha="center", va="center", fontsize=9)
    ax.set(xlim=(0, x0 + width + side + 0.6), ylim=(-0.2, top + 0.8))
    ax.axis("off")
    ax.set_title(f"{prefix}, one of {model.config.n_layer} blocks: d = {d}, {n_head} heads; orange: trained (LoRA), "
                 "grey: frozen", fontsize=10)
    plt.tight_layout()
    plt.show()
    return drawn


def row_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The runs of True in a 1-d boolean mask, as [start, stop): [F, T, T, F, T] -> [(1, 3), (4, 5)]."""
    edges = torch.cat([mask.new_zeros(1), mask.bool(), mask.new_zeros(1)]).int().diff().nonzero().flatten().tolist()
    return list(zip(edges[::2], edges[1::2]))


# ----------------------------------------------------------------------------- build step: a fused layer's update

def fused_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, enable_lora, scaling: float) -> torch.Tensor:
    """The reference: a fused layer's whole dW (out, in), scaling * B_i A_i in enabled slice i's rows, zeros in a
    disabled slice's. lora_A (m r, in) and lora_B (m s, r) stack the m enabled slices' A_i and B_i."""
    enabled = [i for i, on in enumerate(enable_lora) if on]
    r, s = lora_A.shape[0] // len(enabled), lora_B.shape[0] // len(enabled)
    dW = lora_A.new_zeros(len(enable_lora) * s, lora_A.shape[1])  # (out, in): disabled slices stay zero
    for A_i, B_i, i in zip(lora_A.split(r), lora_B.split(s), enabled):  # A_i (r, in), B_i (s, r)
        dW[i * s:(i + 1) * s] = scaling * B_i @ A_i
    return dW


def _fused_cases():  # (lora_A, lora_B, enable_lora, scaling, FusedLoRALinear's own dW) on small random layers
    g, cases = torch.Generator().manual_seed(5), []
    for fan_in, size, r, enable, scaling in [(5, 6, 2, (1, 0, 1), 2.0), (4, 3, 3, (0, 1, 0), 0.5),
                                             (7, 4, 1, (1, 1, 1), 1.5), (6, 2, 2, (1, 0, 0), 3.0)]:
        layer = FusedLoRALinear(fan_in, size * len(enable), r=r, alpha=scaling * r, enable_lora=enable)
        with torch.no_grad():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g))
            cases.append((layer.lora_A.clone(), layer.lora_B.clone(), layer.enable_lora, scaling, layer.delta_weight()))
    return cases


def _fused_hint(got: torch.Tensor, A, B, enable, scaling, want: torch.Tensor) -> str:  # why a wrong dW is wrong
    n_on, size = sum(enable), B.shape[0] // sum(enable)
    if tuple(got.shape) != tuple(want.shape):
        return (f"dW must have shape (out_features, in_features) = {tuple(want.shape)}, yours is {tuple(got.shape)}: "
                f"the update covers all len(enable_lora) x {size} rows of the output, disabled slices as zero rows")
    got = got.to(want.dtype)
    if torch.allclose(got * scaling, want, atol=1e-5):
        return "the update is scaling * B_i A_i: you left out scaling"
    on = torch.tensor([e for e in enable for _ in range(size)])  # (out,): the rows of the enabled slices
    if not on[:n_on * size].all() and torch.allclose(got[:n_on * size], want[on], atol=1e-5):
        return ("you wrote the enabled slices one after another; slice i belongs at rows i x slice_size, so v sits "
                "after k's rows, which stay zero")
    if (got[~on] != 0).any():
        return "the rows of a disabled slice must be exactly zero: no adapter writes to them"
    return ("slice i gets B_i A_i, where A_i is the next block of r rows of lora_A and B_i the next block of "
            "slice_size rows of lora_B (one block per enabled slice, in order)")


def check_fused_delta(fn) -> str:
    """The build step's check: `fn(lora_A, lora_B, enable_lora, scaling)` must equal FusedLoRALinear's own dW."""
    for A, B, enable, scaling, want in (cases := _fused_cases()):
        got = call("fused_delta", fn, A.clone(), B.clone(), enable, scaling)
        if not torch.is_tensor(got):
            raise Problem(f"return a tensor of shape (out_features, in_features), got {type(got).__name__}.")
        if tuple(got.shape) != tuple(want.shape) or not torch.allclose(got.to(want.dtype), want, atol=1e-5):
            raise Problem(f"enable_lora={enable}: " + _fused_hint(got, A, B, enable, scaling, want) + ".")
    return f"equal to FusedLoRALinear.delta_weight on {len(cases)} random layers, disabled slices exactly zero."


# ----------------------------------------------------------------------------- memory pictures and widget

MEMORY_TARGETS = {"q": 1, "q, v": 2, "q, k, v": 3, "q, k, v, o": 4}  # the widget's square d x d projections
BUDGET_COLORS = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer": "tab:red",
                 "master_weights": "tab:purple", "activations": "tab:green"}


def draw_budgets(ax, bars: dict[str, dict[str, float]], unit: str = "GB",
                 note: str = "activations not included") -> dict[str, dict[str, tuple[float, float]]]:
    """Stacked horizontal bars, one per budget, one segment per part (in `unit`), the total at the end; returns
    what was drawn, read back from the bars: {budget: {part: (left edge, width)}}."""
    drawn: dict[str, dict[str, tuple[float, float]]] = {}
    for row, (label, parts) in enumerate(bars.items()):
        left, drawn[label] = 0.0, {}
        for part, size in parts.items():
            (rect,) = ax.barh(row, size, left=left, color=BUDGET_COLORS[part], label=part.replace("_", " "))
            drawn[label][part] = (rect.get_x(), rect.get_width())
            left = rect.get_x() + rect.get_width()
        ax.text(left, row, f" {left:.1f} {unit}", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlim(0, 1.2 * max(sum(p.values()) for p in bars.values()))
    ax.set_xlabel(f"{unit} ({'1e9' if unit == 'GB' else '1e6'} bytes)" + (f"; {note}" if note else ""))
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one legend entry per part
    ax.legend(handles.values(), handles.keys(), loc="lower right", fontsize=8)
    return drawn


def draw_peaks(runs: dict[str, dict[str, tuple]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """{model: {run: (MemoryBudget, measured peak bytes)}} as one panel per model on its own MB scale: each run's
    parts end to end (activations included), its predicted peak (|) and its measured peak (◆)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs) + 1.5, 2.8), squeeze=False)
    drawn = {}
    for ax, (model, rows) in zip(axes[0], runs.items()):
        drawn[model] = draw_budgets(ax, {run: {k: v / 1e6 for k, v in b.parts().items()} for run, (b, _) in
                                         rows.items()}, unit="MB", note="")
        for row, (budget, measured) in enumerate(rows.values()):
            ax.plot(budget.peak / 1e6, row, "|", color="k", ms=22, mew=2, label="predicted peak")
            ax.plot(measured / 1e6, row, "D", color="k", mfc="w", label="measured peak")
        ax.get_legend().remove()
        ax.set_title(model, fontsize=10)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per label
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8)
    fig.suptitle("three AdamW steps: the calculator's parts end to end (all parts added), its predicted peak and "
                 "the measured peak", fontsize=10)
    plt.tight_layout(rect=(0, 0, 1 - 1.5 / (5 * len(runs) + 1.5), 1))
    plt.show()
    return drawn


def memory_budget_view(model: str = "LLaMA-7B", r: int = 8, targets: str = "q, v", precision: str = "fp16",
                       master_weights: bool = False) -> dict:
    """`compare_budgets` (no activations) for a meta-counted model, plus the widget's "bars" ({budget: {part: GB}})."""
    if targets not in MEMORY_TARGETS:
        raise ValueError(f"targets must be one of {list(MEMORY_TARGETS)}, got {targets!r}")
    n_params, d, layers = preset_shape(model)
    c = compare_budgets(n_params, d, layers, r=r, n_targets=MEMORY_TARGETS[targets], precision=precision,
                        master_weights=master_weights)
    c["bars"] = {label: {k: v / 1e9 for k, v in c[key].parts().items()}
                 for label, key in (("full fine-tuning", "full"), ("LoRA", "lora"))}
    c["title"] = (f"{model}: full {c['full'].total / 1e9:.1f} GB vs LoRA {c['lora'].total / 1e9:.1f} GB "
                  f"({c['saving']:.1f}x less; {c['trainable']:,d} trainable)")
    return c


def memory_budget_widget(model: str = "LLaMA-7B", r: int = 8, targets: str = "q, v", precision: str = "fp16"):
    """Sliders for model size, rank, targets, precision and an fp32 master copy; stacked bars of the two budgets."""
    def show(model, r, targets, precision, master_weights):
        view = memory_budget_view(model, r, targets, precision, master_weights)
        fig, ax = plt.subplots(figsize=(7, 2.6))
        draw_budgets(ax, view["bars"])
        ax.set_title(view["title"], fontsize=9)
        plt.tight_layout()
        plt.show()

    return w.interactive(show, model=w.SelectionSlider(options=list(MODEL_PRESETS), value=model, description="model"),
                         r=w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=r, description="r"),
                         targets=w.SelectionSlider(options=list(MEMORY_TARGETS), value=targets, description="targets"),
                         precision=w.ToggleButtons(options=["fp32", "bf16", "fp16"], value=precision,
                                                   description="precision"),
                         master_weights=w.Checkbox(value=False, description="fp32 master weights"))


# ----------------------------------------------------------------------------- exercise checkers

_QUIZ = ((["mlp.c_proj"], "a list entry matches a dotted suffix: the MLP's c_proj, not attention's"),  # exercise 2
         ("c_attn", "a single string is a regex on the whole name, and no full name is just c_attn"),
         (["h.1.attn.c_attn"], "a suffix starts after a dot: block 11's name ends in .h.11.attn.c_attn"),
         (r".*\.(c_fc|c_proj)", "a regex on the whole name: c_fc and both c_proj, in every block"))
TARGET_QUIZ = tuple(t for t, _ in _QUIZ)  # the target_modules whose matches the learner predicts


@checker("answer: one number of layers per target_modules")
def check_targets_prediction(answer, names: list[str]) -> str:
    """Exercise 2, predict then measure: how many of `names` each of `TARGET_QUIZ` picks, by PEFT's rule."""
    if not isinstance(answer, (list, tuple)) or len(answer) != len(TARGET_QUIZ) or not all(map(is_int, answer)):
        raise Problem(f"answer with a list of {len(TARGET_QUIZ)} whole numbers, not {answer!r}.")
    measured = [sum(matches_target(n, t) for n in names) for t in TARGET_QUIZ]  # add_lora's rule, on the real names
    said = "; ".join(f"{t} picks {m}" if isinstance(t, list) else f'"{t}" picks {m}'
                     for t, m in zip(TARGET_QUIZ, measured))
    wrong = [i for i, (a, m) in enumerate(zip(answer, measured)) if a != m]
    if wrong:
        raise Problem(f"{len(wrong)} of {len(measured)} differ. Measured: {said}. First miss: {_QUIZ[wrong[0]][1]}.")
    return f"measured on the model's names: {said}."


@checker('my_prediction: "larger" or "smaller"')
def check_saving_prediction(prediction, config, targets, r: int, seq_len: int, batches=(2, 8)) -> str:
    """Predict, then measure: at a larger batch, is LoRA's measured memory saving larger or smaller?"""
    word = one_word(prediction, ("larger", "smaller"))
    builds = (lambda: toy_gpt2(config), lambda: add_lora(toy_gpt2(config), targets, r=r, alpha=2 * r))

    def saving(batch):  # measured: full fine-tuning's peak over LoRA's (the second AdamW step holds the peak)
        full, lora = (measure_training_peak(build, steps=2, batch_size=batch, seq_len=seq_len)[1] for build in builds)
        return full / lora

    (b0, b1), (s0, s1) = batches, (saving(batches[0]), saving(batches[1]))
    measured = "larger" if s1 > s0 else "smaller"
    what = (f"measured, LoRA's peak is {s0:.2f}x smaller than full fine-tuning's at batch {b0} and {s1:.2f}x at "
            f"batch {b1}: the saving got {measured}.")
    if word != measured:
        raise Problem(f"you predicted {word}; {what} Ask which parts LoRA removes, and which of them grow with "
                      "the batch.")
    return (f"{what} LoRA removes gradients and optimizer state, which do not depend on the batch; activations "
            "grow with every token, and LoRA keeps most of them.")
