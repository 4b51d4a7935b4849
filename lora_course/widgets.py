"""ipywidgets UIs for the notebooks: each a thin shell over a pure function that tests call directly."""

import html

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from .data import FIELD_NAMES, FIELD_VALUES, Record, format_prompt, generate, slots_realized
from .experiments import make_low_rank_target, train_lora
from .lora import LoRALinear, count_parameters
from .lowrank import (best_rank_r, compression_ratio, dense_cost, energy_captured, low_rank_error,
                      singular_values, storage_cost)
from .memory import compare_budgets
from .skeletons import MODEL_PRESETS, preset_shape
from .toy_tasks import accuracy
from .weight_updates import with_rank_r_updates


# --- notebook 03: how many parameters LoRA trains -----------------------------------------

def lora_parameter_budget(d: int, k: int, r: int) -> dict:
    """Trainable parameters of full fine-tuning vs LoRA for one (d x k) weight, counted
    from real meta-device layers (no memory used)."""
    with torch.device("meta"):
        layer = LoRALinear(k, d, r=r, bias=False)  # in_features=k, out_features=d
    lora, total = count_parameters(layer)
    full = total - lora
    return {"full": full, "lora": lora, "reduction_pct": 100 * (1 - lora / full)}


def lora_parameter_budget_widget(d: int = 4096, k: int = 4096, r: int = 8):
    """Sliders for d, k and r; bars of full vs LoRA trainable parameters (log scale)."""
    def show(d, k, r):
        budget = lora_parameter_budget(d, k, min(r, d, k))
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(["full dW (d*k)", "LoRA (d+k)*r"], [budget["full"], budget["lora"]], color=["grey", "tab:orange"])
        ax.set_yscale("log")
        ax.set_ylabel("trainable parameters")
        ax.set_title(f"{budget['full']:,d} -> {budget['lora']:,d}  ({budget['reduction_pct']:.2f}% fewer)")
        plt.show()

    return w.interactive(
        show,
        d=w.IntSlider(value=d, min=64, max=8192, step=64, description="d (out)"),
        k=w.IntSlider(value=k, min=64, max=8192, step=64, description="k (in)"),
        r=w.IntSlider(value=r, min=1, max=256, step=1, description="r"),
    )


# --- notebooks 01 and 02: rank sliders over a photo and over a fine-tuning update -------

def photo_rank_view(photo, r: int, svd=None) -> dict:
    """The best rank-r version of a gray photo (H, W) and what it costs and loses.

    Returns {"r", "approx" (H, W) clipped to [0, 1], "rel_error" = ||P - P_r||_F / ||P||_F,
    "stored", "dense", "storage_ratio" = (H + W) r / (H W), "energy"}. Pass
    `svd=torch.linalg.svd(photo, full_matrices=False)` to reuse one SVD for every r.
    """
    photo = torch.as_tensor(photo)
    if photo.ndim != 2:
        raise ValueError(f"photo must be a gray image (H, W), got shape {tuple(photo.shape)}; use load_photo(gray=True)")
    H, W = photo.shape
    if svd is None:
        svd = torch.linalg.svd(photo, full_matrices=False)
    S = svd[1]
    approx = best_rank_r(photo, r, svd=svd)  # raises a clear ValueError for a bad r
    return {
        "r": r,
        "approx": approx.clamp(0.0, 1.0),
        "rel_error": float(low_rank_error(S, r, "fro") / torch.linalg.vector_norm(S)),
        "stored": storage_cost(H, W, r),
        "dense": dense_cost(H, W),
        "storage_ratio": compression_ratio(H, W, r),
        "energy": energy_captured(S, r),
    }


def photo_rank_widget(photo, r: int = 20, max_r: int | None = None):
    """A rank slider over `photo`: original vs rank-r picture, error and storage in the title.

    A thin shell over photo_rank_view; the returned `ipywidgets.interactive` keeps the
    latest view dict in `.result` (tests set `.children[0].value` and read it).
    """
    photo = torch.as_tensor(photo)
    svd = torch.linalg.svd(photo, full_matrices=False)  # once, reused for every r
    max_r = min(photo.shape) if max_r is None else max_r

    def show(r):
        view = photo_rank_view(photo, r, svd=svd)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
        axes[0].imshow(photo.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"original: {view['dense']:,d} numbers")
        axes[1].imshow(view["approx"].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title(
            f"rank {r}: {view['stored']:,d} numbers ({100 * view['storage_ratio']:.1f}%)\n"
            f"relative error {view['rel_error']:.3f}, energy kept {100 * view['energy']:.2f}%"
        )
        for ax in axes:
            ax.axis("off")
        plt.show()
        return view

    return w.interactive(show, r=w.IntSlider(value=r, min=0, max=max_r, step=1, description="rank r"))


def update_rank_view(pretrained, deltas: dict, X, y, r: int, layer: str | None = None) -> dict:
    """Accuracy on (X, y) of the pretrained model plus every dW cut to rank r, and how
    much of one layer's dW energy the top r directions hold.

    Returns {"r", "accuracy", "layer", "S" (that layer's singular values), "energy"}.
    """
    layer = max(deltas, key=lambda name: min(deltas[name].shape)) if layer is None else layer
    if layer not in deltas:
        raise ValueError(f"layer must be one of {sorted(deltas)}, got {layer!r}")
    S = singular_values(deltas[layer])
    return {
        "r": r,
        "accuracy": accuracy(with_rank_r_updates(pretrained, deltas, r), X, y),
        "layer": layer,
        "S": S,
        "energy": energy_captured(S, min(r, S.numel())),
    }


def update_rank_widget(pretrained, deltas: dict, X, y, accuracy_finetuned: float, r: int = 4, max_r: int = 64):
    """A rank slider over the fine-tuning update: dW's spectrum with the cut at r, and the
    accuracy the rank-r update keeps. A shell over update_rank_view (latest in `.result`)."""
    def show(r):
        view = update_rank_view(pretrained, deltas, X, y, r)
        S = view["S"].numpy()
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.semilogy(range(1, len(S) + 1), S, ".-", label=f"singular values of dW ({view['layer']})")
        ax.axvline(r + 0.5, color="tab:red", ls="--", label=f"keep top {r}")
        ax.set_xlabel("index i")
        ax.set_ylabel("s_i")
        ax.set_title(
            f"rank {r}: accuracy {view['accuracy']:.3f} (full fine-tune {accuracy_finetuned:.3f}), "
            f"energy {100 * view['energy']:.1f}%"
        )
        ax.legend()
        plt.show()
        return view

    return w.interactive(show, r=w.IntSlider(value=r, min=0, max=max_r, step=1, description="rank r"))


# --- notebook 04: rank, alpha and learning rate, retrained live ---------------------------

def rank_alpha_view(r: int = 4, alpha: float = 8.0, lr: float = 0.03, use_rslora: bool = False,
                    steps: int = 150, target=None) -> dict:
    """Train LoRA on the known rank-k target (lora_course.experiments) and return the numbers
    the widget draws: the loss curve, the error against the Eckart-Young floor, and the
    singular values of the learned dW = scaling * B A beside the target's."""
    target = _default_rank_alpha_target() if target is None else target
    run = train_lora(target, r, alpha, lr, steps, use_rslora=use_rslora)
    return {
        "r": r, "alpha": alpha, "lr": lr, "use_rslora": use_rslora, "scaling": run.scaling,
        "losses": run.losses,  # matrix loss ||dW - dW*||_F^2 / out at each step
        "final_error": run.final_error,  # ||dW - dW*||_F after training
        "floor": run.floor,  # the best any rank-r update can do
        "relative_error": run.relative_error,
        "learned_singular_values": run.delta_singular_values.tolist(),  # (r,)
        "target_singular_values": target.singular_values.tolist(),  # (k,)
        "title": (f"r={r}, alpha={alpha:g}, scaling={run.scaling:.3g}: ||dW - dW*|| = "
                  f"{run.final_error:.3f} (floor {run.floor:.3f})"),
    }


def _default_rank_alpha_target():
    """The notebook's 64 x 64 target of rank 8, built once."""
    global _RANK_ALPHA_TARGET
    if _RANK_ALPHA_TARGET is None:
        _RANK_ALPHA_TARGET = make_low_rank_target()
    return _RANK_ALPHA_TARGET


_RANK_ALPHA_TARGET = None


def rank_alpha_widget(target=None, r: int = 4, alpha: float = 8.0, lr: float = 0.03, steps: int = 150,
                      max_r: int = 16):
    """Rank, alpha and learning-rate sliders that retrain LoRA on the known target and redraw
    the loss curve and the learned vs target singular values. A shell over rank_alpha_view
    (the latest numbers are in `.result`)."""
    def show(r, alpha, lr, use_rslora):
        view = rank_alpha_view(r, alpha, lr, use_rslora, steps, target)
        fig, (ax_loss, ax_sv) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax_loss.semilogy(range(1, len(view["losses"]) + 1), view["losses"], label="matrix loss")
        floor_loss = view["floor"] ** 2 / _default_out(target)
        if floor_loss > 0:
            ax_loss.axhline(floor_loss, color="tab:red", ls="--", label="Eckart-Young floor")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("||dW - dW*||^2 / out")
        ax_loss.legend()
        s_target, s_learned = view["target_singular_values"], view["learned_singular_values"]
        ax_sv.plot(range(1, len(s_target) + 1), s_target, "o", mfc="none", ms=9, label="target dW*")
        ax_sv.plot(range(1, len(s_learned) + 1), s_learned, "x", ms=8, label="learned scaling * B A")
        ax_sv.set_xlabel("index i")
        ax_sv.set_ylabel("singular value s_i")
        ax_sv.legend()
        fig.suptitle(view["title"])
        fig.tight_layout()
        plt.show()
        return view

    def _default_out(t):
        return (_default_rank_alpha_target() if t is None else t).out_features

    slider = dict(continuous_update=False)
    return w.interactive(
        show,
        r=w.IntSlider(value=r, min=1, max=max_r, step=1, description="rank r", **slider),
        alpha=w.FloatLogSlider(value=alpha, base=2, min=0, max=7, step=0.5, description="alpha", **slider),
        lr=w.FloatLogSlider(value=lr, base=10, min=-4, max=-0.5, step=0.25, description="lr", **slider),
        use_rslora=w.Checkbox(value=False, description="rsLoRA: alpha/sqrt(r)"),
    )


# --- notebook 05: memory budget of full fine-tuning vs LoRA ---------------------------

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
                ax.barh(row, gb, left=left, color=colors[part], label=part if row == 0 or part not in view["bars"]["full fine-tuning"] else None)
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


# --- notebook 06: what each fine-tuned model writes for a record -------------------------

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
