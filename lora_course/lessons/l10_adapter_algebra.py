"""Notebook 10 (adapter algebra): the task adapters, scoring merges, intruder dimensions, the pictures, the checkers."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import torch
from torch import nn

from ..layers import base_weight
from ..lora import lora_layers, merge_lora
from ..merging import elect_sign, task_merge, trim
from ..methods import Method
from ..train import TrainConfig, train, validation_loss
from .common import Problem, call, call_number, checker, one_word

__all__ = ["TARGETS", "train_model", "task_losses", "weights_of", "similarity", "intruders", "reference_ties",
           "draw_sign_election", "draw_similarity", "check_ties", "check_cat", "check_dare", "check_intruders",
           "check_density_prediction"]

TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer of a GPT-2 block


def train_model(base: nn.Module, tokenizer, splits, *, seed: int, steps: int, lr: float, train_records=None,
                **lora) -> nn.Module:
    """A copy of `base` trained on `splits` (batch 8): LoRA with `lora`'s settings on TARGETS, or, with no
    settings, every weight (full fine-tuning)."""
    torch.manual_seed(seed)
    model = (Method("LoRA", targets=TARGETS, **lora) if lora else Method("full", targets=None)).build(base)
    records = splits.train if train_records is None else train_records
    train(model, tokenizer, records, splits.validation, TrainConfig(steps=steps, batch_size=8, lr=lr, seed=seed,
                                                                    progress=False))
    return model


def task_losses(model: nn.Module, tokenizer, tests: dict) -> dict[str, float]:
    """Mean cross-entropy of each task's test targets (lower is better), by task name."""
    return {task: validation_loss(model, tokenizer, list(records)) for task, records in tests.items()}


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every TARGETS weight as (out, in), with any LoRA update merged in (on a copy)."""
    model = merge_lora(copy.deepcopy(model)) if lora_layers(model) else model
    return {n: base_weight(m).detach().clone() for n, m in model.named_modules()
            if n.endswith(TARGETS) and hasattr(m, "weight")}


def similarity(W0: torch.Tensor, W: torch.Tensor, k: int = 10) -> torch.Tensor:
    """|cos| between W's top-k left singular vectors and all of W0's: (k, min(out, in))."""
    U0 = torch.linalg.svd(W0.double(), full_matrices=False)[0]  # (out, m)
    U = torch.linalg.svd(W.double(), full_matrices=False)[0][:, :k]  # (out, k)
    return (U.T @ U0).abs()


def intruders(W0: torch.Tensor, W: torch.Tensor, k: int = 10, threshold: float = 0.5) -> int:
    """Intruder dimensions (Shuttleworth et al. 2024): of W's top-k singular vectors, how many have a best
    |cos| with every singular vector of W0 below `threshold`."""
    return int((similarity(W0, W, k).max(dim=1).values < threshold).sum())


def reference_ties(task_vectors, weights, density: float) -> torch.Tensor:
    """TIES on same-shape task vectors: trim, elect sign, disjoint merge (lora_course.merging.task_merge)."""
    return task_merge(task_vectors, weights, "ties", density)


def draw_sign_election(task_vectors, density: float, merged: torch.Tensor) -> None:
    """Each trimmed task vector, the elected sign, the merge: one heat map each, red + / blue -."""
    trimmed = torch.stack([trim(t, density) for t in task_vectors])
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = elect_sign(trimmed)
    panels = [*(f"task {i + 1}, trimmed" for i in range(len(trimmed))), "elected sign", "TIES merge"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.4))
    for ax, title, m in zip(axes, panels, [*trimmed, elected, merged]):
        lim = float(m.abs().max()) or 1.0
        ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
        ax.set(title=title, xticks=[], yticks=[])
    for i, ax in enumerate(axes[:len(trimmed)]):  # a cross on each kept entry that loses the election
        ys, xs = torch.nonzero((trimmed[i] != 0) & ~agree[i], as_tuple=True)
        ax.plot(xs, ys, "kx", ms=8)
    plt.tight_layout()
    plt.show()


def draw_similarity(sims: dict[str, torch.Tensor], threshold: float) -> None:
    """One panel per run: |cos| of the fine-tuned weight's top singular vectors (rows) with W0's (columns)."""
    fig, axes = plt.subplots(len(sims), 1, figsize=(7, 1.2 * len(sims) + 0.6), sharex=True)
    for ax, (name, sim) in zip(axes, sims.items()):
        ax.imshow(sim[:, :40], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        n = int((sim.max(dim=1).values < threshold).sum())
        ax.set(yticks=[], ylabel=name, title=f"{n} intruder(s)" if n else "none", xlim=(-0.5, 39.5))
        ax.title.set_fontsize(8)
    axes[-1].set_xlabel("singular vectors of W0 (first 40)")
    plt.tight_layout()
    plt.show()


def _tasks(seed: int, n: int = 3, shape=(6, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def check_ties(fn) -> str:
    """Build step: `fn(task_vectors, weights, density)` is TIES as `reference_ties` computes it."""
    for seed, weights, density in [(0, [1.0, 1.0, 1.0], 0.5), (1, [1.0, 0.5, 2.0], 0.3), (2, [0.7, 0.7, 0.7], 1.0)]:
        tasks = _tasks(seed)
        got = call("your ties", fn, [t.clone() for t in tasks], weights, density)
        want = reference_ties(tasks, weights, density)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise Problem(f"return one tensor shaped like a task vector {tuple(want.shape)}")
        if not torch.allclose(got, want, atol=1e-6):
            summed = sum(w * trim(t, density) for t, w in zip(tasks, weights))
            hint = (" It equals the plain weighted sum of the trimmed vectors: average only the entries that agree "
                    "with the elected sign." if torch.allclose(got, summed, atol=1e-6) else
                    " Trim each vector to its int(density * numel) largest |entries|, elect the sign of the sum of "
                    "the trimmed vectors, then average the weighted entries that have that sign.")
            raise Problem(f"with weights {weights} and density {density} your merge differs from TIES by up to "
                          f"{(got - want).abs().max():.3g}.{hint}")
    return "your TIES trims, elects the sign and averages the agreeing entries, as the paper does."


@checker("my_cat")
def check_cat(fn) -> bool:
    """Exercise 1: `fn(A1, B1, s1, A2, B2, s2, w1, w2)` -> (A, B) of rank r1 + r2 with B A = w1 dW1 + w2 dW2."""
    g = torch.Generator().manual_seed(3)
    A1, B1, A2, B2 = (torch.randn(*s, generator=g) for s in [(2, 7), (5, 2), (3, 7), (5, 3)])
    got = call("your cat merge", fn, A1, B1, 2.0, A2, B2, 0.5, 1.0, -0.6)
    if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
        raise Problem("return a tuple (A, B) of two tensors")
    A, B = got
    if A.shape != (5, 7) or B.shape != (5, 5):
        raise Problem(f"A must be (r1 + r2, in) = (5, 7) and B (out, r1 + r2) = (5, 5); got {tuple(A.shape)}, "
                      f"{tuple(B.shape)}")
    err = (B @ A - (1.0 * 2.0 * B1 @ A1 - 0.6 * 0.5 * B2 @ A2)).abs().max()
    if err > 1e-5:
        raise Problem(f"B A differs from w1 s1 B1 A1 + w2 s2 B2 A2 by up to {err:.3g}: scale each A by its "
                      "weight times its scaling, once (not also B)")
    return "stacking the A's and the B's gives the weighted sum exactly, at rank r1 + r2."


@checker("my_dare")
def check_dare(fn) -> bool:
    """Exercise 2: `fn(t, density, generator)` drops entries at random (keeping `density`) and rescales the rest."""
    t = torch.randn(200, 100, generator=torch.Generator().manual_seed(4))
    got = call("your dare", fn, t.clone(), 0.25, torch.Generator().manual_seed(5))
    if not isinstance(got, torch.Tensor) or got.shape != t.shape:
        raise Problem(f"return a tensor shaped like the input {tuple(t.shape)}")
    kept = got != 0
    share = kept.float().mean().item()
    if abs(share - 0.25) > 0.02:
        raise Problem(f"you kept {share:.1%} of the entries; keep each with probability density (25%)")
    if not torch.allclose(got[kept], t[kept] / 0.25, rtol=1e-5):
        raise Problem("each kept entry must be divided by the density (4x here), so the expectation is unchanged")
    return f"you kept {share:.1%} of the entries, each times 1 / density: the update's expectation is kept."


@checker("my_intruders")
def check_intruders(fn) -> bool:
    """Exercise 3: `fn(W0, W, k, threshold)` counts intruder dimensions as `intruders` does."""
    g = torch.Generator().manual_seed(6)
    W0 = torch.randn(12, 8, generator=g) * torch.linspace(3, 0.1, 8)
    u = torch.linalg.svd(W0, full_matrices=True)[0][:, -1:]  # a direction outside W0's column space
    noise = 3 * torch.randn(12, 8, generator=g)
    cases = [(1.1 * W0, 0), (W0 + 20 * u @ torch.randn(1, 8, generator=g), 1), (W0 + noise, None)]
    for W, want in cases:
        want = intruders(W0, W, 4, 0.5) if want is None else want
        got = call_number("your intruder count", fn, W0, W, 4, 0.5)
        if got != want:
            raise Problem(f"counted {got:g} where there are {want}: take W's top-k left singular vectors, the "
                          "best |cos| of each with all of W0's, and count those below the threshold")
    return "a scaled W0 has none, a strong new direction is one intruder, and noise is counted as it should be."


@checker('prediction ("higher" or "lower")')
def check_density_prediction(prediction, loss_sparse: float, loss_dense: float) -> bool:
    """Exercise 4: was the basic task's loss higher or lower with the sparser TIES merge? Compares the measurements."""
    prediction = one_word(prediction, ("higher", "lower"))
    measured = "higher" if loss_sparse > loss_dense else "lower"
    said = f"measured {loss_sparse:.3f} at the lower density against {loss_dense:.3f}: {measured}"
    if prediction != measured:
        raise Problem(f"{said}. Trimming keeps each factor's largest entries; the product B A of two trimmed "
                      "factors keeps less than either factor alone.")
    return f"{said}, as you predicted."
