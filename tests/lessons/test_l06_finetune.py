"""Notebook 06's lesson module: the comparison widget's view and the exercise checkers."""

import pytest

from lora_course.data import Record, format_target, make_splits
from lora_course.lessons.l06_finetune import (
    check_adam_moment_bytes,
    check_gpt2_c_attn_lora_params,
    check_task_sentence,
    finetune_outputs_view,
)

SPLITS = make_splits(n_validation=16, n_test=16, seed=0)


def test_notebook06_checks_accept_the_truth_and_refuse_the_rest(capsys):
    assert check_gpt2_c_attn_lora_params(12 * 8 * (768 + 3 * 768)) is True
    assert check_gpt2_c_attn_lora_params(12 * 8 * 768 * 2) is False
    assert check_adam_moment_bytes(8 * 1000, n_trainable=1000) is True
    assert check_adam_moment_bytes(4 * 1000, n_trainable=1000) is False
    rec = Record(name="zip", kind="generator", args="3")
    assert check_task_sentence(rec, format_target(rec)) is True
    capsys.readouterr()
    assert check_task_sentence(rec, "zip is a generator.") is False
    verdict = capsys.readouterr().out
    assert verdict.startswith("Not yet") and "args" in verdict and "name" not in verdict.split("missing")[1]


@pytest.mark.parametrize("blank", [None, ...])
def test_notebook06_checks_say_not_yet_for_a_blank_answer(blank, capsys):
    assert check_gpt2_c_attn_lora_params(blank) is False
    assert check_adam_moment_bytes(blank, n_trainable=10) is False
    assert check_task_sentence(Record(name="zip", kind="generator", args="3"), blank) is False
    assert capsys.readouterr().out.count("Not yet: fill in") == 3


def test_finetune_outputs_view_reports_each_model(base_model, tokenizer):
    rec = SPLITS.test[0]
    view = finetune_outputs_view({"a": base_model, "b": base_model}, tokenizer, **rec.__dict__)
    assert view["record"] == rec
    assert set(view["outputs"]) == {"a", "b"}
    out = view["outputs"]["a"]
    assert out == view["outputs"]["b"]  # same model, greedy: same text
    assert set(out["slots"]) == set(rec.__dict__) and 0.0 <= out["slot_accuracy"] <= 1.0
