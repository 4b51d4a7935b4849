"""Notebook 04's exercise checkers: each on a blank answer, the solution, and the plausible wrong answers."""

import math

import pytest
import torch

from lora_course.lessons.l04_rank_alpha import (
    check_dropout_penalty,
    check_eckart_young_floor,
    check_first_step_ratio,
    check_fixed_scaling_update_sizes,
    check_scaling,
    make_low_rank_target,
    train_lora,
)


@pytest.fixture(scope="module")
def target():
    return make_low_rank_target()  # the notebook's 64 x 64 target of rank 8


def verdict(capsys) -> str:
    return capsys.readouterr().out


def blank_fn(*args):
    raise NotImplementedError


def assert_tells_apart(check, right, wrong, hint, capsys, *args):
    """`check` accepts `right`, and refuses `wrong` with a verdict that contains `hint`."""
    assert check(right, *args)
    assert verdict(capsys).startswith("Correct:")
    assert not check(wrong, *args)
    out = verdict(capsys)
    assert out.startswith("Not yet:") and hint in out, out


# ----------------------------------------------------------------------------- solutions, as in the notebook

def scaling(alpha, r, use_rslora=False):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def first_step_ratio(r, optimizer, p=0.5):
    return r ** (1 - p) if optimizer == "adam" else r ** (2 * (1 - p))


def dropout_penalty(delta, X, p):
    return p / (1 - p) * (delta.square().sum(0) * X.square().mean(0)).sum() / delta.shape[0]


# ----------------------------------------------------------------------------- blank answers

def test_every_checker_says_not_yet_to_a_blank_answer(target, capsys):
    assert check_eckart_young_floor(..., [4.0, 3.0, 2.0, 1.0], 2) is False
    assert check_fixed_scaling_update_sizes(..., target, [1, 2]) is False
    assert check_scaling(blank_fn) is False
    assert check_first_step_ratio(blank_fn, target) is False
    assert check_dropout_penalty(blank_fn) is False
    lines = verdict(capsys).splitlines()
    assert len(lines) == 5 and all(line.startswith("Not yet: fill in") for line in lines), lines


# ----------------------------------------------------------------------------- 1. the floor by hand

def test_floor_checker(capsys):
    S = [4.0, 3.0, 2.0, 1.0]
    assert check_eckart_young_floor(math.sqrt(5.0), S, 2)
    assert verdict(capsys).startswith("Correct:")
    assert not check_eckart_young_floor(5.0, S, 2)  # the squared error
    assert "square root" in verdict(capsys)
    assert check_eckart_young_floor(math.sqrt(14.0), S, 1)  # r = 1: what is left out is sqrt(9 + 4 + 1)
    assert verdict(capsys).startswith("Correct:")
    assert not check_eckart_young_floor(4.0, S, 1)  # the kept part
    assert "leave out" in verdict(capsys)
    assert not check_eckart_young_floor(3.0, S, 2)  # 2 + 1: singular values added, not their squares
    assert "add as squares" in verdict(capsys)
    for bad in ("2.24", float("nan"), True):
        assert not check_eckart_young_floor(bad, S, 2)
        assert verdict(capsys).startswith("Not yet:")


# ----------------------------------------------------------------------------- 2. scaling(alpha, r, use_rslora)

@pytest.mark.parametrize("wrong, hint", [
    (lambda a, r, u=False: a / r, "square root"),  # ignores use_rslora
    (lambda a, r, u=False: a / math.sqrt(r), "divides alpha by r"),  # rsLoRA everywhere
    (lambda a, r, u=False: (math.sqrt(r) if u else r) / a, "inverse"),  # r / alpha
    (lambda a, r, u=False: a / r ** 2, "LoRALinear scales B A by"),
])
def test_scaling_checker_tells_the_slips_apart(wrong, hint, capsys):
    assert_tells_apart(check_scaling, scaling, wrong, hint, capsys)


def test_scaling_checker_reports_a_function_that_raises_or_returns_junk(capsys):
    assert not check_scaling(lambda a, r, u=False: a / (r - 1))  # ZeroDivisionError at r = 1
    assert "raised ZeroDivisionError" in verdict(capsys)
    assert not check_scaling(lambda a, r, u=False: "two")
    assert "return one number" in verdict(capsys)


# ----------------------------------------------------------------------------- 3. first_step_ratio(r, optimizer, p)

@pytest.mark.parametrize("wrong, hint", [
    (lambda r, o, p=0.5: r ** (1 - p), "too small for SGD"),  # Adam's law for both
    (lambda r, o, p=0.5: r ** (2 * (1 - p)), "too large for Adam"),  # SGD's law for both
    (lambda r, o, p=0.5: 1 / first_step_ratio(r, o, p), "upside down"),  # LoRA over rsLoRA
    (lambda r, o, p=0.5: math.sqrt(r) if o == "adam" else r, "p = 0.5 only"),  # the rsLoRA case only
    (lambda r, o, p=0.5: float(r), "one measured step gives"),
])
def test_first_step_checker_measures_and_tells_the_slips_apart(target, wrong, hint, capsys):
    assert_tells_apart(check_first_step_ratio, first_step_ratio, wrong, hint, capsys, target)


# ----------------------------------------------------------------------------- 4. early update sizes at a fixed scaling

def test_fixed_scaling_checker_reruns_the_experiment(target, capsys):
    ranks = [1, 4, 16]
    right = [train_lora(target, r, 2 * r, 1e-3, 10, schedule="constant").update_norms[10] for r in ranks]
    assert right[0] < right[1] < right[2]  # scaling fixed at 2: the early update grows with r
    assert check_fixed_scaling_update_sizes(right, target, ranks)
    assert "grows with r" in verdict(capsys)
    fixed_alpha = [train_lora(target, r, 8, 1e-3, 10, schedule="constant").update_norms[10] for r in ranks]
    assert not check_fixed_scaling_update_sizes(fixed_alpha, target, ranks)
    assert "alpha = 2 * r" in verdict(capsys)
    assert not check_fixed_scaling_update_sizes([2 * x for x in right], target, ranks)
    assert "after step 10" in verdict(capsys)
    assert not check_fixed_scaling_update_sizes([0.1], target, ranks)  # one number for three ranks
    assert "3 ranks" in verdict(capsys)
    assert not check_fixed_scaling_update_sizes("big", target, ranks)
    assert "list of 3 numbers" in verdict(capsys)


# ----------------------------------------------------------------------------- 5. dropout_penalty(delta, X, p)

def _per_column(d, X):
    return d.square().sum(0) * X.square().mean(0)


@pytest.mark.parametrize("wrong, hint", [
    (lambda d, X, p: p * _per_column(d, X).sum() / d.shape[0], "divided by 1 - p"),
    (lambda d, X, p: p / (1 - p) * d.square().sum() * X.square().mean() / d.shape[0], "its own input feature"),
    (lambda d, X, p: p / (1 - p) * _per_column(d, X).sum(), "normaliser"),  # a sum over outputs
    (lambda d, X, p: p / (1 - p) * _per_column(d, X).sum() * X.shape[0] / d.shape[0], "normaliser"),
    (lambda d, X, p: (p / (1 - p)) ** 2 * _per_column(d, X).sum() / d.shape[0], "variance of dW"),
])
def test_dropout_checker_tells_the_slips_apart(wrong, hint, capsys):
    assert_tells_apart(check_dropout_penalty, dropout_penalty, wrong, hint, capsys)


def test_dropout_checker_takes_a_tensor_and_leaves_the_inputs_alone(capsys):
    def mutating(delta, X, p):
        value = dropout_penalty(delta, X, p)
        delta.zero_()  # a learner's in-place slip must not change the next case
        return torch.as_tensor(value)

    assert check_dropout_penalty(mutating)
    assert verdict(capsys).startswith("Correct:")
