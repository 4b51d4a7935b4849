"""Exercise checkers: each takes the learner's answer and says whether it holds, and why not."""


# --- shared by every checker -------------------------------------------------------------

def report(ok: bool, message: str) -> bool:
    """Print a one-line verdict for the learner and return whether the answer holds."""
    print(("Correct: " if ok else "Not yet: ") + message)
    return bool(ok)


# --- notebook 03: LoRALinear from scratch -----------------------------------------------

def check_lora_param_count(answer: int, d_model: int = 4096, n_layers: int = 32, r: int = 8,
                           targets: int = 2) -> bool:
    """Exercise: trainable LoRA parameters on `targets` square (d_model x d_model) projections
    in each of `n_layers` layers, counted from real (meta-device) LoRALinear layers."""
    import torch

    from .lora import LoRALinear, count_parameters

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
    import torch

    from .lora import LoRALinear

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
