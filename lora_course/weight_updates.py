"""The fine-tuning update dW = W_ft - W0 of each layer, its spectrum, and its rank-r truncation.

LoRA's bet (Hu et al. 2021, arXiv:2106.09685, section 4) is that dW has a low
"intrinsic rank": a few singular directions carry most of it. This module measures that
on any pair of models (pretrained, fine-tuned) and rebuilds the model with each dW cut
to rank r, so a notebook can show how much of the fine-tuning gain each r keeps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .lowrank import best_rank_r, effective_rank, energy_captured, random_like, singular_values, stable_rank

__all__ = ["weight_deltas", "UpdateSpectrum", "update_spectrum", "with_rank_r_updates", "gain_kept"]


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


@dataclass
class UpdateSpectrum:
    """How low-rank one update is, next to a random matrix of the same shape and norm."""

    shape: tuple[int, int]
    r: int  # the "top few" used for the energy fraction
    S: torch.Tensor  # singular values of dW
    S_random: torch.Tensor  # singular values of the random baseline
    energy_top_r: float
    energy_top_r_random: float
    effective_rank: float
    effective_rank_random: float
    stable_rank: float
    stable_rank_random: float

    @property
    def max_rank(self) -> int:
        return min(self.shape)


def update_spectrum(dW: torch.Tensor, r: int = 4, generator: torch.Generator | None = None) -> UpdateSpectrum:
    """Energy in the top r singular values, effective and stable rank of dW and of random_like(dW)."""
    S = singular_values(dW)
    S_rand = singular_values(random_like(dW, generator=generator))
    r = min(r, S.numel())
    return UpdateSpectrum(
        shape=tuple(dW.shape),
        r=r,
        S=S,
        S_random=S_rand,
        energy_top_r=energy_captured(S, r),
        energy_top_r_random=energy_captured(S_rand, r),
        effective_rank=effective_rank(S),
        effective_rank_random=effective_rank(S_rand),
        stable_rank=stable_rank(S),
        stable_rank_random=stable_rank(S_rand),
    )


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


def gain_kept(score_r: float, score_pretrained: float, score_finetuned: float) -> float:
    """(score_r - score_pretrained) / (score_finetuned - score_pretrained): 1.0 = all of the gain."""
    gain = score_finetuned - score_pretrained
    if gain <= 0:
        raise ValueError(
            f"fine-tuning did not improve the score ({score_pretrained:.4f} -> {score_finetuned:.4f}); "
            "there is no gain to keep. Train longer or with a larger learning rate."
        )
    return (score_r - score_pretrained) / gain
