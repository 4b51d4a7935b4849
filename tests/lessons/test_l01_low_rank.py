"""Notebook 01's lesson module: the trained competitor, the photo, its rank-one layers, its rank slider (driven
headlessly), the build step's check and the exercise checkers."""

import matplotlib
import numpy as np

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_course.lessons import l01_low_rank as lesson  # noqa: E402
from lora_course.lessons.l01_low_rank import (  # noqa: E402
    fit_rank_r_factors,
    load_photo,
    photo_rank_view,
    photo_rank_widget,
    rank_one_layers,
    rank_one_layers_figure,
)
from lora_course.lowrank import best_rank_r, low_rank_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see tests/conftest.py


@pytest.fixture(scope="module")
def photo():
    return load_photo()[::4, ::4].contiguous()  # (150, 128): small and still a photo


def test_load_photo_ships_with_matplotlib():
    p = load_photo()
    assert p.shape == (600, 512) and p.dtype == torch.float64
    assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0


def test_photo_rank_view_numbers(photo):
    H, W = photo.shape
    v = photo_rank_view(photo, 10)
    assert v["r"] == 10 and v["approx"].shape == (H, W)
    torch.testing.assert_close(v["approx"], best_rank_r(photo, 10).clamp(0, 1))
    exact = float(torch.linalg.matrix_norm(photo - best_rank_r(photo, 10)) / torch.linalg.matrix_norm(photo))
    assert v["rel_error"] == pytest.approx(exact, rel=1e-9)
    assert v["stored"] == (H + W) * 10 and v["dense"] == H * W
    assert v["storage_ratio"] == pytest.approx((H + W) * 10 / (H * W))
    assert photo_rank_view(photo, 0)["rel_error"] == pytest.approx(1.0)
    assert photo_rank_view(photo, min(H, W))["rel_error"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="r="):
        photo_rank_view(photo, min(H, W) + 1)
    with pytest.raises(ValueError, match="gray image"):
        photo_rank_view(torch.zeros(4, 4, 3), 1)


def test_photo_slider_updates_error_and_storage(photo):
    ui = photo_rank_widget(photo, r=5)
    slider = ui.children[0]
    assert slider.max == min(photo.shape)
    first = ui.result
    assert first["r"] == 5
    slider.value = 40  # what dragging the slider does
    second = ui.result
    assert second["r"] == 40
    assert second["rel_error"] < first["rel_error"]
    assert second["storage_ratio"] > first["storage_ratio"]
    assert second["energy"] > first["energy"]
    assert not torch.equal(second["approx"], first["approx"])
    slider.value = 0
    assert ui.result["rel_error"] == pytest.approx(1.0)


def test_rank_one_layers_add_up_to_the_truncation(photo):
    layers = rank_one_layers(photo, 4)
    assert layers.shape == (4, *photo.shape)
    for i in range(4):
        assert torch.linalg.matrix_rank(layers[i]).item() == 1
        torch.testing.assert_close(layers[: i + 1].sum(0), best_rank_r(photo, i + 1))
    torch.testing.assert_close(rank_one_layers(photo, 2, svd=torch.linalg.svd(photo, full_matrices=False)),
                               layers[:2])
    with pytest.raises(ValueError, match="exceeds min"):
        rank_one_layers(photo, min(photo.shape) + 1)


def test_rank_one_layers_figure_draws_each_layer_and_the_running_sum(photo):
    import matplotlib.pyplot as plt

    layers = rank_one_layers(photo, 3)
    fig = rank_one_layers_figure(layers)
    axes = fig.axes
    assert len(axes) == 6 and plt.fignum_exists(fig.number)  # returned, not shown and closed
    top, bottom = axes[:3], axes[3:]
    for i in range(3):
        np.testing.assert_allclose(top[i].images[0].get_array(), layers[i].numpy())
        lo, hi = top[i].images[0].get_clim()
        assert lo == -hi  # gray is zero: a layer's negative and positive parts show alike
        np.testing.assert_allclose(bottom[i].images[0].get_array(), best_rank_r(photo, i + 1).clamp(0, 1).numpy())
        assert bottom[i].images[0].get_clim() == (0, 1)
    assert [ax.get_title() for ax in axes] == ["layer 1 alone", "layer 2 alone", "layer 3 alone",
                                               "sum of layers 1..1", "sum of layers 1..2", "sum of layers 1..3"]
    plt.close(fig)


def test_exercise_checkers_accept_right_and_reject_wrong_answers(verdict):
    verdict(lesson.check_break_even_rank(600, 512, 276), True)
    verdict(lesson.check_break_even_rank(600, 512, 277), False)
    S = torch.tensor([3.0, 2.0, 1.0])
    verdict(lesson.check_rank_for_energy(S, 0.9, 2), True)
    verdict(lesson.check_rank_for_energy(S, 0.9, 1), False)


@pytest.mark.parametrize("blank", [None, ...])
def test_checkers_say_fill_in_for_a_blank_answer(blank, photo, capsys):
    S = torch.tensor([3.0, 2.0, 1.0])
    verdicts = {
        "best_rank_r": lesson.check_best_rank_r(blank),
        "break_even": lesson.check_break_even_rank(600, 512, blank),
        "rank_for_energy": lesson.check_rank_for_energy(S, 0.9, blank),
        "shuffled": lesson.check_shuffled_photo_error(blank, photo),
    }
    lines = capsys.readouterr().out.splitlines()
    assert verdicts == dict.fromkeys(verdicts, False)
    assert len(lines) == len(verdicts)
    assert all(line.startswith("Not yet: fill in") for line in lines), lines
    assert not any("squared" in line or "measured" in line for line in lines)  # no hint about an answer never given


def test_rank_for_energy_hint_matches_the_mistake(verdict):
    S = torch.tensor([4.0, 2.0, 2.0, 1.0, 1.0])  # 90% of sum s_i^2 needs r = 3; of sum s_i, r = 4
    verdict(lesson.check_rank_for_energy(S, 0.9, 3), True)
    assert "squared" in verdict(lesson.check_rank_for_energy(S, 0.9, 4), False)
    out = verdict(lesson.check_rank_for_energy(S, 0.9, 2), False)
    assert "too few" in out and "squared" not in out
    assert "a smaller r" in verdict(lesson.check_rank_for_energy(S, 0.9, 5), False)
    assert "an int rank" in verdict(lesson.check_rank_for_energy(S, 0.9, "3"), False)
    verdict(lesson.check_rank_for_energy(S, 0.9, np.int64(3)), True)


# ----------------------------------------------------------------------------- predict, then measure

def test_shuffled_photo_prediction_right_wrong_and_not_a_number(photo, verdict):
    unshuffled = photo_rank_view(photo, 20)["rel_error"]  # shuffling rows and columns keeps every singular value
    out = verdict(lesson.check_shuffled_photo_error(round(unshuffled, 3), photo), True)
    assert f"{unshuffled:.3f} for the shuffled photo" in out and "orthogonal" in out
    verdict(lesson.check_shuffled_photo_error(unshuffled + 0.015, photo), True)  # within 0.02 of the measurement
    out = verdict(lesson.check_shuffled_photo_error(0.9, photo), False)
    assert "you predicted 0.900" in out and f"measured: {unshuffled:.3f}" in out
    # Shuffling single pixels, by contrast, does raise the error: the message says by how much.
    scattered = float(out.rsplit("becomes ", 1)[1].rstrip(".\n"))
    assert scattered > unshuffled + 0.1
    assert "one number" in verdict(lesson.check_shuffled_photo_error("same", photo), False)
    verdict(lesson.check_shuffled_photo_error(round(photo_rank_view(photo, 5)["rel_error"], 3), photo, r=5), True)


# ----------------------------------------------------------------------------- the trained competitor

@pytest.fixture(scope="module")
def noisy_low_rank():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
    return M + 0.1 * torch.randn(12, 9, generator=g, dtype=torch.float64)  # (12, 9)


def test_fit_gradients_are_those_of_half_the_squared_error(noisy_low_rank):
    M, r, lr, scale = noisy_low_rank, 2, 0.2, 0.1
    fit = fit_rank_r_factors(M, r, steps=1, lr=lr, momentum=0.0, init_scale=scale, seed=3)
    g = torch.Generator().manual_seed(3)
    B = (scale * torch.randn(12, r, generator=g, dtype=M.dtype)).requires_grad_()
    A = (scale * torch.randn(r, 9, generator=g, dtype=M.dtype)).requires_grad_()
    (0.5 * (M - B @ A).square().sum()).backward()
    step = lr / torch.linalg.matrix_norm(M)
    torch.testing.assert_close(fit.B, B.detach() - step * B.grad)
    torch.testing.assert_close(fit.A, A.detach() - step * A.grad)
    assert fit.errors[0] == pytest.approx(torch.linalg.matrix_norm(M - B.detach() @ A.detach()).item())


@pytest.mark.parametrize("r", [1, 3, 5])
def test_fit_approaches_the_eckart_young_floor_and_never_beats_it(noisy_low_rank, r):
    M = noisy_low_rank
    S = torch.linalg.svdvals(M)
    floor = low_rank_error(S, r).item()
    for seed in range(3):
        fit = fit_rank_r_factors(M, r, seed=seed)
        assert fit.B.shape == (12, r) and fit.A.shape == (r, 9) and len(fit.errors) == 1501
        assert fit.error == pytest.approx(torch.linalg.matrix_norm(M - fit.B @ fit.A).item())
        assert min(fit.errors) >= floor * (1 - 1e-12)
        assert fit.error <= 1.01 * floor
        # The two notebook asserts can fail: a floor off by one rank either way is missed or beaten.
        assert fit.error > 1.01 * low_rank_error(S, r + 1).item()
        assert fit.error < low_rank_error(S, r - 1).item()


def test_fit_is_seeded(noisy_low_rank):
    a, b = fit_rank_r_factors(noisy_low_rank, 2, steps=5), fit_rank_r_factors(noisy_low_rank, 2, steps=5)
    assert a.errors == b.errors and torch.equal(a.B, b.B)
    assert fit_rank_r_factors(noisy_low_rank, 2, steps=5, seed=1).errors != a.errors


def test_fit_bad_input(noisy_low_rank):
    M = noisy_low_rank
    with pytest.raises(ValueError, match="r must be"):
        fit_rank_r_factors(M, 0)
    with pytest.raises(ValueError, match="r must be"):
        fit_rank_r_factors(M, 10)
    with pytest.raises(ValueError, match="steps"):
        fit_rank_r_factors(M, 1, steps=0)
    with pytest.raises(ValueError, match="lr"):
        fit_rank_r_factors(M, 1, lr=0.0)
    with pytest.raises(ValueError, match="2-D floating-point"):
        fit_rank_r_factors(M[0], 1)
    with pytest.raises(ValueError, match="2-D floating-point"):
        fit_rank_r_factors(torch.ones(3, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="zero matrix"):
        fit_rank_r_factors(torch.zeros(3, 3), 1)
    with pytest.raises(RuntimeError, match="diverged"):
        fit_rank_r_factors(M, 2, lr=50.0)


# ----------------------------------------------------------------------------- the truncation (build step)

def _svd_parts(M):
    return torch.linalg.svd(M, full_matrices=False)


def _right(M, r):
    U, S, Vh = _svd_parts(M)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def _right_full_matrices(M, r):
    U, S, Vh = torch.linalg.svd(M)  # full_matrices=True is fine too
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize("fn", [_right, _right_full_matrices, best_rank_r])
def test_best_rank_r_checker_accepts_right_answers(fn, capsys):
    assert lesson.check_best_rank_r(fn)
    assert capsys.readouterr().out.startswith("Correct:")


def _no_singular_values(M, r):
    U, S, Vh = _svd_parts(M)
    return U[:, :r] @ Vh[:r]


def _smallest_directions(M, r):
    U, S, Vh = _svd_parts(M)
    return M * 0 if r == 0 else (U[:, -r:] * S[-r:]) @ Vh[-r:]


def _transposed_vh(M, r):
    U, S, Vh = _svd_parts(M)
    return (U[:, :r] * S[:r]) @ Vh[:, :r].T


@pytest.mark.parametrize("fn, hint", [
    (_no_singular_values, "left out the singular values"),
    (_smallest_directions, "smallest"),
    (_transposed_vh, "already transposed"),
    (lambda M, r: _right(M, min(r + 1, min(M.shape))), "off by one"),
    (lambda M, r: M, "M itself"),
    (lambda M, r: _svd_parts(M), "factors"),
    (lambda M, r: _right(M, r)[:, :1], "shape"),
    (lambda M, r: 2 * _right(M, r), "off by"),
    (lambda M, r: _right(M.float(), r), "keep M's dtype"),  # the notebook compares M_r with float64 matrices
])
def test_best_rank_r_checker_explains_wrong_answers(fn, hint, capsys):
    assert not lesson.check_best_rank_r(fn)
    out = capsys.readouterr().out
    assert out.startswith("Not yet:") and hint in out, out


@pytest.mark.parametrize("blank", [None, ...])
def test_best_rank_r_checker_blank(blank, capsys):
    assert not lesson.check_best_rank_r(blank)
    assert capsys.readouterr().out.startswith("Not yet: fill in your function")


def test_best_rank_r_checker_not_implemented_raises_and_non_functions(capsys):
    def todo(M, r):
        raise NotImplementedError

    assert not lesson.check_best_rank_r(todo)
    assert capsys.readouterr().out.startswith("Not yet: fill in your function (it still raises NotImplementedError)")
    assert not lesson.check_best_rank_r(lambda M, r: M[99])
    assert "raised IndexError" in capsys.readouterr().out
    assert not lesson.check_best_rank_r(_right(torch.eye(2), 1))
    assert "function itself" in capsys.readouterr().out


def test_the_notebook_continues_with_the_learners_truncation_or_the_reference(capsys):
    def blank(M, r):
        raise NotImplementedError

    used = lesson.use_or_reference("best_rank_r", blank, lesson.check_best_rank_r, best_rank_r, "lowrank.best_rank_r")
    assert used is best_rank_r and "uses the reference best_rank_r" in capsys.readouterr().out
    used = lesson.use_or_reference("best_rank_r", _right, lesson.check_best_rank_r, best_rank_r, "lowrank.best_rank_r")
    assert used is _right and "uses your best_rank_r" in capsys.readouterr().out


def test_break_even_hint_says_which_way_the_answer_is_off(capsys):
    assert not lesson.check_break_even_rank(600, 512, 277)  # (600 + 512) 277 = 308,024 > 307,200
    assert "308,024" in capsys.readouterr().out
    assert not lesson.check_break_even_rank(600, 512, 100)
    assert "a larger r is too" in capsys.readouterr().out
    assert not lesson.check_break_even_rank(600, 512, "276")
    assert "Solve (d + k) r < d k" in capsys.readouterr().out
