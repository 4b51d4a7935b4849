"""Notebook 02 (intrinsic rank): a generated pretrain/fine-tune task pair, training in a random subspace
theta = theta0 + P z and its d90 (Li et al., 2018, arXiv:1804.08838; from a pretrained theta0, Aghajanyan et
al., 2020, arXiv:2012.13255; here the smallest d that keeps 90% of the fine-tuning *gain*, the measure the
rank-r cut uses too), the spectrum of a real update dW, its rank slider and the checkers.

The data: Gaussian factors z mixed linearly into the inputs x plus a little noise; a fixed random teacher turns
z into 32 features t = tanh(W_t z); task A labels x by argmax(R_A t), task B by argmax(R_B t) with
R_B = R_A + shift * R'. Same features, a different read-out: related tasks."""

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

from ..lowrank import best_rank_r, effective_rank, energy_captured, singular_values
from ..train import optimizer_step, trainable_parameters
from ..validate import check_choice, check_int, is_int
from .common import Problem, call, call_number, checker, close_to, one_word, play, sample_spectra

__all__ = ["TaskPair", "make_task_pair", "make_mlp", "train_classifier", "full_fine_tune", "accuracy", "SubspaceModel",
           "sweep_over_seeds", "d90_threshold", "find_d90", "weight_deltas", "with_rank_r_updates",
           "energy_in_input_directions", "gain_kept", "update_rank_widget", "play", "check_find_d90_fn",
           "check_further_task_d90", "check_effective_rank_fn"]


# ----------------------------------------------------------------------------- the task pair and the model

@dataclass
class TaskPair:
    """Train/test inputs (n, n_features) shared by two related classification tasks: labels (n,) of A and B."""

    X_train: torch.Tensor
    X_test: torch.Tensor
    y_a_train: torch.Tensor
    y_a_test: torch.Tensor
    y_b_train: torch.Tensor
    y_b_test: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    def agreement(self) -> float:
        """Fraction of test inputs on which tasks A and B give the same label."""
        return float((self.y_a_test == self.y_b_test).float().mean())


def make_task_pair(n_train: int = 2000, n_test: int = 2000, n_features: int = 32, n_latent: int = 8,
                   n_classes: int = 10, shift: float = 0.7, noise: float = 0.05, seed: int = 0) -> TaskPair:
    """Generate the pretraining task A and the fine-tuning task B (see the module docstring). For one seed,
    every shift gives the same inputs and the same task A: only task B moves."""
    check_int("n_latent", n_latent, minimum=1, maximum=n_features, hint="at most n_features")
    check_int("n_classes", n_classes, minimum=2)
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_latent, n_features, generator=g) / math.sqrt(n_latent)  # (n_latent, n_features)
    W_t = torch.randn(32, n_latent, generator=g) / math.sqrt(n_latent)  # (32, n_latent): the teacher
    R_a = torch.randn(n_classes, 32, generator=g) / math.sqrt(32)  # (C, 32)
    R_b = R_a + shift * torch.randn(n_classes, 32, generator=g) / math.sqrt(32)

    def sample(n):
        z = torch.randn(n, n_latent, generator=g)  # (n, n_latent)
        x = z @ mixing + noise * torch.randn(n, n_features, generator=g)  # (n, n_features)
        t = torch.tanh(z @ W_t.T)  # (n, 32)
        return x, (t @ R_a.T).argmax(1), (t @ R_b.T).argmax(1)

    (X_train, ya_train, yb_train), (X_test, ya_test, yb_test) = sample(n_train), sample(n_test)
    return TaskPair(X_train, X_test, ya_train, ya_test, yb_train, yb_test, n_classes)


def make_mlp(n_features: int, hidden: int, n_classes: int, seed: int = 0) -> nn.Sequential:
    """A two-hidden-layer ReLU MLP: n_features -> hidden -> hidden -> n_classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),  # weight (hidden, n_features)
                         nn.Linear(hidden, hidden), nn.ReLU(),  # weight (hidden, hidden)
                         nn.Linear(hidden, n_classes))  # weight (n_classes, hidden)


def train_classifier(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                     optimizer: str = "sgd", batch_size: int | None = None, seed: int = 0) -> list[float]:
    """Minimise cross-entropy on X (n, features), y (n,) for `steps` steps, training only the parameters with
    requires_grad: "sgd" (momentum 0.9) or "adam"; batch_size=None is the full batch. Returns every loss."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    check_choice("optimizer", optimizer, ("sgd", "adam"))
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    opt.zero_grad(set_to_none=True)  # no gradient left over from an earlier loop
    g, losses = torch.Generator().manual_seed(seed), []
    model.train()
    for _ in range(steps):
        idx = slice(None) if batch_size is None else torch.randint(0, X.shape[0], (batch_size,), generator=g)
        losses.append(optimizer_step(F.cross_entropy(model(X[idx]), y[idx]), opt))
    return losses


def full_fine_tune(pretrained: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 150,
                   lr: float = 0.03) -> nn.Module:
    """A copy of `pretrained` with every weight matrix fine-tuned on (X, y) by full-batch SGD with momentum;
    the biases stay frozen, so the whole change sits in the weights' dW."""
    model = copy.deepcopy(pretrained)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("weight"))
    train_classifier(model, X, y, steps=steps, lr=lr, optimizer="sgd")
    return model


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of X whose argmax prediction equals y."""
    model.eval()
    return float((model(X).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- intrinsic dimension

class SubspaceModel(nn.Module):
    """`model` reparameterised as theta0 + P z: only z (d,) trains, from 0. P (D, d) is a very sparse random projection
    (Li, Hastie and Church, 2006), as Li et al. (2018) use for large models: an entry is nonzero (random sign) with
    probability 1 / sqrt(D), columns scaled to unit length. Only its ~d sqrt(D) nonzeros are stored and multiplied."""

    def __init__(self, model: nn.Module, d: int, seed: int = 0):
        super().__init__()
        self._shapes = {name: p.shape for name, p in model.named_parameters()}
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # (D,)
        D, g = theta0.numel(), torch.Generator().manual_seed(seed)
        d = check_int("d", d, minimum=1, maximum=D, hint="at most D, the model's parameter count")
        self.base = copy.deepcopy(model).requires_grad_(False)  # a frozen private copy, called functionally
        rows, cols = (torch.rand(D, d, generator=g) < 1 / math.sqrt(D)).nonzero(as_tuple=True)  # (nnz,) each, sorted
        values = (torch.randint(0, 2, rows.shape, generator=g) * 2 - 1) / torch.bincount(cols)[cols].sqrt()  # (nnz,)
        self.register_buffer("theta0", theta0)
        self.register_buffer("P", torch.sparse_coo_tensor(torch.stack([rows, cols]), values.to(theta0.dtype), (D, d),
                                                          check_invariants=True, is_coalesced=True))
        self.z = nn.Parameter(torch.zeros(d, dtype=theta0.dtype))  # (d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.P.indices()  # theta0 + P z through P's nonzeros: (D,), moved only inside span(P)
        theta = self.theta0.index_add(0, rows, self.P.values() * self.z[cols])
        chunks = torch.split(theta, [s.numel() for s in self._shapes.values()])
        return functional_call(self.base, {n: c.view(s) for (n, s), c in zip(self._shapes.items(), chunks)}, (x,))


def sweep_over_seeds(model: nn.Module, X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor,
                     y_test: torch.Tensor, dims: Iterable[int], seeds: int = 3, steps: int = 300, lr: float = 0.03,
                     batch_size: int | None = 256):
    """Test accuracy after training `model` inside a random d-dim subspace (Adam on z), for each d in dims and each
    seed 0 .. seeds-1: (the mean {d: accuracy}, [each seed's {d: accuracy}]). Each (seed, d) gets its own P and
    batches and starts from `model`'s weights, which do not change."""
    dims = list(dims)
    if not dims:
        raise ValueError("dims is empty; pass the subspace sizes to try, e.g. [1, 4, 16, 64, 256]")
    runs = [{} for _ in range(seeds)]
    for seed, run in enumerate(runs):
        for d in dims:
            sub = SubspaceModel(model, d, seed=seed * 100_003 + d)
            train_classifier(sub, X_train, y_train, steps, lr, optimizer="adam", batch_size=batch_size, seed=seed)
            run[d] = accuracy(sub, X_test, y_test)
    return {d: sum(run[d] for run in runs) / seeds for d in dims}, runs


def d90_threshold(pretrained_score: float, finetuned_score: float, fraction: float = 0.9) -> float:
    """The score that keeps `fraction` of the fine-tuning gain: pretrained + fraction * (finetuned - pretrained).
    (Li et al. ask for 90% of the full score itself, a lower bar when the pretrained model already scores well.)"""
    return pretrained_score + fraction * (finetuned_score - pretrained_score)


def find_d90(scores: dict[int, float], threshold: float) -> int | None:
    """The smallest d whose score reaches `threshold`, or None if no d in the sweep does."""
    return min((d for d, s in scores.items() if s >= threshold), default=None)


# ----------------------------------------------------------------------------- the real update dW

def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def weight_deltas(pretrained: nn.Module, finetuned: nn.Module) -> dict[str, torch.Tensor]:
    """dW = W_ft - W0 for every nn.Linear weight, keyed by parameter name.  # each (out, in)"""
    before, after = _linear_weights(pretrained), _linear_weights(finetuned)
    shapes = [{name: tuple(W.shape) for name, W in weights.items()} for weights in (before, after)]
    if shapes[0] != shapes[1]:
        raise ValueError("the two models' linear layers differ in names or shapes; pass the pretrained model and a "
                         f"fine-tuned copy of it (got {shapes[0]} vs {shapes[1]})")
    return {name: (after[name] - W0).detach().clone() for name, W0 in before.items()}


@torch.no_grad()
def with_rank_r_updates(pretrained: nn.Module, deltas: dict[str, torch.Tensor], r: int) -> nn.Module:
    """A copy of `pretrained` with every W0 replaced by W0 + best_rank_r(dW, r); a layer whose dW has fewer
    than r singular values (the 10-class head) keeps its full dW. Biases stay as in `pretrained`."""
    r = check_int("r", r, minimum=0)
    model = copy.deepcopy(pretrained)
    weights = _linear_weights(model)
    if set(deltas) - set(weights):
        raise ValueError(f"deltas name layers the model does not have: {sorted(set(deltas) - set(weights))}")
    for name, dW in deltas.items():
        weights[name].add_(best_rank_r(dW, min(r, min(dW.shape))))
    return model


@torch.no_grad()
def energy_in_input_directions(dW: torch.Tensor, inputs: torch.Tensor, q: int) -> float:
    """Share of ||dW||_F^2 in the top-q right singular directions of the layer's inputs: dW (out, in), inputs
    (n, in). A linear layer's gradient is a sum of outer products delta x^T, so its update lies near their span."""
    if dW.ndim != 2 or inputs.ndim != 2 or dW.shape[1] != inputs.shape[1]:
        raise ValueError(f"dW (out, in) and inputs (n, in) must share `in`; got {tuple(dW.shape)} and "
                         f"{tuple(inputs.shape)}")
    q = check_int("q", q, minimum=1, maximum=min(inputs.shape), hint="a number of input directions")
    Vh = torch.linalg.svd(inputs.to(dW.dtype), full_matrices=False)[2]  # (m, in)
    total = dW.square().sum()
    return float((dW @ Vh[:q].T).square().sum() / total) if total > 0 else 1.0  # dW @ Vh_q^T: (out, q)


def gain_kept(score_r: float, score_pretrained: float, score_finetuned: float) -> float:
    """(score_r - score_pretrained) / (score_finetuned - score_pretrained): 1.0 = all of the gain."""
    if score_finetuned <= score_pretrained:
        raise ValueError(f"fine-tuning did not improve the score ({score_pretrained:.4f} -> {score_finetuned:.4f}); "
                         "there is no gain to keep. Train longer or with a larger learning rate.")
    return (score_r - score_pretrained) / (score_finetuned - score_pretrained)


def update_rank_widget(pretrained, deltas: dict, X, y, accuracy_finetuned: float, r: int = 4, max_r: int = 64):
    """A rank slider over the fine-tuning update: the widest layer's dW spectrum with the cut at r, and the accuracy
    on (X, y) of the pretrained model plus every dW cut to rank r. `.result` keeps the latest view:
    {"r", "accuracy", "layer", "S", "energy" (the share of that layer's dW energy in its top r directions)}."""
    layer = max(deltas, key=lambda name: min(deltas[name].shape))
    S = singular_values(deltas[layer])

    def show(r):
        view = {"r": r, "accuracy": accuracy(with_rank_r_updates(pretrained, deltas, r), X, y), "layer": layer,
                "S": S, "energy": energy_captured(S, min(r, S.numel()))}
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.semilogy(range(1, len(S) + 1), S.numpy(), ".-", label=f"singular values of dW ({layer})")
        ax.axvline(r + 0.5, color="tab:red", ls="--", label=f"keep top {r}")
        ax.set(xlabel="index i", ylabel="s_i", title=f"rank {r}: accuracy {view['accuracy']:.3f} (full fine-tune "
               f"{accuracy_finetuned:.3f}), energy {100 * view['energy']:.1f}%")
        ax.legend()
        plt.show()
        return view

    return w.interactive(show, r=w.IntSlider(value=r, min=0, max=max_r, step=1, description="rank r"))


# ----------------------------------------------------------------------------- exercise checkers

@checker("your function my_effective_rank(S)", function=True)
def check_effective_rank_fn(fn) -> str:
    """Exercise: `fn(S)` must return Roy & Vetterli's exp(entropy of s_i / sum s_j)."""
    for S in sample_spectra():
        got, want = call_number("your function", fn, S.clone()), effective_rank(S)
        if not close_to(got, want, 1e-6):
            raise Problem(f"for S = {[round(float(s), 3) for s in S[:5]]}... you returned {got:.4f}, expected "
                          f"{want:.4f}. Normalise p_i = s_i / sum(s), then exp(-sum p_i log p_i).")
    return "exp(H(p)) with p_i = s_i / sum s_j: 1 for one direction, n for n equal ones."


# Sweeps ({d: accuracy}) and thresholds that tell the usual slips apart: one that dips after crossing, one whose
# best d is not the smallest to get there, one exactly on the threshold, one not sorted by d, one that never gets there.
_D90_CASES = [({1: 0.30, 4: 0.52, 16: 0.70, 64: 0.81, 256: 0.80, 1024: 0.79}, 0.75),
              ({4: 0.50, 16: 0.76, 64: 0.85, 256: 0.80}, 0.75), ({8: 0.60, 32: 0.75, 128: 0.90}, 0.75),
              ({256: 0.80, 64: 0.78, 16: 0.40, 1024: 0.82}, 0.75), ({2: 0.10, 8: 0.20, 32: 0.30}, 0.50)]


def _d90_slips(scores: dict, threshold: float) -> dict[str, int | None]:
    """The d that common wrong searches return, each with the hint that explains it."""
    reached = [d for d, acc in scores.items() if acc >= threshold]
    return {"an accuracy exactly at the threshold counts as reaching it: compare with >=, not >.":
            min([d for d, acc in scores.items() if acc > threshold], default=None),
            "you returned the first d in the dict's order; a dict keeps the order its keys were added, not sorted "
            "order. Take the smallest d among those that reach the threshold.": reached[0] if reached else None,
            "that is the largest d that gets there; d90 is the smallest.": max(reached, default=None),
            "that is the d with the best accuracy, not the smallest d that reaches the threshold.":
            max(scores, key=scores.get)}


@checker("your function my_find_d90(scores, threshold)", function=True)
def check_find_d90_fn(fn) -> str:
    """Exercise: `fn(scores, threshold)` must return the smallest d in `scores` ({d: accuracy}) whose accuracy
    reaches `threshold`, or None if no d does."""
    for scores, threshold in _D90_CASES:
        where, want = f"for scores = {scores} and threshold {threshold}", find_d90(scores, threshold)
        try:
            got = call("your function", fn, dict(scores), threshold)
        except Problem as problem:
            none = "; no d reaches the threshold here, so return None" if want is None else ""
            raise Problem(str(problem) if "fill in" in str(problem) else f"{problem} ({where}){none}.") from None
        if (got is None and want is None) or (is_int(got) and got == want):
            continue
        if want is None:
            raise Problem(f"{where} you returned {got!r}, but no d reaches the threshold: return None, so that a "
                          "sweep that fell short is not mistaken for a d90.")
        if got is None:
            raise Problem(f"{where} you returned None, but d = {want} reaches it.")
        if not is_int(got):
            raise Problem(f"{where} you returned {got!r}, an accuracy; return the subspace size d."
                          if got in scores.values() else
                          f"{where} you returned {got!r}; return d as an int, one of the keys of scores.")
        hint = next((h for h, slip in _d90_slips(scores, threshold).items() if got == slip),
                    "Keep the d whose accuracy is >= the threshold, then take the smallest of them.")
        raise Problem(f"{where} you returned {got!r}: {hint}")
    return "the smallest d that reaches the threshold, and None when the sweep falls short."


def _further_task(pretrained: nn.Module, task: TaskPair, dims: list[int]) -> tuple[dict[int, float], float, float]:
    """Fine-tune fully on task B, sweep `dims` over 3 seeds: (the mean {d: accuracy}, acc_pre, acc_ft)."""
    finetuned = full_fine_tune(pretrained, task.X_train, task.y_b_train)
    acc_pre, acc_ft = accuracy(pretrained, task.X_test, task.y_b_test), accuracy(finetuned, task.X_test, task.y_b_test)
    data = task.X_train, task.y_b_train, task.X_test, task.y_b_test
    return sweep_over_seeds(pretrained, *data, dims=dims)[0], acc_pre, acc_ft


@checker('my_prediction: "lower", "same" or "higher"')
def check_further_task_d90(prediction, pretrained: nn.Module, task: TaskPair, scores: dict, acc_pre: float,
                           acc_ft: float, dims=(64, 256, 1024)) -> str:
    """Predict, then measure: is d90 "lower", the "same" or "higher" for a task B further from task A? Sweeps `dims`
    on `task` over 3 seeds; compares with the first task's mean `scores`, `acc_pre`, `acc_ft` on the same sizes."""
    word, dims = one_word(prediction, ("lower", "same", "higher")), list(dims)
    far, far_pre, far_ft = _further_task(pretrained, task, dims)
    shares = [[gain_kept(acc[d], pre, ft) for d in dims] for acc, pre, ft in ((scores, acc_pre, acc_ft),
                                                                                (far, far_pre, far_ft))]
    place = [next((i for i, share in enumerate(row) if share >= 0.9), len(dims)) for row in shares]  # d90's index
    measured = ["same", "higher", "lower"][(place[1] > place[0]) - (place[1] < place[0])]
    d90, pct = ([str(dims[i]) if i < len(dims) else f"over {dims[-1]}" for i in place],
                [", ".join(f"{x:.0%}" for x in row) for row in shares])
    what = (f"share of the fine-tuning gain at d = {dims} (3 seeds each): first task B {pct[0]}; this one {pct[1]}, "
            f"so d90 is {d90[1]} here against {d90[0]}. This task B starts lower (pretrained {far_pre:.3f}, against "
            f"{acc_pre:.3f}) and full fine-tuning gains more ({far_ft - far_pre:.3f}, against {acc_ft - acc_pre:.3f})"
            + ("; yet each size carried both about the same share of the way. One pair of tasks: a measurement, "
               "not a law." if measured == "same" else "."))
    if word != measured:
        raise Problem(f"you predicted {word}; measured {measured}: {what}")
    return what
