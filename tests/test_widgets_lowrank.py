"""The rank sliders of notebooks 01 and 02, driven headlessly, and their exercise checkers."""

import copy

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from lora_course import checks
from lora_course.lowrank import best_rank_r, effective_rank, low_rank_error, stable_rank
from lora_course.photo import load_photo
from lora_course.toy_tasks import accuracy, make_mlp, make_task_pair
from lora_course.weight_updates import weight_deltas
from lora_course.widgets import photo_rank_view, photo_rank_widget, update_rank_view, update_rank_widget


pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see tests/conftest.py


@pytest.fixture(scope="module")
def photo():
    return load_photo()[::4, ::4].contiguous()  # (150, 128): small and still a photo


def test_load_photo_ships_with_matplotlib():
    p = load_photo()
    assert p.shape == (600, 512) and p.dtype == torch.float64
    assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0
    assert load_photo(gray=False).shape == (600, 512, 3)
    with pytest.raises(FileNotFoundError, match="grace_hopper"):
        load_photo("no_such_picture.png")


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
    with pytest.raises(ValueError, match="gray"):
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


@pytest.fixture(scope="module")
def finetuned_pair():
    torch.manual_seed(0)
    task = make_task_pair(n_train=200, n_test=200, seed=0)
    pre = make_mlp(task.n_features, 16, task.n_classes, seed=0)
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        for m in ft:
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.3 * torch.randn(m.weight.shape))
    return task, pre, ft


def test_update_rank_slider(finetuned_pair):
    task, pre, ft = finetuned_pair
    deltas = weight_deltas(pre, ft)
    view = update_rank_view(pre, deltas, task.X_test, task.y_b_test, r=16)
    assert view["accuracy"] == pytest.approx(accuracy(ft, task.X_test, task.y_b_test))  # r = full rank
    assert min(deltas[view["layer"]].shape) == 16 and view["energy"] == pytest.approx(1.0)
    assert update_rank_view(pre, deltas, task.X_test, task.y_b_test, r=1, layer="4.weight")["layer"] == "4.weight"
    ui = update_rank_widget(pre, deltas, task.X_test, task.y_b_test, accuracy_finetuned=0.5, r=0, max_r=16)
    assert ui.result["accuracy"] == pytest.approx(accuracy(pre, task.X_test, task.y_b_test))
    assert ui.result["energy"] == 0.0
    ui.children[0].value = 3
    assert ui.result["r"] == 3 and 0.0 < ui.result["energy"] < 1.0
    with pytest.raises(ValueError, match="layer must be"):
        update_rank_view(pre, deltas, task.X_test, task.y_b_test, r=1, layer="nope")


def test_checkers_accept_right_and_reject_wrong_answers(capsys):
    assert checks.check_break_even_rank(600, 512, 276)
    assert not checks.check_break_even_rank(600, 512, 277)
    assert checks.check_low_rank_error_fn(lambda S, r: low_rank_error(S, r, "fro"))
    assert not checks.check_low_rank_error_fn(lambda S, r: low_rank_error(S, r, "spectral"))
    assert "spectral" in capsys.readouterr().out
    assert not checks.check_low_rank_error_fn(lambda S, r: S[r + 1:].square().sum().sqrt())
    assert "off by one" in capsys.readouterr().out
    assert not checks.check_low_rank_error_fn(lambda S, r: 1 / 0)
    S = torch.tensor([3.0, 2.0, 1.0])
    assert checks.check_rank_for_energy(S, 0.9, 2)
    assert not checks.check_rank_for_energy(S, 0.9, 1)
    assert checks.check_effective_rank_fn(effective_rank)
    assert not checks.check_effective_rank_fn(stable_rank)
    assert checks.check_stable_rank_fn(stable_rank)
    assert not checks.check_stable_rank_fn(effective_rank)
    scores = {4: 0.5, 16: 0.7, 64: 0.8}
    assert checks.check_d90(scores, 0.7, 16)
    assert not checks.check_d90(scores, 0.7, 64)
    assert checks.check_d90(scores, 0.9, None)


@pytest.mark.parametrize("blank", [None, ...])
def test_checkers_say_fill_in_for_a_blank_answer(blank, capsys):
    S = torch.tensor([3.0, 2.0, 1.0])
    verdicts = {
        "break_even": checks.check_break_even_rank(600, 512, blank),
        "low_rank_error_fn": checks.check_low_rank_error_fn(blank),
        "rank_for_energy": checks.check_rank_for_energy(S, 0.9, blank),
        "effective_rank_fn": checks.check_effective_rank_fn(blank),
        "stable_rank_fn": checks.check_stable_rank_fn(blank),
    }
    lines = capsys.readouterr().out.splitlines()
    assert verdicts == dict.fromkeys(verdicts, False)
    assert len(lines) == len(verdicts)
    assert all(line.startswith("Not yet: fill in") for line in lines), lines
    assert not any("squared" in line for line in lines)  # no hint about an answer never given


def test_d90_checker_blank_is_ellipsis_because_none_is_an_answer(capsys):
    scores = {4: 0.5, 16: 0.7, 64: 0.8}
    assert not checks.check_d90(scores, 0.7, ...)
    assert capsys.readouterr().out.startswith("Not yet: fill in")
    assert not checks.check_d90(scores, 0.7, None)  # None claims no d got there; 16 did
    assert checks.check_d90(scores, 0.9, None)
    assert not checks.check_d90(scores, 0.7, 32)
    assert "not one of the sizes tried" in capsys.readouterr().out


def test_function_checkers_treat_not_implemented_as_blank(capsys):
    def todo(*args):
        raise NotImplementedError("your code here")

    for checker in (checks.check_low_rank_error_fn, checks.check_effective_rank_fn, checks.check_stable_rank_fn):
        assert not checker(todo)
        out = capsys.readouterr().out
        assert out.startswith("Not yet: fill in the body of your function") and "for r =" not in out


def test_function_checkers_reject_nan_non_numbers_and_non_functions(capsys):
    nan = float("nan")
    assert not checks.check_low_rank_error_fn(lambda S, r: nan)
    assert not checks.check_effective_rank_fn(lambda S: nan)
    assert not checks.check_stable_rank_fn(lambda S: torch.tensor(nan))
    capsys.readouterr()
    assert not checks.check_effective_rank_fn(lambda S: None)  # forgot `return`
    assert "returned NoneType" in capsys.readouterr().out
    assert not checks.check_stable_rank_fn(lambda S: S)  # a whole tensor, not one number
    assert "return one number" in capsys.readouterr().out
    assert not checks.check_stable_rank_fn(2.5)  # called it instead of passing it
    assert "function itself" in capsys.readouterr().out


def test_rank_for_energy_hint_matches_the_mistake(capsys):
    S = torch.tensor([4.0, 2.0, 2.0, 1.0, 1.0])  # 90% of sum s_i^2 needs r = 3; of sum s_i, r = 4
    assert checks.check_rank_for_energy(S, 0.9, 3)
    capsys.readouterr()
    assert not checks.check_rank_for_energy(S, 0.9, 4)
    assert "squared" in capsys.readouterr().out
    assert not checks.check_rank_for_energy(S, 0.9, 2)
    out = capsys.readouterr().out
    assert "too few" in out and "squared" not in out
    assert not checks.check_rank_for_energy(S, 0.9, "3")
    assert "an int rank" in capsys.readouterr().out
