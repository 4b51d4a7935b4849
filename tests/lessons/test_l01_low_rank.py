"""Notebook 01's lesson module: the photo, its rank slider (driven headlessly) and the exercise checkers."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_course.lessons import l01_low_rank as lesson  # noqa: E402
from lora_course.lessons.l01_low_rank import load_photo, photo_rank_view, photo_rank_widget  # noqa: E402
from lora_course.lowrank import best_rank_r, low_rank_error  # noqa: E402

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


def test_checkers_accept_right_and_reject_wrong_answers(capsys):
    assert lesson.check_break_even_rank(600, 512, 276)
    assert not lesson.check_break_even_rank(600, 512, 277)
    assert lesson.check_low_rank_error_fn(lambda S, r: low_rank_error(S, r, "fro"))
    assert not lesson.check_low_rank_error_fn(lambda S, r: low_rank_error(S, r, "spectral"))
    assert "spectral" in capsys.readouterr().out
    assert not lesson.check_low_rank_error_fn(lambda S, r: S[r + 1:].square().sum().sqrt())
    assert "off by one" in capsys.readouterr().out
    assert not lesson.check_low_rank_error_fn(lambda S, r: 1 / 0)
    S = torch.tensor([3.0, 2.0, 1.0])
    assert lesson.check_rank_for_energy(S, 0.9, 2)
    assert not lesson.check_rank_for_energy(S, 0.9, 1)


@pytest.mark.parametrize("blank", [None, ...])
def test_checkers_say_fill_in_for_a_blank_answer(blank, capsys):
    S = torch.tensor([3.0, 2.0, 1.0])
    verdicts = {
        "break_even": lesson.check_break_even_rank(600, 512, blank),
        "low_rank_error_fn": lesson.check_low_rank_error_fn(blank),
        "rank_for_energy": lesson.check_rank_for_energy(S, 0.9, blank),
    }
    lines = capsys.readouterr().out.splitlines()
    assert verdicts == dict.fromkeys(verdicts, False)
    assert len(lines) == len(verdicts)
    assert all(line.startswith("Not yet: fill in") for line in lines), lines
    assert not any("squared" in line for line in lines)  # no hint about an answer never given


def test_function_checker_treats_not_implemented_as_blank(capsys):
    def todo(*args):
        raise NotImplementedError("your code here")

    assert not lesson.check_low_rank_error_fn(todo)
    out = capsys.readouterr().out
    assert out.startswith("Not yet: fill in the body of your function") and "for r =" not in out


def test_function_checker_rejects_nan_and_non_functions(capsys):
    assert not lesson.check_low_rank_error_fn(lambda S, r: float("nan"))
    capsys.readouterr()
    assert not lesson.check_low_rank_error_fn(2.5)  # called it instead of passing it
    assert "function itself" in capsys.readouterr().out


def test_rank_for_energy_hint_matches_the_mistake(capsys):
    S = torch.tensor([4.0, 2.0, 2.0, 1.0, 1.0])  # 90% of sum s_i^2 needs r = 3; of sum s_i, r = 4
    assert lesson.check_rank_for_energy(S, 0.9, 3)
    capsys.readouterr()
    assert not lesson.check_rank_for_energy(S, 0.9, 4)
    assert "squared" in capsys.readouterr().out
    assert not lesson.check_rank_for_energy(S, 0.9, 2)
    out = capsys.readouterr().out
    assert "too few" in out and "squared" not in out
    assert not lesson.check_rank_for_energy(S, 0.9, "3")
    assert "an int rank" in capsys.readouterr().out
