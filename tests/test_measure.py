"""measure.py: medians of wall-clock time, wall and CPU time of one call, the fastest of interleaved rounds,
and greedy generation."""

import time

import pytest
import torch

from lora_course.measure import fastest_of_rounds, generation_ms, median_ms, wall_and_cpu_ms
from lora_course.models import toy_gpt2


def test_median_ms_is_positive_and_calls_the_function():
    calls = []
    ms = median_ms(lambda: calls.append(1), min_run_time=0.01)
    assert ms > 0 and len(calls) > 1


def test_wall_and_cpu_ms_counts_waiting_in_wall_time_only_and_work_in_both():
    def work():  # 60 ms of this process's CPU
        start = time.process_time()
        while time.process_time() - start < 0.06:
            pass

    waited, worked = wall_and_cpu_ms(lambda: time.sleep(0.1)), wall_and_cpu_ms(work)
    assert waited[0] >= 100 and waited[1] < 30, waited
    assert worked[1] >= 60 and worked[0] >= 0.9 * worked[1], worked


def test_fastest_of_rounds_interleaves_and_keeps_each_ones_fastest_round():
    calls, script = [], {"a": iter([5.0, 3.0, 4.0]), "b": iter([(2.0, 9.0), (1.0, 10.0), (3.0, 8.0)])}

    def timing(name):
        def run():
            calls.append(name)
            return next(script[name])
        return run

    fastest = fastest_of_rounds({"a": timing("a"), "b": timing("b")}, rounds=3)
    assert calls == ["a", "b"] * 3  # every round times each variant once, in order
    assert fastest == {"a": 3.0, "b": (1.0, 8.0)}  # a tuple's parts each keep their own fastest round


def test_fastest_of_rounds_rejects_no_rounds_before_timing_anything():
    calls = []
    with pytest.raises(ValueError, match="rounds"):
        fastest_of_rounds({"a": lambda: calls.append(1) or 1.0}, rounds=0)
    assert calls == []


def test_generation_ms_times_greedy_generation():
    model = toy_gpt2()
    prompt = torch.zeros(1, 4, dtype=torch.long)
    ms, tokens = generation_ms(model, prompt, max_new_tokens=5, min_run_time=0.05)
    assert ms > 0 and tokens.shape == (1, 9)
    assert torch.equal(tokens[:, :4], prompt)
    assert torch.equal(generation_ms(model, prompt, max_new_tokens=5, min_run_time=0.05)[1], tokens)  # greedy
