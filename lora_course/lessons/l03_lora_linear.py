"""Notebook 03 (LoRALinear from scratch): the parameter-budget slider and the exercise checkers."""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
import torch

from ..lora import LoRALinear, count_parameters
from .common import report

__all__ = ["lora_parameter_budget", "lora_parameter_budget_widget", "check_lora_param_count", "check_lora_forward"]


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


# ----------------------------------------------------------------------------- exercise checkers

def check_lora_param_count(answer: int, d_model: int = 4096, n_layers: int = 32, r: int = 8,
                           targets: int = 2) -> bool:
    """Exercise: trainable LoRA parameters on `targets` square (d_model x d_model) projections
    in each of `n_layers` layers, counted from real (meta-device) LoRALinear layers."""
    with torch.device("meta"):
        layer = LoRALinear(d_model, d_model, r=r, bias=False)
    expected = count_parameters(layer)[0] * targets * n_layers
    if answer == expected:
        return report(True, f"{expected:,d} trainable parameters: (d + k) * r per projection, "
                            f"{targets} projections in each of {n_layers} layers.")
    return report(False, f"you said {answer:,d}. Count A (r x k) and B (d x r) for one projection, "
                         "then multiply by the projections per layer and the layers.")


def check_lora_forward(forward_fn) -> bool:
    """Exercise: `forward_fn(x, W0, b, A, B, alpha, r)` must compute LoRALinear's output."""
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(12, 6, r=3, alpha=5).eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(6, 3, generator=g))  # non-zero, so the update counts
    x = torch.randn(4, 12, generator=g)
    try:
        got = forward_fn(x, layer.base_layer.weight, layer.base_layer.bias,
                         layer.lora_A, layer.lora_B, layer.alpha, layer.r)
    except Exception as e:  # the learner's code raised: say what, don't crash the notebook
        return report(False, f"your function raised {type(e).__name__}: {e}")
    expected = layer(x)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return report(False, f"expected a tensor of shape {tuple(expected.shape)}, got "
                             f"{getattr(got, 'shape', type(got).__name__)}")
    if torch.allclose(got, expected, atol=1e-5):
        return report(True, "h = x W0^T + b + (alpha / r) (x A^T) B^T, the same as LoRALinear.")
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    if torch.allclose(got, base, atol=1e-5):
        return report(False, "that is the frozen layer alone; add the low-rank branch.")
    return report(False, "the numbers differ from LoRALinear's; check the scaling alpha / r "
                         "and the order of A and B.")
