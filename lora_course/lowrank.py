"""Low-rank matrices: the SVD, the best rank-r approximation and how to measure rank.

Every matrix M (d x k) has a singular value decomposition M = U diag(S) Vh with
s_1 >= s_2 >= ... >= 0. Keeping the top r singular triplets gives the best rank-r
approximation in both the Frobenius and the spectral norm (Eckart & Young, 1936;
Mirsky, 1960), and its error is known from the singular values alone:

    ||M - M_r||_F = sqrt(s_{r+1}^2 + s_{r+2}^2 + ...),     ||M - M_r||_2 = s_{r+1}.

Storing M_r as two thin factors costs (d + k) r numbers instead of d k: this is the
saving LoRA makes when it writes a weight update as B A.

References: Eckart & Young, "The approximation of one matrix by another of lower rank"
(1936); Mirsky, "Symmetric gauge functions and unitarily invariant norms" (1960); Roy &
Vetterli, "The effective rank: a measure of effective dimensionality" (EUSIPCO 2007);
Rudelson & Vershynin, "Sampling from large matrices" (2007) for the stable rank; Hu et
al., "LoRA" (2021), arXiv:2106.09685, Eq. 4 for subspace similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validate import check_int

__all__ = [
    "singular_values",
    "truncated_svd",
    "best_rank_r",
    "low_rank_error",
    "storage_cost",
    "dense_cost",
    "compression_ratio",
    "energy_captured",
    "rank_for_energy",
    "effective_rank",
    "stable_rank",
    "subspace_similarity",
    "random_subspace_approximation",
    "random_like",
    "UpdateSpectrum",
    "update_spectrum",
]

_NORMS = ("fro", "spectral")


def _as_matrix(M) -> torch.Tensor:
    """M as a floating-point 2-D tensor, or a clear error."""
    M = torch.as_tensor(M)
    if M.ndim != 2:
        raise ValueError(f"expected a 2-D matrix (d, k), got a tensor of shape {tuple(M.shape)}")
    if not M.is_floating_point():
        M = M.to(torch.get_default_dtype())
    return M


def _as_spectrum(S) -> torch.Tensor:
    """Singular values as a 1-D float tensor, checked to be non-negative and sorted descending."""
    S = torch.as_tensor(S)
    if S.ndim != 1:
        raise ValueError(
            f"expected a 1-D tensor of singular values, got shape {tuple(S.shape)}; "
            "pass singular_values(M) (or the S of torch.linalg.svd), not the matrix"
        )
    if not S.is_floating_point():
        S = S.to(torch.get_default_dtype())
    if S.numel() and (S.min() < 0 or bool((S[1:] > S[:-1]).any())):
        raise ValueError("singular values must be non-negative and sorted descending, as torch.linalg.svd returns them")
    return S


def _check_rank(r, max_rank: int, limit: str, name: str = "r") -> int:
    """r as a checked int in [0, max_rank]; `limit` says where max_rank comes from."""
    r = check_int(name, r, minimum=0, hint="a number of singular directions")
    if r > max_rank:
        raise ValueError(f"{name}={r} exceeds {limit} = {max_rank}; use 0 <= {name} <= {max_rank}")
    return r


def singular_values(M) -> torch.Tensor:
    """The singular values of M, largest first.  # (min(d, k),)"""
    return torch.linalg.svdvals(_as_matrix(M))


def truncated_svd(M, r: int, svd=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-r singular triplets of M: U_r (d, r), S_r (r,), Vh_r (r, k).

    r = 0 gives empty factors; r = min(d, k) gives the thin SVD itself. Pass
    `svd=torch.linalg.svd(M, full_matrices=False)` to reuse one SVD for many r.
    """
    M = _as_matrix(M)
    d, k = M.shape
    r = _check_rank(r, min(d, k), f"min(d, k) for a {d}x{k} matrix")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False) if svd is None else svd  # (d, m), (m,), (m, k)
    return U[:, :r], S[:r], Vh[:r, :]


def best_rank_r(M, r: int, svd=None) -> torch.Tensor:
    """The best rank-r approximation of M (Eckart-Young-Mirsky): U_r diag(S_r) Vh_r.  # (d, k)

    `svd`: M's thin SVD (U, S, Vh) if already computed, to skip recomputing it.
    """
    U_r, S_r, Vh_r = truncated_svd(M, r, svd=svd)
    return (U_r * S_r) @ Vh_r  # (d, r) * (r,) @ (r, k) -> (d, k)


def low_rank_error(S, r: int, norm: str = "fro") -> torch.Tensor:
    """The error ||M - M_r|| of the best rank-r approximation, from M's singular values S.

    norm="fro": sqrt(sum_{i > r} s_i^2).  norm="spectral": s_{r+1}, or 0 when r = len(S).
    Returns a 0-d tensor in S's dtype.
    """
    S = _as_spectrum(S)
    r = _check_rank(r, S.numel(), "the number of singular values given")
    if norm == "fro":
        return S[r:].square().sum().sqrt()
    if norm == "spectral":
        return S[r].clone() if r < S.numel() else S.new_zeros(())
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


def storage_cost(d: int, k: int, r: int) -> int:
    """Numbers stored for a rank-r factorisation B (d, r) @ A (r, k): (d + k) r."""
    d, k = check_int("d", d, minimum=1), check_int("k", k, minimum=1)
    r = _check_rank(r, min(d, k), f"min(d, k) for a {d}x{k} matrix")
    return (d + k) * r


def dense_cost(d: int, k: int) -> int:
    """Numbers stored for a dense d x k matrix: d k."""
    return check_int("d", d, minimum=1) * check_int("k", k, minimum=1)


def compression_ratio(d: int, k: int, r: int) -> float:
    """storage_cost / dense_cost = (d + k) r / (d k); below 1 means the factors are smaller."""
    return storage_cost(d, k, r) / dense_cost(d, k)


def energy_captured(S, r: int) -> float:
    """Fraction of ||M||_F^2 = sum s_i^2 held by the top r singular values (1.0 for a zero matrix)."""
    S = _as_spectrum(S)
    r = _check_rank(r, S.numel(), "the number of singular values given")
    total = S.square().sum()
    if total == 0:
        return 1.0
    return float(S[:r].square().sum() / total)


def rank_for_energy(S, fraction: float) -> int:
    """The smallest r whose top-r singular values hold at least `fraction` of the energy."""
    S = _as_spectrum(S)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    energy = S.double().square()
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = energy.cumsum(0) / total
    # A small tolerance so fraction=1.0 is reached despite rounding in the cumulative sum.
    return int((cumulative < fraction - 1e-12).sum().item()) + (1 if fraction > 0 else 0)


def effective_rank(S) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), with p_i = s_i / sum_j s_j.

    Between 1 (one direction) and the number of non-zero singular values (all equal);
    0.0 for a zero matrix. Unlike the rank, it does not jump when a tiny s_i appears.
    """
    S = _as_spectrum(S).double()
    total = S.sum()
    if total == 0:
        return 0.0
    p = S / total
    p = p[p > 0]  # 0 log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(S) -> float:
    """||M||_F^2 / ||M||_2^2 = sum s_i^2 / s_1^2: at most the rank, 0.0 for a zero matrix."""
    S = _as_spectrum(S).double()
    if S.numel() == 0 or S[0] == 0:
        return 0.0
    return float(S.square().sum() / S[0].square())


def subspace_similarity(U_a, U_b, i: int, j: int) -> float:
    """LoRA paper Eq. 4: phi = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j), in [0, 1].

    U_a (d, m_a) and U_b (d, m_b) hold orthonormal columns (e.g. left singular vectors).
    1 means the smaller subspace lies inside the larger one; 0 means they are orthogonal.
    """
    U_a, U_b = _as_matrix(U_a), _as_matrix(U_b)
    if U_a.shape[0] != U_b.shape[0]:
        raise ValueError(
            f"U_a and U_b must live in the same space (same number of rows), "
            f"got {tuple(U_a.shape)} and {tuple(U_b.shape)}"
        )
    i = _check_rank(i, U_a.shape[1], "the number of columns of U_a", "i")
    j = _check_rank(j, U_b.shape[1], "the number of columns of U_b", "j")
    if min(i, j) == 0:
        raise ValueError("i and j must both be >= 1 (the similarity of an empty subspace is undefined)")
    overlap = U_a[:, :i].T @ U_b[:, :j].to(U_a.dtype)  # (i, j)
    return float(overlap.square().sum() / min(i, j))


def random_subspace_approximation(M, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The best approximation of M inside a *random* r-dimensional column space: Q Q^T M.

    Q (d, r) is an orthonormal basis of r Gaussian directions. It has rank r, like
    best_rank_r(M, r), but picks its directions blindly, so its error is larger.
    """
    M = _as_matrix(M)
    d, k = M.shape
    r = _check_rank(r, min(d, k), f"min(d, k) for a {d}x{k} matrix")
    G = torch.randn(d, r, generator=generator, dtype=M.dtype)  # (d, r)
    Q, _ = torch.linalg.qr(G)  # (d, r), orthonormal columns
    return Q @ (Q.T @ M)  # (d, k)


def random_like(M, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gaussian matrix with M's shape, rescaled to M's Frobenius norm: the 'no structure' baseline."""
    M = _as_matrix(M)
    G = torch.randn(M.shape, generator=generator, dtype=M.dtype)
    return G * (torch.linalg.matrix_norm(M) / torch.linalg.matrix_norm(G))


@dataclass
class UpdateSpectrum:
    """How low-rank one update dW is, next to a random matrix of the same shape and norm."""

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


def update_spectrum(dW, r: int = 4, generator: torch.Generator | None = None) -> UpdateSpectrum:
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
