"""Notebook 02 (intrinsic rank): a generated pretrain/fine-tune task pair, training in a random
subspace (d90), the spectrum of a real update dW, its rank slider and the exercise checkers.

Intrinsic dimension: all D parameters are tied to d << D trainable numbers z through a
fixed random matrix, theta = theta0 + P z (theta0 (D,) frozen, P (D, d) random, z = 0 at
start). The smallest d that reaches 90% of what training all D parameters achieves is d90
(Li et al., "Measuring the Intrinsic Dimension of Objective Landscapes", ICLR 2018,
arXiv:1804.08838); starting from a pretrained theta0 measures the intrinsic dimension of
*fine-tuning* (Aghajanyan et al., 2020, arXiv:2012.13255), the observation LoRA builds on.

The data are made here, from a fixed seed: `n_latent` Gaussian factors z mixed linearly
into `n_features` measurements plus a little noise; a fixed random teacher turns z into
32 features t = tanh(W_t z); task A (pretraining) labels x by argmax(R_A t), task B
(fine-tuning) by argmax(R_B t) with R_B = R_A + shift * R'. Same features, a different
read-out: related tasks, as sentiment and topic labels of the same text are.

LoRA's bet (Hu et al. 2021, arXiv:2106.09685, section 4) is that dW = W_ft - W0 has a low
intrinsic rank; `with_rank_r_updates` rebuilds the model with each dW cut to rank r, so
the notebook can show how much of the fine-tuning gain each r keeps, and
`energy_in_input_directions` shows how much of a layer's dW its inputs alone confine.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..lowrank import best_rank_r, effective_rank, energy_captured, singular_values, stable_rank
from ..runtime import progress_bar
from ..validate import check_int, is_int
from .common import call_learner, call_learner_fn, close_to, is_blank, not_filled_in, play, report, sample_spectra

__all__ = ["TaskPair", "make_task_pair", "make_mlp", "train_classifier", "accuracy", "SubspaceModel",
           "intrinsic_dimension_sweep", "d90_threshold", "find_d90", "weight_deltas", "with_rank_r_updates",
           "energy_in_input_directions", "gain_kept", "update_rank_view", "update_rank_widget", "play",
           "check_find_d90_fn", "check_d90", "check_effective_rank_fn", "check_stable_rank_fn"]


# ----------------------------------------------------------------------------- the task pair

_TEACHER_FEATURES = 32


@dataclass
class TaskPair:
    """Train/test inputs shared by two related classification tasks A and B."""

    X_train: torch.Tensor  # (n_train, n_features)
    X_test: torch.Tensor  # (n_test, n_features)
    y_a_train: torch.Tensor  # (n_train,) labels of task A (pretraining)
    y_a_test: torch.Tensor
    y_b_train: torch.Tensor  # (n_train,) labels of task B (fine-tuning)
    y_b_test: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    def agreement(self) -> float:
        """Fraction of test inputs on which tasks A and B give the same label."""
        return float((self.y_a_test == self.y_b_test).float().mean())


def make_task_pair(
    n_train: int = 2000,
    n_test: int = 2000,
    n_features: int = 32,
    n_latent: int = 8,
    n_classes: int = 10,
    shift: float = 0.7,
    noise: float = 0.05,
    seed: int = 0,
) -> TaskPair:
    """Generate the pretraining task A and the fine-tuning task B (see the module docstring)."""
    if not (isinstance(n_latent, int) and 1 <= n_latent <= n_features):
        raise ValueError(f"n_latent must be an int in [1, n_features={n_features}], got {n_latent!r}")
    if not (isinstance(n_classes, int) and n_classes >= 2):
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    if shift < 0 or noise < 0:
        raise ValueError(f"shift and noise must be >= 0, got shift={shift}, noise={noise}")
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_latent, n_features, generator=g) / math.sqrt(n_latent)  # (n_latent, n_features)
    W_t = torch.randn(_TEACHER_FEATURES, n_latent, generator=g) / math.sqrt(n_latent)  # (32, n_latent)
    R_a = torch.randn(n_classes, _TEACHER_FEATURES, generator=g) / math.sqrt(_TEACHER_FEATURES)  # (C, 32)
    R_b = R_a + shift * torch.randn(n_classes, _TEACHER_FEATURES, generator=g) / math.sqrt(_TEACHER_FEATURES)

    def sample(n):
        z = torch.randn(n, n_latent, generator=g)  # (n, n_latent)
        x = z @ mixing + noise * torch.randn(n, n_features, generator=g)  # (n, n_features)
        t = torch.tanh(z @ W_t.T)  # (n, 32)
        return x, (t @ R_a.T).argmax(1), (t @ R_b.T).argmax(1)

    X_train, ya_train, yb_train = sample(n_train)
    X_test, ya_test, yb_test = sample(n_test)
    return TaskPair(X_train, X_test, ya_train, ya_test, yb_train, yb_test, n_classes)


def make_mlp(n_features: int, hidden: int, n_classes: int, seed: int = 0) -> nn.Sequential:
    """A two-hidden-layer ReLU MLP: n_features -> hidden -> hidden -> n_classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_features, hidden),  # weight (hidden, n_features)
        nn.ReLU(),
        nn.Linear(hidden, hidden),  # weight (hidden, hidden)
        nn.ReLU(),
        nn.Linear(hidden, n_classes),  # weight (n_classes, hidden)
    )


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Minimise cross-entropy on (X, y) for `steps` steps; trains only params with requires_grad.

    optimizer: "sgd" (momentum 0.9) or "adam". batch_size=None uses the full batch
    (plain gradient descent, no sampling noise). Returns the loss of every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    g = torch.Generator().manual_seed(seed)
    losses = []
    steps_iter = range(steps)
    if progress:
        steps_iter = progress_bar(steps_iter, desc="training")
    model.train()
    for _ in steps_iter:
        if batch_size is None:
            xb, yb = X, y
        else:
            idx = torch.randint(0, X.shape[0], (batch_size,), generator=g)
            xb, yb = X[idx], y[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of X whose argmax prediction equals y."""
    model.eval()
    return float((model(X).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- intrinsic dimension

class SubspaceModel(nn.Module):
    """`model` reparameterised as theta0 + P z; z (d,) is the only trainable parameter.

    P's columns are Gaussian directions scaled to unit length, as in Li et al. (2018);
    z starts at 0, so at step 0 this computes exactly what `model` did.
    """

    def __init__(self, model: nn.Module, d: int, seed: int = 0):
        super().__init__()
        self._names = [name for name, _ in model.named_parameters()]
        self._shapes = [p.shape for _, p in model.named_parameters()]
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # (D,)
        D = theta0.numel()
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= D:
            raise ValueError(f"d must be an int in [1, D={D}] (D = the model's parameter count), got {d!r}")
        # Keep a frozen private copy to call functionally; its own parameters never train.
        self.base = copy.deepcopy(model).requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        P = torch.randn(D, d, generator=g, dtype=theta0.dtype)  # (D, d)
        P /= P.norm(dim=0, keepdim=True)  # unit-length columns
        self.register_buffer("theta0", theta0)
        self.register_buffer("P", P)
        self.z = nn.Parameter(torch.zeros(d, dtype=theta0.dtype))  # (d,)

    @property
    def d(self) -> int:
        return self.z.numel()

    @property
    def D(self) -> int:
        return self.theta0.numel()

    def theta(self) -> torch.Tensor:
        """The full parameter vector theta0 + P z.  # (D,)"""
        return self.theta0 + self.P @ self.z

    def _params(self) -> dict[str, torch.Tensor]:
        chunks = torch.split(self.theta(), [s.numel() for s in self._shapes])
        return {name: c.view(shape) for name, c, shape in zip(self._names, chunks, self._shapes)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, self._params(), (x,))

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """A plain copy of the model holding theta0 + P z as its ordinary parameters."""
        model = copy.deepcopy(self.base)
        for p, value in zip(model.parameters(), self._params().values()):
            p.copy_(value)
        return model.requires_grad_(True)


def intrinsic_dimension_sweep(
    model: nn.Module,
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_test: torch.Tensor,
    y_test: torch.Tensor,
    dims: Iterable[int],
    steps: int,
    lr: float,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[int, float]:
    """Test accuracy after training `model` inside a random d-dim subspace, for each d in dims.

    Each d gets its own P (seeded from `seed` and d) and starts from `model`'s weights.
    Adam on z; `model` itself is not changed.
    """
    dims = list(dims)
    if not dims:
        raise ValueError("dims is empty; pass the subspace sizes to try, e.g. [1, 4, 16, 64, 256]")
    results = {}
    dims_iter = dims
    if progress:
        dims_iter = progress_bar(dims, desc="subspace sizes d")
    for d in dims_iter:
        sub = SubspaceModel(model, d, seed=seed * 100_003 + d)
        train_classifier(sub, X_train, y_train, steps=steps, lr=lr, optimizer="adam", batch_size=batch_size, seed=seed)
        results[d] = accuracy(sub, X_test, y_test)
    return results


def d90_threshold(full_score: float, baseline: float = 0.0, fraction: float = 0.9) -> float:
    """The score d90 must reach: baseline + fraction * (full_score - baseline).

    baseline=0 is Li et al.'s "90% of full training's accuracy"; baseline = the
    pretrained model's score asks for 90% of the *gain* of full fine-tuning (stricter).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return baseline + fraction * (full_score - baseline)


def find_d90(scores: dict[int, float], threshold: float) -> int | None:
    """The smallest d whose score reaches `threshold`, or None if no d in the sweep does."""
    reached = [d for d, s in scores.items() if s >= threshold]
    return min(reached) if reached else None


# ----------------------------------------------------------------------------- the real update dW

def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def weight_deltas(pretrained: nn.Module, finetuned: nn.Module) -> dict[str, torch.Tensor]:
    """dW = W_ft - W0 for every nn.Linear weight, keyed by parameter name.  # each (out, in)"""
    before, after = _linear_weights(pretrained), _linear_weights(finetuned)
    if before.keys() != after.keys():
        raise ValueError(
            "the two models have different linear layers; pass the pretrained model and a fine-tuned copy of it "
            f"(got {sorted(before)} vs {sorted(after)})"
        )
    deltas = {}
    for name, W0 in before.items():
        if W0.shape != after[name].shape:
            raise ValueError(f"{name} has shape {tuple(W0.shape)} before and {tuple(after[name].shape)} after")
        deltas[name] = (after[name] - W0).detach().clone()
    return deltas


@torch.no_grad()
def with_rank_r_updates(pretrained: nn.Module, deltas: dict[str, torch.Tensor], r: int) -> nn.Module:
    """A copy of `pretrained` with every W0 replaced by W0 + best_rank_r(dW, r).

    A layer whose dW has fewer than r singular values (e.g. a 10-class head) keeps
    its full dW. Biases and everything else stay as in `pretrained`.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    model = copy.deepcopy(pretrained)
    weights = _linear_weights(model)
    missing = set(deltas) - set(weights)
    if missing:
        raise ValueError(f"deltas name layers the model does not have: {sorted(missing)}")
    for name, dW in deltas.items():
        weights[name].add_(best_rank_r(dW, min(r, min(dW.shape))))
    return model


@torch.no_grad()
def energy_in_input_directions(dW: torch.Tensor, inputs: torch.Tensor, q: int) -> float:
    """Share of ||dW||_F^2 that lies in the top-q right singular directions of the layer's inputs.

    dW (out, in) and inputs (n, in), one row per example. The gradient of a linear layer is
    a sum of outer products delta x^T, so an update trained on these inputs lies near their span.
    """
    if dW.ndim != 2 or inputs.ndim != 2 or dW.shape[1] != inputs.shape[1]:
        raise ValueError(f"dW (out, in) and inputs (n, in) must share `in`; got {tuple(dW.shape)} and "
                         f"{tuple(inputs.shape)}")
    q = check_int("q", q, minimum=1, maximum=min(inputs.shape), hint="a number of input directions")
    _, _, Vh = torch.linalg.svd(inputs.to(dW.dtype), full_matrices=False)  # Vh (m, in)
    inside = dW @ Vh[:q].T  # (out, q): dW's components along the top-q input directions
    total = dW.square().sum()
    return float(inside.square().sum() / total) if total > 0 else 1.0


def gain_kept(score_r: float, score_pretrained: float, score_finetuned: float) -> float:
    """(score_r - score_pretrained) / (score_finetuned - score_pretrained): 1.0 = all of the gain."""
    gain = score_finetuned - score_pretrained
    if gain <= 0:
        raise ValueError(
            f"fine-tuning did not improve the score ({score_pretrained:.4f} -> {score_finetuned:.4f}); "
            "there is no gain to keep. Train longer or with a larger learning rate."
        )
    return (score_r - score_pretrained) / gain


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


# ----------------------------------------------------------------------------- exercise checkers

def _check_spectrum_fn(fn, reference, what: str, hint: str, success: str) -> bool:
    """Shared loop of the rank-measure exercises: `fn(S)` must match `reference(S)` on every test spectrum."""
    if is_blank(fn):
        return not_filled_in(what)
    if not callable(fn):
        return report(False, f"pass your function itself (the name, without calling it), not {fn!r}.")
    for S in sample_spectra():
        got, problem = call_learner_fn(fn, S.clone())
        if problem:
            return report(False, problem)
        want = reference(S)
        if not close_to(got, want, 1e-6):
            return report(False, f"for S = {[round(float(s), 3) for s in S[:5]]}... you returned {got:.4f}, "
                                 f"expected {want:.4f}. {hint}")
    return report(True, success)


def check_effective_rank_fn(effective_rank_fn) -> bool:
    """Exercise: `effective_rank_fn(S)` must return Roy & Vetterli's exp(entropy of s_i / sum s_j)."""
    return _check_spectrum_fn(
        effective_rank_fn, effective_rank, "your function effective_rank_fn(S)",
        hint="Normalise p_i = s_i / sum(s), then exp(-sum p_i log p_i).",
        success="exp(H(p)) with p_i = s_i / sum s_j: 1 for one direction, n for n equal ones.")


def check_stable_rank_fn(stable_rank_fn) -> bool:
    """Exercise: `stable_rank_fn(S)` must return ||M||_F^2 / ||M||_2^2 from the singular values."""
    return _check_spectrum_fn(
        stable_rank_fn, stable_rank, "your function stable_rank_fn(S)",
        hint="||M||_F^2 = sum s_i^2 and ||M||_2 = s_1.",
        success="sum s_i^2 / s_1^2: how many directions of the largest size the energy would fill.")


# Sweeps ({d: accuracy}) and thresholds that tell the usual slips apart, in this order: one that
# dips after crossing (the largest d that gets there is not d90), one whose best d is not the
# smallest to get there, one exactly on the threshold, one not sorted by d, one that never gets there.
_D90_CASES = [
    ({1: 0.30, 4: 0.52, 16: 0.70, 64: 0.81, 256: 0.80, 1024: 0.79}, 0.75),
    ({4: 0.50, 16: 0.76, 64: 0.85, 256: 0.80}, 0.75),
    ({8: 0.60, 32: 0.75, 128: 0.90}, 0.75),
    ({256: 0.80, 64: 0.78, 16: 0.40, 1024: 0.82}, 0.75),
    ({2: 0.10, 8: 0.20, 32: 0.30}, 0.50),
]


def _d90_slips(scores: dict, threshold: float) -> dict[str, int | None]:
    """The d that common wrong searches return, each with the hint that explains it."""
    reached = [d for d, acc in scores.items() if acc >= threshold]
    return {
        "an accuracy exactly at the threshold counts as reaching it: compare with >=, not >.":
            min([d for d, acc in scores.items() if acc > threshold], default=None),
        "you returned the first d in the dict's order; a dict keeps the order its keys were added, not "
        "sorted order. Take the smallest d among those that reach the threshold.": reached[0] if reached else None,
        "that is the largest d that gets there; d90 is the smallest.": max(reached, default=None),
        "that is the d with the best accuracy, not the smallest d that reaches the threshold.":
            max(scores, key=scores.get),
    }


def check_find_d90_fn(find_d90_fn) -> bool:
    """Exercise: `find_d90_fn(scores, threshold)` must return the smallest d in `scores` ({d: accuracy})
    whose accuracy reaches `threshold`, or None if no d does."""
    if is_blank(find_d90_fn):
        return not_filled_in("your function find_d90_fn(scores, threshold)")
    if not callable(find_d90_fn):
        return report(False, f"pass your function itself (the name, without calling it), not {find_d90_fn!r}.")
    for scores, threshold in _D90_CASES:
        got, problem = call_learner(find_d90_fn, dict(scores), threshold)
        where = f"for scores = {scores} and threshold {threshold}"
        want = find_d90(scores, threshold)
        if problem:
            if problem.startswith("fill in"):
                return report(False, problem)
            none_hint = "; no d reaches the threshold here, so return None" if want is None else ""
            return report(False, f"{problem} ({where}){none_hint}.")
        if (got is None and want is None) or (is_int(got) and got == want):
            continue
        if want is None:
            return report(False, f"{where} you returned {got!r}, but no d reaches the threshold: return None, "
                                 "so that a sweep that fell short is not mistaken for a d90.")
        if got is None:
            return report(False, f"{where} you returned None, but d = {want} reaches it.")
        if not is_int(got):
            if got in scores.values():
                return report(False, f"{where} you returned {got!r}, an accuracy; return the subspace size d.")
            return report(False, f"{where} you returned {got!r}; return d as an int, one of the keys of scores.")
        for hint, slip in _d90_slips(scores, threshold).items():
            if got == slip:
                return report(False, f"{where} you returned {got!r}: {hint}")
        return report(False, f"{where} you returned {got!r}. Keep the d whose accuracy is >= the threshold, "
                             "then take the smallest of them.")
    return report(True, "the smallest d that reaches the threshold, and None when the sweep falls short.")


def check_d90(scores: dict, threshold: float, answer) -> bool:
    """Exercise: the smallest subspace size d in `scores` ({d: accuracy}) that reaches `threshold`.

    None is a real answer here (no d reached it), so the blank placeholder is `...`.
    """
    if answer is Ellipsis:
        return not_filled_in("the smallest d from scores (an int), or None if no d reaches the threshold")
    expected = find_d90(scores, threshold)
    if answer == expected:
        return report(True, f"d90 = {expected}" + ("" if expected is None else
                            f": accuracy {scores[expected]:.3f} >= {threshold:.3f}, and no smaller d got there."))
    if answer is not None and answer not in scores:
        return report(False, f"you said {answer!r}, which is not one of the sizes tried: {sorted(scores)}.")
    return report(False, f"you said {answer!r}. Take the smallest d whose accuracy is >= {threshold:.3f} "
                         "(None if no d reached it).")
