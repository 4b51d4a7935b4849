"""Notebook 03 (LoRA from scratch): the reference layer (the notebook's steps, PEFT's names), the build checks,
the picture and the exercise checkers. A build check runs the learner's layer and `lora_course.LoRALinear` on
copies of one pretrained `nn.Linear` with the same A (later B) and names whichever is off LoRA's formula."""

from __future__ import annotations

import copy
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import lora
from ..layers import Conv1D
from ..lora import add_lora, count_parameters
from .common import Problem, call, checker, play, seeded

__all__ = ["LoRALinear", "count_trainable", "add_lora_by_name", "reference", "SHAPES", "draw_lora_structure",
           "check_init", "check_forward", "check_count", "check_merge", "toy_model", "check_swap",
           "check_swapped_init", "check_unmerge", "check_merge_conv1d", "play"]

ATOL = 1e-5  # float32 agreement between two implementations of the same arithmetic

# (d, k, r, alpha): each scaling mistake (`_scaling_mistakes`) scales the update by its own factor, 10%+ off 1, others
SHAPES = [(41, 18, 18, 8.0), (12, 24, 10, 25.0), (17, 32, 12, 2.0), (48, 17, 9, 15.0)]


class LoRALinear(nn.Module):
    """h = W0 x + b + (alpha / r) B A x around a frozen pretrained nn.Linear (W0: (d, k))."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):  # step 1
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # W0 and its bias: frozen, shared
        d, k = base_layer.weight.shape  # (out, in)
        self.lora_A = nn.Parameter(torch.empty(r, k))  # (r, k)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # uniform in +-1/sqrt(k), as PEFT
        self.lora_B = nn.Parameter(torch.zeros(d, r))  # (d, r): zero, so B A = 0 at step 0
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged = False

    def forward(self, x):  # step 2; x: (..., k)
        h = self.base_layer(x)  # (..., d): W0 x + b
        if not self.merged:
            h = h + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T  # (..., r) -> (..., d)
        return h

    @torch.no_grad()
    def merge(self):  # step 4
        self.base_layer.weight += self.scaling * self.lora_B @ self.lora_A  # (d, r) @ (r, k) -> (d, k)
        self.merged = True


def count_trainable(model: nn.Module) -> int:  # step 3
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora_by_name(model: nn.Module, names, r: int, alpha: float) -> nn.Module:  # step 5
    model.requires_grad_(False)  # the pretrained model: frozen
    for name in names:  # e.g. "model.layers.0.self_attn.q_proj"
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha))
    return model


def reference() -> type:
    """The reference class for the notebook to go on with: a fresh subclass, which later steps may change."""
    return type("LoRALinear", (LoRALinear,), {})


def draw_lora_structure(d: int = 768, k: int = 768, r: int = 8, ax=None) -> dict:
    """The LoRA paper's Figure 1 to scale: each matrix as wide as its input and as tall as its output, so that its
    area is its parameter count. Returns {"W0" | "A" | "B": (width, height)} as drawn."""
    ax = ax or plt.subplots(figsize=(7.5, 4.6))[1]
    left, bottom = k + 0.18 * max(d, k), r + 0.18 * max(d, k)  # A's column; B and W0 start above A
    mid, x_y, h_y = (left + k) / 2, -0.22 * d, bottom + 1.2 * d
    boxes = {"W0": ((0, bottom), k, d, "tab:blue", f"$W_0$ (d x k = {d} x {k})\nfrozen"),
             "A": ((left, 0), k, r, "tab:orange", f"A (r x k = {r} x {k})\nKaiming-uniform"),
             "B": ((left + (k - r) / 2, bottom), r, d, "tab:orange", f"B (d x r = {d} x {r})\nzeros at step 0")}
    for gid, ((x0, y0), width, height, color, label) in boxes.items():
        ax.add_patch(Rectangle((x0, y0), width, height, facecolor=color, edgecolor=color, gid=gid,
                               alpha=0.35 if gid == "W0" else 1.0))
        tx, ha = (x0 + width / 2, "center") if gid == "W0" else (x0 + width + 0.04 * k, "left")
        ax.text(tx, y0 + height / 2, f"{label}\n{width * height:,d} numbers", ha=ha, va="center", fontsize=9)
    ax.text(mid, x_y, f"x  ({k} inputs)", ha="center", va="center", fontsize=10)
    ax.text(mid, h_y, r"$h = W_0 x + \frac{\alpha}{r} B A x$" + f"  ({d} outputs)", ha="center", va="center")
    for start, end in [((mid, x_y + 0.06 * d), (k / 2, bottom)), ((mid, x_y + 0.06 * d), (left + k / 2, 0)),
                       ((left + k / 2, r), (left + k / 2, bottom)), ((k / 2, bottom + d), (mid, h_y - 0.06 * d)),
                       ((left + k / 2, bottom + d), (mid, h_y - 0.06 * d))]:
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="0.3"))
    ax.set(xlim=(-0.05 * k, left + 1.75 * k), ylim=(x_y - 0.08 * d, h_y + 0.08 * d), aspect="equal")
    ax.axis("off")
    ax.set_title(f"LoRA to scale (areas are parameter counts): d = {d}, k = {k}, r = {r}", fontsize=10)
    return {p.get_gid(): (p.get_width(), p.get_height()) for p in ax.patches if p.get_gid()}


def _scaling_mistakes(r: int, alpha: float) -> list[tuple[float, str]]:
    """(factor, why): a mistaken scaling makes the update `factor` times LoRA's (alpha / r) B A x."""
    return [(r, "you scale by alpha; LoRA scales by alpha / r"),
            (math.sqrt(r), "that is rsLoRA's alpha / sqrt(r); plain LoRA scales by alpha / r"),
            (r / alpha, "the scaling alpha / r is missing"), (alpha / r, "the scaling alpha / r is applied twice"),
            (-1, "the sign is flipped: add the update, do not subtract it")]


def _scaling_hint(c: float, r: int, alpha: float, what: str) -> str:
    """Why `what` came out c times the library's: the scaling mistakes a learner makes."""
    why = [why for factor, why in _scaling_mistakes(r, alpha) if math.isclose(c, factor, rel_tol=1e-3)]
    return f"{what} is {c:.3g} times the library's" + (
        f": {why[0]}." if why else f"; it should be (alpha / r) B A x = {alpha / r:.3g} B A x.")


def _ratio(got: torch.Tensor, want: torch.Tensor) -> float:
    """The c that makes c * want closest to got (least squares)."""
    return float((got * want).sum() / (want * want).sum().clamp_min(1e-30))


def _pretrained(d: int, k: int, g: torch.Generator) -> nn.Linear:
    base = nn.Linear(k, d)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, k, generator=g) / math.sqrt(k))
        base.bias.copy_(0.1 * torch.randn(d, generator=g))
    return base


def _build(cls, base: nn.Linear, r: int, alpha: float):
    """The learner's `cls(base, r, alpha)`: PEFT's names, and A and B parameters of LoRA's shapes."""
    if not isinstance(cls, type):
        raise Problem(f"pass your class itself (LoRALinear, without calling it), not {cls!r}.")
    layer = call(f"{cls.__name__}(base_layer, r={r}, alpha={alpha:g})", cls, base, r, alpha)
    names = ("base_layer", "lora_A", "lora_B", "scaling", "merged")
    missing = [name for name in names if not hasattr(layer, name)]
    if missing:
        raise Problem(f"fill in __init__: it sets none of {', '.join(names)} yet." if len(missing) == len(names)
                      else f"your layer has no attribute {missing[0]!r}; keep PEFT's names {', '.join(names)}.")
    (d, k), (A, B) = base.weight.shape, (layer.lora_A, layer.lora_B)
    for name, t, shape, meaning in (("lora_A", A, (r, k), "r rows, one column per input"),
                                    ("lora_B", B, (d, r), "one row per output, r columns")):
        if not isinstance(t, nn.Parameter):
            raise Problem(f"{name} is a {type(t).__name__}, not an nn.Parameter, so it would never train.")
        if tuple(t.shape) != shape:
            raise Problem(f"{name} has shape {tuple(t.shape)}; it should be {shape}: {meaning}.")
    return layer


def _pair(cls, d: int, k: int, r: int, alpha: float, seed: int):
    """(learner's layer, library's layer, the pretrained base, x (2, 3, k)), both layers with the same A."""
    g = torch.Generator().manual_seed(seed)
    base = _pretrained(d, k, g)
    mine = _build(cls, copy.deepcopy(base), r, alpha)
    lib = lora.LoRALinear.from_linear(copy.deepcopy(base), r=r, alpha=alpha)
    with torch.no_grad():
        lib.lora_A.copy_(mine.lora_A)
    return mine, lib, base, torch.randn(2, 3, k, generator=g)  # x: (batch, tokens, k)


def _same_B(mine, lib, seed: int) -> None:
    with torch.no_grad():
        mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=torch.Generator().manual_seed(seed + 1)))
        lib.lora_B.copy_(mine.lora_B)


def _forward(layer, x):
    out = call("your forward", layer, x)
    if not isinstance(out, torch.Tensor):
        raise Problem(f"your forward returned {out!r:.40}: fill it in, and return the output h (a tensor).")
    return out


def _library_off(what: str) -> Problem:
    return Problem(f"lora_course.LoRALinear {what}; the library, not your layer, is off here.")


@seeded()
def check_init(cls, shapes=SHAPES) -> str:
    """Step 1: A (r, k) as PEFT's, B (d, r) = 0, base frozen and shared, alpha / r, (d + k) r parameters train."""
    for i, (d, k, r, alpha) in enumerate(shapes):
        given = _pretrained(d, k, torch.Generator().manual_seed(i))
        lib = lora.LoRALinear.from_linear(copy.deepcopy(given), r=r, alpha=alpha)  # before yours freezes `given`
        mine = _build(cls, given, r, alpha)
        trainable, c = count_parameters(mine)[0], float(mine.scaling) * r / alpha  # c: 1 when the scaling is right
        for wrong, message in [
                (mine.base_layer is not given, "base_layer must be the layer you were given: shared, not copied."),
                (torch.count_nonzero(mine.lora_B) > 0, "lora_B is not zero at the start, so B A is not 0 either."),
                (any(p.requires_grad for p in given.parameters()), "the base layer still trains: freeze it."),
                (not (mine.lora_A.requires_grad and mine.lora_B.requires_grad), "lora_A and lora_B must train."),
                (not math.isclose(c, 1, rel_tol=1e-6), _scaling_hint(c, r, alpha, "your scaling")),
                (mine.merged is not False, "merged should start False: merge() sets it once W0 holds the update."),
                (trainable != (d + k) * r, f"{trainable:,d} parameters train at d={d}, k={k}, r={r}; LoRA trains A "
                                           f"and B only, (d + k) r = {(d + k) * r:,d}.")]:
            if wrong:
                raise Problem(message)
        if count_parameters(lib)[0] != (d + k) * r or torch.count_nonzero(lib.lora_B) > 0 or lib.scaling != alpha / r:
            raise _library_off("does not start with B = 0, scaling alpha / r and (d + k) r trainable parameters")
    k = 512  # A's distribution, on enough entries (r k = 8,192) that its spread is measured to about 1%
    A = _build(cls, nn.Linear(k, 64), 16, 16.0).lora_A.detach()
    bound = 1 / math.sqrt(k)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(k), 1/sqrt(k))
    if torch.count_nonzero(A) == 0:
        raise Problem("your A is all zeros: with B = 0 as well, neither would ever get a gradient. Start A at random.")
    if A.abs().max() > bound * (1 + 1e-6) or not math.isclose(A.std().item(), bound / math.sqrt(3), rel_tol=0.1):
        raise Problem(f"your A has std {A.std().item():.3g} and max |A| {A.abs().max():.3g} at k = {k}; PEFT's init, "
                      "nn.init.kaiming_uniform_(A, a=math.sqrt(5)), is uniform in +-1/sqrt(k): std "
                      f"{bound / math.sqrt(3):.3g}, max {bound:.3g}.")
    return (f"on {len(shapes)} shapes (d, k, r) your layer has A (r, k) uniform in +-1/sqrt(k) as PEFT's, B (d, r) "
            "= 0, the pretrained base shared and frozen, scaling alpha / r, and (d + k) r trainable parameters, the "
            "same count as lora_course.LoRALinear.")


def _grads(layer, x, weights):  # dL/dA and dL/dB of L = sum(h * weights)
    layer.zero_grad(set_to_none=True)
    (_forward(layer, x) * weights).sum().backward()
    return layer.lora_A.grad, layer.lora_B.grad


def _formula(base: nn.Linear, A, B, s: float, x, weights):
    """LoRA's output W0 x + b + s (x A^T) B^T and its gradients in A and B, from the formula itself."""
    A, B = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    out = F.linear(x, base.weight.detach(), base.bias.detach()) + s * (x @ A.T) @ B.T  # (..., d)
    (out * weights).sum().backward()
    return out.detach(), A.grad, B.grad


@seeded()
def check_forward(cls, shapes=SHAPES) -> str:
    """Step 2: output and gradients are LoRA's (and the library's) at step 0 and with B != 0, at 2 N r (k + d) FLOPs."""
    for i, (d, k, r, alpha) in enumerate(shapes):
        mine, lib, base, x = _pair(cls, d, k, r, alpha, seed=i)
        weights = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(i))  # dL/dh
        for step in ("at step 0", "with a non-zero B"):
            if step != "at step 0":
                _same_B(mine, lib, seed=i)
            want, want_gA, want_gB = _formula(base, mine.lora_A, mine.lora_B, alpha / r, x, weights)
            with torch.no_grad():
                _compare_output(_forward(mine, x), want, base(x), step, r, alpha)
            gA, gB = _grads(mine, x, weights)
            if mine.base_layer.weight.grad is not None:
                raise Problem("your W0 got a gradient: the base layer must stay frozen.")
            for name, got_g, want_g in (("lora_B", gB, want_gB), ("lora_A", gA, want_gA)):
                if got_g is None:
                    raise Problem(f"{name} got no gradient {step}: use self.{name} in your forward.")
                if not torch.allclose(got_g, want_g, atol=ATOL):
                    raise Problem(_scaling_hint(_ratio(got_g, want_g), r, alpha, f"{step}, dL/d{name[-1]}")
                                  if want_g.abs().max() > 0 else
                                  f"{step}, dL/d{name[-1]} should be exactly zero (it is s B^T g x^T, and B = 0).")
            lA, lB = _grads(lib, x, weights)
            if lib.base_layer.weight.grad is not None or not all(
                    torch.allclose(a, b, atol=ATOL) for a, b in ((lib(x), want), (lA, want_gA), (lB, want_gB))):
                raise _library_off(f"does not compute W0 x + b + (alpha / r) (x A^T) B^T or its gradients {step}")
    d, k, r, N = 64, 48, 4, 6  # the low-rank branch costs 2 N r (k + d) FLOPs for N tokens: A x first, never B A
    layer = _build(cls, nn.Linear(k, d), r, 8.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(N, k))
    extra, want = counter.get_total_flops() - 2 * N * k * d, 2 * N * r * (k + d)
    if extra != want:
        raise Problem(f"your forward does {extra:,d} FLOPs beside W0 x for {N} tokens where LoRA needs "
                      f"2 N r (k + d) = {want:,d}: multiply x by A first ((..., r)), then by B; never form B A.")
    return (f"on {len(shapes)} shapes, at step 0 your output equals the frozen layer's W0 x + b and "
            "lora_course.LoRALinear's; dL/dA = 0 and dL/dB equals the library's, so only B moves first. "
            "With a non-zero B your outputs and both gradients equal the library's (scaling alpha / r).")


def _compare_output(got, want, frozen_out, step: str, r: int, alpha: float) -> None:
    if got.shape != want.shape:
        raise Problem(f"your forward returned shape {tuple(got.shape)} for x of shape (2, 3, k); it should be "
                      f"{tuple(want.shape)} (any leading dims, then d = {want.shape[-1]}).")
    if not torch.allclose(got, want, atol=ATOL):
        c = _ratio(got - frozen_out, want - frozen_out)
        raise Problem(f"at step 0 your output is {(got - want).abs().max():.2g} away from the frozen layer's W0 x + b; "
                      "with B = 0 the update is zero." if step == "at step 0" else
                      _scaling_hint(c, r, alpha, f"{step}, your update (output - W0 x - b)")
                      if torch.allclose(got - frozen_out, c * (want - frozen_out), atol=ATOL) else
                      f"{step} your output is not W0 x + b + (alpha / r) (x A^T) B^T; add the low-rank branch to "
                      "the base layer's output.")


@seeded()
def check_count(count_fn) -> str:
    """Step 3: `count_fn(model)` gives `lora_course.count_parameters`' trainable count, on a model with adapters."""
    model = add_lora(toy_model(), ["q_proj", "v_proj"], r=4, alpha=8)
    got, (trainable, total) = call("count_trainable(model)", count_fn, model), count_parameters(model)
    if got != trainable:
        raise Problem(("you counted every parameter, the frozen ones too" if got == total else f"you counted {got!r}")
                      + f"; lora_course.count_parameters finds {trainable:,d} that train (requires_grad=True).")
    return (f"on a small LLaMA with LoRA on q_proj and v_proj your count equals lora_course.count_parameters: "
            f"{trainable:,d} of its {total:,d} parameters train.")


@seeded()
def check_merge(cls, shapes=SHAPES) -> str:
    """Step 4: merge() makes the base weight W0 + (alpha / r) B A, as the library's does; the output stays."""
    for i, (d, k, r, alpha) in enumerate(shapes):
        mine, lib, base, x = _pair(cls, d, k, r, alpha, seed=i)
        if not callable(getattr(mine, "merge", None)):
            raise Problem("your class has no merge() yet: attach it with LoRALinear.merge = merge.")
        _same_B(mine, lib, seed=i)
        with torch.no_grad():
            W0, before = base.weight.detach(), _forward(mine, x)
            want = W0 + (alpha / r) * mine.lora_B @ mine.lora_A  # (d, k)
        call("your merge()", mine.merge)
        lib.merge()
        with torch.no_grad():
            after, got = _forward(mine, x), mine.base_layer.weight.detach()
        c = _ratio(got - W0, want - W0)
        if not torch.allclose(got, want, atol=ATOL):
            raise Problem("merge() left base_layer.weight as it was: add the update into it, in place."
                          if abs(c) < 1e-3 else _scaling_hint(c, r, alpha, "what your merge() adds to W0")
                          if torch.allclose(got - W0, c * (want - W0), atol=ATOL) else
                          "your merged weight differs from W0 + (alpha / r) B A, shape (d, k).")
        if not torch.allclose(after, before, atol=ATOL):
            raise Problem("after merge() your forward still adds the low-rank branch, so the update counts twice: "
                          "set self.merged = True, and let the forward skip the branch when it is."
                          if torch.allclose(after - before, before - base(x), atol=ATOL) else
                          "the merged layer's output differs from the unmerged one's.")
        if not torch.allclose(lib.base_layer.weight, want, atol=ATOL):
            raise _library_off("does not merge to W0 + (alpha / r) B A")
    return (f"on {len(shapes)} shapes your merged weight equals W0 + (alpha / r) B A, the same as "
            "lora_course.LoRALinear's merge, and the merged layer's output equals the unmerged one's.")


def toy_model(n_layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny seeded LLaMA (width 32) from a config, no download: a pretrained model with LLaMA's layer names."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    with seeded(seed):
        return LlamaForCausalLM(config).eval()


@seeded()
def check_swap(swap_fn, r: int = 4, alpha: float = 8.0) -> str:
    """Step 5: `swap_fn(model, names, r, alpha)` wraps the named layers only, keeps the output, trains as `add_lora`."""
    model, ids = toy_model(), torch.randint(0, 64, (2, 5))
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    want = model(ids).logits.detach()
    model = call("add_lora_by_name(model, names, r, alpha)", swap_fn, model, names, r, alpha) or model
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    if wrapped != set(names):
        missed = [n for n in names if n not in wrapped]
        raise Problem(f"{missed[0]} is still a {type(model.get_submodule(missed[0])).__name__}: put your LoRALinear "
                      "in its place in the parent module (setattr(parent, child_name, ...))." if missed else
                      f"you also wrapped {sorted(wrapped - set(names))}; wrap only the layers named.")
    with torch.no_grad():
        if not torch.allclose(call("the adapted model", model, ids).logits, want, atol=ATOL):
            raise Problem("the model's output changed at step 0; wrapping must leave it as it was.")
    trainable, lib = count_parameters(model)[0], count_parameters(add_lora(toy_model(), names, r=r, alpha=alpha))[0]
    if trainable != lib:
        raise Problem(f"{trainable:,d} parameters train; in lora_course.add_lora's model {lib:,d} do. "
                      + ("Freeze the rest of the model (model.requires_grad_(False)) before adding the adapters."
                         if trainable > lib else "Each adapter's A and B must train."))
    return (f"the {len(names)} layers named carry your LoRA around the model's own layers, the output at step 0 "
            f"is unchanged, and {trainable:,d} parameters train, as many as lora_course.add_lora gives.")


@checker("your prediction: 'A', 'B', 'both' or 'neither'")
@seeded()
def check_swapped_init(prediction, cls=LoRALinear) -> str:
    """Predict, then measure on a `cls` layer: which factor gets a gradient at step 0 if A = 0 and B is random?"""
    answer = {"a": "A", "b": "B", "both": "both", "neither": "neither"}.get(str(prediction).strip().lower())
    if answer is None:
        raise Problem(f"answer 'A', 'B', 'both' or 'neither', not {prediction!r}.")
    g = torch.Generator().manual_seed(0)
    layer = cls(_pretrained(32, 64, g), 4, 8.0)
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_B.copy_(torch.rand(layer.lora_B.shape, generator=g) - 0.5)
    x = torch.randn(16, 64, generator=g)  # (N, k)
    call("your layer", lambda: layer(x).pow(2).mean().backward())
    grad = {n: getattr(layer, f"lora_{n}").grad.abs().max().item() for n in "AB"}
    measured = {"": "neither", "A": "A", "B": "B", "AB": "both"}["".join(n for n in "AB" if grad[n] > 0)]
    seen = (f"measured max |dL/dA| = {grad['A']:.2g}, max |dL/dB| = {grad['B']:.2g}: with A = 0, A x = 0, so "
            "dL/dB = s g (A x)^T is zero, while dL/dA = s B^T g x^T is not, since B is random.")
    if answer != measured:
        raise Problem(f"you predicted {prediction!r}; {seen}")
    return (f"{seen} B A is still zero at step 0, so this init starts at the pretrained model too; the roles "
            "swap, and A moves first.")


@checker("your function unmerge(layer)")
@seeded()
def check_unmerge(unmerge_fn, cls=LoRALinear) -> str:
    """`unmerge_fn(layer)` takes a merged `cls` layer back to W0 and the unmerged forward."""
    g = torch.Generator().manual_seed(0)
    layer = cls(_pretrained(16, 24, g), 4, 12.0)  # scaling 3
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(16, 4, generator=g))
        x, W0 = torch.randn(5, 24, generator=g), layer.base_layer.weight.clone()
        want = layer(x)
    layer.merge()
    call("your unmerge(layer)", unmerge_fn, layer)
    W, delta = layer.base_layer.weight.detach(), (layer.scaling * layer.lora_B @ layer.lora_A).detach()  # (d, k)
    for wrong, message in [
            (not torch.allclose(W, W0, atol=ATOL), f"you took out {_ratio(W0 + delta - W, delta):.3g} times "
                                                   "(alpha / r) B A: take it out exactly once to get W0 back."),
            (layer.merged, "W0 is restored, but layer.merged is still True, so forward skips the adapter."),
            (not torch.allclose(layer(x).detach(), want, atol=ATOL), "the output is not the unmerged layer's.")]:
        if wrong:
            raise Problem(message)
    return "W0 is back (to float32 rounding), merged is False, and the layer computes W0 x + b + (alpha / r) B A x."


@checker("your function merge_conv1d(conv, lora_A, lora_B, scaling)")
@seeded()
def check_merge_conv1d(merge_fn, r: int = 8, scaling: float = 2.0) -> str:
    """`merge_fn(conv, A, B, scaling)` folds scaling B A into a Conv1D's (in, out) weight: conv(x) = base + adapter."""
    g = torch.Generator().manual_seed(0)
    for k, d in ((768, 768), (768, 2304)):  # square first: there an update added the wrong way round still fits
        conv = Conv1D(d, k).requires_grad_(False)  # Conv1D(nf=out, nx=in): x @ weight (k, d) + bias (d,); its own init
        A, B, x = (torch.randn(*shape, generator=g) for shape in ((r, k), (d, r), (5, k)))
        W0, want = conv.weight.clone(), conv(x) + scaling * (x @ A.T) @ B.T  # (k, d), (5, d)
        call("your merge_conv1d(conv, lora_A, lora_B, scaling)", merge_fn, conv, A, B, scaling)
        if conv.weight.shape != W0.shape:
            raise Problem(f"conv.weight is now {tuple(conv.weight.shape)}; keep its (in, out) shape, {(k, d)}.")
        delta, update = conv.weight.detach() - W0, scaling * (B @ A).T  # (k, d): what a merge adds in this layout
        c = _ratio(delta, update)
        for wrong, message in [
                (d == k and torch.allclose(delta, update.T, rtol=1e-4, atol=1e-3),
                 "you added scaling B A as nn.Linear stores it, (out, in); a Conv1D stores (in, out), so add the "
                 "transpose, (scaling B A)^T. On a square layer the shapes fit either way."),
                (abs(c) < 1e-3, "conv.weight did not change: add the update into it, in place."),
                (not torch.allclose(delta, update, rtol=1e-4, atol=1e-3), f"you added {c:.3g} times (scaling B A)^T; "
                 "add it exactly once." if torch.allclose(delta, c * update, rtol=1e-4, atol=1e-3) else
                 "what you added to conv.weight is not (scaling B A)^T, shape (in, out)."),
                (not torch.allclose(conv(x), want, rtol=1e-4, atol=1e-3), "conv(x) is not the base plus the adapter.")]:
            if wrong:
                raise Problem(message)
    return ("on a 768 x 768 Conv1D and a 768 -> 2304 one (like c_attn), conv(x) after your merge equals the base plus "
            "the unmerged adapter: x A^T B^T = x (B A)^T, so an (in, out) weight takes (scaling B A)^T.")
