"""Notebooks 06 and 06b's lesson module: the methods, the runs, learn-forget bookkeeping, the widget, the checkers."""

import copy
import math

import pytest
import torch

from lora_course.data import evaluate_task, format_target, make_splits
from lora_course.fused import FusedLoRALinear, add_attention_lora
from lora_course.lessons.l06_finetune import (
    WEIGHT_SETS,
    LearnForget,
    Method,
    check_adapter_state,
    check_head_start_prediction,
    check_lora_step,
    check_table5_prediction,
    check_task_sentence,
    finetune_compare_widget,
    forgetting_at_quality,
    mean_spread,
    run_method,
    sample_record,
    sweep,
)
from lora_course.lora import count_parameters, lora_layers, update_norm
from lora_course.models import toy_gpt2, toy_gpt2_config

SPLITS = make_splits(n_validation=16, n_test=16, seed=0)


def small_gpt2():
    return toy_gpt2(toy_gpt2_config(n_layer=2, n_embd=32, n_head=2), seed=0)


@pytest.mark.parametrize("name", list(WEIGHT_SETS))
def test_every_table5_row_has_the_same_budget_and_adapts_only_its_weights(name):
    weights, r = WEIGHT_SETS[name]
    model = add_attention_lora(small_gpt2(), weights, r)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 8 * (32 + 32)  # 2 layers x r=8 x (d + d), whatever the split
    layers = lora_layers(model)
    assert all(n.endswith(("attn.c_attn", "attn.c_proj")) for n in layers)  # never the MLP's c_proj
    assert any(n.endswith("attn.c_proj") for n in layers) == ("o" in weights)
    for n, layer in layers.items():
        if n.endswith("c_attn"):
            assert isinstance(layer, FusedLoRALinear)
            assert layer.enable_lora == tuple(s in weights for s in "qkv")


def test_forgetting_at_quality_interpolates_and_says_nan_when_never_reached():
    curve = [(0, 0.0, 0.0), (10, 0.2, 1.0), (20, 0.4, 1.5)]
    assert forgetting_at_quality(curve, 0.1) == pytest.approx(0.5)
    assert forgetting_at_quality(curve, 0.3) == pytest.approx(1.25)
    assert forgetting_at_quality(curve, 0.2) == pytest.approx(1.0)
    assert forgetting_at_quality(curve, 0.5) != forgetting_at_quality(curve, 0.5)  # NaN
    assert mean_spread([0.1, 0.3, 0.2]) == (pytest.approx(0.2), pytest.approx(0.2))


def test_widget_shows_every_model_for_the_chosen_record(base_model, tokenizer, monkeypatch):
    shown = []
    monkeypatch.setattr("lora_course.lessons.l06_finetune.display", lambda obj: shown.append(obj.data))
    widget = finetune_compare_widget({"a": base_model, "other": base_model}, tokenizer, list(SPLITS.test[:3]))
    (record,) = widget.children[:1]
    assert (record.min, record.max, record.value) == (0, 2, 0)
    widget.f(record=2)
    assert "record 2" in shown[-1] and "<b>a</b>" in shown[-1] and "<b>other</b>" in shown[-1]
    widget.f(record=0)
    assert shown[-1] != shown[-2]


def test_task_sentence_checker(capsys):
    rec = sample_record()
    assert check_task_sentence(rec, format_target(rec)) is True
    capsys.readouterr()
    assert check_task_sentence(rec, "zip from builtins is a function.") is False
    verdict = capsys.readouterr().out
    assert verdict.startswith("Not yet") and "args" in verdict and "'name'" not in verdict.split("missing")[1]
    assert check_task_sentence(rec, 42) is False


def good_step(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def no_zero_grad(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def no_step(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.zero_grad()
    return loss.item()


def test_lora_step_checker_accepts_a_step_and_names_each_mistake(capsys):
    assert check_lora_step(good_step) is True
    capsys.readouterr()
    assert check_lora_step(no_zero_grad) is False
    assert "zero_grad" in capsys.readouterr().out
    assert check_lora_step(no_step) is False
    assert "optimizer.step()" in capsys.readouterr().out
    assert check_lora_step(lambda m, b, o: good_step(m, b, o) * 2) is False
    assert "loss" in capsys.readouterr().out


def test_adapter_state_checker_accepts_copies_of_the_adapters_only(capsys):
    good = lambda m: {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert check_adapter_state(good) is True
    capsys.readouterr()
    assert check_adapter_state(lambda m: copy.deepcopy(m.state_dict())) is False
    assert "not adapters" in capsys.readouterr().out
    assert check_adapter_state(lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}) is False
    assert "clone" in capsys.readouterr().out
    assert check_adapter_state(lambda m: {n: torch.zeros_like(p) for n, p in m.named_parameters()
                                          if p.requires_grad}) is False
    assert "reproduce" in capsys.readouterr().out


@pytest.mark.parametrize("blank", [None, ...])
def test_checkers_say_not_yet_for_a_blank_answer(blank, capsys, base_model, tokenizer):
    assert check_task_sentence(sample_record(), blank) is False
    assert check_lora_step(blank) is False
    assert check_adapter_state(blank) is False
    assert check_head_start_prediction(blank, base_model, tokenizer, SPLITS, {"lora": 1e-2, "full": 1e-3}) is False
    assert check_table5_prediction(blank, base_model, tokenizer, SPLITS, lr=1e-2, steps=2) is False
    assert capsys.readouterr().out.count("Not yet: fill in") == 5


def test_checkers_say_not_yet_for_an_unfinished_function(capsys):
    def unfinished(*args):
        raise NotImplementedError

    assert check_lora_step(unfinished) is False
    assert check_adapter_state(unfinished) is False
    assert capsys.readouterr().out.count("NotImplementedError") == 2


def test_run_method_trains_what_it_says_and_records_a_learn_forget_curve(base_model, tokenizer):
    before = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    heldout = torch.randint(0, len(tokenizer), (300,), generator=torch.Generator().manual_seed(0))
    lf = LearnForget(tokenizer, list(SPLITS.test[:2]), heldout, base_loss=0.0, base_quality=0.0, max_blocks=2)
    res = run_method(base_model, tokenizer, SPLITS, Method("LoRA", r=2), seed=0, steps=4, lr=1e-2,
                     test=list(SPLITS.test[:2]), keep_model=True, learn_forget=lf, checkpoint_every=2)
    assert [s for s, _, _ in res.curve] == [0, 2, 4] and all(f > 0 for _, _, f in res.curve[1:])
    assert res.run.trainable_params == sum(p.numel() for n, p in res.model.named_parameters() if "lora_" in n)
    assert 0.0 <= res.quality <= 1.0 and res.share == res.run.trainable_params / count_parameters(base_model)[1]
    assert res.update_norm == pytest.approx(update_norm(res.model)) and res.update_norm > 0  # B has moved off zero
    full = run_method(base_model, tokenizer, SPLITS, Method("full", targets=None), seed=0, steps=2, lr=1e-3)
    assert full.run.trainable_params == full.run.total_params and full.model is None
    assert math.isnan(full.update_norm)  # no adapter, no Delta W
    assert all(torch.equal(p, before[n]) for n, p in base_model.named_parameters())  # trained copies, not the base


@pytest.mark.parametrize("n_test", [2, 3])
def test_run_method_decodes_the_test_records_once_when_the_last_checkpoint_scored_them(base_model, tokenizer, n_test):
    """The checkpoint after the last step scores the curve's records; the same test records are not decoded again."""
    heldout = torch.randint(0, len(tokenizer), (300,), generator=torch.Generator().manual_seed(0))
    lf = LearnForget(tokenizer, list(SPLITS.test[:2]), heldout, base_loss=0.0, max_blocks=2)
    test = list(SPLITS.test[:n_test])
    res = run_method(base_model, tokenizer, SPLITS, Method("LoRA", r=2), seed=0, steps=2, lr=1e-2, test=test,
                     keep_model=True, learn_forget=lf)
    assert res.scores == evaluate_task(res.model, tokenizer, test, max_new_tokens=32)
    assert (res.scores is lf.scores) is (n_test == 2) and res.curve[-1][1] == lf.scores["slot_accuracy"]
    other_length = run_method(base_model, tokenizer, SPLITS, Method("LoRA", r=2), seed=0, steps=2, lr=1e-2, test=test,
                              learn_forget=lf, max_new_tokens=16)
    assert other_length.scores is not lf.scores  # decoded to another length: scored again


def test_sweep_runs_one_model_per_rate(base_model, tokenizer):
    runs = sweep(base_model, tokenizer, SPLITS, Method("LoRA", r=2), [1e-3, 1e-2], steps=2)
    assert list(runs) == [1e-3, 1e-2] and all(r.lr == lr and r.run.steps == 2 for lr, r in runs.items())


@pytest.mark.parametrize("checker, kwargs, options", [
    (check_head_start_prediction, dict(lrs={"lora": 1e-2, "full": 1e-3}, steps=2, test=list(SPLITS.test[:4])),
     ("ahead", "behind")),
    (check_table5_prediction, dict(lr=1e-2, steps=2), ("yes", "no")),
])
def test_prediction_checkers_measure_and_judge_both_ways(checker, kwargs, options, base_model, tokenizer, capsys):
    assert checker("perhaps", base_model, tokenizer, SPLITS, **kwargs) is False
    assert "predict one of" in capsys.readouterr().out
    first = checker(options[0], base_model, tokenizer, SPLITS, **kwargs)
    line = capsys.readouterr().out
    assert line.startswith("Correct" if first else "Not yet") and ("loss" in line or "steps" in line)
    assert checker(options[1], base_model, tokenizer, SPLITS, **kwargs) is (not first)
    assert capsys.readouterr().out.startswith("Not yet" if first else "Correct")
