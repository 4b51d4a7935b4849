"""Intrinsic dimension: train a model only inside a random d-dimensional subspace.

All D parameters are tied to d << D trainable numbers z through a fixed random matrix:

    theta = theta0 + P z,     theta0: (D,) frozen,  P: (D, d) random,  z: (d,) trainable, z = 0 at start.

Sweeping d and finding the smallest d that reaches 90% of what training all D
parameters achieves gives d90, the task's intrinsic dimension (Li et al., "Measuring the
Intrinsic Dimension of Objective Landscapes", ICLR 2018, arXiv:1804.08838). Starting
from a pretrained theta0 measures the intrinsic dimension of *fine-tuning*
(Aghajanyan et al., "Intrinsic Dimensionality Explains the Effectiveness of Language
Model Fine-Tuning", 2020, arXiv:2012.13255), the observation LoRA builds on.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call

from .toy_tasks import accuracy, train_classifier

__all__ = ["SubspaceModel", "intrinsic_dimension_sweep", "d90_threshold", "find_d90"]


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
        from tqdm.auto import tqdm

        dims_iter = tqdm(dims, desc="subspace sizes d", leave=False)
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
