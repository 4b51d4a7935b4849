"""Notebook 01 (SVD and low rank): a rank-r factorisation fitted by gradient descent (the
competitor the truncated SVD must beat), the photo, its rank slider, and the exercise checkers.

The photo is `grace_hopper.jpg` from the sample data that ships with matplotlib (a 600 x
512 portrait of Rear Admiral Grace Hopper, U.S. Navy photo, public domain): no download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ipywidgets as w
import matplotlib.pyplot as plt
import numpy as np
import torch

from ..lowrank import (
    best_rank_r,
    compression_ratio,
    dense_cost,
    energy_captured,
    low_rank_error,
    rank_for_energy,
    storage_cost,
)
from ..validate import check_int, check_positive, is_int
from .common import call_learner, call_learner_fn, close_to, is_blank, not_filled_in, play, report, sample_spectra

__all__ = ["FactorFit", "fit_rank_r_factors", "load_photo", "photo_rank_view", "photo_rank_widget", "play",
           "check_best_rank_r_fn", "check_break_even_rank", "check_low_rank_error_fn", "check_rank_for_energy"]


# ----------------------------------------------------------------------------- a trained competitor

@dataclass
class FactorFit:
    """A rank-r factorisation M ~ B A found by gradient descent, and its error along the way."""

    B: torch.Tensor  # (d, r)
    A: torch.Tensor  # (r, k)
    errors: list[float]  # ||M - B A||_F at the start and after every step: steps + 1 values

    @property
    def error(self) -> float:
        """The final Frobenius error ||M - B A||_F."""
        return self.errors[-1]


def fit_rank_r_factors(M, r: int, steps: int = 1500, lr: float = 0.2, momentum: float = 0.9,
                       init_scale: float = 0.1, seed: int = 0) -> FactorFit:
    """Fit B (d, r) and A (r, k) to M (d, k) by gradient descent on 1/2 ||M - B A||_F^2.

    Starts from small Gaussian factors (std `init_scale`, seeded) and takes `steps`
    heavy-ball steps of size lr / ||M||_F, so one `lr` suits a matrix of any scale.
    It never looks at M's SVD: it is an honest competitor for the truncated SVD.
    The gradients, written out: dL/dB = -(M - B A) A^T and dL/dA = -B^T (M - B A).
    """
    M = torch.as_tensor(M)
    if M.ndim != 2 or not M.is_floating_point():
        raise ValueError(f"M must be a 2-D floating-point matrix (d, k), got {M.dtype} of shape {tuple(M.shape)}")
    d, k = M.shape
    r = check_int("r", r, minimum=1, maximum=min(d, k), hint=f"a rank between 1 and min(d, k) = {min(d, k)}")
    steps = check_int("steps", steps, minimum=1)
    lr, init_scale = check_positive("lr", lr), check_positive("init_scale", init_scale)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    norm = float(torch.linalg.matrix_norm(M))
    if norm == 0.0:
        raise ValueError("M is the zero matrix: B A = 0 fits it exactly, there is nothing to fit")
    g = torch.Generator().manual_seed(seed)
    B = init_scale * torch.randn(d, r, generator=g, dtype=M.dtype)  # (d, r)
    A = init_scale * torch.randn(r, k, generator=g, dtype=M.dtype)  # (r, k)
    vel_B, vel_A = torch.zeros_like(B), torch.zeros_like(A)
    step = lr / norm
    errors = []
    for t in range(steps + 1):
        residual = M - B @ A  # (d, k)
        errors.append(float(torch.linalg.matrix_norm(residual)))
        if not math.isfinite(errors[-1]) or errors[-1] > 1e6 * norm:
            raise RuntimeError(f"gradient descent diverged at step {t} (error {errors[-1]:.3g}); use a smaller lr")
        if t == steps:
            break
        grad_B, grad_A = -residual @ A.T, -B.T @ residual  # (d, r), (r, k)
        vel_B.mul_(momentum).add_(grad_B)
        vel_A.mul_(momentum).add_(grad_A)
        B -= step * vel_B
        A -= step * vel_A
    return FactorFit(B=B, A=A, errors=errors)


# ----------------------------------------------------------------------------- the photo

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def load_photo(name: str = "grace_hopper.jpg", gray: bool = True) -> torch.Tensor:
    """A matplotlib sample image as float64 in [0, 1]: (H, W) if gray else (H, W, 3)."""
    import matplotlib.cbook as cbook
    import matplotlib.pyplot as plt

    try:
        with cbook.get_sample_data(name, asfileobj=True) as f:
            image = plt.imread(f, format=name.rsplit(".", 1)[-1])
    except (FileNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(
            f"matplotlib's sample data has no readable image {name!r} ({e}); "
            "use the default 'grace_hopper.jpg', which matplotlib ships"
        ) from e
    image = np.asarray(image, dtype=np.float64)
    if image.max() > 1.0:  # 8-bit JPEG/PNG values
        image = image / 255.0
    if image.ndim == 3:
        image = image[..., :3]
        if gray:
            image = image @ np.array(_LUMA)
    return torch.from_numpy(np.ascontiguousarray(image))


def photo_rank_view(photo, r: int, svd=None) -> dict:
    """The best rank-r version of a gray photo (H, W) and what it costs and loses.

    Returns {"r", "approx" (H, W) clipped to [0, 1], "rel_error" = ||P - P_r||_F / ||P||_F,
    "stored", "dense", "storage_ratio" = (H + W) r / (H W), "energy"}. Pass
    `svd=torch.linalg.svd(photo, full_matrices=False)` to reuse one SVD for every r.
    """
    photo = torch.as_tensor(photo)
    if photo.ndim != 2:
        raise ValueError(f"photo must be a gray image (H, W), got shape {tuple(photo.shape)}; "
                         "use load_photo(gray=True)")
    H, W = photo.shape
    if svd is None:
        svd = torch.linalg.svd(photo, full_matrices=False)
    S = svd[1]
    approx = best_rank_r(photo, r, svd=svd)  # raises a clear ValueError for a bad r
    return {
        "r": r,
        "approx": approx.clamp(0.0, 1.0),
        "rel_error": float(low_rank_error(S, r, "fro") / torch.linalg.vector_norm(S)),
        "stored": storage_cost(H, W, r),
        "dense": dense_cost(H, W),
        "storage_ratio": compression_ratio(H, W, r),
        "energy": energy_captured(S, r),
    }


def photo_rank_widget(photo, r: int = 20, max_r: int | None = None):
    """A rank slider over `photo`: original vs rank-r picture, error and storage in the title.

    A thin shell over photo_rank_view; the returned `ipywidgets.interactive` keeps the
    latest view dict in `.result` (tests set `.children[0].value` and read it).
    """
    photo = torch.as_tensor(photo)
    svd = torch.linalg.svd(photo, full_matrices=False)  # once, reused for every r
    max_r = min(photo.shape) if max_r is None else max_r

    def show(r):
        view = photo_rank_view(photo, r, svd=svd)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
        axes[0].imshow(photo.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"original: {view['dense']:,d} numbers")
        axes[1].imshow(view["approx"].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title(
            f"rank {r}: {view['stored']:,d} numbers ({100 * view['storage_ratio']:.1f}%)\n"
            f"relative error {view['rel_error']:.3f}, energy kept {100 * view['energy']:.2f}%"
        )
        for ax in axes:
            ax.axis("off")
        plt.show()
        return view

    return w.interactive(show, r=w.IntSlider(value=r, min=0, max=max_r, step=1, description="rank r"))


# ----------------------------------------------------------------------------- exercise checkers

def _test_matrices() -> list[torch.Tensor]:
    """Matrices that tell the usual slips apart: square first (so a transposed Vh still runs), then
    tall, wide and rank-deficient."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return [rand(5, 5), rand(7, 4), rand(3, 6), rand(6, 2) @ rand(2, 5)]


def _best_rank_r_slips(M: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    """What common wrong truncations return, each with the hint that explains it."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (d, m), (m,), (m, k)
    m = S.numel()
    slips = {
        "you left out the singular values: scale the columns of U_r by S_r, U_r diag(S_r) Vh_r.":
            U[:, :r] @ Vh[:r],
        "you kept the r smallest directions. torch.linalg.svd returns s_1 >= s_2 >= ..., largest first: "
        "keep the first r.": (U[:, m - r:] * S[m - r:]) @ Vh[m - r:],
        "you returned M itself: keep only the top r singular triplets.": M,
    }
    if M.shape[0] == M.shape[1]:
        slips["Vh is V already transposed: its rows are the v_i, so take its first r rows, Vh[:r], "
              "and do not transpose them."] = (U[:, :r] * S[:r]) @ Vh[:, :r].T
    for other, word in ((r + 1, "one direction too many"), (r - 1, "one direction too few")):
        if 0 <= other <= m:
            slips[f"off by one: you kept {word} (rank {other} instead of {r})."] = best_rank_r(M, other)
    return slips


def _relative_gap(X: torch.Tensor, Y: torch.Tensor, M: torch.Tensor) -> float:
    """||X - Y||_F / ||M||_F."""
    return float(torch.linalg.matrix_norm(X - Y) / torch.linalg.matrix_norm(M))


def check_best_rank_r_fn(best_rank_r_fn) -> bool:
    """Exercise: `best_rank_r_fn(M, r)` must return M's best rank-r approximation (d, k), the
    truncated SVD, on several matrices and every r from 0 to min(d, k)."""
    if is_blank(best_rank_r_fn):
        return not_filled_in("your function best_rank_r_fn(M, r)")
    if not callable(best_rank_r_fn):
        return report(False, f"pass your function itself (the name, without calling it), not {best_rank_r_fn!r}.")
    for M in _test_matrices():
        d, k = M.shape
        for r in range(min(d, k) + 1):
            out, problem = call_learner(best_rank_r_fn, M.clone(), r)
            if problem:
                return report(False, problem if problem.startswith("fill in") else f"{problem} (for a {d} x {k} M, "
                                                                                   f"r = {r})")
            if isinstance(out, (tuple, list)):
                return report(False, "you returned the factors; return the d x k matrix they multiply out to.")
            try:
                out = torch.as_tensor(out, dtype=M.dtype)
            except (TypeError, ValueError, RuntimeError):
                return report(False, f"your function returned {type(out).__name__}; return a d x k tensor.")
            if out.shape != M.shape:
                return report(False, f"for a {d} x {k} M and r = {r} you returned shape {tuple(out.shape)}; "
                                     f"the approximation has M's shape ({d}, {k}).")
            miss = _relative_gap(out, best_rank_r(M, r), M)
            if miss <= 1e-5:  # float32 rounding passes; every slip below misses by far more
                continue
            for hint, slip in _best_rank_r_slips(M, r).items():
                if _relative_gap(out, slip, M) <= 1e-5:
                    return report(False, f"for a {d} x {k} M and r = {r}, {hint}")
            return report(False, f"for a {d} x {k} M and r = {r} your matrix is off by {miss:.3g} of ||M||_F. "
                                 "Take U, S, Vh = torch.linalg.svd(M, full_matrices=False) and keep the top r.")
    return report(True, "U_r diag(S_r) Vh_r, the truncated SVD, for every r on tall, wide, square and "
                        "rank-deficient matrices.")


def check_break_even_rank(d: int, k: int, answer) -> bool:
    """Exercise: the largest r at which a rank-r factorisation, (d + k) r numbers, is still
    smaller than the dense d x k matrix."""
    if is_blank(answer):
        return not_filled_in(f"the largest rank r (an int) for a {d} x {k} matrix")
    expected = max(r for r in range(min(d, k) + 1) if storage_cost(d, k, r) < dense_cost(d, k))
    if answer == expected:
        return report(True, f"r = {expected}: (d + k) r = {storage_cost(d, k, expected):,d} < d k = "
                            f"{dense_cost(d, k):,d}, and one more rank would not be.")
    if is_int(answer) and answer > expected:
        return report(False, f"at r = {answer} the factors hold (d + k) r = {(d + k) * answer:,d} numbers, "
                             f"no fewer than the d k = {dense_cost(d, k):,d} of the matrix itself.")
    if is_int(answer) and 0 <= answer < expected:
        return report(False, f"r = {answer} is still smaller than the matrix, but a larger r is too: "
                             "find the largest whole r with (d + k) r < d k.")
    return report(False, f"you said {answer!r}. Solve (d + k) r < d k for the largest whole r "
                         f"(d = {d}, k = {k}).")


def check_low_rank_error_fn(error_fn) -> bool:
    """Exercise: `error_fn(S, r)` must return ||M - M_r||_F of the best rank-r approximation
    from the singular values S alone."""
    if is_blank(error_fn):
        return not_filled_in("your function error_fn(S, r)")
    if not callable(error_fn):
        return report(False, f"pass your function itself (the name, without calling it), not {error_fn!r}.")
    for S in sample_spectra():
        for r in range(len(S) + 1):
            got, problem = call_learner_fn(error_fn, S.clone(), r)
            if problem:
                return report(False, problem if problem.startswith("fill in") else f"{problem} (for r = {r})")
            want = float(low_rank_error(S, r, "fro"))
            if not close_to(got, want, 1e-9, floor=1.0):
                if close_to(got, float(low_rank_error(S, r, "spectral")), 1e-9, floor=1.0):
                    return report(False, "that is the spectral-norm error s_{r+1}; the Frobenius error "
                                         "adds up all the dropped singular values, squared.")
                if r + 1 <= len(S) and close_to(got, float(low_rank_error(S, r + 1, "fro")), 1e-9, floor=1.0):
                    return report(False, "off by one: you dropped s_{r+1} too. The best rank-r "
                                         "approximation keeps s_1..s_r and drops s_{r+1}, s_{r+2}, ...")
                return report(False, f"for S = {[round(float(s), 3) for s in S[:5]]}..., r = {r} you "
                                     f"returned {got:.6g}, expected {want:.6g}.")
    return report(True, "||M - M_r||_F = sqrt(s_{r+1}^2 + ... ), Eckart-Young's error, for every r.")


def check_rank_for_energy(S, fraction: float, answer) -> bool:
    """Exercise: the smallest r whose top-r singular values hold `fraction` of the energy."""
    if is_blank(answer):
        return not_filled_in(f"the smallest rank r (an int) that keeps {fraction:.0%} of the energy")
    expected = rank_for_energy(S, fraction)
    if answer == expected:
        return report(True, f"r = {expected} keeps {100 * energy_captured(S, expected):.2f}% of sum s_i^2.")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer <= len(S):
        return report(False, f"you said {answer!r}; answer with an int rank between 0 and {len(S)}.")
    # The classic slip: counting sum s_i instead of sum s_i^2.
    plain = [float(s) for s in S]
    unsquared = next(r for r in range(len(plain) + 1) if sum(plain[:r]) >= fraction * sum(plain) - 1e-12)
    kept = f"r = {answer} keeps {100 * energy_captured(S, answer):.2f}% of sum s_i^2"
    if answer == unsquared:
        return report(False, f"{kept}. Energy is the sum of the *squared* singular values, not of s_i.")
    side = "too few" if answer < expected else "more than needed: a smaller r already gets there"
    return report(False, f"{kept}: {side}.")
