"""A pretraining task and a related fine-tuning task, generated in code, plus a small MLP.

Notebook 02 needs "pretrain on one task, fine-tune on a related one" without downloading
anything, so the data are made here, from a fixed seed:

* Inputs: `n_latent` Gaussian factors z, mixed linearly into `n_features` measurements
  plus a little noise (x = z M + eps). Real data also lies near a low-dimensional
  manifold inside its high-dimensional feature space; this is the simplest such data.
* A fixed random *teacher* turns z into 32 features t = tanh(W_t z).
* Task A (pretraining) labels x by argmax(R_A t); task B (fine-tuning) by
  argmax(R_B t) with R_B = R_A + shift * R'. Same features, a different read-out:
  related tasks, as sentiment and topic labels of the same text are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskPair", "make_task_pair", "make_mlp", "train_classifier", "accuracy"]

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
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc="training", leave=False)
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
