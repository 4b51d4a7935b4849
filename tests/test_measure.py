"""measure.py: medians of wall-clock time, and of greedy generation."""

import torch

from lora_course.measure import generation_ms, median_ms
from lora_course.models import toy_gpt2


def test_median_ms_is_positive_and_calls_the_function():
    calls = []
    ms = median_ms(lambda: calls.append(1), min_run_time=0.01)
    assert ms > 0 and len(calls) > 1


def test_generation_ms_times_greedy_generation():
    model = toy_gpt2()
    prompt = torch.zeros(1, 4, dtype=torch.long)
    ms, tokens = generation_ms(model, prompt, max_new_tokens=5, min_run_time=0.05)
    assert ms > 0 and tokens.shape == (1, 9)
    assert torch.equal(tokens[:, :4], prompt)
    assert torch.equal(generation_ms(model, prompt, max_new_tokens=5, min_run_time=0.05)[1], tokens)  # greedy
