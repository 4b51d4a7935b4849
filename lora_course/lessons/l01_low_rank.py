"""Notebook 01 (SVD and low rank): rank-r factors fitted by gradient descent (the competitor the truncated SVD
must beat), the photo (matplotlib's sample `grace_hopper.jpg`, a public-domain U.S. Navy portrait: no download),
its rank-one layers and rank slider, and the checkers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ipywidgets as w
import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import lowrank
from ..train import optimizer_step
from ..validate import check_int, check_positive, is_int, is_number
from .common import Problem, call, checker, play, use_or_reference

__all__ = ["FactorFit", "fit_rank_r_factors", "load_photo", "photo_rank_view", "photo_rank_widget", "rank_one_layers",
           "rank_one_layers_figure", "play", "use_or_reference", "check_best_rank_r", "check_break_even_rank",
           "check_rank_for_energy", "check_shuffled_photo_error"]


# ----------------------------------------------------------------------------- a trained competitor

@dataclass
class FactorFit:
    """Rank-r factors M ~ B A found by gradient descent, and ||M - B A||_F at the start and after each step."""

    B: torch.Tensor  # (d, r)
    A: torch.Tensor  # (r, k)
    errors: list[float]  # steps + 1 values

    error = property(lambda self: self.errors[-1])  # ||M - B A||_F after the last step


def fit_rank_r_factors(M, r: int, steps: int = 1500, lr: float = 0.2, momentum: float = 0.9,
                       init_scale: float = 0.1, seed: int = 0) -> FactorFit:
    """Fit B (d, r) and A (r, k) to M (d, k) by gradient descent on 1/2 ||M - B A||_F^2, never looking at M's SVD:
    from small seeded Gaussian factors, `steps` SGD steps with momentum of size lr / ||M||_F (one `lr` suits a
    matrix of any scale); autograd computes the gradients -(M - B A) A^T for B and -B^T (M - B A) for A."""
    M = torch.as_tensor(M)
    if M.ndim != 2 or not M.is_floating_point():
        raise ValueError(f"M must be a 2-D floating-point matrix (d, k), got {M.dtype} of shape {tuple(M.shape)}")
    d, k = M.shape
    r = check_int("r", r, minimum=1, maximum=min(d, k), hint=f"a rank between 1 and min(d, k) = {min(d, k)}")
    steps, lr = check_int("steps", steps, minimum=1), check_positive("lr", lr)
    norm = float(torch.linalg.matrix_norm(M))
    if norm == 0.0:
        raise ValueError("M is the zero matrix: B A = 0 fits it exactly, there is nothing to fit")
    g = torch.Generator().manual_seed(seed)
    B = (init_scale * torch.randn(d, r, generator=g, dtype=M.dtype)).requires_grad_()  # (d, r)
    A = (init_scale * torch.randn(r, k, generator=g, dtype=M.dtype)).requires_grad_()  # (r, k)
    optimizer = torch.optim.SGD([B, A], lr=lr / norm, momentum=momentum)
    errors = []
    for t in range(steps + 1):
        loss = 0.5 * (M - B @ A).square().sum()
        errors.append(math.sqrt(2 * loss.item()))
        if not math.isfinite(errors[-1]) or errors[-1] > 1e6 * norm:
            raise RuntimeError(f"gradient descent diverged at step {t} (error {errors[-1]:.3g}); use a smaller lr")
        if t < steps:
            optimizer_step(loss, optimizer)
    return FactorFit(B=B.detach(), A=A.detach(), errors=errors)


# ----------------------------------------------------------------------------- the photo

def load_photo() -> torch.Tensor:
    """matplotlib's sample `grace_hopper.jpg` in gray (ITU-R BT.601 weights), float64 in [0, 1].  # (600, 512)"""
    import matplotlib.cbook as cbook

    with cbook.get_sample_data("grace_hopper.jpg", asfileobj=True) as f:
        image = np.asarray(plt.imread(f, format="jpg"), dtype=np.float64) / 255.0  # (600, 512, 3), 8-bit values
    return torch.from_numpy(np.ascontiguousarray(image @ np.array([0.299, 0.587, 0.114])))


def photo_rank_view(photo, r: int, svd=None) -> dict:
    """The best rank-r version of a gray photo (H, W) and what it costs and loses: {"r", "approx" (H, W) clipped
    to [0, 1], "rel_error" = ||P - P_r||_F / ||P||_F, "stored", "dense", "storage_ratio" = (H + W) r / (H W),
    "energy"}; `svd` reuses one torch.linalg.svd for every r."""
    photo = torch.as_tensor(photo)
    if photo.ndim != 2:
        raise ValueError(f"photo must be a gray image (H, W), got shape {tuple(photo.shape)}")
    H, W = photo.shape
    svd = torch.linalg.svd(photo, full_matrices=False) if svd is None else svd
    S = svd[1]
    return {"r": r, "approx": lowrank.best_rank_r(photo, r, svd=svd).clamp(0.0, 1.0),
            "rel_error": float(lowrank.low_rank_error(S, r, "fro") / torch.linalg.vector_norm(S)),
            "stored": lowrank.storage_cost(H, W, r), "dense": lowrank.dense_cost(H, W),
            "storage_ratio": lowrank.compression_ratio(H, W, r), "energy": lowrank.energy_captured(S, r)}


def photo_rank_widget(photo, r: int = 20, max_r: int | None = None):
    """A rank slider over `photo`: original vs rank-r picture, error and storage in the title. A thin shell
    over photo_rank_view; the `ipywidgets.interactive` keeps the latest view dict in `.result`."""
    photo = torch.as_tensor(photo)
    svd = torch.linalg.svd(photo, full_matrices=False)  # once, reused for every r
    max_r = min(photo.shape) if max_r is None else max_r

    def show(r):
        view = photo_rank_view(photo, r, svd=svd)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
        axes[0].imshow(photo.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"original: {view['dense']:,d} numbers")
        axes[1].imshow(view["approx"].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title(f"rank {r}: {view['stored']:,d} numbers ({100 * view['storage_ratio']:.1f}%)\n"
                          f"relative error {view['rel_error']:.3f}, energy kept {100 * view['energy']:.2f}%")
        for ax in axes:
            ax.axis("off")
        plt.show()
        return view

    return w.interactive(show, r=w.IntSlider(value=r, min=0, max=max_r, step=1, description="rank r"))


def rank_one_layers(photo, count: int, svd=None) -> torch.Tensor:
    """The first `count` rank-one layers s_i u_i v_i^T of a gray photo (H, W), largest first.  # (count, H, W)"""
    U, S, Vh = lowrank.truncated_svd(photo, count, svd=svd)  # (H, count), (count,), (count, W)
    return S[:, None, None] * U.T[:, :, None] * Vh[:, None, :]  # (count, 1, 1) * (count, H, 1) * (count, 1, W)


def rank_one_layers_figure(layers: torch.Tensor):
    """Each layer alone (top row, gray = 0) and the running sum of layers 1..i (bottom row, clipped to [0, 1]
    like the photo), from `layers` (count, H, W). Returns the figure; it shows nothing itself."""
    fig, axes = plt.subplots(2, len(layers), figsize=(2.2 * len(layers), 5.2), squeeze=False)
    for i, (layer, total) in enumerate(zip(layers, layers.cumsum(0).clamp(0.0, 1.0))):
        top = float(layer.abs().max())
        axes[0, i].imshow(layer.numpy(), cmap="gray", vmin=-top, vmax=top)
        axes[0, i].set_title(f"layer {i + 1} alone", fontsize=9)
        axes[1, i].imshow(total.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, i].set_title(f"sum of layers 1..{i + 1}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the truncation (build step)

def _slips(M: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    """What common wrong truncations return, each with the hint that explains it."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (d, m), (m,), (m, k)
    m = S.numel()
    slips = {"you left out the singular values: scale the columns of U_r by S_r, U_r diag(S_r) Vh_r.":
             U[:, :r] @ Vh[:r],
             "you kept the r smallest directions. torch.linalg.svd returns s_1 >= s_2 >= ..., largest first: "
             "keep the first r.": (U[:, m - r:] * S[m - r:]) @ Vh[m - r:],
             "you returned M itself: keep only the top r singular triplets.": M}
    if M.shape[0] == M.shape[1]:
        slips["Vh is V already transposed: its rows are the v_i, so take its first r rows, Vh[:r], "
              "and do not transpose them."] = (U[:, :r] * S[:r]) @ Vh[:, :r].T
    for other, word in ((r + 1, "one direction too many"), (r - 1, "one direction too few")):
        if 0 <= other <= m:
            slips[f"off by one: you kept {word} (rank {other} instead of {r})."] = lowrank.best_rank_r(M, other)
    return slips


@checker("your function best_rank_r(M, r)", function=True)
def check_best_rank_r(fn) -> str:
    """Build step: `fn(M, r)` must return M's truncated SVD (d, k) on several matrices, every r in 0..min(d, k)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    for M in [rand(5, 5), rand(7, 4), rand(3, 6), rand(6, 2) @ rand(2, 5)]:  # square first: a transposed Vh runs
        d, k = M.shape
        gap = lambda X, Y: float(torch.linalg.matrix_norm(X - Y) / torch.linalg.matrix_norm(M))  # noqa: B023, E731
        for r in range(min(d, k) + 1):
            where = f"for a {d} x {k} M and r = {r}"
            out = call("your function", fn, M.clone(), r)
            if isinstance(out, (tuple, list)):
                raise Problem("you returned the factors; return the d x k matrix they multiply out to.")
            if not isinstance(out, torch.Tensor) or out.shape != M.shape:
                raise Problem(f"{where} you returned {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}"
                              "; return a tensor of M's shape (d, k).")
            if out.dtype != M.dtype:
                raise Problem(f"you returned {out.dtype}; keep M's dtype ({M.dtype}), so M_r is as exact as M.")
            miss = gap(out, lowrank.best_rank_r(M, r))
            if miss > 1e-9:  # every slip below misses by far more
                hint = next((h for h, slip in _slips(M, r).items() if gap(out, slip) <= 1e-9), None)
                raise Problem(f"{where}, {hint}" if hint else f"{where} your matrix is off by {miss:.3g} of ||M||_F. "
                              "Take U, S, Vh = torch.linalg.svd(M, full_matrices=False) and keep the top r.")
    return "U_r diag(S_r) Vh_r, the truncated SVD, for every r on tall, wide, square and rank-deficient matrices."


# ----------------------------------------------------------------------------- exercise checkers

@checker("the largest rank r (an int) for a {d} x {k} matrix", answers=("answer",))
def check_break_even_rank(d: int, k: int, answer) -> str:
    """Exercise: the largest r at which rank-r factors, (d + k) r numbers, are still fewer than d k."""
    dense = lowrank.dense_cost(d, k)
    best = max(r for r in range(min(d, k) + 1) if lowrank.storage_cost(d, k, r) < dense)
    if not is_int(answer) or answer < 0:
        raise Problem(f"you said {answer!r}. Solve (d + k) r < d k for the largest whole r (d = {d}, k = {k}).")
    if answer > best:
        raise Problem(f"at r = {answer} the factors hold (d + k) r = {(d + k) * answer:,d} numbers, no fewer than "
                      f"the d k = {dense:,d} of the matrix itself.")
    if answer < best:
        raise Problem(f"r = {answer} is still smaller than the matrix, but a larger r is too: find the largest "
                      "whole r with (d + k) r < d k.")
    return f"r = {best}: (d + k) r = {(d + k) * best:,d} < d k = {dense:,d}, and one more rank would not be."


@checker("the smallest rank r (an int) that keeps {fraction:.0%} of the energy", answers=("answer",))
def check_rank_for_energy(S, fraction: float, answer) -> str:
    """Exercise: the smallest r whose top-r singular values hold `fraction` of the energy."""
    expected = lowrank.rank_for_energy(S, fraction)
    if not is_int(answer) or not 0 <= answer <= len(S):
        raise Problem(f"you said {answer!r}; answer with an int rank between 0 and {len(S)}.")
    kept = f"r = {answer} keeps {100 * lowrank.energy_captured(S, int(answer)):.2f}% of sum s_i^2"
    if answer == expected:
        return kept + "."
    plain = torch.as_tensor(S, dtype=torch.float64)  # the classic slip: counting sum s_i instead of sum s_i^2
    if answer == int((plain.cumsum(0) < fraction * plain.sum() - 1e-12).sum()) + 1:
        raise Problem(f"{kept}. Energy is the sum of the *squared* singular values, not of s_i.")
    raise Problem(f"{kept}: " + ("too few." if answer < expected else "more than needed: a smaller r gets there."))


@checker("my_prediction: the relative error of the best rank-{r} approximation (a number)")
def check_shuffled_photo_error(prediction, photo, r: int = 20, seed: int = 0) -> str:
    """Predict, then measure: the rank-r relative error of the photo with its rows and columns shuffled."""
    if not is_number(prediction):
        raise Problem(f"predict one number, the relative error ||P - P_{r}||_F / ||P||_F, not {prediction!r}.")
    photo, g = torch.as_tensor(photo), torch.Generator().manual_seed(seed)
    H, W = photo.shape
    rows_cols = photo[torch.randperm(H, generator=g)][:, torch.randperm(W, generator=g)]
    pixels = photo.flatten()[torch.randperm(H * W, generator=g)].view(H, W)
    before, after, scattered = (float(lowrank.low_rank_error(lowrank.singular_values(P), r) / P.norm())
                                for P in (photo, rows_cols, pixels))
    what = (f"measured: {after:.3f} for the shuffled photo, {before:.3f} for the photo itself. Shuffling rows and "
            "columns multiplies P by two permutation matrices, which are orthogonal: the singular values, and so "
            f"every rank-r error, stay the same. Rank sees no picture. Shuffling single pixels is different: that "
            f"destroys the rank-one layers, and the rank-{r} error becomes {scattered:.3f}.")
    if abs(prediction - after) > 0.02:
        raise Problem(f"you predicted {prediction:.3f}; {what}")
    return what
