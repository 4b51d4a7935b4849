"""Combining LoRA adapters into one: PEFT's `add_weighted_adapter` methods, as pure functions on one layer.

Adapter i at one layer is its factors A_i (r_i, in), B_i (out, r_i) and scaling s_i, so its
update is dW_i = s_i B_i A_i (out, in). With weights w_i a merge makes one adapter (A, B),
scaling 1:

    cat      A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: rank sum r_i, B A = sum w_i dW_i exactly
    svd      sum w_i dW_i, cut to its best rank-k approximation (Eckart-Young): A = Vh_k, B = U_k S_k
    linear   A = sum c_i A_i, B = sum c_i B_i with c_i = sqrt(|w_i s_i|) (sign on A): equal ranks only, and
             B A = sum w_i dW_i + cross terms c_i c_j B_i A_j, i != j (PEFT's rule: cheap, not exact)

The task-vector merges act on the tensors of each adapter ("task vectors"):

    TIES (Yadav et al. 2023)  trim each to its top `density` fraction by magnitude; elect a sign per entry
                              (of the sum: "total", or of the count: "frequency"); average, per entry,
                              the weighted values that agree with the elected sign (disjoint merge)
    DARE (Yu et al. 2023)     drop each entry with probability 1 - density, rescale the rest by 1 / density
                              (the expectation is kept); then add ("dare_linear") or TIES's sign election
                              and disjoint merge ("dare_ties")
    magnitude_prune           trim as TIES, then add

As in PEFT, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` apply these to the A's and the B's
separately (so, like `linear`, they carry cross terms), and their `_svd` forms apply them to the
updates dW_i, as the papers do to fine-tuned weights, then cut to rank k by SVD.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .lora import LoRALinear
from .lowrank import truncated_svd
from .validate import check_choice

__all__ = ["TASK_MERGES", "COMBINATION_TYPES", "SIGN_METHODS", "trim", "drop_and_rescale", "elect_sign",
           "disjoint_merge", "task_merge", "cat_merge", "linear_merge", "svd_merge", "merge_layer",
           "check_merge"]

TASK_MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on factors: equal ranks only
COMBINATION_TYPES = ("svd", "cat", *TASK_MERGES, *(f"{m}_svd" for m in TASK_MERGES[1:]))
SIGN_METHODS = ("total", "frequency")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_SIGN = ("ties", "dare_ties")

Factors = tuple[torch.Tensor, torch.Tensor, float]  # one adapter at one layer: A (r, in), B (out, r), scaling


# ----------------------------------------------------------------------------- the steps of TIES and DARE

def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the int(density * numel) entries of largest magnitude, zero the rest (any shape)."""
    if density >= 1:
        return t
    keep = torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[keep] = 1
    return t * mask.view(t.shape)


def drop_and_rescale(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli), divide the kept ones by `density`.

    E[result] = t. Draws one Bernoulli per entry from `generator` (default: torch's global one, which
    PEFT uses too, so the same seed gives the same mask); density 1 draws nothing.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def elect_sign(stack: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES's sign election on `stack` (n, ...): the mask (n, ...) of entries whose sign is the elected one.

    "total": the sign of the sum over the n tensors (the paper's); "frequency": the sign held by most.
    A tie elects +; a zero entry (trimmed or dropped) never agrees.
    """
    sign = stack.sign()
    check_choice("majority_sign_method", method, SIGN_METHODS)
    votes = stack.sum(dim=0) if method == "total" else sign.sum(dim=0)  # (...)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES's disjoint merge: per entry, the mean of the weighted values (n, ...) that agree; 0 where none do."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def task_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str, density: float | None = None,
               majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge same-shape task tensors with `weights` by one of TASK_MERGES ("linear" = task arithmetic).

    Signs are elected on the tensors before weighting, and a weighted entry that agrees is averaged
    with the others that agree (not summed), as PEFT does; with equal weights w this is w times
    the paper's TIES merge.
    """
    if method in ("ties", "magnitude_prune"):
        tensors = [trim(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [drop_and_rescale(t, density, generator) for t in tensors]
    stack = torch.stack(list(tensors))  # (n, ...)
    w = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device).view(-1, *[1] * (stack.dim() - 1))
    if method in NEEDS_SIGN:
        return disjoint_merge(stack * w, elect_sign(stack, majority_sign_method))
    return (stack * w).sum(dim=0)


# ----------------------------------------------------------------------------- one layer, every way

def cat_merge(factors: Sequence[Factors], weights: Sequence[float], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in), B (out, rank): the adapters stacked along r, each A times w_i s_i; zero rows up to `rank`.

    B A = sum w_i s_i B_i A_i exactly: a block product has no cross terms.
    """
    A = torch.cat([w * s * a for (a, _, s), w in zip(factors, weights)])  # (sum r_i, in)
    B = torch.cat([b for _, b, _ in factors], dim=1)  # (out, sum r_i)
    return _pad(A, B, rank)


def linear_merge(factors: Sequence[Factors], weights: Sequence[float], method: str = "linear",
                 density: float | None = None, majority_sign_method: str = "total",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factor-wise merges: A = merge of the A_i with weights sign(w_i s_i) sqrt|w_i s_i|, B = merge
    of the B_i with weights sqrt|w_i s_i| (method one of TASK_MERGES). All A_i must have one shape (r, in)."""
    roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(factors, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(factors, weights)]
    kw = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)
    A = task_merge([a for a, _, _ in factors], [g * c for g, c in zip(signs, roots)], method, **kw)  # (r, in)
    B = task_merge([b for _, b, _ in factors], roots, method, **kw)  # (out, r)
    return A, B


def svd_merge(factors: Sequence[Factors], weights: Sequence[float], rank: int, method: str = "linear",
              density: float | None = None, majority_sign_method: str = "total",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the updates dW_i = s_i B_i A_i (out, in) by `method` (one of TASK_MERGES), then keep the best
    rank-`rank` approximation: A = Vh[:rank] (rank, in), B = U[:, :rank] S[:rank] (out, rank)."""
    deltas = [LoRALinear.delta_of({"lora_A": a, "lora_B": b}, s) for a, b, s in factors]  # each (out, in)
    delta = task_merge(deltas, weights, method, density, majority_sign_method, generator)
    U, S, Vh = truncated_svd(delta, min(rank, *delta.shape))  # (out, k), (k,), (k, in)
    return _pad(Vh, U * S, rank)


def _pad(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in), B (out, k) with zero rows/columns added up to `rank` (the product is unchanged)."""
    extra = rank - A.shape[0]
    if extra > 0:
        A = torch.cat([A, A.new_zeros(extra, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
    return A, B


def merge_layer(factors: Sequence[Factors], weights: Sequence[float], combination_type: str, rank: int,
                density: float | None = None, majority_sign_method: str = "total",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's merged adapter, A (rank, in) and B (out, rank), scaling 1, in the first A's dtype.

    `factors` are the adapters present at this layer, `weights` theirs; `rank` the merged adapter's r
    (`check_merge` gives it).
    """
    kw = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)
    dtype = factors[0][0].dtype
    if combination_type == "cat":
        A, B = cat_merge(factors, weights, rank)
    elif combination_type.endswith("svd"):
        method = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
        A, B = svd_merge(factors, weights, rank, method, **kw)
    else:
        A, B = linear_merge(factors, weights, combination_type, **kw)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


# ----------------------------------------------------------------------------- checking the request first

def check_merge(ranks: dict[str, dict[str, int]], weights: Sequence[float], combination_type: str,
                svd_rank: int | None = None, density: float | None = None,
                majority_sign_method: str = "total") -> tuple[str, int]:
    """Check a merge request before anything is computed; return (combination_type, merged rank r).

    `ranks[adapter][layer]` is each adapter's r at each layer it adapts. Raises ValueError saying what
    to change. As in PEFT, a single adapter is merged with "linear" (exact for one adapter).
    """
    names = list(ranks)
    if len(weights) != len(names):
        raise ValueError(f"got {len(names)} adapters but {len(weights)} weights; give one weight per adapter")
    if not names:
        raise ValueError("give at least one adapter to merge")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; choose one of {COMBINATION_TYPES}")
    method = combination_type.removesuffix("_svd")
    if method in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs a density in (0, 1] (the fraction of "
                         f"entries kept), got {density!r}")
    if method not in NEEDS_DENSITY and density is not None:
        raise ValueError(f"combination_type={combination_type!r} keeps every entry and takes no density; "
                         f"use 'ties', 'dare_linear', 'dare_ties' or 'magnitude_prune' (or their _svd forms)")
    check_choice("majority_sign_method", majority_sign_method, SIGN_METHODS)
    is_svd = combination_type.endswith("svd")
    if svd_rank is not None and (not is_svd or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive int and only goes with an svd combination_type; got "
                         f"svd_rank={svd_rank!r} with {combination_type!r}")
    if len(names) == 1:
        combination_type, is_svd = "linear", False
    if combination_type in TASK_MERGES:
        _check_equal_ranks(ranks, combination_type)
    top = [max(layers.values()) for layers in ranks.values()]  # each adapter's largest r
    rank = sum(top) if combination_type == "cat" else (svd_rank or max(top)) if is_svd else top[0]
    return combination_type, rank


def _check_equal_ranks(ranks: dict[str, dict[str, int]], combination_type: str) -> None:
    """The factor-wise merges add A's to A's: every adapter needs the same r at every layer."""
    found = {name: sorted(set(layers.values())) for name, layers in ranks.items()}
    if len({r for rs in found.values() for r in rs}) > 1:
        raise ValueError(f"combination_type={combination_type!r} adds the adapters' A's and B's, so all must have "
                         f"the same r, but their ranks are {found}; use 'cat' or 'svd' (or an _svd form), which "
                         "merge any ranks")
