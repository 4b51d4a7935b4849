"""Notebook 04's lesson module: the controlled rank / alpha experiments."""

import math

import pytest
import torch

from lora_course.lessons.l04_rank_alpha import (
    early_stopped,
    first_step_ratios,
    loglog_slope,
    make_low_rank_target,
    make_regression_task,
    no_finetuning_loss,
    scaling_sweep,
    train_lora,
)
from lora_course.lowrank import best_rank_r, singular_values


@pytest.fixture(scope="module")
def target():
    return make_low_rank_target(32, 48, k=6, seed=1)  # out=32, in=48: not square on purpose


def test_target_has_the_asked_shape_rank_and_spectrum(target):
    assert target.W0.shape == target.delta.shape == (32, 48)
    assert target.k == 6
    S = singular_values(target.delta)
    assert torch.allclose(S[:6], target.singular_values, atol=1e-5)
    assert S[6:].abs().max() < 1e-5  # rank exactly k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(out_features=8, in_features=8, k=9), "exceeds"),
        (dict(k=0), "positive int"),
    ],
)
def test_bad_targets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_low_rank_target(**kwargs)


def test_a_runs_floor_is_the_error_of_the_best_rank_r_matrix(target):
    for r in (1, 3, target.k, target.k + 2):
        best = best_rank_r(target.delta, min(r, 32))
        exact = torch.linalg.matrix_norm(target.delta - best).item()
        assert train_lora(target, r, lr=1e-2, steps=1).floor == pytest.approx(exact, abs=1e-4)
    assert train_lora(target, target.k, lr=1e-2, steps=1).floor == 0.0


@pytest.mark.parametrize("r", [1, 2, 4])
def test_rank_below_k_converges_to_the_eckart_young_floor(target, r):
    run = train_lora(target, r, lr=3e-2, steps=300)
    assert run.floor > 0
    assert run.floor * (1 - 1e-4) <= run.final_error <= 1.05 * run.floor  # reaches it, never beats it
    # The best rank-r update is the top-r SVD of the target: the learned spectrum is its top r.
    assert torch.allclose(run.delta_singular_values, target.singular_values[:r], rtol=2e-2)


@pytest.mark.parametrize("r", [6, 12])
def test_rank_at_least_k_recovers_the_target(target, r):
    run = train_lora(target, r, lr=3e-2, steps=300)
    assert run.floor == 0.0
    assert run.relative_error < 1e-2
    assert torch.allclose(run.delta_singular_values[: target.k], target.singular_values, rtol=1e-2)
    extra = run.delta_singular_values[target.k:]  # the ranks the target does not need
    assert extra.numel() == 0 or extra.max() < 1e-2


def test_run_records_curves_counts_and_optimizer_memory(target):
    run = train_lora(target, 4, alpha=8, lr=1e-2, steps=20)
    assert len(run.losses) == 20 and len(run.errors) == len(run.update_norms) == 21
    assert run.update_norms[0] == 0.0  # B = 0: the adapted layer starts as the pretrained one
    assert run.scaling == pytest.approx(8 / 4)
    assert run.trainable_params == 4 * (32 + 48)
    other = train_lora(target, 8, alpha=8, lr=1e-2, steps=20)
    # Adam keeps two float32 moments per trainable number (plus a step counter per tensor).
    extra_state = other.optimizer_state_bytes - run.optimizer_state_bytes
    per_param = extra_state / (other.trainable_params - run.trainable_params)
    assert per_param == 8
    assert train_lora(target, 4, lr=1e-2, steps=5, optimizer="sgd").optimizer_state_bytes == 0


def test_step_one_update_scales_with_the_scaling_exactly(target):
    """Adam's first step is the sign of the gradient, so ||dW_1|| is proportional to the scaling;
    plain SGD's is proportional to scaling squared. rsLoRA / LoRA at the same r: sqrt(r) and r."""
    for r in (2, 4, 16):
        for optimizer, lr, power in (("adam", 1e-3, 1), ("sgd", 0.5, 2)):
            plain = train_lora(target, r, 8, lr, 1, optimizer=optimizer, schedule="constant")
            rs = train_lora(target, r, 8, lr, 1, optimizer=optimizer, schedule="constant", use_rslora=True)
            ratio = rs.update_norms[1] / plain.update_norms[1]  # measured, then compared with the formulas
            assert ratio == pytest.approx(math.sqrt(r) ** power, rel=1e-3)
            assert plain.scaling == pytest.approx(8 / r) and rs.scaling == pytest.approx(8 / math.sqrt(r))


def test_alpha_over_r_shrinks_early_updates_and_rslora_does_not(target):
    ranks = [1, 4, 16]
    sweep = scaling_sweep(target, ranks, alpha=8, lr=1e-3, steps=10)
    plain, rs = ([run.update_norms[10] for run in sweep[rule]] for rule in ("alpha/r", "alpha/sqrt(r)"))
    assert plain[0] > plain[1] > plain[2]
    assert rs[0] < rs[1] < rs[2]
    assert loglog_slope(ranks, rs) - loglog_slope(ranks, plain) == pytest.approx(0.5, abs=0.05)
    assert [run.update_norms[0] for run in sweep["alpha/r"]] == [0.0, 0.0, 0.0]  # B = 0 before the first step


def test_first_step_ratios_follow_the_scaling_law(target):
    ranks = [1, 4, 16]
    adam = scaling_sweep(target, ranks, alpha=8, lr=1e-3, steps=1)
    sgd = scaling_sweep(target, ranks, alpha=8, lr=0.5, steps=1, optimizer="sgd")
    assert first_step_ratios(adam) == pytest.approx([math.sqrt(r) for r in ranks], rel=1e-3)
    assert first_step_ratios(sgd) == pytest.approx([float(r) for r in ranks], rel=1e-3)


def test_loraplus_gives_B_its_own_learning_rate(target):
    plain = train_lora(target, 4, lr=1e-3, steps=30)
    plus = train_lora(target, 4, lr=1e-3, steps=30, lr_B=16e-3)
    assert plus.final_error < plain.final_error  # at a small rate, a faster B learns faster


def test_regression_loss_is_noise_plus_matrix_loss(target):
    task = make_regression_task(target, n_train=2048, n_test=4096, noise_std=0.5)
    assert task.X_train.shape == (2048, 48) and task.Y_test.shape == (4096, 32)
    run = train_lora(target, 2, lr=3e-2, steps=200, task=task)
    predicted = 0.25 + run.final_error ** 2 / target.out_features
    assert run.test_loss == pytest.approx(predicted, rel=0.02)
    assert run.final_error <= 1.1 * run.floor  # the data loss also drives dW to the floor


def test_sweeps_and_slope():
    t = make_low_rank_target(8, 8, k=2)
    assert [train_lora(t, r, lr=3e-2, steps=5).alpha for r in (1, 2)] == [2, 4]  # alpha = 2 r by default
    assert loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ranks is empty"):
        scaling_sweep(t, [], alpha=1, lr=1e-3, steps=1)
    with pytest.raises(ValueError, match="at least two"):
        loglog_slope([1], [1])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(r=0), ValueError, "at least 1"),
        (dict(r=9), ValueError, "exceeds"),
        (dict(r=2, steps=0), ValueError, "steps"),
        (dict(r=2, lr=-1.0), ValueError, "lr must be"),
        (dict(r=2, lr_B=float("nan")), ValueError, "lr_B must be"),
        (dict(r=2, optimizer="adamw"), ValueError, "optimizer"),
        (dict(r=2, schedule="linear"), ValueError, "schedule"),
        (dict(r=2, alpha=0), ValueError, "alpha"),
    ],
)
def test_bad_training_settings_are_refused(kwargs, error, match):
    t = make_low_rank_target(8, 8, k=2)
    with pytest.raises(error, match=match):
        train_lora(t, **kwargs)


def test_task_for_another_target_is_refused():
    a, b = make_low_rank_target(8, 8, k=2), make_low_rank_target(8, 8, k=2, seed=3)
    with pytest.raises(ValueError, match="different target"):
        train_lora(a, 2, task=make_regression_task(b, 16))
    with pytest.raises(ValueError, match="n_train"):
        make_regression_task(a, 0)


# ----------------------------------------------------------------------------- lora_dropout and the first-step law

def test_dropout_needs_a_task_and_is_off_when_measuring(target):
    with pytest.raises(ValueError, match="pass a task"):
        train_lora(target, 2, lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout"):
        train_lora(target, 2, lora_dropout=1.0, task=make_regression_task(target, 16))
    task = make_regression_task(target, n_train=64, n_test=4096, seed=2)
    run = train_lora(target, 4, lr=3e-2, steps=50, task=task, lora_dropout=0.3)
    # Measured with dropout off: the error of the learned dW alone. With dropout's masks on, the penalty
    # p / (1 - p) * ||dW||^2 / out (exercise 3) would come on top, here more than 10% of the loss.
    expected = 0.25 + run.final_error ** 2 / target.out_features
    assert run.test_loss == pytest.approx(expected, rel=0.03)
    assert 0.3 / 0.7 * run.update_norms[-1] ** 2 / target.out_features > 0.1 * expected


def test_dropout_shrinks_the_update_on_few_examples(target):
    task = make_regression_task(target, n_train=64, noise_std=0.5, seed=3)
    plain = train_lora(target, 16, lr=3e-2, steps=200, task=task)
    dropped = train_lora(target, 16, lr=3e-2, steps=200, task=task, lora_dropout=0.2)
    assert dropped.update_norms[-1] < 0.95 * plain.update_norms[-1]
    assert dropped.train_loss > plain.train_loss  # it fits the training set less ...
    assert dropped.test_loss < plain.test_loss  # ... and generalises better


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_penalty_formula_matches_loralinears_own_dropout(p):
    """Exercise 5's answer, checked against LoRALinear's dropout by Monte Carlo over masks."""
    from lora_course.lessons.l04_rank_alpha import dropout_penalty_mc

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 9, generator=g)  # (out, in)
    X = torch.randn(20, 9, generator=g) * torch.linspace(0.2, 2.0, 9)  # (n, in), features of unequal size
    formula = p / (1 - p) * (delta.square().sum(0) * X.square().mean(0)).sum().item() / delta.shape[0]
    assert dropout_penalty_mc(delta, X, p, masks=20000) == pytest.approx(formula, rel=0.02)
    assert dropout_penalty_mc(delta, X, 0.0, masks=10) == pytest.approx(0.0, abs=1e-6)


def test_no_finetuning_loss_is_noise_plus_the_whole_target(target):
    from lora_course.lessons.l04_rank_alpha import no_finetuning_loss

    task = make_regression_task(target, n_train=8, n_test=8192, noise_std=0.5)
    expected = 0.25 + target.delta.square().sum().item() / target.out_features
    assert no_finetuning_loss(task) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("optimizer, power", [("adam", 0), ("sgd", 1)])
def test_trading_alpha_for_lr_changes_the_first_step_by_c_to_the_optimizers_power(target, optimizer, power):
    """Adam's first step goes as lr * scaling, SGD's as lr * scaling^2: (alpha c, lr / c) gives c^0 and c^1."""
    from lora_course.lessons.l04_rank_alpha import measured_first_step_change

    for c in (0.5, 3.0):
        assert measured_first_step_change(target, c, optimizer) == pytest.approx(c ** power, rel=1e-3)
        assert measured_first_step_change(target, c, optimizer, r=2, alpha=3.0) == pytest.approx(c ** power, rel=1e-3)


# ----------------------------------------------------------------------------- early stopping on a validation split

def test_validation_split_leaves_the_train_and_test_sets_as_they_were(target):
    plain, split = make_regression_task(target, 40, seed=5), make_regression_task(target, 40, seed=5, n_val=12)
    assert torch.equal(plain.X_train, split.X_train) and torch.equal(plain.Y_test, split.Y_test)
    assert plain.X_val is None and split.X_val.shape == (12, 48) and split.Y_val.shape == (12, 32)
    residual = split.Y_val - split.X_val @ (target.W0 + target.delta).T  # the noise alone
    assert 0.3 < residual.std().item() < 0.7  # noise_std 0.5


def test_a_run_records_validation_and_the_test_error_at_its_best_step(target):
    task = make_regression_task(target, n_train=40, n_test=4096, noise_std=0.5, seed=2, n_val=64)
    run = train_lora(target, 32, lr=3e-2, steps=150, task=task)
    assert len(run.val_losses) == 151 and run.val_losses[run.best_step] == min(run.val_losses)
    assert run.val_losses[0] == pytest.approx(no_finetuning_loss(task), rel=0.2)  # step 0: dW = 0, W0 alone
    assert 0 < run.best_step < 150  # r = 32 on 40 examples overfits: validation turns back up before the end
    assert run.early_test_loss < run.test_loss  # stopping there tests better than training on
    assert train_lora(target, 2, lr=1e-2, steps=3, task=make_regression_task(target, 8)).best_step is None


def test_patience_stops_the_same_run_that_many_steps_after_its_lowest_validation_error(target):
    task = make_regression_task(target, n_train=40, n_test=256, noise_std=0.5, seed=2, n_val=64)
    full = train_lora(target, 32, lr=3e-2, steps=150, task=task)
    stopped = train_lora(target, 32, lr=3e-2, steps=150, task=task, patience=10)
    assert full.best_step + 10 < 150  # it overfits: the full run goes on well past its best step
    assert len(stopped.val_losses) == full.best_step + 10 + 1  # step 0 to best + patience
    assert stopped.val_losses == pytest.approx(full.val_losses[: len(stopped.val_losses)])  # the same run, cut short
    assert stopped.best_step == full.best_step and stopped.early_test_loss == pytest.approx(full.early_test_loss)
    edge = 150 - full.best_step  # the stop would fall on the last step: the whole run; one less stops one short
    assert len(train_lora(target, 32, lr=3e-2, steps=150, task=task, patience=edge).val_losses) == 151
    assert len(train_lora(target, 32, lr=3e-2, steps=150, task=task, patience=edge - 1).val_losses) == 150
    with pytest.raises(ValueError, match="n_val > 0"):
        train_lora(target, 2, lr=1e-2, steps=3, task=make_regression_task(target, 8), patience=5)
    with pytest.raises(ValueError, match="n_val > 0"):
        train_lora(target, 2, lr=1e-2, steps=3, patience=5)
    with pytest.raises(ValueError, match="patience"):
        train_lora(target, 2, lr=1e-2, steps=3, task=task, patience=0)


def test_early_stopped_picks_the_learning_rate_by_validation_only(target):
    task = make_regression_task(target, n_train=40, noise_std=0.5, seed=3, n_val=32)
    lrs = [1e-4, 1e-3, 1e-2]
    best = early_stopped(target, task, 16, lrs, steps=60, patience=None)
    runs = [train_lora(target, 16, lr=lr, steps=60, task=task) for lr in lrs]
    assert best.lr == min(runs, key=lambda run: min(run.val_losses)).lr
    assert best.early_test_loss == pytest.approx(runs[lrs.index(best.lr)].early_test_loss)
    patient = early_stopped(target, task, 16, lrs, steps=60, patience=5)  # stopped 5 steps after each run's best
    assert len(patient.val_losses) == min(patient.best_step + 5, 60) + 1
    with pytest.raises(ValueError, match="validation split"):
        early_stopped(target, make_regression_task(target, 8), 2, lrs)
