"""Notebook 04's lesson module: the rank / alpha widget (its pure function and headless shell) and checkers."""

import math
import time

import matplotlib

matplotlib.use("Agg")

import pytest

from lora_course.lessons.l04_rank_alpha import (
    check_alpha_for_scaling,
    check_early_stopping,
    check_eckart_young_floor,
    check_fixed_scaling_update_sizes,
    check_smallest_rank,
    make_low_rank_target,
    make_regression_task,
    rank_alpha_view,
    rank_alpha_widget,
    train_lora,
)
from lora_course.lowrank import low_rank_error


@pytest.fixture(scope="module")
def target():
    return make_low_rank_target()  # the notebook's 64 x 64 target of rank 8


def test_view_below_k_sits_on_the_floor_with_the_top_singular_values(target):
    view = rank_alpha_view(r=3, alpha=6, lr=0.03, target=target)
    assert view["scaling"] == pytest.approx(6 / 3)
    assert view["floor"] == pytest.approx(float(low_rank_error(target.singular_values, 3)), rel=1e-6)
    assert view["floor"] <= view["final_error"] <= 1.05 * view["floor"]
    assert len(view["learned_singular_values"]) == 3 and len(view["target_singular_values"]) == 8
    assert view["learned_singular_values"] == pytest.approx(view["target_singular_values"][:3], rel=0.02)
    assert f"{view['final_error']:.3f}" in view["title"] and f"floor {view['floor']:.3f}" in view["title"]


def test_view_at_or_above_k_recovers_the_target(target):
    view = rank_alpha_view(r=12, alpha=24, lr=0.03, target=target)
    assert view["floor"] == 0.0 and view["relative_error"] < 1e-2
    assert view["learned_singular_values"][:8] == pytest.approx(view["target_singular_values"], rel=0.02)
    assert max(view["learned_singular_values"][8:]) < 0.02


def test_alpha_and_rslora_set_the_scaling_and_the_speed(target):
    r = 16
    plain = rank_alpha_view(r=r, alpha=8, lr=1e-3, steps=20, target=target)
    rs = rank_alpha_view(r=r, alpha=8, lr=1e-3, steps=20, use_rslora=True, target=target)
    big = rank_alpha_view(r=r, alpha=32, lr=1e-3, steps=20, target=target)
    assert plain["scaling"] == pytest.approx(8 / r) and rs["scaling"] == pytest.approx(8 / math.sqrt(r))
    assert big["scaling"] == pytest.approx(32 / r)
    # With Adam a larger scaling moves dW further per step: lower loss after the same 20 steps.
    assert rs["losses"][-1] < plain["losses"][-1]
    assert big["losses"][-1] < plain["losses"][-1]
    assert len(plain["losses"]) == 20 and plain["losses"][0] == pytest.approx(
        (target.delta.square().sum() / target.out_features).item(), rel=1e-5)  # B = 0 at step 0


def test_view_is_fast_enough_to_feel_live(target):
    rank_alpha_view(r=4, target=target)  # warm-up (imports, allocator)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        rank_alpha_view(r=8, alpha=16, lr=0.03, target=target)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[1] < 1.5, f"median retrain took {sorted(times)[1]:.2f} s"  # ~0.2 s on an idle core


def test_bad_slider_values_are_refused(target):
    with pytest.raises(ValueError, match="exceeds"):
        rank_alpha_view(r=65, target=target)
    with pytest.raises(ValueError, match="alpha"):
        rank_alpha_view(r=4, alpha=-1, target=target)
    with pytest.raises(ValueError, match="lr"):
        rank_alpha_view(r=4, lr=0.0, target=target)


def test_widget_redraws_when_sliders_move_headlessly(target):
    ui = rank_alpha_widget(target=target, r=2, alpha=4, lr=0.03)
    sliders = {c.description: c for c in ui.children if hasattr(c, "description")}
    assert ui.result["r"] == 2 and ui.result["scaling"] == pytest.approx(2.0)
    sliders["rank r"].value = 8
    assert ui.result["r"] == 8 and ui.result["scaling"] == pytest.approx(4 / 8)
    sliders["alpha"].value = 16
    assert ui.result["alpha"] == 16 and ui.result["scaling"] == pytest.approx(16 / 8)
    assert ui.result["relative_error"] < 0.05  # rank 8 = k: the target is within reach
    sliders["rank r"].value = 2
    assert ui.result["final_error"] == pytest.approx(ui.result["floor"], rel=0.05)


def test_checks_accept_right_answers_and_explain_wrong_ones(capsys):
    S = [4.0, 3.0, 2.0, 1.0]
    assert check_eckart_young_floor(math.sqrt(5.0), S, 2)
    assert not check_eckart_young_floor(5.0, S, 2)
    assert "square root" in capsys.readouterr().out
    assert check_alpha_for_scaling(32, 16, 2.0)
    assert check_alpha_for_scaling(8, 16, 2.0, use_rslora=True)
    assert not check_alpha_for_scaling(16, 16, 2.0)
    assert not check_alpha_for_scaling(-1, 16, 2.0)
    # floors / ||S||: r=1 -> sqrt(14/30)=0.68, r=2 -> sqrt(5/30)=0.41, r=3 -> sqrt(1/30)=0.18
    assert check_smallest_rank(3, S, 0.2)
    assert not check_smallest_rank(2, S, 0.2) and not check_smallest_rank(4, S, 0.2)
    assert not check_smallest_rank(9, S, 0.2)
    assert not check_smallest_rank(3.0, S, 0.2) and not check_smallest_rank(True, S, 0.2)


@pytest.mark.parametrize("blank", [None, ...])
def test_checks_say_not_yet_to_a_blank_answer(blank, target, capsys):
    S = [4.0, 3.0, 2.0, 1.0]
    task = make_regression_task(target, n_train=32, n_test=64)
    assert check_eckart_young_floor(blank, S, 2) is False
    assert check_alpha_for_scaling(blank, 16, 2.0) is False
    assert check_smallest_rank(blank, S, 0.2) is False
    assert check_fixed_scaling_update_sizes(blank, target, [1, 2]) is False
    assert check_early_stopping(blank, task) is False
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and all(line.startswith("Not yet: fill in") for line in out), out


def test_checks_refuse_non_numbers_without_crashing(target, capsys):
    task = make_regression_task(target, n_train=32, n_test=64)
    assert not check_eckart_young_floor("2.29", [5, 3, 2, 1, 0.5], 2)
    assert not check_eckart_young_floor(float("nan"), [5, 3, 2, 1, 0.5], 2)
    assert not check_alpha_for_scaling("64", 32, 2.0)
    assert not check_fixed_scaling_update_sizes("big", target, [1, 2])
    assert not check_fixed_scaling_update_sizes([0.1], target, [1, 2])  # one number for two ranks
    assert not check_early_stopping("0.5", task)
    assert all(line.startswith("Not yet: ") for line in capsys.readouterr().out.splitlines())


def test_fixed_scaling_checker_reruns_the_experiment(target, capsys):
    ranks = [1, 4, 16]
    right = [train_lora(target, r, 2 * r, 1e-3, 10, schedule="constant").update_norms[10] for r in ranks]
    assert check_fixed_scaling_update_sizes(right, target, ranks)
    assert "grows with r" in capsys.readouterr().out  # scaling fixed at 2: the early update grows with r
    assert right[0] < right[1] < right[2]
    fixed_alpha = [train_lora(target, r, 8, 1e-3, 10, schedule="constant").update_norms[10] for r in ranks]
    assert not check_fixed_scaling_update_sizes(fixed_alpha, target, ranks)
    assert "alpha = 2 * r" in capsys.readouterr().out
    assert not check_fixed_scaling_update_sizes([2 * x for x in right], target, ranks)


def test_early_stopping_checker_reruns_the_experiment(target, capsys):
    few = make_regression_task(target, n_train=128, noise_std=0.5, seed=1)
    short = train_lora(target, 64, lr=3e-2, steps=50, task=few).test_loss
    assert check_early_stopping(short, few)
    out = capsys.readouterr().out
    base = (few.X_test @ target.W0.T - few.Y_test).square().mean().item()
    assert ("still worse than" in out) == (short > base) and f"{short:.2f}" in out
    assert not check_early_stopping(short * 0.9, few)
