"""Notebook 04 (rank and alpha): LoRA trained on a target of known rank, the sliders, the exercise checkers.

A `LoRALinear` on a frozen W0 (out, in) learns dW = scaling * B A toward a target dW* of rank k and chosen
spectrum, from the matrix loss ||dW - dW*||_F^2 / out or from a regression task y = (W0 + dW*) x + noise,
x ~ N(0, I) (the same loss plus the noise variance). Every outcome meets a theory: the Eckart-Young floor below k,
dW* itself from k on, the scaling laws.

References: Hu et al., "LoRA" (2021), arXiv:2106.09685; Eckart & Young (1936); Baldi & Hornik (1989), no spurious
minima; Kalajdzievski, "rsLoRA" (2023), arXiv:2312.03732; Hayou et al., "LoRA+" (2024), arXiv:2402.12354."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..lora import LoRAConfig, LoRALinear, count_parameters
from ..lowrank import low_rank_error, singular_values
from ..measure import optimizer_state_bytes
from ..runtime import num_threads
from ..train import optimizer_step
from ..validate import check_choice, check_int, check_positive
from .common import Problem, call_number, checker, close_to, play

__all__ = ["LowRankTarget", "RegressionTask", "LoRARun", "make_low_rank_target", "make_regression_task",
           "no_finetuning_loss", "train_lora", "early_stopped", "scaling_sweep", "loglog_slope", "first_step_ratios",
           "rank_alpha_view", "rank_alpha_widget", "play", "measured_first_step_change", "check_alpha_for_lr",
           "fixed_scaling_sizes", "check_update_trend", "dropout_penalty_mc", "check_dropout_penalty"]


@dataclass(frozen=True)
class LowRankTarget:
    """A frozen weight W0 and a known target update dW* = U diag(s) V^T of rank k."""

    W0: torch.Tensor  # (out, in) the frozen "pretrained" weight
    delta: torch.Tensor  # (out, in) the update a perfect fine-tune would learn, rank k
    singular_values: torch.Tensor  # (k,) its spectrum s_1 >= ... >= s_k > 0

    k = property(lambda self: self.singular_values.numel())  # the target's rank
    out_features = property(lambda self: self.W0.shape[0])
    in_features = property(lambda self: self.W0.shape[1])


@dataclass(frozen=True)
class RegressionTask:
    """y = (W0 + dW*) x + noise, x ~ N(0, I): a task whose best LoRA update is dW*."""

    target: LowRankTarget
    X_train: torch.Tensor  # (n_train, in)
    Y_train: torch.Tensor  # (n_train, out)
    X_test: torch.Tensor  # (n_test, in)
    Y_test: torch.Tensor  # (n_test, out)
    noise_std: float
    X_val: torch.Tensor | None = None  # (n_val, in): held out to pick a step and a learning rate
    Y_val: torch.Tensor | None = None  # (n_val, out)


@dataclass
class LoRARun:
    """What one training run of a `LoRALinear` measured."""

    r: int
    alpha: float
    scaling: float  # the layer's own scaling, as LoRALinear computed it
    lr: float  # learning rate of A (B's is lr_B, = lr unless LoRA+)
    losses: list[float]  # training loss at each step, before its update  (steps,), fewer if patience stopped it
    errors: list[float]  # ||dW - dW*||_F before each step and after the last  (steps + 1,), or to the stop
    update_norms: list[float]  # ||dW||_F before each step and after the last  (steps + 1,), or to the stop
    floor: float  # the Eckart-Young floor for this r: the best any rank-r dW can do
    delta: torch.Tensor  # (out, in) the learned dW = scaling * B A
    delta_singular_values: torch.Tensor  # (r,) singular values of the learned dW
    trainable_params: int  # r * (in + out)
    optimizer_state_bytes: int  # measured from the optimizer's state tensors (lora_course.memory)
    target_norm: float  # ||dW*||_F
    test_loss: float | None = None  # regression task only: test MSE, dropout off
    train_loss: float | None = None  # regression task only: final training MSE, dropout off
    val_losses: list[float] | None = None  # task with a validation split: its MSE before each step and after the last
    best_step: int | None = None  # the step of the lowest validation MSE (0: dW = 0, the frozen layer)
    early_test_loss: float | None = None  # test MSE of dW as it was at best_step: the run stopped early

    final_error = property(lambda self: self.errors[-1])  # ||dW - dW*||_F at the end
    relative_error = property(lambda self: self.errors[-1] / self.target_norm)


def make_low_rank_target(out_features: int = 64, in_features: int = 64, k: int = 8, seed: int = 0) -> LowRankTarget:
    """A random frozen W0 (N(0, 1/in) entries) and dW* = U diag(s) V^T with random orthonormal U, V and
    s falling evenly from 2.0 to 0.25, so every direction matters."""
    for name, value in (("out_features", out_features), ("in_features", in_features), ("k", k)):
        check_int(name, value, minimum=1)
    if k > min(out_features, in_features):
        raise ValueError(f"k={k} exceeds min(out_features, in_features) = {min(out_features, in_features)}; "
                         "a target of that rank cannot exist in this shape")
    s = torch.linspace(2.0, 0.25, k)  # (k,)
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)  # (out, in)
    U, _ = torch.linalg.qr(torch.randn(out_features, k, generator=g))  # (out, k)
    V, _ = torch.linalg.qr(torch.randn(in_features, k, generator=g))  # (in, k)
    return LowRankTarget(W0=W0, delta=(U * s) @ V.T, singular_values=s)  # (out, k) * (k,) @ (k, in)


def make_regression_task(target: LowRankTarget, n_train: int, n_test: int = 2048, noise_std: float = 0.5,
                         seed: int = 0, n_val: int = 0) -> RegressionTask:
    """Samples x ~ N(0, I) and y = (W0 + dW*) x + noise_std * N(0, I); `n_val` > 0 adds a validation split
    (drawn after the others, so the training and test sets do not depend on it)."""
    check_int("n_train", n_train, minimum=1)
    check_int("n_test", n_test, minimum=1)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    g = torch.Generator().manual_seed(seed)

    def draw(n):  # X (n, in), Y (n, out)
        X = torch.randn(n, target.in_features, generator=g)
        return X, X @ (target.W0 + target.delta).T + noise_std * torch.randn(n, target.out_features, generator=g)

    (X, Y), (X_val, Y_val) = draw(n_train + n_test), draw(n_val) if n_val else (None, None)
    return RegressionTask(target, X[:n_train], Y[:n_train], X[n_train:], Y[n_train:], float(noise_std), X_val, Y_val)


def no_finetuning_loss(task: RegressionTask) -> float:
    """Test MSE of the frozen layer alone (dW = 0): what fine-tuning has to beat."""
    return _mse(task.X_test, task.Y_test, task.target.W0)


def _mse(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor) -> float:
    """Mean squared error of the layer x -> W x on inputs X (n, in) against Y (n, out)."""
    return (X @ W.T - Y).square().mean().item()  # (n, out) -> ()


def _optimizer(layer: LoRALinear, lr: float, lr_B: float, optimizer: str, steps: int, schedule: str):
    check_choice("optimizer", optimizer, ("adam", "sgd"))
    check_choice("schedule", schedule, ("cosine", "constant"))
    groups = [{"params": [layer.lora_A], "lr": lr}, {"params": [layer.lora_B], "lr": lr_B}]
    opt = torch.optim.Adam(groups, fused=True) if optimizer == "adam" else torch.optim.SGD(groups)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None


def train_lora(target: LowRankTarget, r: int, alpha: float | None = None, lr: float = 1e-2, steps: int = 300, *,
               use_rslora: bool = False, lr_B: float | None = None, optimizer: str = "adam",
               schedule: str = "cosine", task: RegressionTask | None = None, lora_dropout: float = 0.0,
               seed: int = 0, patience: int | None = None) -> LoRARun:
    """Train a `LoRALinear(r, alpha)` on the frozen W0 (on the CPU) and measure what it learned.

    Without `task` the loss is the matrix loss ||dW - dW*||_F^2 / out; with a `RegressionTask` the training set's
    MSE (full batch), and with its validation split the step of lowest validation MSE and the test MSE there
    (`patience`: stop that many steps after it; the schedule still spans `steps`). `alpha` defaults to 2 r; `lr_B`
    gives B its own learning rate (LoRA+); `optimizer` "adam" or "sgd"; `schedule` "cosine" (to 0) or "constant".
    `lora_dropout` (task only) drops the adapter's input while training, not when measuring. Each step's dW is
    kept and measured after the loop: (steps + 1) x out x in floats, 5 MB for 64 x 64 and 300 steps."""
    if task is not None and task.target is not target:
        raise ValueError("task was built for a different target; pass task.target as target")
    if lora_dropout and task is None:
        raise ValueError("lora_dropout acts on the layer's input, which the matrix loss never sees; pass a task")
    if patience is not None and (task is None or task.X_val is None):
        raise ValueError("patience watches the validation error: pass a task made with n_val > 0")
    patience = None if patience is None else check_int("patience", patience, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    check_positive("lr", lr, hint="a learning rate")
    lr_B = check_positive("lr_B", lr if lr_B is None else lr_B, hint="a learning rate")
    alpha = 2 * r if alpha is None else alpha
    config = LoRAConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=lora_dropout)  # checks them
    with num_threads(1):  # tiny matrices: one thread is fastest and spares a shared CPU
        torch.manual_seed(seed)  # A's random init (and dropout's masks)
        base = nn.Linear(target.in_features, target.out_features, bias=False)
        base.weight.data.copy_(target.W0)
        layer = LoRALinear.from_linear(base, config)
        opt, sched = _optimizer(layer, lr, lr_B, optimizer, steps, schedule)
        deltas, losses = [], []  # dW before each step and after the last, and each step's loss before its update
        val = None if task is None or task.X_val is None else []  # the validation MSE of each dW in deltas
        for step in range(steps + 1):
            dW = layer.delta_weight()  # (out, in)
            deltas.append(dW.detach())
            if val is not None:
                val.append(_mse(task.X_val, task.Y_val, target.W0 + dW.detach()))
            if step == steps or patience is not None and step - val.index(min(val)) >= patience:
                break
            loss = ((dW - target.delta).square().sum() / target.out_features if task is None
                    else (layer(task.X_train) - task.Y_train).square().mean())  # (n_train, out) -> ()
            losses.append(optimizer_step(loss, opt, scheduler=sched))
        with torch.no_grad():  # measured from the recorded trajectory, after training
            trajectory = torch.stack(deltas)  # (steps + 1, out, in)
            errors = (trajectory - target.delta).flatten(1).norm(dim=1).tolist()
            norms = trajectory.flatten(1).norm(dim=1).tolist()
            layer.eval()  # dropout off: the trained layer as it would be used
            pairs = [] if task is None else [(task.X_test, task.Y_test), (task.X_train, task.Y_train)]
            test_loss, train_loss = [(layer(X) - Y).square().mean().item() for X, Y in pairs] or (None, None)
            best = early = None
            if val is not None:
                best = val.index(min(val))  # the first step of lowest validation MSE
                early = _mse(task.X_test, task.Y_test, target.W0 + trajectory[best])
        return LoRARun(r=r, alpha=alpha, scaling=layer.scaling, lr=lr, losses=losses, errors=errors,
                       update_norms=norms, floor=float(low_rank_error(target.singular_values, min(r, target.k))),
                       delta=deltas[-1], delta_singular_values=singular_values(deltas[-1])[:r],
                       trainable_params=count_parameters(layer)[0], optimizer_state_bytes=optimizer_state_bytes(opt),
                       target_norm=target.delta.norm().item(), test_loss=test_loss, train_loss=train_loss,
                       val_losses=val, best_step=best, early_test_loss=early)


def early_stopped(target: LowRankTarget, task: RegressionTask, r: int, lrs, steps: int = 300,
                  seed: int = 0, patience: int | None = 50) -> LoRARun:
    """A rank at its own swept learning rate, stopped early: of one run per learning rate in `lrs` (each ending
    `patience` steps after its lowest validation error), the one whose lowest is lowest (`early_test_loss`)."""
    if task.X_val is None:
        raise ValueError("early stopping needs a validation split: make_regression_task(..., n_val=32)")
    runs = [train_lora(target, r, lr=lr, steps=steps, task=task, seed=seed, patience=patience) for lr in lrs]
    return min(runs, key=lambda run: min(run.val_losses))


def scaling_sweep(target: LowRankTarget, ranks, alpha: float, lr: float, steps: int,
                  **train_kwargs) -> dict[str, list[LoRARun]]:
    """{"alpha/r": runs, "alpha/sqrt(r)": runs}, one per rank at one fixed alpha and lr (constant schedule)."""
    train_kwargs.setdefault("schedule", "constant")
    ranks = list(ranks)
    if not ranks:
        raise ValueError("ranks is empty; give e.g. [2, 8, 32]")
    return {rule: [train_lora(target, r, alpha, lr, steps, use_rslora=rs, **train_kwargs) for r in ranks]
            for rule, rs in (("alpha/r", False), ("alpha/sqrt(r)", True))}


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    x, y = (torch.log(torch.as_tensor(v, dtype=torch.float64)) for v in (xs, ys))
    if x.numel() < 2 or x.shape != y.shape:
        raise ValueError("need at least two (x, y) pairs of equal length")
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def first_step_ratios(sweep: dict) -> list[float]:
    """||dW_1|| under alpha / sqrt(r) over ||dW_1|| under alpha / r, rank by rank, for a `scaling_sweep`.
    Theory: sqrt(r) with Adam (its step carries the scaling once), r with SGD (twice)."""
    plain, rs = sweep["alpha/r"], sweep["alpha/sqrt(r)"]
    return [b.update_norms[1] / a.update_norms[1] for a, b in zip(plain, rs)]


# ----------------------------------------------------------------------------- the sliders

def rank_alpha_view(r: int = 4, alpha: float = 8.0, lr: float = 0.03, use_rslora: bool = False,
                    steps: int = 150, target: LowRankTarget | None = None) -> dict:
    """What the widget draws for one `train_lora` run: loss curve, floor, learned and target singular values."""
    target = make_low_rank_target() if target is None else target  # the notebook's 64 x 64 target of rank 8
    run = train_lora(target, r, alpha, lr, steps, use_rslora=use_rslora)
    return {"r": r, "alpha": alpha, "scaling": run.scaling, "losses": run.losses,  # ||dW - dW*||_F^2 / out per step
            "final_error": run.final_error, "floor": run.floor, "relative_error": run.relative_error,
            "floor_loss": run.floor ** 2 / target.out_features,
            "learned_singular_values": run.delta_singular_values.tolist(),  # (r,)
            "target_singular_values": target.singular_values.tolist(),  # (k,)
            "title": f"r={r}, alpha={alpha:g}, scaling={run.scaling:.3g}: ||dW - dW*|| = {run.final_error:.3f} "
                     f"(floor {run.floor:.3f})"}


def rank_alpha_widget(target: LowRankTarget | None = None, r: int = 4, alpha: float = 8.0, lr: float = 0.03,
                      steps: int = 150, max_r: int = 16):
    """Rank, alpha and learning-rate sliders that retrain LoRA on the known target and redraw the
    loss curve and the singular values. A shell over `rank_alpha_view` (its numbers in `.result`)."""
    def show(r, alpha, lr, use_rslora):
        view = rank_alpha_view(r, alpha, lr, use_rslora, steps, target)
        fig, (ax_loss, ax_sv) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax_loss.semilogy(range(1, len(view["losses"]) + 1), view["losses"], label="matrix loss")
        if view["floor_loss"] > 0:
            ax_loss.axhline(view["floor_loss"], color="tab:red", ls="--", label="Eckart-Young floor")
        ax_loss.set(xlabel="step", ylabel="||dW - dW*||^2 / out")
        s_target, s_learned = view["target_singular_values"], view["learned_singular_values"]
        ax_sv.plot(range(1, len(s_target) + 1), s_target, "o", mfc="none", ms=9, label="target dW*")
        ax_sv.plot(range(1, len(s_learned) + 1), s_learned, "x", ms=8, label="learned scaling * B A")
        ax_sv.set(xlabel="index i", ylabel="singular value s_i")
        for ax in (ax_loss, ax_sv):
            ax.legend()
        fig.suptitle(view["title"])
        fig.tight_layout()
        plt.show()
        return view

    log = lambda **kw: w.FloatLogSlider(continuous_update=False, **kw)  # noqa: E731
    return w.interactive(show, r=w.IntSlider(value=r, min=1, max=max_r, description="rank r", continuous_update=False),
                         alpha=log(value=alpha, base=2, min=0, max=7, step=0.5, description="alpha"),
                         lr=log(value=lr, base=10, min=-4, max=-0.5, step=0.25, description="lr"),
                         use_rslora=w.Checkbox(value=False, description="rsLoRA: alpha/sqrt(r)"))


# ----------------------------------------------------------------------------- exercise checkers

def measured_first_step_change(target: LowRankTarget, c: float, optimizer: str, r: int = 8,
                               alpha: float = 16.0) -> float:
    """||dW_1|| with alpha * c and the learning rate / c, over ||dW_1|| with alpha and the learning rate (same
    rank and seed), measured by one training step of each."""
    lr = 1e-3 if optimizer == "adam" else 0.5
    new, old = (train_lora(target, r, a, rate, 1, optimizer=optimizer, schedule="constant")
                for a, rate in ((alpha * c, lr / c), (alpha, lr)))
    return new.update_norms[1] / old.update_norms[1]


@checker("first_step_change")
def check_alpha_for_lr(fn, target: LowRankTarget) -> str:
    """Exercise: `fn(c, optimizer)` predicts ||dW_1|| at (alpha c, lr / c) over at (alpha, lr); measured on `target`."""
    cases = [(c, opt) for opt in ("adam", "sgd") for c in (2.0, 4.0, 0.5)]
    got = [call_number("first_step_change", fn, *case) for case in cases]
    want = {case: measured_first_step_change(target, *case) for case in cases}

    def fits(opt):  # your numbers match the measured ones for this optimizer
        return all(close_to(g, want[c, o], 1e-2) for (c, o), g in zip(cases, got) if o == opt)

    if fits("adam") and fits("sgd"):
        return ("measured: Adam's first step is unchanged, SGD's grows by c. Adam's step carries the scaling and lr "
                "once each, so they cancel; SGD's gradient carries the scaling again: alpha acts as a learning rate "
                "under Adam only.")
    if fits("adam"):
        raise Problem("right for Adam. With SGD, B's gradient is scaling * G A^T, and dW = scaling * B A: "
                      "the scaling enters twice, the learning rate once.")
    if fits("sgd"):
        raise Problem("right for SGD. Adam divides each gradient by its own size, so its first step moves each "
                      "entry of B by lr whatever the scaling; dW = scaling * B A then carries the scaling once.")
    (c, opt), g = next((case, g) for case, g in zip(cases, got) if not close_to(g, want[case], 1e-2))
    raise Problem(f"at c={c:g}, {opt}: you predict {g:.3g}; one measured step gives {want[c, opt]:.3g}. Write "
                  "||dW_1|| as a power of lr times a power of the scaling, for each optimizer (section 4).")


def fixed_scaling_sizes(target: LowRankTarget, ranks, lr: float = 1e-3, steps: int = 10) -> list[float]:
    """||dW||_F after `steps` constant-rate Adam steps at each rank with alpha = 2 r: the scaling is 2 at every r."""
    return [train_lora(target, r, 2 * r, lr, steps, schedule="constant").update_norms[steps] for r in ranks]


@checker('my_prediction: "grows", "shrinks" or "stays"')
def check_update_trend(prediction, target: LowRankTarget, ranks) -> str:
    """Predict, then measure: with alpha = 2 r, does Adam's early ||dW||_F grow, shrink or stay as r grows?"""
    ranks, word = list(ranks), prediction.strip().lower().removesuffix("s") if isinstance(prediction, str) else None
    if word not in ("grow", "shrink", "stay"):
        raise Problem(f'predict with one word, "grows", "shrinks" or "stays", not {prediction!r}.')
    sizes = fixed_scaling_sizes(target, ranks)
    slope = loglog_slope(ranks, sizes)
    measured = "grow" if slope > 0.1 else "shrink" if slope < -0.1 else "stay"
    what = ("measured ||dW||_F after 10 steps, " + ", ".join(f"r={r}: {s:.3f}" for r, s in zip(ranks, sizes))
            + f", about r^{slope:+.1f}: it {measured}s.")
    if word != measured:
        raise Problem(f"you predicted it {word}s; {what} With the scaling held at 2, ask what the rank does to "
                      "dW = scaling * B A itself.")
    return (f"{what} Section 4's shrinking was alpha / r's doing. What is left comes from the product: Adam moves "
            "every entry of B by about lr, so dW = scaling * B A adds up r rank-one pieces of a fixed size.")


def dropout_penalty_mc(delta: torch.Tensor, X: torch.Tensor, p: float, masks: int = 4000, seed: int = 0) -> float:
    """How much `LoRALinear`'s own dropout raises the mean squared error of an adapter whose update is
    `delta` (out, in), on inputs `X` (n, in): averaged over `masks` random masks, no formula."""
    (out_features, in_features), r = delta.shape, min(delta.shape)
    layer = LoRALinear(in_features, out_features, r=r, alpha=r, lora_dropout=p, bias=False)  # scaling 1
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, r), (r,), (r, in)
    with torch.no_grad():
        layer.lora_B.copy_(U * S)  # (out, r)
        layer.lora_A.copy_(Vh)  # (r, in): B A = delta
        torch.manual_seed(seed)
        Xs = X.float().expand(masks, *X.shape)  # (masks, n, in): a fresh dropout mask for every copy
        adapter = layer(Xs) - layer.base_layer(Xs)  # (masks, n, out) = delta drop(x)
        return (adapter - X.float() @ delta.float().T).square().mean().item()


@checker("dropout_penalty")
def check_dropout_penalty(fn) -> str:
    """Exercise: `fn(delta, X, p)`, how much dropout p on the adapter's input raises the expected MSE of `delta`."""
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(5, 7, generator=g, dtype=torch.float64)  # (out, in)
    X = torch.randn(11, 7, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 7, dtype=torch.float64)
    out, n = delta.shape[0], X.shape[0]
    per_column = (delta.square().sum(0) * X.square().mean(0)).sum().item()  # sum_j ||dW[:, j]||^2 mean(x_j^2)
    got = [call_number("dropout_penalty", fn, delta.clone(), X.clone(), p) for p in (0.1, 0.5)]  # fn may edit

    fits = lambda values: all(close_to(a, b, 1e-4) for a, b in zip(got, values))  # noqa: E731
    want = [p / (1 - p) * per_column / out for p in (0.1, 0.5)]
    if fits(want):
        return ("dropout adds p / (1 - p) * sum_j ||dW[:, j]||^2 x_j^2, averaged: a penalty that pulls dW toward 0, "
                "hardest on the columns of the largest inputs.")
    if fits([p * per_column / out for p in (0.1, 0.5)]):
        raise Problem("close: the kept inputs are divided by 1 - p, which makes each entry's variance larger than p.")
    if fits([p / (1 - p) * delta.square().sum().item() * X.square().mean().item() / out for p in (0.1, 0.5)]):
        raise Problem("each column of dW is weighted by the size of its own input feature, not by their average.")
    if any(fits([v * m for v in want]) for m in (out, n, out * n)):
        raise Problem("right shape, wrong normaliser: the error is a mean over examples and outputs.")
    raise Problem(f"at p=0.5 you say {got[1]:.4g}. Write drop(x) = x + (drop(x) - x): the error splits into the "
                  "error without dropout plus the variance of dW (drop(x) - x).")
