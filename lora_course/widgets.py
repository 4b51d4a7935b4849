"""ipywidgets UIs for the notebooks: each a thin shell over a pure function that tests call directly."""


# --- notebook 03: how many parameters LoRA trains -----------------------------------------

def lora_parameter_budget(d: int, k: int, r: int) -> dict:
    """Trainable parameters of full fine-tuning vs LoRA for one (d x k) weight, counted
    from real meta-device layers (no memory used)."""
    import torch

    from .lora import LoRALinear, count_parameters

    with torch.device("meta"):
        layer = LoRALinear(k, d, r=r, bias=False)  # in_features=k, out_features=d
    lora, total = count_parameters(layer)
    full = total - lora
    return {"full": full, "lora": lora, "reduction_pct": 100 * (1 - lora / full)}


def lora_parameter_budget_widget(d: int = 4096, k: int = 4096, r: int = 8):
    """Sliders for d, k and r; bars of full vs LoRA trainable parameters (log scale)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

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
