"""Notebook 05 (LoRA in a transformer): its pictures, the memory-budget sliders and the exercise checkers.

`play` (from `common`) is re-exported here, so that the notebook imports its own lesson module only.
"""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle
from torch.utils.flop_counter import FlopCounterMode

from ..fused import FusedLoRALinear
from ..layers import linear_features
from ..lora import LoRALinear, add_lora
from ..memory import compare_budgets
from ..skeletons import MODEL_PRESETS, llama_7b_config, meta_lora_counts, preset_shape
from ..validate import is_int
from .common import call_learner, is_blank, not_filled_in, play, report

__all__ = ["MEMORY_TARGETS", "BUDGET_COLORS", "draw_gpt2_block", "row_runs", "adam_steps", "forward_flops",
           "draw_budgets", "draw_peaks", "memory_budget_view", "memory_budget_widget", "check_matches",
           "check_fused_delta", "check_llama_qkvo_params", "play"]


# ----------------------------------------------------------------------------- a GPT-2 block, drawn

# One GPT-2 block, bottom to top: a module of the block by name, or a step without weights.
_GPT2_FLOW = ("ln_1", "attn.c_attn", "attention", "attn.c_proj", "+", "ln_2", "mlp.c_fc", "mlp.act", "mlp.c_proj", "+")
_FROZEN, _TRAINED, _PLAIN = "#d9d9d9", "#f4a259", "#ffffff"


def _adapted_runs(layer: LoRALinear) -> list[tuple[int, int, int | None]]:
    """(start, stop, slice index or None) of the output rows an adapter writes to."""
    if isinstance(layer, FusedLoRALinear):
        return [(i * layer.slice_size, (i + 1) * layer.slice_size, i) for i in layer.enabled_slices]
    return [(0, layer.out_features, None)]


def _slice_name(i: int, n: int) -> str:
    return "qkv"[i] if n == 3 else f"slice {i}"


def _box(ax, x, y, width, height, text, color, fontsize=8.5):
    ax.add_patch(Rectangle((x, y - height / 2), width, height, fc=color, ec="k"))
    ax.text(x + width / 2, y, text, ha="center", va="center", fontsize=fontsize)


def draw_gpt2_block(model: torch.nn.Module, block: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Draw block `block` of a GPT-2 (`GPT2LMHeadModel`; the meta device will do) and the LoRA adapters in it.

    Names, layer types and shapes are read from the model. A LoRA layer is drawn in orange
    with its A and B beside it; a `FusedLoRALinear` (q, v of `c_attn`) is split into its
    output slices, and only the enabled ones are orange. Returns, for each adapted layer
    (by full name), the output rows [start, stop) drawn as adapted.
    """
    prefix = f"transformer.h.{block}"
    h = model.get_submodule(prefix)
    d, n_head = model.config.n_embd, model.config.n_head
    fig, ax = plt.subplots(figsize=(10, 7.5))
    drawn: dict[str, list[tuple[int, int]]] = {}
    x0, width, side = 3.4, 5.4, 2.6  # the block's column, and the adapters' boxes on either side of it
    mid = x0 + width / 2

    def arrow(y_from, y_to):
        ax.annotate("", (mid, y_to), (mid, y_from), arrowprops=dict(arrowstyle="->"))

    ax.text(mid, 0.15, f"x from block {block - 1}" if block else "x: token + position embeddings",
            ha="center", va="center", fontsize=9)
    ax.text(mid, -0.2, f"(B, T, {d})", ha="center", va="center", fontsize=8, color="0.3")
    y, top, residuals = 0.0, 0.35, iter(["ln_1", "ln_2"])
    for part in _GPT2_FLOW:
        module = h.get_submodule(part) if part not in ("+", "attention") else None
        half = 0.5 if isinstance(module, LoRALinear) else 0.3
        y = top + 0.35 + half
        arrow(top, y - half)
        top = y + half
        if part == "+":
            ax.plot(mid, y, "o", ms=15, mfc=_PLAIN, mec="k")
            ax.text(mid, y, "+", ha="center", va="center", fontsize=11)
            ax.text(mid + 0.35, y, f"residual: adds the input of {next(residuals)}", va="center", fontsize=8,
                    color="0.3")
        elif part == "attention":
            _box(ax, x0, y, width, 2 * half, f"attention: softmax(q k^T / sqrt({d // n_head})) v, {n_head} heads, "
                 "no weights", _PLAIN)
        elif not isinstance(module, LoRALinear):
            kind = type(module).__name__
            weight = getattr(module, "weight", None)
            if weight is None:
                _box(ax, x0, y, width, 2 * half, f"{part}   {kind}, no weights", _PLAIN)
            elif weight.dim() == 2:
                fan_in, fan_out = linear_features(module)
                _box(ax, x0, y, width, 2 * half, f"{part}   {kind}  {fan_in} -> {fan_out}   frozen", _FROZEN)
            else:
                _box(ax, x0, y, width, 2 * half, f"{part}   {kind} {tuple(weight.shape)}   frozen", _FROZEN)
        else:  # a LoRA layer: a title band over its output slices (one slice for a plain LoRALinear)
            _box(ax, x0, y + 0.25, width, 0.5, f"{part}   {type(module.base_layer).__name__}  {module.in_features} "
                 f"-> {module.out_features}: frozen W0 + LoRA", _PLAIN)
            n = len(module.enable_lora) if isinstance(module, FusedLoRALinear) else 1
            size = module.out_features // n
            runs = _adapted_runs(module)
            adapted = {i for _, _, i in runs}
            for i in range(n):
                on = None in adapted or i in adapted
                rows = f"rows {i * size}..{(i + 1) * size - 1}"
                text = (f"{_slice_name(i, n)}: {rows}" if n > 1 else "") + ("" if on else "\nno adapter")
                _box(ax, x0 + i * width / n, y - 0.25, width / n, 0.5, text, _TRAINED if on else _FROZEN, 8)
            pairs = (module.slice_pairs() if isinstance(module, FusedLoRALinear)
                     else [(None, module.lora_A, module.lora_B)])
            for k, (i, a, b) in enumerate(pairs):
                tag = "" if i is None else f"_{_slice_name(i, n)}"
                left = i is not None and (i + 0.5) / n < 0.5
                bx = x0 - side - 0.4 if left else x0 + width + 0.4
                _box(ax, bx, y - 0.25, side, 0.6, f"A{tag} {tuple(a.shape)}\nB{tag} {tuple(b.shape)}", _TRAINED, 8)
                ax.annotate("", (x0 if left else x0 + width, y - 0.25), (bx + side if left else bx, y - 0.25),
                            arrowprops=dict(arrowstyle="->", color="tab:orange", lw=1.5))
            drawn[f"{prefix}.{part}"] = [(start, stop) for start, stop, _ in runs]
    arrow(top, top + 0.35)
    last = block + 1 == model.config.n_layer
    ax.text(mid, top + 0.55, "to ln_f" if last else f"to block {block + 1}", ha="center", va="center", fontsize=9)
    for k, (color, text) in enumerate([(_TRAINED, "trained (LoRA)"), (_FROZEN, "frozen")]):
        ax.add_patch(Rectangle((x0 + width + 0.4, 0.5 - 0.45 * k), 0.3, 0.3, fc=color, ec="k"))
        ax.text(x0 + width + 0.8, 0.65 - 0.45 * k, text, va="center", fontsize=8)
    ax.set_xlim(0, x0 + width + side + 0.6)
    ax.set_ylim(-0.45, top + 0.8)
    ax.axis("off")
    ax.set_title(f"{prefix}, one of {model.config.n_layer} blocks: d = {d}, {n_head} heads", fontsize=10)
    plt.tight_layout()
    plt.show()
    return drawn


def row_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The runs of True in a 1-d boolean mask, as [start, stop): [F, T, T, F, T] -> [(1, 3), (4, 5)]."""
    runs, start = [], None
    for i, on in enumerate(mask.tolist() + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def adam_steps(layer: torch.nn.Module, x: torch.Tensor, steps: int = 1, lr: float = 1e-2, seed: int = 0) -> float:
    """AdamW steps on `layer`'s trainable parameters toward a random target for input x; returns the last loss.

    One step is enough to move every entry of a LoRA B away from zero.
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        target = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def forward_flops(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Floating-point operations of one forward pass of `model(input_ids)`, as torch's FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- memory pictures and widget

# Targets offered by the memory widget: how many square d x d attention projections per layer.
MEMORY_TARGETS = {"q": 1, "q, v": 2, "q, k, v": 3, "q, k, v, o": 4}
BUDGET_COLORS = {"weights": "tab:blue", "gradients": "tab:orange", "optimizer": "tab:red",
                 "master_weights": "tab:purple", "activations": "tab:green"}


def draw_budgets(ax, bars: dict[str, dict[str, float]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Stacked horizontal bars, one per budget, one segment per part (GB), the total written at the end.

    Returns what was drawn, read back from the bars: {budget: {part: (left edge, width)}}.
    """
    drawn: dict[str, dict[str, tuple[float, float]]] = {}
    labelled = set()
    for row, (label, parts) in enumerate(bars.items()):
        left, drawn[label] = 0.0, {}
        for part, gb in parts.items():
            (rect,) = ax.barh(row, gb, left=left, color=BUDGET_COLORS[part],
                              label=None if part in labelled else part.replace("_", " "))
            labelled.add(part)
            drawn[label][part] = (rect.get_x(), rect.get_width())
            left = rect.get_x() + rect.get_width()
        ax.text(left, row, f" {left:.1f} GB", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15 * max(sum(p.values()) for p in bars.values()))
    ax.set_xlabel("GB (1e9 bytes); activations not included")
    ax.legend(loc="lower right", fontsize=8)
    return drawn


def draw_peaks(rows: dict[str, dict[str, float]], title: str = "") -> None:
    """Grouped bars (MB), one group per run: e.g. its measured peak, the predicted peak and all parts added up."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    kinds = list(next(iter(rows.values())))
    height = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        ax.barh([y + (k - (len(kinds) - 1) / 2) * height for y in range(len(rows))],
                [r[kind] / 1e6 for r in rows.values()], height=height, label=kind)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.invert_yaxis()
    ax.set_xlabel("MB")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    plt.tight_layout()
    plt.show()


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

    def show(model, r, targets, precision, master_weights):
        view = memory_budget_view(model, r, targets, precision, master_weights)
        fig, ax = plt.subplots(figsize=(7, 2.6))
        draw_budgets(ax, view["bars"])
        ax.set_title(view["title"], fontsize=9)
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

def _call(fn, *args):
    """Run the learner's function: (its result, None), or (None, a verdict message) if it is blank or raised."""
    if is_blank(fn) or not callable(fn):
        return None, "fill in your function (define it in the cell above), then run this cell again."
    return call_learner(fn, *args)


def _peft_matches(name: str, target_modules) -> bool:
    """PEFT's own answer: does `target_modules` pick the module called `name`?"""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(LoraConfig(target_modules=target_modules), name))


# (module name, target_modules, what a wrong verdict on this case most likely misses)
_MATCH_CASES = [
    ("transformer.h.0.attn.c_attn", ["c_attn"], "a name in the list picks every module whose full name ends in "
                                                "'.' + that name"),
    ("transformer.h.0.mlp.c_proj", ["c_proj"], "a name in the list picks every module whose full name ends in "
                                               "'.' + that name"),
    ("transformer.h.0.attn.c_proj", ["attn"], "'attn' occurs inside this name, but a list entry must match the END "
                                              "of the name (whole dotted parts), not any substring"),
    ("model.layers.0.self_attn.xq_proj", ["q_proj"], "'xq_proj' is a different module: the suffix must begin right "
                                                     "after a dot"),
    ("lm_head", ["lm_head"], "an entry also matches a full name equal to it (a top-level module has no dot)"),
    ("transformer.h.0.attn.c_attn", ["h.0.attn.c_attn"], "a list entry may itself hold dots: it matches the last "
                                                         "dotted parts of the name"),
    ("transformer.h.0.attn.c_attn", "c_attn", "a single string is a regex that must match the WHOLE name "
                                              "(re.fullmatch), and 'c_attn' alone does not"),
    ("transformer.h.10.attn.c_attn", r".*\.h\.1", "re.match only anchors the start of the name; PEFT uses "
                                                  "re.fullmatch, so 'h.10...' is not matched by '.*\\.h\\.1'"),
    ("transformer.h.1.attn.c_attn", r".*\.h\.1\..*c_attn", "a single string is a regex on the full name, not a list "
                                                           "of names (or of characters)"),
]


def check_matches(fn) -> bool:
    """Exercise 05.1: `fn(name, target_modules) -> bool` must agree with PEFT on which modules are picked."""
    for name, targets, hint in _MATCH_CASES:
        got, problem = _call(fn, name, targets)
        if problem:
            return report(False, problem)
        want = _peft_matches(name, targets)
        if bool(got) != want:
            return report(False, f"matches({name!r}, {targets!r}) gave {bool(got)}, PEFT says {want}: {hint}.")
    return report(True, f"all {len(_MATCH_CASES)} cases agree with PEFT's check_target_module_exists "
                        "(lists by full name or dotted suffix, a string as a full-name regex).")


def _fused_cases():
    """(lora_A, lora_B, enable_lora, scaling, the true dW) on small random shapes."""
    g = torch.Generator().manual_seed(5)
    cases = []
    for fan_in, size, r, enable, scaling in [(5, 6, 2, (True, False, True), 2.0), (4, 3, 3, (False, True, False), 0.5),
                                             (7, 4, 1, (True, True, True), 1.5), (6, 2, 2, (True, False, False), 3.0)]:
        layer = FusedLoRALinear(fan_in, size * len(enable), r=r, alpha=scaling * r, enable_lora=enable)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        cases.append((A, B, enable, scaling, layer.delta_weight().detach()))
    return cases


def _fused_hint(got: torch.Tensor, A, B, enable, scaling, want: torch.Tensor) -> str:
    """Why a wrong dW of a fused layer is wrong, as a hint."""
    n_on, size = sum(enable), B.shape[0] // sum(enable)
    if tuple(got.shape) != tuple(want.shape):
        if tuple(got.shape) == (n_on * size, A.shape[1]):
            return (f"your dW has only the enabled slices' {n_on * size} rows; the update covers the whole "
                    f"output ({want.shape[0]} rows = len(enable_lora) x {size}), disabled slices as zero rows")
        return f"dW must have shape (out_features, in_features) = {tuple(want.shape)}, yours is {tuple(got.shape)}"
    got = got.to(want.dtype)
    if torch.allclose(got * scaling, want, atol=1e-5):
        return "the update is scaling * B_i A_i: you left out scaling"
    on = torch.zeros(want.shape[0], dtype=torch.bool)  # the rows of the enabled slices
    for i in (i for i, e in enumerate(enable) if e):
        on[i * size:(i + 1) * size] = True
    packed = want[on]
    if not on[: len(packed)].all() and torch.allclose(got[: len(packed)], packed, atol=1e-5):
        return ("you wrote the enabled slices one after another; slice i belongs at rows i x slice_size, "
                "so v sits after k's rows, which stay zero")
    if (got[~on] != 0).any():
        return "the rows of a disabled slice (k) must be exactly zero: no adapter writes to them"
    return ("slice i gets B_i A_i, where A_i is the next block of r rows of lora_A and B_i the next block of "
            "slice_size rows of lora_B (one block per enabled slice, in order)")


def check_fused_delta(fn) -> bool:
    """Exercise 05.2: `fn(lora_A, lora_B, enable_lora, scaling)` must return a fused layer's whole update dW."""
    cases = _fused_cases()
    for A, B, enable, scaling, want in cases:
        got, problem = _call(fn, A.clone(), B.clone(), enable, scaling)
        if problem:
            return report(False, problem)
        if not torch.is_tensor(got):
            return report(False, f"return a tensor of shape (out_features, in_features), got {type(got).__name__}")
        if tuple(got.shape) != tuple(want.shape) or not torch.allclose(got.to(want.dtype), want, atol=1e-5):
            return report(False, f"enable_lora={enable}: " + _fused_hint(got, A, B, enable, scaling, want) + ".")
    return report(True, f"equal to FusedLoRALinear.delta_weight on {len(cases)} random layers, "
                        "disabled slices exactly zero.")


def check_llama_qkvo_params(answer) -> bool:
    """Exercise 05.3: trainable parameters of LoRA r=16 on q_proj, k_proj, v_proj, o_proj of LLaMA-7B."""
    if is_blank(answer):
        return not_filled_in("the number of trainable parameters (an int)")
    if not is_int(answer):
        return report(False, f"you gave {answer!r}; answer with a whole number of parameters (an int).")
    truth = meta_lora_counts(llama_7b_config(),
                             lambda m: add_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16))["trainable"]
    if answer == truth:
        return report(True, f"{truth:,d} = 32 layers x 4 projections x r (d_in + d_out).")
    if answer == truth // 2:
        return report(False, f"you gave {answer:,d}, half the count: each adapted weight has two factors, "
                             "A (r x d_in) and B (d_out x r).")
    return report(False, f"you gave {answer:,d}. Each adapted (d_out x d_in) weight adds r (d_in + d_out); "
                         "count layers and targets.")
