"""Notebook 03 (LoRA from scratch): the checks the learner's layer meets at each step of the build,
the picture of LoRA, a small model to adapt, the cost of an unmerged adapter, the parameter-budget
widget (shown with `play`, re-exported from `common`) and the exercise checkers.

The build checks put the learner's class and the library's `lora_course.LoRALinear` around copies
of the same pretrained `nn.Linear`, on seeded random shapes, give them the same `A` (and later the
same `B`), and compare both with LoRA's formula: a wrong learner's layer gets a hint at its
mistake, a wrong library a message that names the library. The learner's class is built as
`cls(base_layer, r, alpha)` and keeps PEFT's names: `base_layer`, `lora_A` (r, k), `lora_B` (d, r),
`scaling`, `merged`.
"""

from __future__ import annotations

import copy
import functools
import math
import time

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Conv1D
from ..lora import LoRALinear, add_lora, count_parameters
from ..runtime import num_threads
from .common import is_blank, not_filled_in, play, report

__all__ = [
    "draw_lora_structure", "random_shapes", "compare_with_library",
    "check_init", "check_forward", "check_count", "check_merge", "check_swap", "ToyBlock", "toy_model",
    "thread_times_us", "unmerged_overhead", "lora_parameter_budget", "lora_parameter_budget_widget",
    "recovery_task", "check_lora_param_count", "check_conv1d_forward", "check_unmerge", "check_recover_update",
    "play",
]

ATOL = 1e-5  # float32 agreement between two implementations of the same arithmetic


# ----------------------------------------------------------------------------- the picture

def draw_lora_structure(d: int = 768, k: int = 768, r: int = 8, ax=None) -> dict:
    """The LoRA paper's Figure 1, to scale: the frozen W0 (d x k) beside the thin A (r x k) and B (d x r).

    Each matrix is a rectangle as wide as its input and as tall as its output, so its area is
    its number of parameters. Returns {"W0" | "A" | "B": (width, height)} read back from the
    drawn rectangles.
    """
    from matplotlib.patches import Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.6))
    gap = 0.18 * max(d, k)
    left, bottom = k + gap, r + gap  # A's column; B and W0 start above A so both outputs meet at h
    boxes = [
        Rectangle((0, bottom), k, d, facecolor="tab:blue", alpha=0.35, edgecolor="tab:blue", gid="W0"),
        Rectangle((left, 0), k, r, facecolor="tab:orange", edgecolor="tab:orange", gid="A"),
        Rectangle((left + k / 2 - r / 2, bottom), r, d, facecolor="tab:orange", edgecolor="tab:orange", gid="B"),
    ]
    for box in boxes:
        ax.add_patch(box)
    top = bottom + d
    ax.text(k / 2, bottom + d / 2, f"$W_0$  (d x k = {d} x {k})\nfrozen\n{d * k:,d} numbers",
            ha="center", va="center", fontsize=10)
    ax.text(left + k + 0.04 * k, r / 2, f"A  (r x k = {r} x {k})\nKaiming-uniform\n{r * k:,d} numbers",
            va="center", fontsize=9)
    ax.text(left + k / 2 + r + 0.04 * k, bottom + d / 2, f"B  (d x r = {d} x {r})\nzeros at step 0\n"
            f"{d * r:,d} numbers", va="center", fontsize=9)
    arrow = dict(arrowstyle="->", color="0.3")
    x_y = -0.22 * d
    ax.text((left + k) / 2, x_y, f"x  ({k} inputs)", ha="center", va="center", fontsize=10)
    for target in ((k / 2, bottom), (left + k / 2, 0)):
        ax.annotate("", xy=target, xytext=((left + k) / 2, x_y + 0.06 * d), arrowprops=arrow)
    ax.annotate("", xy=(left + k / 2, bottom), xytext=(left + k / 2, r), arrowprops=arrow)
    h_y = top + 0.2 * d
    ax.text((left + k) / 2, h_y, r"$h = W_0 x + \frac{\alpha}{r} B A x$" + f"  ({d} outputs)", ha="center",
            va="center", fontsize=11)
    for source in ((k / 2, top), (left + k / 2, top)):
        ax.annotate("", xy=((left + k) / 2, h_y - 0.06 * d), xytext=source, arrowprops=arrow)
    ax.set_xlim(-0.05 * k, left + 1.75 * k)
    ax.set_ylim(x_y - 0.08 * d, h_y + 0.08 * d)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"LoRA to scale (areas are parameter counts): d = {d}, k = {k}, r = {r}", fontsize=10)
    return {p.get_gid(): (p.get_width(), p.get_height()) for p in ax.patches if p.get_gid()}


# ----------------------------------------------------------------------------- the build checks

def random_shapes(n: int = 4, seed: int = 0) -> list[tuple[int, int, int, float]]:
    """`n` seeded random (d, k, r, alpha): 2 <= d, k <= 48, 2 <= r <= min(d, k), alpha in 1..32."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    while len(shapes) < n:
        d, k = (int(v) for v in torch.randint(2, 49, (2,), generator=g))
        r = int(torch.randint(2, min(d, k) + 1, (1,), generator=g))
        alpha = float(torch.randint(1, 33, (1,), generator=g))
        if _distinct_factors(r, alpha):  # so that each scaling mistake shows, and shows as itself
            shapes.append((d, k, r, alpha))
    return shapes


def _distinct_factors(r: int, alpha: float) -> bool:
    """True when the factors by which the scaling mistakes scale the update (see `_scaling_hint`)
    differ from 1 and from each other by at least 10%."""
    factors = sorted([1.0] + [f for f, _ in _scaling_mistakes(r, alpha)])
    return all(b > 1.1 * a if a > 0 else b > a + 0.1 for a, b in zip(factors, factors[1:]))


def _pretrained(d: int, k: int, g: torch.Generator) -> nn.Linear:
    base = nn.Linear(k, d)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, k, generator=g) / math.sqrt(k))
        base.bias.copy_(0.1 * torch.randn(d, generator=g))
    return base


def _own_rng(fn):
    """Run a check on its own seeded random stream: the same verdict every run, and the caller's
    random state left as it was."""
    @functools.wraps(fn)
    def seeded(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return fn(*args, **kwargs)

    return seeded


class _Problem(Exception):
    """What is wrong with the learner's code, in words a learner can act on."""


def _call(what: str, fn, *args):
    """fn(*args), with the learner's own errors turned into a verdict (a blank body included)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Problem(f"fill in {what} (it still raises NotImplementedError), then run this cell again.")
    except _Problem:
        raise
    except Exception as e:  # the learner's code raised: say what, don't crash the notebook
        raise _Problem(f"{what} raised {type(e).__name__}: {e}")


def _build(cls, base: nn.Linear, r: int, alpha: float):
    if not isinstance(cls, type):
        raise _Problem(f"pass your class itself (LoRALinear, without calling it), not {cls!r}.")
    layer = _call(f"{cls.__name__}(base_layer, r={r}, alpha={alpha:g})", cls, base, r, alpha)
    for name in ("base_layer", "lora_A", "lora_B", "scaling"):
        if not hasattr(layer, name):
            raise _Problem(f"your layer has no attribute {name!r}; keep PEFT's names base_layer, lora_A, "
                           "lora_B and scaling.")
    for name in ("lora_A", "lora_B"):
        if not isinstance(getattr(layer, name), nn.Parameter):
            raise _Problem(f"{name} is a {type(getattr(layer, name)).__name__}, not an nn.Parameter, so it "
                           "would never train; wrap it in nn.Parameter(...).")
    return layer


def _pair(cls, d: int, k: int, r: int, alpha: float, seed: int):
    """(learner's layer, library's layer, the pretrained base, x (2, 3, k)), both layers with the same A."""
    g = torch.Generator().manual_seed(seed)
    base = _pretrained(d, k, g)
    mine = _build(cls, copy.deepcopy(base), r, alpha)
    lib = LoRALinear.from_linear(copy.deepcopy(base), r=r, alpha=alpha)
    _expect_shape("lora_A", mine.lora_A, (r, k), "(r, k): r rows, one column per input")
    _expect_shape("lora_B", mine.lora_B, (d, r), "(d, r): one row per output, r columns")
    with torch.no_grad():
        lib.lora_A.copy_(mine.lora_A)
    x = torch.randn(2, 3, k, generator=g)  # (batch, tokens, k)
    return mine, lib, base, x


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple, meaning: str) -> None:
    if tuple(tensor.shape) != shape:
        raise _Problem(f"{name} has shape {tuple(tensor.shape)}; it should be {shape} = {meaning}.")


def _same_B(mine, lib, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=g))
        lib.lora_B.copy_(mine.lora_B)


def _ratio(got: torch.Tensor, want: torch.Tensor) -> float:
    """The c that makes c * want closest to got (least squares)."""
    got, want = got.detach(), want.detach()
    return float((got * want).sum() / (want * want).sum().clamp_min(1e-30))


def _scaling_mistakes(r: int, alpha: float) -> list[tuple[float, str]]:
    """(factor, why): a mistaken scaling makes the update `factor` times LoRA's (alpha / r) B A x."""
    s = alpha / r
    return [(r, "you scale by alpha; LoRA scales by alpha / r"),
            (math.sqrt(r), "that is rsLoRA's alpha / sqrt(r); plain LoRA scales by alpha / r"),
            (1 / s, "the scaling alpha / r is missing"),
            (s, "the scaling alpha / r is applied twice"),
            (-1, "the sign is flipped: add the update, do not subtract it")]


def _scaling_hint(c: float, r: int, alpha: float, what: str) -> str:
    """Why `what` came out c times the library's: the scaling mistakes a learner makes."""
    s = alpha / r
    for factor, why in _scaling_mistakes(r, alpha):
        if math.isclose(c, factor, rel_tol=1e-3):
            return f"{what} is {c:.3g} times the library's: {why}."
    return f"{what} is {c:.3g} times the library's; it should be (alpha / r) B A x = {s:.3g} B A x."


def _forward(layer, x):
    out = _call("your forward", layer, x)
    if not isinstance(out, torch.Tensor):
        raise _Problem(f"your forward returned {type(out).__name__}; return the output tensor h.")
    return out


def _verdict(fn, *args) -> bool:
    try:
        message = fn(*args)
    except _Problem as problem:
        return report(False, str(problem))
    return report(True, message)


@_own_rng
def check_init(cls, shapes=None) -> bool:
    """Step 1: A (r, k) uniform in +-1/sqrt(k) as PEFT's, B (d, r) = 0, the base frozen and shared,
    scaling alpha / r, and the library's trainable count, on random shapes."""
    return _verdict(_check_init, cls, shapes or random_shapes())


def _check_init(cls, shapes) -> str:
    for i, (d, k, r, alpha) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        given = _pretrained(d, k, g)
        lib = LoRALinear.from_linear(copy.deepcopy(given), r=r, alpha=alpha)  # before yours freezes `given`
        mine = _build(cls, given, r, alpha)
        _expect_shape("lora_A", mine.lora_A, (r, k), "(r, k): r rows, one column per input")
        _expect_shape("lora_B", mine.lora_B, (d, r), "(d, r): one row per output, r columns")
        if mine.base_layer is not given:
            raise _Problem("base_layer is not the layer you were given: keep it (self.base_layer = base_layer), "
                           "so the pretrained weight is shared, not copied.")
        if torch.count_nonzero(mine.lora_B) > 0:
            raise _Problem("lora_B is not zero at the start: with B = 0, B A = 0 and the adapted layer starts "
                           "exactly as the pretrained one.")
        if any(p.requires_grad for p in mine.base_layer.parameters()):
            raise _Problem("the base layer still trains: freeze it with base_layer.requires_grad_(False); "
                           "only A and B learn.")
        if not (mine.lora_A.requires_grad and mine.lora_B.requires_grad):
            raise _Problem("lora_A and lora_B must train (requires_grad=True).")
        if not math.isclose(float(mine.scaling), alpha / r, rel_tol=1e-6):
            raise _Problem(_scaling_hint(float(mine.scaling) / (alpha / r), r, alpha, "your scaling"))
        lora = (d + k) * r
        if count_parameters(mine)[0] != lora:
            raise _Problem(f"your layer trains {count_parameters(mine)[0]:,d} parameters for d={d}, k={k}, r={r}; "
                           f"LoRA trains A and B only, (d + k) r = {lora:,d}.")
        if count_parameters(lib)[0] != lora:
            raise _library_off(f"trains {count_parameters(lib)[0]:,d} parameters, not (d + k) r = {lora:,d}")
        if torch.count_nonzero(lib.lora_B) > 0 or not math.isclose(lib.scaling, alpha / r, rel_tol=1e-6):
            raise _library_off("does not start with B = 0 and scaling alpha / r")
    _check_A_init(cls)
    return (f"on {len(shapes)} random shapes (d, k, r) your layer has A (r, k) uniform in +-1/sqrt(k) as PEFT's, "
            "B (d, r) = 0, the pretrained base shared and frozen, scaling alpha / r, and (d + k) r trainable "
            "parameters, the same count as lora_course.LoRALinear.")


def _check_A_init(cls, d: int = 64, k: int = 512, r: int = 16) -> None:
    """A's distribution, on enough entries (r k = 8,192) that its spread is measured to about 1%."""
    bound = 1 / math.sqrt(k)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(k), 1/sqrt(k))
    def off(A: torch.Tensor) -> bool:
        return A.abs().max() > bound * (1 + 1e-6) or not math.isclose(A.std().item(), bound / math.sqrt(3),
                                                                      rel_tol=0.1)

    A = _build(cls, nn.Linear(k, d), r, 16.0).lora_A.detach()
    if torch.count_nonzero(A) == 0:
        raise _Problem("your A is all zeros: with B = 0 as well, neither would ever get a gradient. "
                       "Start A at random.")
    if off(A):
        raise _Problem(f"your A has std {A.std().item():.3g} and max |A| {A.abs().max():.3g} at k = {k}; PEFT's "
                       "init, nn.init.kaiming_uniform_(A, a=math.sqrt(5)), is uniform in +-1/sqrt(k): std "
                       f"{bound / math.sqrt(3):.3g}, max {bound:.3g}.")
    if off(LoRALinear(k, d, r=r, alpha=16).lora_A.detach()):
        raise _library_off("does not draw A uniform in +-1/sqrt(k)")


@_own_rng
def check_forward(cls, shapes=None) -> bool:
    """Step 2: at step 0 the output is W0 x + b, dL/dA = 0 and dL/dB is s g (Ax)^T; with a non-zero B,
    the output and both gradients are LoRA's. Each is compared with the library's too."""
    return _verdict(_check_forward, cls, shapes or random_shapes())


def _grads(layer, x, weights):
    layer.zero_grad(set_to_none=True)
    (_forward(layer, x) * weights).sum().backward()
    return layer.lora_A.grad, layer.lora_B.grad


def _reference(base: nn.Linear, A, B, s: float, x, weights):
    """LoRA's output W0 x + b + s (x A^T) B^T and its gradients in A and B, from the formula itself."""
    A, B = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    out = F.linear(x, base.weight.detach(), base.bias.detach()) + s * (x @ A.T) @ B.T  # (..., d)
    (out * weights).sum().backward()
    return out.detach(), A.grad, B.grad


def _library_off(what: str) -> _Problem:
    return _Problem(f"lora_course.LoRALinear {what}; the library, not your layer, is off here.")


def _check_forward(cls, shapes) -> str:
    for i, (d, k, r, alpha) in enumerate(shapes):
        mine, lib, base, x = _pair(cls, d, k, r, alpha, seed=i)
        weights = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(i))  # dL/dh
        for step in ("at step 0", "with a non-zero B"):
            if step != "at step 0":
                _same_B(mine, lib, seed=i)
            want, want_gA, want_gB = _reference(base, mine.lora_A, mine.lora_B, alpha / r, x, weights)
            with torch.no_grad():
                got, frozen_out = _forward(mine, x), base(x)
            if got.shape != want.shape:
                raise _Problem(f"for x of shape {tuple(x.shape)} your forward returned shape {tuple(got.shape)}; "
                               f"it should be {tuple(want.shape)} (any leading dims, then d = {d}).")
            if not torch.allclose(got, want, atol=ATOL):
                if step == "at step 0":
                    raise _Problem(f"at step 0 your output differs from the frozen layer's W0 x + b by up to "
                                   f"{(got - want).abs().max():.2g}; with B = 0 the update is zero.")
                c = _ratio(got - frozen_out, want - frozen_out)
                raise _Problem(_scaling_hint(c, r, alpha, f"{step}, your update (output - W0 x - b)")
                               if torch.allclose(got - frozen_out, c * (want - frozen_out), atol=ATOL) else
                               f"{step} your output is not W0 x + b + (alpha / r) (x A^T) B^T; compute the "
                               "low-rank branch and add it to the base layer's output.")
            gA, gB = _grads(mine, x, weights)
            if mine.base_layer.weight.grad is not None:
                raise _Problem("your W0 got a gradient: the base layer must stay frozen.")
            for name, got_g, want_g in (("lora_B", gB, want_gB), ("lora_A", gA, want_gA)):
                if got_g is None:
                    raise _Problem(f"{name} got no gradient {step}: use self.{name} in your forward.")
                if not torch.allclose(got_g, want_g, atol=ATOL):
                    raise _Problem(_scaling_hint(_ratio(got_g, want_g), r, alpha, f"{step}, dL/d{name[-1]}")
                                   if want_g.abs().max() > 0 else
                                   f"{step}, dL/d{name[-1]} should be exactly zero (it is s B^T g x^T, and B = 0).")
            lA, lB = _grads(lib, x, weights)
            with torch.no_grad():
                lib_out = lib(x)
            if not (torch.allclose(lib_out, want, atol=ATOL) and torch.allclose(lA, want_gA, atol=ATOL)
                    and torch.allclose(lB, want_gB, atol=ATOL)):
                raise _library_off(f"does not compute W0 x + b + (alpha / r) (x A^T) B^T or its gradients {step}")
            if lib.base_layer.weight.grad is not None:
                raise _library_off("lets W0 get a gradient")
    return (f"on {len(shapes)} random shapes, at step 0 your output equals the frozen layer's W0 x + b and "
            "lora_course.LoRALinear's; dL/dA = 0 and dL/dB equals the library's, so only B moves first. "
            "With a non-zero B your outputs and both gradients equal the library's (scaling alpha / r).")


@_own_rng
def check_count(count_fn, cls, shapes=None) -> bool:
    """Step 3: `count_fn(model)` counts the trainable parameters, as the library counts them."""
    if is_blank(count_fn):
        return not_filled_in("your function count_trainable(model)")
    return _verdict(_check_count, count_fn, cls, shapes or random_shapes())


def _check_count(count_fn, cls, shapes) -> str:
    for i, (d, k, r, alpha) in enumerate(shapes):
        mine = _build(cls, _pretrained(d, k, torch.Generator().manual_seed(i)), r, alpha)
        got = _call("count_trainable(layer)", count_fn, mine)
        trainable, total = count_parameters(mine)
        if got == total:
            raise _Problem(f"you counted {got:,d}, every parameter including the frozen base; count only the "
                           "parameters with requires_grad.")
        if got != trainable:
            raise _Problem(f"you counted {got!r} for d={d}, k={k}, r={r}; lora_course.count_parameters finds "
                           f"{trainable:,d} trainable, (d + k) r.")
    return (f"on {len(shapes)} random shapes your count equals lora_course.count_parameters: (d + k) r "
            "trainable, the frozen base not counted.")


@_own_rng
def check_merge(cls, shapes=None) -> bool:
    """Step 4: merge() makes the base weight W0 + (alpha / r) B A, as the library's merge does, and the
    merged layer computes what the unmerged one did."""
    return _verdict(_check_merge, cls, shapes or random_shapes())


def _check_merge(cls, shapes) -> str:
    for i, (d, k, r, alpha) in enumerate(shapes):
        mine, lib, base, x = _pair(cls, d, k, r, alpha, seed=i)
        if not callable(getattr(mine, "merge", None)):
            raise _Problem("your class has no merge() yet: attach it with LoRALinear.merge = merge.")
        _same_B(mine, lib, seed=i)
        W0 = base.weight.detach()
        want = W0 + (alpha / r) * mine.lora_B.detach() @ mine.lora_A.detach()  # (d, k)
        with torch.no_grad():
            before = _forward(mine, x)
            _call("your merge()", mine.merge)
            lib.merge()
            after = _forward(mine, x)
        got = mine.base_layer.weight.detach()
        if not torch.allclose(got, want, atol=ATOL):
            c = _ratio(got - W0, want - W0)
            if abs(c) < 1e-3:
                raise _Problem("merge() left base_layer.weight as it was: add the update into it, in place.")
            raise _Problem(_scaling_hint(c, r, alpha, "what your merge() adds to W0") if
                           torch.allclose(got - W0, c * (want - W0), atol=ATOL) else
                           "your merged weight differs from W0 + (alpha / r) B A, shape (d, k).")
        if not torch.allclose(after, before, atol=ATOL):
            twice = torch.allclose(after - before, before - base(x), atol=ATOL)
            raise _Problem("after merge() your forward still adds the low-rank branch, so the update counts "
                           "twice: set self.merged = True and skip the branch when merged." if twice else
                           "the merged layer's output differs from the unmerged one's.")
        if not torch.allclose(lib.base_layer.weight, want, atol=ATOL):
            raise _library_off("does not merge to W0 + (alpha / r) B A")
    return (f"on {len(shapes)} random shapes your merged weight equals W0 + (alpha / r) B A, the same as "
            "lora_course.LoRALinear's merge, and the merged layer's output equals the unmerged one's.")


# ----------------------------------------------------------------------------- a small model to adapt

class _Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x):  # x: (B, T, C)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class _MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x):  # x: (B, T, C)
        return self.down_proj(F.gelu(self.up_proj(x)))


class ToyBlock(nn.Module):
    """One pre-norm transformer block with LLaMA's layer names: attn.{q,k,v,o}_proj, mlp.{up,down}_proj."""

    def __init__(self, d_model: int = 32, n_head: int = 4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.mlp = _Attention(d_model, n_head), _MLP(d_model)

    def forward(self, x):  # x: (B, T, C)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def toy_model(d_model: int = 32, seed: int = 0) -> ToyBlock:
    """A seeded `ToyBlock`, standing in for a pretrained model."""
    torch.manual_seed(seed)
    return ToyBlock(d_model).eval()


@_own_rng
def check_swap(swap_fn, cls, names=("attn.q_proj", "attn.v_proj"), r: int = 4, alpha: float = 8.0) -> bool:
    """Step 5: `swap_fn(model, names, r, alpha)` wraps exactly the named layers with `cls`, freezes the
    rest, leaves the output at step 0 unchanged, and trains as many parameters as `add_lora`."""
    if is_blank(swap_fn):
        return not_filled_in("your function add_lora_by_name(model, names, r, alpha)")
    return _verdict(_check_swap, swap_fn, cls, list(names), r, alpha)


def _check_swap(swap_fn, cls, names, r, alpha) -> str:
    model = toy_model()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))  # (B, T, C)
    with torch.no_grad():
        want = model(x)
    originals = {n: model.get_submodule(n) for n in names}
    returned = _call("add_lora_by_name(model, names, r, alpha)", swap_fn, model, names, r, alpha)
    model = model if returned is None else returned
    for name, original in originals.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, cls):
            raise _Problem(f"{name} is still a {type(layer).__name__}: put your LoRALinear in its place in the "
                           "parent module (setattr(parent, child_name, ...)).")
        if layer.base_layer is not original:
            raise _Problem(f"{name}'s base_layer is not the model's own pretrained layer: wrap that one.")
    others = [n for n, m in model.named_modules() if isinstance(m, cls) and n not in names]
    if others:
        raise _Problem(f"you also wrapped {others}; wrap only the layers named.")
    with torch.no_grad():
        got = _forward(model, x)
    if not torch.allclose(got, want, atol=ATOL):
        raise _Problem("the model's output changed at step 0; wrapping must leave it as it was.")
    trainable = count_parameters(model)[0]
    lib = count_parameters(add_lora(toy_model(), names, r=r, alpha=alpha))[0]
    if trainable != lib:
        raise _Problem(f"{trainable:,d} parameters train; in lora_course.add_lora's model {lib:,d} do. "
                       + ("Freeze the rest of the model (model.requires_grad_(False)) before adding the adapters."
                          if trainable > lib else "Each adapter's A and B must train."))
    return (f"{' and '.join(names)} now carry your LoRA around the model's own layers, the output at step 0 is "
            f"unchanged, and {trainable:,d} parameters train, as many as lora_course.add_lora gives.")


# ----------------------------------------------------------------------------- the library, compared

@_own_rng
def compare_with_library(cls, d: int = 24, k: int = 40, r: int = 4, alpha: float = 8.0, seed: int = 0) -> dict:
    """Max |difference| between the learner's layer and `lora_course.LoRALinear` on the same weights
    (same base, same A, the same non-zero B): output, dL/dA, dL/dB, the merged weight, and the
    number of trainable parameters."""
    mine, lib, _, x = _pair(cls, d, k, r, alpha, seed)
    trainable = abs(count_parameters(mine)[0] - count_parameters(lib)[0])
    _same_B(mine, lib, seed)
    weights = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(seed))  # dL/dh
    diffs = {"output": (_forward(mine, x) - lib(x)).abs().max().item()}
    for name, got, want in zip(("grad_A", "grad_B"), _grads(mine, x, weights), _grads(lib, x, weights)):
        diffs[name] = (got - want).abs().max().item()
    with torch.no_grad():
        mine.merge()
        lib.merge()
    diffs["merged_weight"] = (mine.base_layer.weight - lib.base_layer.weight).abs().max().item()
    diffs["trainable_count"] = trainable
    return diffs


# ----------------------------------------------------------------------------- the cost of not merging

def thread_times_us(fns, number: int, repeat: int = 25) -> list:
    """Microseconds of CPU time this thread spends per call of each `fn()` in `fns`: the least of
    `repeat` runs of `number` calls. The runs of the functions alternate (the order flips each
    repeat), so a burst of load on the machine hits them alike; time other programs take is not
    counted."""
    for fn in fns:
        fn()  # warm up
    best = [math.inf] * len(fns)
    for i in range(repeat):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for j in order:
            start = time.thread_time_ns()
            for _ in range(number):
                fns[j]()
            best[j] = min(best[j], (time.thread_time_ns() - start) / number / 1e3)
    return best


def unmerged_overhead(k: int = 768, d: int = 768, r: int = 8, tokens=(1, 16, 256, 1024), seed: int = 0) -> list:
    """One LoRA layer unmerged vs merged, on one CPU thread, for each number of tokens N.

    Rows {"tokens", "merged_us", "unmerged_us", "ratio", "extra_us_per_token"}; the times come
    from `thread_times_us`, the two layers timed in alternation (a few ms of calls per run).
    """
    g = torch.Generator().manual_seed(seed)
    unmerged = LoRALinear(k, d, r=r, alpha=2 * r).eval()
    with torch.no_grad():
        unmerged.lora_B.copy_(0.02 * torch.randn(d, r, generator=g))
    merged = copy.deepcopy(unmerged)
    merged.merge()
    rows = []
    with num_threads(1), torch.inference_mode():
        for n in tokens:
            x = torch.randn(n, k, generator=g)  # (N, k)
            t_merged, t_unmerged = thread_times_us([lambda: merged(x), lambda: unmerged(x)], max(2, 32 // n))
            rows.append({"tokens": n, "merged_us": t_merged, "unmerged_us": t_unmerged,
                         "ratio": t_unmerged / t_merged, "extra_us_per_token": (t_unmerged - t_merged) / n})
    return rows


# ----------------------------------------------------------------------------- the parameter budget

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

def check_lora_param_count(answer, d_model: int = 4096, n_layers: int = 32, r: int = 8, targets: int = 2) -> bool:
    """Exercise: trainable LoRA parameters on `targets` square (d_model x d_model) projections
    in each of `n_layers` layers, counted from real (meta-device) LoRALinear layers."""
    if is_blank(answer):
        return not_filled_in("the number of trainable parameters (an int)")
    with torch.device("meta"):
        layer = LoRALinear(d_model, d_model, r=r, bias=False)
    per_projection = count_parameters(layer)[0]
    expected = per_projection * targets * n_layers
    if answer == expected:
        return report(True, f"{expected:,d} trainable parameters: (d + k) r = {per_projection:,d} per projection, "
                            f"{targets} projections in each of {n_layers} layers.")
    hints = {per_projection * n_layers: "that is half: one projection per layer (LoRA adapts q_proj and v_proj), "
                                        "or only one of A and B (both train).",
             per_projection * targets: f"that is one layer; the model has {n_layers}.",
             d_model * d_model * targets * n_layers: "that is the full d x k weights; LoRA trains (d + k) r each."}
    return report(False, f"you said {answer!r}. " + hints.get(answer, "Count A (r x k) and B (d x r) for one "
                                                                     "projection, then projections and layers."))


def _lib_conv1d(d: int, k: int, r: int, alpha: float, seed: int):
    """The library's LoRA around a GPT-2 `Conv1D` (weight stored (k, d)), with a non-zero B, and an x."""
    g = torch.Generator().manual_seed(seed)
    conv = Conv1D(d, k)  # Conv1D(nf=out, nx=in): weight (in, out)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(k, d, generator=g) / math.sqrt(k))
        conv.bias.copy_(0.1 * torch.randn(d, generator=g))
    layer = LoRALinear.from_linear(conv, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(d, r, generator=g))
    return layer, torch.randn(5, k, generator=g)


@_own_rng
def check_conv1d_forward(forward_fn) -> bool:
    """Exercise: `forward_fn(x, W, b, A, B, scaling)` with W stored as GPT-2's Conv1D stores it,
    (k, d), must compute LoRALinear's output on that layer."""
    if is_blank(forward_fn):
        return not_filled_in("your function lora_forward(x, W, b, A, B, scaling)")
    try:
        for d, k in ((12, 12), (10, 6)):  # square first, so a transposed W gives numbers to diagnose
            layer, x = _lib_conv1d(d, k, r=3, alpha=5.0, seed=d)
            W, b, A, B = (t.detach() for t in (layer.base_layer.weight, layer.base_layer.bias,
                                               layer.lora_A, layer.lora_B))
            got = _call("your function", forward_fn, x, W, b, A, B, layer.scaling)
            if not isinstance(got, torch.Tensor) or got.shape != (5, d):
                raise _Problem(f"for x (5, {k}) expected a tensor of shape (5, {d}), got "
                               f"{getattr(got, 'shape', type(got).__name__)}")
            with torch.no_grad():
                want, base = layer(x), x @ W + b
            if torch.allclose(got, want, atol=ATOL):
                continue
            update = want - base
            if torch.allclose(got, base, atol=ATOL):
                raise _Problem("that is the frozen layer alone; add the low-rank branch.")
            if torch.allclose(got, x @ W.T + b + (want - base), atol=ATOL):
                raise _Problem("the frozen part is wrong: Conv1D stores W as (in, out) = (k, d), so it "
                               "computes x W + b, not x W^T + b.")
            if torch.allclose(got - base, _ratio(got - base, update) * update, atol=ATOL):
                raise _Problem(_scaling_hint(_ratio(got - base, update), 3, 5.0, "your update"))
            raise _Problem("the numbers differ from LoRALinear's; A is (r, k) and B is (d, r) in either "
                           "layout: (x A^T) B^T.")
    except _Problem as problem:
        return report(False, str(problem))
    return report(True, "h = x W + b + scaling (x A^T) B^T for Conv1D's (k, d) weight, the same as LoRALinear; "
                        "only W's layout changed, not A's and B's.")


@_own_rng
def check_unmerge(unmerge_fn) -> bool:
    """Exercise: `unmerge_fn(layer)` takes a merged LoRALinear back to W0 and the unmerged forward."""
    if is_blank(unmerge_fn):
        return not_filled_in("your function unmerge(layer)")
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear.from_linear(_pretrained(16, 24, g), r=4, alpha=12)  # scaling 3
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(16, 4, generator=g))
    x = torch.randn(5, 24, generator=g)
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        want = layer(x)
        layer.merge()
    try:
        _call("your unmerge(layer)", unmerge_fn, layer)
    except _Problem as problem:
        return report(False, str(problem))
    W, delta = layer.base_layer.weight.detach(), layer.delta_weight().detach()
    if not torch.allclose(W, W0, atol=ATOL):
        c = _ratio(W0 + delta - W, delta)  # how much of the update was taken out
        hints = [(0, "the base weight still holds the update: subtract (alpha / r) B A from it, in place."),
                 (-1, "you added the update again: subtract it."),
                 (1 / layer.scaling, "you subtracted B A without the scaling alpha / r.")]
        for factor, hint in hints:
            if math.isclose(c, factor, rel_tol=1e-3, abs_tol=1e-6):
                return report(False, hint)
        return report(False, "the base weight is not back to W0; subtract (alpha / r) B A, shape (d, k).")
    if layer.merged:
        return report(False, "W0 is restored, but layer.merged is still True, so forward skips the adapter: "
                             "set it to False.")
    with torch.no_grad():
        got = layer(x)
    if not torch.allclose(got, want, atol=ATOL):
        return report(False, "W0 is restored but the output is not the unmerged layer's.")
    return report(True, "W0 is back (to float32 rounding), merged is False, and the layer computes "
                        "W0 x + b + (alpha / r) B A x again.")


def recovery_task(d: int = 32, k: int = 32, rank: int = 2, n: int = 512, noise: float = 0.01,
                  seed: int = 0) -> dict:
    """A frozen W0 (d, k), a rank-`rank` update dW* with singular values 1, 1/2, ..., and data
    x (n, k) -> y = x (W0 + dW*)^T + noise to recover it from."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d, k, generator=g) / math.sqrt(k)
    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
    V, _ = torch.linalg.qr(torch.randn(k, rank, generator=g))
    delta = U @ torch.diag(1 / torch.arange(1.0, rank + 1)) @ V.T  # (d, k), rank `rank`
    x = torch.randn(n, k, generator=g)
    y = x @ (W0 + delta).T + noise * torch.randn(n, d, generator=g)  # (n, d)
    return {"W0": W0, "x": x, "y": y, "delta_star": delta}


@_own_rng
def check_recover_update(fit_fn, r: int = 4, tolerance: float = 0.02) -> bool:
    """Exercise: `fit_fn(W0, x, y, r)` trains LoRA on (x, y) from the frozen W0 and returns the layer;
    its scaling * B A must be dW* to within `tolerance` (relative), with W0 untouched."""
    if is_blank(fit_fn):
        return not_filled_in("your function fit_lora(W0, x, y, r)")
    task = recovery_task()
    try:
        with num_threads(1):  # small matrices run fastest on one thread
            layer = _call("your fit_lora(W0, x, y, r)", fit_fn, task["W0"].clone(), task["x"], task["y"], r)
    except _Problem as problem:
        return report(False, str(problem))
    if not all(hasattr(layer, n) for n in ("base_layer", "lora_A", "lora_B", "scaling")):
        return report(False, f"return the trained LoRA layer (a LoRALinear), not {type(layer).__name__}.")
    if layer.lora_A.shape[0] != r:
        return report(False, f"your layer has rank {layer.lora_A.shape[0]}; use r = {r}.")
    W = layer.base_layer.weight.detach()
    W = W.T if W.shape != task["W0"].shape else W  # a Conv1D-layout base is fine too
    if not torch.allclose(W, task["W0"], atol=1e-6):
        return report(False, "W0 changed during training: LoRA trains only A and B; keep the base frozen.")
    delta = (layer.scaling * layer.lora_B @ layer.lora_A).detach()
    error = ((delta - task["delta_star"]).norm() / task["delta_star"].norm()).item()
    if error > 0.999:
        return report(False, "the learned update is still zero. If A and B both start at zero, neither ever "
                             "gets a gradient; if you trained, did optimizer.step() run on lora_A and lora_B?")
    if error > tolerance:
        return report(False, f"the learned update is {error:.0%} away from dW*; train longer or with a larger "
                             "learning rate (Adam at 1e-2 for a few hundred steps works here).")
    return report(True, f"scaling B A is within {tolerance:.0%} of the rank-2 dW* (error {error:.1%}), and W0 "
                        "never moved.")
