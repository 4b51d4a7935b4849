"""lora_course.runtime: the mode switch, seeding, device choice and thread scoping."""

import pytest
import torch

from lora_course.runtime import by_mode, get_device, is_fast_mode, num_threads, seed_everything


@pytest.mark.parametrize("value, fast", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_fast_mode_reads_the_environment(monkeypatch, value, fast):
    monkeypatch.setenv("LORA_COURSE_FAST", value)
    assert is_fast_mode() is fast
    assert by_mode(fast="small", full="big") == ("small" if fast else "big")


def test_full_mode_is_the_default_for_learners(monkeypatch):
    monkeypatch.delenv("LORA_COURSE_FAST", raising=False)
    assert not is_fast_mode()


def test_seed_everything_reproduces():
    seed_everything(3)
    a = torch.randn(4)
    seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_get_device():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device().type in {"cpu", "cuda", "mps"}


def test_num_threads_restores_the_setting_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with num_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
