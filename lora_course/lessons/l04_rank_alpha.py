"""Notebook 04 (rank and alpha): controlled experiments on what r and alpha do, small enough to
run live, the rank/alpha/lr sliders and the exercise checkers.

The set-up: a frozen "pretrained" weight W0 (out x in) and a target update dW* of known
rank k and known singular values. A `LoRALinear` on top of W0 learns dW = scaling * B A,
either straight from the matrix loss ||dW - dW*||_F^2 / out, or from a regression task
y = (W0 + dW*) x + noise. Because the target is known, every outcome can be compared
with theory:

- r < k: the best any rank-r update can do is the Eckart-Young floor
  sqrt(s_{r+1}^2 + ... + s_k^2) (`lora_course.lowrank.low_rank_error`); training reaches it.
- r >= k: the floor is 0; training recovers dW* itself.
- scaling = alpha / r (LoRA) vs alpha / sqrt(r) (rsLoRA): at a fixed alpha and optimizer
  learning rate, how big the learned update gets, and how fast, as r grows.
- LoRA+: a larger learning rate for B than for A.
- lora_dropout: dropout on the adapter's input while training on a small task.

For whitened inputs (x ~ N(0, I)) the regression loss is the matrix loss plus the noise
variance, E||(dW - dW*) x||^2 / out = ||dW - dW*||_F^2 / out, so the two losses tell the
same story and the task adds what data does: noise, and overfitting when data are few.

References: Hu et al., "LoRA" (2021), arXiv:2106.09685; Eckart & Young (1936); Baldi &
Hornik, "Neural networks and principal component analysis" (1989), no spurious minima;
Kalajdzievski, "rsLoRA" (2023), arXiv:2312.03732; Hayou et al., "LoRA+: Efficient Low
Rank Adaptation of Large Models" (2024), arXiv:2402.12354.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..lora import LoRAConfig, LoRALinear, count_parameters
from ..lowrank import low_rank_error, singular_values
from ..memory import optimizer_state_bytes
from ..runtime import num_threads
from ..validate import check_int, check_positive, is_number
from .common import call_learner_fn, close_to, is_blank, not_filled_in, play, report

__all__ = [
    "LowRankTarget",
    "RegressionTask",
    "LoRARun",
    "make_low_rank_target",
    "make_regression_task",
    "eckart_young_floor",
    "no_finetuning_loss",
    "train_lora",
    "rank_sweep",
    "scaling_sweep",
    "loglog_slope",
    "update_sizes",
    "first_step_ratios",
    "rank_alpha_view",
    "rank_alpha_widget",
    "play",
    "check_eckart_young_floor",
    "check_scaling",
    "measured_first_step_ratio",
    "check_first_step_ratio",
    "check_fixed_scaling_update_sizes",
    "dropout_penalty_mc",
    "check_dropout_penalty",
]


@dataclass(frozen=True)
class LowRankTarget:
    """A frozen weight W0 and a known target update dW* = U diag(s) V^T of rank k."""

    W0: torch.Tensor  # (out, in) the frozen "pretrained" weight
    delta: torch.Tensor  # (out, in) the update a perfect fine-tune would learn, rank k
    singular_values: torch.Tensor  # (k,) its spectrum s_1 >= ... >= s_k > 0

    @property
    def k(self) -> int:
        return self.singular_values.numel()

    @property
    def out_features(self) -> int:
        return self.W0.shape[0]

    @property
    def in_features(self) -> int:
        return self.W0.shape[1]


@dataclass(frozen=True)
class RegressionTask:
    """y = (W0 + dW*) x + noise, x ~ N(0, I): a task whose best LoRA update is dW*."""

    target: LowRankTarget
    X_train: torch.Tensor  # (n_train, in)
    Y_train: torch.Tensor  # (n_train, out)
    X_test: torch.Tensor  # (n_test, in)
    Y_test: torch.Tensor  # (n_test, out)
    noise_std: float

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]


@dataclass
class LoRARun:
    """What one training run of a `LoRALinear` measured."""

    r: int
    alpha: float
    scaling: float  # the layer's own scaling, as LoRALinear computed it
    lr: float  # learning rate of A
    lr_B: float  # learning rate of B (= lr unless LoRA+)
    use_rslora: bool
    lora_dropout: float  # dropout on the adapter's input during training (0: none)
    optimizer: str
    steps: int
    losses: list[float]  # training loss at each step, before its update  (steps,)
    errors: list[float]  # ||dW - dW*||_F before each step and after the last  (steps + 1,)
    update_norms: list[float]  # ||dW||_F before each step and after the last  (steps + 1,)
    final_error: float  # ||dW - dW*||_F at the end
    relative_error: float  # final_error / ||dW*||_F
    floor: float  # the Eckart-Young floor for this r: the best any rank-r dW can do
    delta: torch.Tensor  # (out, in) the learned dW = scaling * B A
    delta_singular_values: torch.Tensor  # (r,) singular values of the learned dW
    trainable_params: int  # r * (in + out)
    optimizer_state_bytes: int  # measured from the optimizer's state tensors (lora_course.memory)
    test_loss: float | None = None  # regression task only: test MSE, dropout off
    train_loss: float | None = None  # regression task only: final training MSE, dropout off
    layer: LoRALinear | None = field(default=None, repr=False)


def make_low_rank_target(
    out_features: int = 64,
    in_features: int = 64,
    k: int = 8,
    singular_values: list[float] | torch.Tensor | None = None,
    seed: int = 0,
) -> LowRankTarget:
    """A random frozen W0 and a rank-k target update with a chosen spectrum.

    W0 has N(0, 1/in) entries (like a trained layer's scale); dW* = U diag(s) V^T with
    random orthonormal U (out, k), V (in, k). The default spectrum falls evenly from 2.0 to
    0.25, so every singular direction matters and each extra rank lowers the floor.
    """
    check_int("out_features", out_features, minimum=1)
    check_int("in_features", in_features, minimum=1)
    check_int("k", k, minimum=1)
    if k > min(out_features, in_features):
        raise ValueError(
            f"k={k} exceeds min(out_features, in_features) = {min(out_features, in_features)}; "
            "a target of that rank cannot exist in this shape"
        )
    if singular_values is None:
        s = torch.linspace(2.0, 0.25, k)
    else:
        s = torch.as_tensor(singular_values, dtype=torch.float32).flatten()
        if s.numel() != k:
            raise ValueError(f"give k={k} singular values, got {s.numel()}")
        if bool((s <= 0).any()) or bool((s[1:] > s[:-1]).any()):
            raise ValueError("singular values must be positive and sorted descending (s_1 >= s_2 >= ...)")
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)  # (out, in)
    U, _ = torch.linalg.qr(torch.randn(out_features, k, generator=g))  # (out, k)
    V, _ = torch.linalg.qr(torch.randn(in_features, k, generator=g))  # (in, k)
    delta = (U * s) @ V.T  # (out, k) * (k,) @ (k, in) -> (out, in)
    return LowRankTarget(W0=W0, delta=delta, singular_values=s)


def make_regression_task(
    target: LowRankTarget, n_train: int, n_test: int = 2048, noise_std: float = 0.5, seed: int = 0
) -> RegressionTask:
    """Samples x ~ N(0, I) and y = (W0 + dW*) x + noise_std * N(0, I)."""
    check_int("n_train", n_train, minimum=1)
    check_int("n_test", n_test, minimum=1)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    g = torch.Generator().manual_seed(seed)
    W = target.W0 + target.delta  # (out, in)
    X = torch.randn(n_train + n_test, target.in_features, generator=g)  # (n, in)
    Y = X @ W.T + noise_std * torch.randn(n_train + n_test, target.out_features, generator=g)  # (n, out)
    return RegressionTask(target, X[:n_train], Y[:n_train], X[n_train:], Y[n_train:], float(noise_std))


def eckart_young_floor(target: LowRankTarget, r: int) -> float:
    """The smallest ||dW - dW*||_F any rank-r dW can reach (0 once r >= k)."""
    return float(low_rank_error(target.singular_values, min(r, target.k), norm="fro"))


def no_finetuning_loss(task: RegressionTask) -> float:
    """Test MSE of the frozen layer alone (dW = 0): what fine-tuning has to beat."""
    return (task.X_test @ task.target.W0.T - task.Y_test).square().mean().item()  # (n_test, out)


def train_lora(
    target: LowRankTarget,
    r: int,
    alpha: float | None = None,
    lr: float = 1e-2,
    steps: int = 300,
    *,
    use_rslora: bool = False,
    lr_B: float | None = None,
    optimizer: str = "adam",
    schedule: str = "cosine",
    task: RegressionTask | None = None,
    lora_dropout: float = 0.0,
    seed: int = 0,
    keep_layer: bool = False,
) -> LoRARun:
    """Train a `LoRALinear(r, alpha)` on top of the frozen W0 and measure what it learned.

    Without `task` the loss is the matrix loss ||dW - dW*||_F^2 / out (the expected
    regression loss on whitened inputs, without noise); with a `RegressionTask` it is the
    mean squared error on its training set (full batch). `alpha` defaults to 2 r (so the
    scaling is 2 at every rank). `lr_B` gives B its own learning rate (LoRA+); by default
    B uses `lr`. `optimizer` is "adam" or "sgd"; `schedule` is "cosine" (decay to 0, to
    settle exactly at the optimum) or "constant". `lora_dropout` (task only) drops the
    adapter's input during training; the final train and test losses are measured without it.
    """
    if task is not None and task.target is not target:
        raise ValueError("task was built for a different target; pass task.target as target")
    alpha = 2 * r if alpha is None else alpha
    steps = check_int("steps", steps, minimum=1)
    check_positive("lr", lr, hint="a learning rate")
    lr_B = check_positive("lr_B", lr if lr_B is None else lr_B, hint="a learning rate")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")

    if lora_dropout and task is None:
        raise ValueError("lora_dropout acts on the layer's input, which the matrix loss never sees; pass a task")
    config = LoRAConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=lora_dropout)  # checks them
    with num_threads(1):  # tiny matrices: one thread is fastest and spares a shared CPU
        torch.manual_seed(seed)  # A's random init
        base = nn.Linear(target.in_features, target.out_features, bias=False)
        with torch.no_grad():
            base.weight.copy_(target.W0)
        layer = LoRALinear.from_linear(base, config)
        groups = [{"params": [layer.lora_A], "lr": lr}, {"params": [layer.lora_B], "lr": lr_B}]
        if optimizer == "adam":
            opt = torch.optim.Adam(groups, fused=layer.lora_A.device.type == "cpu" or None)
        else:
            opt = torch.optim.SGD(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None

        out = target.out_features
        stats = []  # per step: loss, ||dW - dW*||_F, ||dW||_F, all *before* the step
        for _ in range(steps):
            dW = layer.delta_weight()  # (out, in)
            residual = dW - target.delta  # (out, in)
            if task is None:
                loss = residual.square().sum() / out
            else:
                loss = (layer(task.X_train) - task.Y_train).square().mean()
            stats.append(torch.stack([loss.detach(), residual.detach().norm(), dW.detach().norm()]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()

        with torch.no_grad():
            dW = layer.delta_weight()
            stats.append(torch.stack([torch.tensor(float("nan")), (dW - target.delta).norm(), dW.norm()]))
            losses, errors, norms = (torch.stack(stats).T.tolist())
            test_loss = train_loss = None
            if task is not None:
                layer.eval()  # dropout off: the trained layer as it would be used
                test_loss = (layer(task.X_test) - task.Y_test).square().mean().item()
                train_loss = (layer(task.X_train) - task.Y_train).square().mean().item()
        target_norm = torch.linalg.matrix_norm(target.delta).item()
        return LoRARun(
            r=r, alpha=alpha, scaling=layer.scaling, lr=lr, lr_B=lr_B, use_rslora=use_rslora,
            lora_dropout=lora_dropout, optimizer=optimizer, steps=steps,
            losses=losses[:-1], errors=errors, update_norms=norms,
            final_error=errors[-1], relative_error=errors[-1] / target_norm,
            floor=eckart_young_floor(target, r),
            delta=dW,
            delta_singular_values=singular_values(dW)[:r],
            trainable_params=count_parameters(layer)[0],
            optimizer_state_bytes=optimizer_state_bytes(opt),
            test_loss=test_loss, train_loss=train_loss,
            layer=layer if keep_layer else None,
        )


def rank_sweep(target: LowRankTarget, ranks, **train_kwargs) -> list[LoRARun]:
    """`train_lora` at each rank in `ranks` (alpha = 2 r unless given), same seed and settings."""
    ranks = list(ranks)
    if not ranks:
        raise ValueError("ranks is empty; give e.g. [1, 2, 4, 8, 16]")
    return [train_lora(target, r, **train_kwargs) for r in ranks]


def scaling_sweep(
    target: LowRankTarget, ranks, alpha: float, lr: float, steps: int, **train_kwargs
) -> dict[str, list[LoRARun]]:
    """At one fixed alpha and learning rate: runs at each rank with alpha/r and with alpha/sqrt(r).

    Returns {"alpha/r": [...], "alpha/sqrt(r)": [...]}, one run per rank, constant schedule
    unless told otherwise, so the curves show the raw speed of learning.
    """
    train_kwargs.setdefault("schedule", "constant")
    ranks = list(ranks)
    if not ranks:
        raise ValueError("ranks is empty; give e.g. [2, 8, 32]")
    return {
        "alpha/r": [train_lora(target, r, alpha, lr, steps, use_rslora=False, **train_kwargs) for r in ranks],
        "alpha/sqrt(r)": [train_lora(target, r, alpha, lr, steps, use_rslora=True, **train_kwargs) for r in ranks],
    }


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    x = torch.log(torch.as_tensor(xs, dtype=torch.float64))
    y = torch.log(torch.as_tensor(ys, dtype=torch.float64))
    if x.numel() < 2 or x.shape != y.shape:
        raise ValueError("need at least two (x, y) pairs of equal length")
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def update_sizes(runs, step: int = 10) -> list[float]:
    """||dW||_F after `step` optimizer steps, one per run (how far each run moved early on)."""
    runs = list(runs)
    for run in runs:
        if not 0 <= step <= run.steps:
            raise ValueError(f"step must be between 0 and the run's {run.steps} steps, got {step!r}")
    return [run.update_norms[step] for run in runs]


def first_step_ratios(sweep: dict) -> list[float]:
    """||dW_1|| under alpha/sqrt(r) divided by ||dW_1|| under alpha/r, rank by rank, for a
    `scaling_sweep` result. Theory: sqrt(r) with Adam (step ~ scaling), r with SGD (~ scaling^2)."""
    plain, rs = sweep["alpha/r"], sweep["alpha/sqrt(r)"]
    if [run.r for run in plain] != [run.r for run in rs]:
        raise ValueError("the two rules were run at different ranks; pass a scaling_sweep result")
    if any(run.use_rslora for run in plain) or not all(run.use_rslora for run in rs):
        raise ValueError("'alpha/r' runs must not use rsLoRA and 'alpha/sqrt(r)' runs must")
    return [b.update_norms[1] / a.update_norms[1] for a, b in zip(plain, rs)]


# ----------------------------------------------------------------------------- the sliders

def rank_alpha_view(r: int = 4, alpha: float = 8.0, lr: float = 0.03, use_rslora: bool = False,
                    steps: int = 150, target=None) -> dict:
    """Train LoRA on the known rank-k target (see `train_lora`) and return the numbers
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


# ----------------------------------------------------------------------------- exercise checkers

def check_eckart_young_floor(answer: float, singular_values, r: int) -> bool:
    """Exercise: the smallest ||dW - dW*||_F any rank-r LoRA update can reach, for a target
    with these singular values (computed by hand from the spectrum)."""
    S = [float(s) for s in singular_values]
    expected = float(low_rank_error(S, min(r, len(S)), norm="fro"))
    if is_blank(answer):
        return not_filled_in(f"my_floor: the error left by the best rank-{r} update")
    if not is_number(answer):
        return report(False, f"you said {answer!r}; give a number: the error left by the best rank-{r} update.")
    if abs(answer - expected) <= 1e-3 * max(1.0, expected):
        return report(True, f"{expected:.4f} = sqrt of the sum of the squared singular values "
                            f"after the first {r}: the directions a rank-{r} update must leave out.")
    if abs(answer - expected ** 2) <= 1e-3 * max(1.0, expected ** 2):
        return report(False, "that is the squared error; take the square root.")
    kept = math.sqrt(sum(s * s for s in S[:r]))
    if abs(answer - kept) <= 1e-3 * max(1.0, kept):
        return report(False, f"that is the size of what a rank-{r} update keeps; the floor is what it must leave out.")
    if abs(answer - sum(S[r:])) <= 1e-3 * max(1.0, sum(S[r:])):
        return report(False, "errors in orthogonal directions add as squares: square, sum, then take the root.")
    return report(False, f"you said {answer:.4f}. Keep the top {r} singular values; the error is "
                         "the root of the sum of squares of the ones left out.")


def check_fixed_scaling_update_sizes(answer, target, ranks, lr: float = 1e-3, step: int = 10) -> bool:
    """Exercise: ||dW||_F after `step` constant-rate Adam steps at each rank in `ranks` with
    alpha = 2 r (scaling alpha / r = 2 at every rank), on `target`. Checked by re-running them."""
    ranks = list(ranks)
    if is_blank(answer):
        return not_filled_in(f"one ||dW||_F per rank in {ranks}, after {step} Adam steps at lr={lr:g} "
                             "with alpha = 2 * r")
    try:
        sizes = [float(x) for x in answer]
    except (TypeError, ValueError):
        return report(False, f"give a list of {len(ranks)} numbers (one ||dW||_F per rank), not {answer!r}.")
    if len(sizes) != len(ranks):
        return report(False, f"you gave {len(sizes)} numbers for {len(ranks)} ranks {ranks}.")

    def measured(alpha_of_r):
        return [train_lora(target, r, alpha_of_r(r), lr, step, schedule="constant").update_norms[step] for r in ranks]

    def close(a, b):
        return all(abs(x - y) <= 2e-2 * y for x, y in zip(a, b))

    expected = measured(lambda r: 2 * r)
    if close(sizes, expected):
        slope = loglog_slope(ranks, expected)
        trend = "grows" if slope > 0 else "shrinks"
        return report(True, f"with the scaling held at 2, the early update {trend} with r (about r^{slope:+.1f}): "
                            "the shrinking under a fixed alpha was alpha / r's doing. What is left comes from A: "
                            "dW = scaling * B A adds up r random rank-one pieces.")
    if close(sizes, measured(lambda r: 8)):
        return report(False, "those are section 4's sizes at a fixed alpha = 8; set alpha = 2 * r at each rank.")
    return report(False, f"these are not the sizes after {step} steps; train each rank with alpha = 2 * r, "
                         f"lr={lr:g} and a constant schedule, and read ||dW||_F after step {step}.")


def _call_on_cases(fn, cases) -> tuple[list[float] | None, str | None]:
    """The learner's `fn(*case)` for every case: (values, None), or (None, the verdict for the first problem)."""
    values = []
    for case in cases:
        value, problem = call_learner_fn(fn, *case)
        if problem:
            return None, problem
        values.append(value)
    return values, None


def check_scaling(fn) -> bool:
    """Exercise: `fn(alpha, r, use_rslora)` returns the factor on B A, checked against a real
    `LoRALinear` built with the same settings, on a grid where the common slips differ."""
    cases = [(16, 4, False), (16, 4, True), (8, 64, False), (8, 64, True), (1, 1, True), (32, 16, True)]
    got, problem = _call_on_cases(fn, cases)
    if problem:
        return report(False, problem)
    want = [LoRALinear(r, r, r=r, alpha=alpha, use_rslora=rs).scaling for alpha, r, rs in cases]
    if all(close_to(g, x, 1e-6) for g, x in zip(got, want)):
        return report(True, "your scaling matches LoRALinear's at every rank, alpha and rule: alpha / r, "
                            "or alpha / sqrt(r) with rsLoRA.")
    rs_rows = [i for i, (_, _, rs) in enumerate(cases) if rs]
    plain_rows = [i for i, (_, _, rs) in enumerate(cases) if not rs]
    if all(close_to(got[i], want[i], 1e-6) for i in plain_rows):
        return report(False, "right for use_rslora=False only; with rsLoRA the rank enters through its square root.")
    if all(close_to(got[i], want[i], 1e-6) for i in rs_rows):
        return report(False, "right with rsLoRA only; plain LoRA divides alpha by r itself.")
    if all(close_to(g * x, 1.0, 1e-6) for g, x in zip(got, want)):
        return report(False, "your function returns the inverse: a larger alpha must give a larger scaling.")
    (alpha, r, rs), g, x = next((c, g, x) for c, g, x in zip(cases, got, want) if not close_to(g, x, 1e-6))
    return report(False, f"at alpha={alpha}, r={r}, use_rslora={rs} your function gives {g:g}, but LoRALinear "
                         f"scales B A by {x:g}.")


def measured_first_step_ratio(target: LowRankTarget, r: int, optimizer: str, p: float,
                              alpha: float = 8.0) -> float:
    """||dW_1|| with scaling alpha / r**p over ||dW_1|| with alpha / r, same alpha, seed and lr,
    measured by one training step each (alpha / r**p is alpha * r**(1 - p) under alpha / r)."""
    lr = 1e-3 if optimizer == "adam" else 0.5
    new = train_lora(target, r, alpha * r ** (1 - p), lr, 1, optimizer=optimizer, schedule="constant")
    old = train_lora(target, r, alpha, lr, 1, optimizer=optimizer, schedule="constant")
    return new.update_norms[1] / old.update_norms[1]


def check_first_step_ratio(fn, target: LowRankTarget) -> bool:
    """Exercise: `fn(r, optimizer, p)` predicts ||dW_1|| under scaling alpha / r**p divided by
    ||dW_1|| under alpha / r (same alpha, lr and seed), checked against one-step runs on `target`."""
    cases = [(r, opt, p) for opt in ("adam", "sgd") for p in (0.5, 0.0) for r in (2, 8, 32)]
    got, problem = _call_on_cases(fn, cases)
    if problem:
        return report(False, problem)
    want = [measured_first_step_ratio(target, r, opt, p) for r, opt, p in cases]

    def fits(rows, values):
        return all(close_to(values[i], want[i], 1e-2) for i in rows)

    every = range(len(cases))
    adam = [i for i, c in enumerate(cases) if c[1] == "adam"]
    sgd = [i for i, c in enumerate(cases) if c[1] == "sgd"]
    half = [i for i, c in enumerate(cases) if c[2] == 0.5]
    if fits(every, got):
        return report(True, "your ratios match the measured first steps for Adam and SGD at p = 0.5 (rsLoRA) and "
                            "p = 0: Adam's step carries the scaling once, SGD's twice.")
    if fits(adam, got) and fits(sgd, [g * g for g in got]):
        return report(False, "right for Adam, too small for SGD: with SGD the gradient of B already carries "
                             "the scaling, and dW = scaling * B A multiplies by it again.")
    if fits(sgd, got) and fits(adam, [math.sqrt(abs(g)) for g in got]):
        return report(False, "right for SGD, too large for Adam: Adam divides each gradient by its own size, "
                             "so its first step on B does not depend on the scaling.")
    if fits(every, [1 / g if g else float("inf") for g in got]):
        return report(False, "upside down: that is alpha / r over alpha / r**p. For p < 1 the new rule's "
                             "scaling is the larger one.")
    if fits(half, got):
        return report(False, "right at p = 0.5 only; write the ratio for any power p of r in the scaling.")
    (r, opt, p), g, x = next((c, g, x) for c, g, x in zip(cases, got, want) if not close_to(g, x, 1e-2))
    return report(False, f"at r={r}, {opt}, p={p:g} you predict {g:.3g}; one measured step gives {x:.3g}. "
                         "Write the scaling ratio first, then ask how often it multiplies the first step.")


def dropout_penalty_mc(delta: torch.Tensor, X: torch.Tensor, p: float, masks: int = 4000,
                       seed: int = 0) -> float:
    """How much `LoRALinear`'s own dropout raises the mean squared error of an adapter whose update
    is `delta` (out, in), on inputs `X` (n, in): averaged over `masks` random masks, no formula."""
    out_features, in_features = delta.shape
    r = min(out_features, in_features)
    layer = LoRALinear(in_features, out_features, r=r, alpha=r, lora_dropout=p, bias=False)  # scaling 1
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, r), (r,), (r, in)
    with torch.no_grad():
        layer.lora_B.copy_(U * S)  # (out, r)
        layer.lora_A.copy_(Vh)  # (r, in): B A = delta
        torch.manual_seed(seed)
        Xs = X.float().expand(masks, *X.shape)  # (masks, n, in): a fresh dropout mask for every copy
        adapter = layer(Xs) - layer.base_layer(Xs)  # (masks, n, out) = delta drop(x)
        clean = X.float() @ delta.float().T  # (n, out) = delta x
        return (adapter - clean).square().mean().item()


def check_dropout_penalty(fn) -> bool:
    """Exercise: `fn(delta, X, p)` returns how much dropout p on the adapter's input raises the
    expected mean squared error, for an update `delta` (out, in) on inputs `X` (n, in)."""
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(5, 7, generator=g, dtype=torch.float64)  # (out, in)
    X = torch.randn(11, 7, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 7, dtype=torch.float64)
    per_column = delta.square().sum(0) * X.square().mean(0)  # (in,): ||dW[:, j]||^2 * mean(x_j^2)
    ps = [0.1, 0.5]
    got, problem = _call_on_cases(fn, [(delta.clone(), X.clone(), p) for p in ps])  # copies: fn may edit them
    if problem:
        return report(False, problem)

    def fits(values):
        return all(close_to(g, x, 1e-4) for g, x in zip(got, values))

    out, n = delta.shape[0], X.shape[0]
    want = [p / (1 - p) * per_column.sum().item() / out for p in ps]
    if fits(want):
        return report(True, "dropout adds p / (1 - p) * sum_j ||dW[:, j]||^2 x_j^2, averaged: a penalty that "
                            "pulls dW toward 0, hardest on the columns of the largest inputs.")
    if fits([p * per_column.sum().item() / out for p in ps]):
        return report(False, "close: the kept inputs are divided by 1 - p, which makes each dropped entry's "
                             "variance larger than p.")
    if fits([p / (1 - p) * delta.square().sum().item() * X.square().mean().item() / out for p in ps]):
        return report(False, "each column of dW is weighted by the size of its own input feature, "
                             "not by the average over all features.")
    if fits([w * out for w in want]) or fits([w * n for w in want]) or fits([w * out * n for w in want]):
        return report(False, "right shape, wrong normaliser: the error is a mean over examples and outputs.")
    return report(False, f"at p=0.5 you say {got[1]:.4g}. Write drop(x) = x + (drop(x) - x): the error splits "
                         "into the error without dropout plus the variance of dW (drop(x) - x).")
