"""Controlled experiments on what LoRA's rank r and alpha do, small enough to run live.

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

For whitened inputs (x ~ N(0, I)) the regression loss is the matrix loss plus the noise
variance, E||(dW - dW*) x||^2 / out = ||dW - dW*||_F^2 / out, so the two losses tell the
same story and the task adds what data does: noise, and overfitting when data are few.

References: Hu et al., "LoRA" (2021), arXiv:2106.09685; Eckart & Young (1936);
Kalajdzievski, "rsLoRA" (2023), arXiv:2312.03732; Hayou et al., "LoRA+: Efficient Low
Rank Adaptation of Large Models" (2024), arXiv:2402.12354.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import LoRALinear, count_parameters
from .lowrank import low_rank_error, singular_values
from .memory import optimizer_state_bytes
from .runtime import num_threads

__all__ = [
    "LowRankTarget",
    "RegressionTask",
    "LoRARun",
    "make_low_rank_target",
    "make_regression_task",
    "eckart_young_floor",
    "train_lora",
    "rank_sweep",
    "scaling_sweep",
    "loglog_slope",
    "update_sizes",
    "first_step_ratios",
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
    optimizer: str
    steps: int
    losses: list[float]  # training loss at each step, before its update  (steps,)
    errors: list[float]  # ||dW - dW*||_F before each step and after the last  (steps + 1,)
    update_norms: list[float]  # ||dW||_F before each step and after the last  (steps + 1,)
    final_error: float  # ||dW - dW*||_F at the end
    relative_error: float  # final_error / ||dW*||_F
    floor: float  # the Eckart-Young floor for this r: the best any rank-r dW can do
    delta_singular_values: torch.Tensor  # (r,) singular values of the learned dW
    trainable_params: int  # r * (in + out)
    optimizer_state_bytes: int  # measured from the optimizer's state tensors (lora_course.memory)
    test_loss: float | None = None  # regression task only: test MSE
    train_loss: float | None = None  # regression task only: final training MSE
    layer: LoRALinear | None = field(default=None, repr=False)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
    _check_positive_int("out_features", out_features)
    _check_positive_int("in_features", in_features)
    _check_positive_int("k", k)
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
    _check_positive_int("n_train", n_train)
    _check_positive_int("n_test", n_test)
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
    seed: int = 0,
    keep_layer: bool = False,
) -> LoRARun:
    """Train a `LoRALinear(r, alpha)` on top of the frozen W0 and measure what it learned.

    Without `task` the loss is the matrix loss ||dW - dW*||_F^2 / out (the expected
    regression loss on whitened inputs, without noise); with a `RegressionTask` it is the
    mean squared error on its training set (full batch). `alpha` defaults to 2 r (so the
    scaling is 2 at every rank). `lr_B` gives B its own learning rate (LoRA+); by default
    B uses `lr`. `optimizer` is "adam" or "sgd"; `schedule` is "cosine" (decay to 0, to
    settle exactly at the optimum) or "constant".
    """
    if task is not None and task.target is not target:
        raise ValueError("task was built for a different target; pass task.target as target")
    alpha = 2 * r if alpha is None else alpha
    steps = _check_positive_int("steps", steps)
    for name, value in (("lr", lr), ("lr_B", lr if lr_B is None else lr_B)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive learning rate, got {value!r}")
    lr_B = lr if lr_B is None else lr_B
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")

    with num_threads(1):  # tiny matrices: one thread is fastest and spares a shared CPU
        return _train(target, r, alpha, lr, steps, use_rslora, lr_B, optimizer, schedule, task, seed, keep_layer)


def _train(target, r, alpha, lr, steps, use_rslora, lr_B, optimizer, schedule, task, seed, keep_layer) -> LoRARun:
    torch.manual_seed(seed)  # A's random init
    base = nn.Linear(target.in_features, target.out_features, bias=False)
    with torch.no_grad():
        base.weight.copy_(target.W0)
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=use_rslora)  # checks r and alpha
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
            test_loss = (layer(task.X_test) - task.Y_test).square().mean().item()
            train_loss = (layer(task.X_train) - task.Y_train).square().mean().item()
    target_norm = torch.linalg.matrix_norm(target.delta).item()
    return LoRARun(
        r=r, alpha=alpha, scaling=layer.scaling, lr=lr, lr_B=lr_B, use_rslora=use_rslora,
        optimizer=optimizer, steps=steps, losses=losses[:-1], errors=errors, update_norms=norms,
        final_error=errors[-1], relative_error=errors[-1] / target_norm,
        floor=eckart_young_floor(target, r),
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
