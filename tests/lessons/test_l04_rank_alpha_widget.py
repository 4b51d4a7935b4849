"""Notebook 04's lesson module: the rank / alpha widget (its pure function and headless shell)."""

import math

import matplotlib

matplotlib.use("Agg")

import pytest

from lora_course.lessons.l04_rank_alpha import make_low_rank_target, rank_alpha_view, rank_alpha_widget
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
