"""Notebook 03's exercise checkers and parameter-budget widget, called directly."""

import pytest

from lora_course.lessons.l03_lora_linear import (
    check_lora_forward,
    check_lora_param_count,
    lora_parameter_budget,
    lora_parameter_budget_widget,
)


def test_param_count_check_accepts_the_card_number_only(capsys):
    assert check_lora_param_count(4_194_304) is True
    assert check_lora_param_count(4_194_304 // 2) is False
    assert "Not yet" in capsys.readouterr().out


def test_forward_check_tells_right_from_wrong(capsys):
    def right(x, W0, b, A, B, alpha, r):
        return x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T

    def base_only(x, W0, b, A, B, alpha, r):
        return x @ W0.T + b

    def wrong_scale(x, W0, b, A, B, alpha, r):
        return x @ W0.T + b + alpha * (x @ A.T) @ B.T

    def raises(*args):
        raise RuntimeError("boom")

    assert check_lora_forward(right)
    assert not check_lora_forward(base_only)
    assert not check_lora_forward(wrong_scale)
    assert not check_lora_forward(raises)
    out = capsys.readouterr().out
    assert "frozen layer alone" in out and "raised RuntimeError" in out


@pytest.mark.parametrize("d, k, r", [(4096, 4096, 8), (2304, 768, 4), (64, 128, 1)])
def test_parameter_budget(d, k, r):
    budget = lora_parameter_budget(d, k, r)
    assert budget["full"] == d * k and budget["lora"] == (d + k) * r
    assert budget["reduction_pct"] == pytest.approx(100 * (1 - (d + k) * r / (d * k)))


def test_parameter_budget_rejects_impossible_rank():
    with pytest.raises(ValueError, match="exceeds min"):
        lora_parameter_budget(64, 32, 33)


def test_parameter_budget_widget_builds_and_redraws():
    import matplotlib

    matplotlib.use("Agg")
    ui = lora_parameter_budget_widget(d=768, k=768, r=4)
    assert [c.description for c in ui.children[:3]] == ["d (out)", "k (in)", "r"]
    ui.children[2].value = 16  # moving the slider re-runs the redraw without error
    assert ui.children[2].value == 16


def test_play_shows_the_live_widget_and_a_static_copy_of_its_view(monkeypatch):
    import ipywidgets

    from lora_course.lessons import common

    shown, drawn = [], []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    widget = ipywidgets.interactive(lambda r: drawn.append(r), r=ipywidgets.IntSlider(value=3, min=1, max=8))
    drawn.clear()  # interactive draws once when it is built
    common.play(widget)
    assert shown == [widget] and drawn == [3]  # the static copy uses the sliders' current value
    widget.children[0].value = 5  # the live widget redraws itself
    assert drawn == [3, 5]
    common.play(widget)
    assert drawn == [3, 5, 5]
