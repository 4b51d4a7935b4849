"""Notebook 04's exercise checkers: each on a blank answer, the solution, and the plausible wrong answers."""

import pytest
import torch

from lora_course.lessons.l04_rank_alpha import (
    check_alpha_for_lr,
    check_dropout_penalty,
    check_update_trend,
    fixed_scaling_sizes,
    loglog_slope,
    make_low_rank_target,
)


@pytest.fixture(scope="module")
def target():
    return make_low_rank_target()  # the notebook's 64 x 64 target of rank 8


def blank_fn(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- solutions, as in the notebook

def first_step_change(c, optimizer):
    return 1.0 if optimizer == "adam" else c


def dropout_penalty(delta, X, p):
    return p / (1 - p) * (delta.square().sum(0) * X.square().mean(0)).sum() / delta.shape[0]


# ----------------------------------------------------------------------------- blank answers

def test_every_checker_says_not_yet_to_a_blank_answer(target, verdict):
    assert "fill in first_step_change" in verdict(check_alpha_for_lr(blank_fn, target), False)
    assert "fill in first_step_change" in verdict(check_alpha_for_lr(..., target), False)
    assert "fill in my_prediction" in verdict(check_update_trend(..., target, [1, 2]), False)
    assert "fill in dropout_penalty" in verdict(check_dropout_penalty(blank_fn), False)


# ----------------------------------------------------------------------------- 1. first_step_change(c, optimizer)

@pytest.mark.parametrize("wrong, hint", [
    (lambda c, o: 1.0, "right for Adam"),  # "alpha is a learning rate" for both
    (lambda c, o: c, "right for SGD"),  # the scaling counted once, lr not at all, for both
    (lambda c, o: c * c if o == "sgd" else 1.0, "right for Adam"),  # SGD: the scaling twice, forgot lr / c
    (lambda c, o: 1 / c, "one measured step gives"),
    (lambda c, o: c / (c - 2), "raised ZeroDivisionError"),
    (lambda c, o: "same", "return one number"),
])
def test_alpha_for_lr_checker_measures_and_tells_the_slips_apart(target, wrong, hint, verdict):
    right = verdict(check_alpha_for_lr(first_step_change, target), True)
    assert "alpha acts as a learning rate under Adam only" in right
    assert hint in verdict(check_alpha_for_lr(wrong, target), False)


# ----------------------------------------------------------------------------- 2. predict, then measure

def test_update_trend_checker_measures_and_compares(target, verdict):
    ranks = [1, 4, 16]
    sizes = fixed_scaling_sizes(target, ranks)
    assert sizes[0] < sizes[1] < sizes[2] and loglog_slope(ranks, sizes) > 0.1  # scaling fixed at 2: it grows
    right = verdict(check_update_trend("grows", target, ranks), True)
    assert f"r=16: {sizes[2]:.3f}" in right and "alpha / r's doing" in right  # the measurement, then why
    assert verdict(check_update_trend(" Grow ", target, ranks), True)  # the word, however written
    for wrong in ("shrinks", "stays"):
        out = verdict(check_update_trend(wrong, target, ranks), False)
        assert f"you predicted it {wrong}" in out and "it grows" in out
    for junk in ("bigger maybe", 1.5, True):
        assert '"grows", "shrinks" or "stays"' in verdict(check_update_trend(junk, target, ranks), False)


# ----------------------------------------------------------------------------- 3. dropout_penalty(delta, X, p)

def _per_column(d, X):
    return d.square().sum(0) * X.square().mean(0)


@pytest.mark.parametrize("wrong, hint", [
    (lambda d, X, p: p * _per_column(d, X).sum() / d.shape[0], "divided by 1 - p"),
    (lambda d, X, p: p / (1 - p) * d.square().sum() * X.square().mean() / d.shape[0], "its own input feature"),
    (lambda d, X, p: p / (1 - p) * _per_column(d, X).sum(), "normaliser"),  # a sum over outputs
    (lambda d, X, p: p / (1 - p) * _per_column(d, X).sum() * X.shape[0] / d.shape[0], "normaliser"),
    (lambda d, X, p: (p / (1 - p)) ** 2 * _per_column(d, X).sum() / d.shape[0], "variance of dW"),
    (lambda d, X, p: d @ X.T, "return one number"),
])
def test_dropout_checker_tells_the_slips_apart(wrong, hint, verdict):
    assert "pulls dW toward 0" in verdict(check_dropout_penalty(dropout_penalty), True)
    assert hint in verdict(check_dropout_penalty(wrong), False)


def test_dropout_checker_takes_a_tensor_and_leaves_the_inputs_alone(verdict):
    def mutating(delta, X, p):
        value = dropout_penalty(delta, X, p)
        delta.zero_()  # a learner's in-place slip must not change the next case
        return torch.as_tensor(value)

    verdict(check_dropout_penalty(mutating), True)
