"""Notebook 03's exercise checkers and parameter-budget widget, called directly."""

import pytest

from lora_course.checks import check_lora_forward, check_lora_param_count
from lora_course.widgets import lora_parameter_budget, lora_parameter_budget_widget


def test_param_count_check_accepts_the_card_number_only(capsys):
    assert check_lora_param_count(4_194_304) is True
    assert check_lora_param_count(4_194_304 // 2) is False
    assert "Not yet" in capsys.readouterr().out


def test_forward_check_tells_right_from_wrong(capsys):
    right = lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T
    base_only = lambda x, W0, b, A, B, alpha, r: x @ W0.T + b
    wrong_scale = lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha * (x @ A.T) @ B.T

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
