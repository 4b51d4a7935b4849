"""Notebook 01 (SVD and low rank): the photo, its rank slider, and the exercise checkers.

The photo is `grace_hopper.jpg` from the sample data that ships with matplotlib (a 600 x
512 portrait of Rear Admiral Grace Hopper, U.S. Navy photo, public domain): no download.
"""

from __future__ import annotations

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
from .common import call_learner_fn, close_to, is_blank, not_filled_in, report, sample_spectra

__all__ = ["load_photo", "photo_rank_view", "photo_rank_widget", "check_break_even_rank",
           "check_low_rank_error_fn", "check_rank_for_energy"]


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

def check_break_even_rank(d: int, k: int, answer) -> bool:
    """Exercise: the largest r at which a rank-r factorisation, (d + k) r numbers, is still
    smaller than the dense d x k matrix."""
    if is_blank(answer):
        return not_filled_in(f"the largest rank r (an int) for a {d} x {k} matrix")
    expected = max(r for r in range(min(d, k) + 1) if storage_cost(d, k, r) < dense_cost(d, k))
    if answer == expected:
        return report(True, f"r = {expected}: (d + k) r = {storage_cost(d, k, expected):,d} < d k = "
                            f"{dense_cost(d, k):,d}, and one more rank would not be.")
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
