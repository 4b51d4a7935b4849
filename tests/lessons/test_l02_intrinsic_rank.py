"""Notebook 02's lesson module: the task pair, random-subspace training (d90), the real update dW,
its rank slider (driven headlessly) and the exercise checkers."""

import copy

import matplotlib
import numpy as np

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_course.lessons import l02_intrinsic_rank as lesson  # noqa: E402
from lora_course.lessons.l02_intrinsic_rank import (  # noqa: E402
    SubspaceModel,
    accuracy,
    d90_threshold,
    find_d90,
    full_fine_tune,
    gain_kept,
    make_mlp,
    make_task_pair,
    sweep_over_seeds,
    train_classifier,
    update_rank_widget,
    weight_deltas,
    with_rank_r_updates,
)
from lora_course.lowrank import best_rank_r, effective_rank, stable_rank  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see tests/conftest.py


@pytest.fixture(scope="module")
def task():
    return make_task_pair(n_train=300, n_test=300, seed=0)


def test_task_pair_is_deterministic_and_related(task):
    again = make_task_pair(n_train=300, n_test=300, seed=0)
    assert torch.equal(task.X_train, again.X_train) and torch.equal(task.y_b_test, again.y_b_test)
    assert task.X_train.shape == (300, 32) and task.n_classes == 10
    # Related but different: B agrees with A more often than chance (1/10), but not always.
    assert 0.2 < task.agreement() < 0.95
    other = make_task_pair(n_train=300, n_test=300, seed=1)
    assert not torch.equal(task.X_train, other.X_train)
    # Inputs lie near an 8-dimensional subspace of the 32 features.
    S = torch.linalg.svdvals(task.X_train - task.X_train.mean(0))
    assert S[8] < 0.2 * S[7]


def test_task_pair_bad_input():
    with pytest.raises(ValueError, match="n_latent"):
        make_task_pair(n_features=4, n_latent=8)
    with pytest.raises(ValueError, match="n_classes"):
        make_task_pair(n_classes=1)


def test_train_classifier_learns_and_respects_frozen_params(task):
    model = make_mlp(task.n_features, 32, task.n_classes, seed=0)
    before = accuracy(model, task.X_test, task.y_a_test)
    losses = train_classifier(model, task.X_train, task.y_a_train, steps=150, lr=3e-3, optimizer="adam", batch_size=64)
    assert len(losses) == 150 and losses[-1] < losses[0]
    assert accuracy(model, task.X_test, task.y_a_test) > before + 0.2
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    train_classifier(model, task.X_train, task.y_a_train, steps=5, lr=0.1)
    assert torch.equal(model[0].weight, frozen)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(model, task.X_train, task.y_a_train, steps=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="no trainable"):
        train_classifier(model.requires_grad_(False), task.X_train, task.y_a_train, steps=1, lr=0.1)


def test_train_classifier_steps_through_the_one_optimizer_step(task, monkeypatch):
    calls = []
    real = lesson.optimizer_step
    monkeypatch.setattr(lesson, "optimizer_step", lambda loss, opt: calls.append(type(opt).__name__) or real(loss, opt))
    model = make_mlp(task.n_features, 8, task.n_classes, seed=0)
    losses = train_classifier(model, task.X_train, task.y_a_train, steps=3, lr=0.01, optimizer="adam", batch_size=16)
    assert calls == ["Adam"] * 3 and len(losses) == 3
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind for the next loop


def test_full_fine_tune_moves_only_the_weights_of_a_copy(task):
    pre = make_mlp(task.n_features, 16, task.n_classes, seed=0)
    before = copy.deepcopy(pre)
    ft = full_fine_tune(pre, task.X_train, task.y_b_train, steps=20, lr=0.05)
    for (name, p0), p1, p_pre in zip(before.named_parameters(), ft.parameters(), pre.parameters()):
        assert torch.equal(p_pre, p0)  # the pretrained model is untouched
        assert torch.equal(p1, p0) != name.endswith("weight"), name  # weights moved, biases did not
    assert accuracy(ft, task.X_train, task.y_b_train) > accuracy(pre, task.X_train, task.y_b_train)


def test_subspace_model_starts_at_theta0_and_only_z_trains(task):
    model = make_mlp(task.n_features, 16, task.n_classes, seed=0)
    D = sum(p.numel() for p in model.parameters())
    sub = SubspaceModel(model, d=7, seed=0)
    assert sub.theta0.numel() == D and sub.z.shape == (7,) and sub.P.shape == (D, 7) and sub.P.is_sparse
    torch.testing.assert_close(sub.P.to_dense().norm(dim=0), torch.ones(7))
    torch.testing.assert_close(sub(task.X_test), model(task.X_test))  # z = 0: same function
    assert [name for name, p in sub.named_parameters() if p.requires_grad] == ["z"]
    train_classifier(sub, task.X_train, task.y_b_train, steps=20, lr=0.1, optimizer="adam", batch_size=64)
    assert sub.z.abs().sum() > 0
    # The model moved only inside the span of P: a plain copy holding theta0 + P z computes the same function.
    plain = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(sub.theta0 + sub.P.to_dense() @ sub.z.detach(), plain.parameters())
    torch.testing.assert_close(plain(task.X_test), sub(task.X_test))
    torch.testing.assert_close(model(task.X_test), SubspaceModel(model, d=3)(task.X_test))  # the original untouched


def test_subspace_model_projection_is_very_sparse_with_unit_columns(task):
    model = make_mlp(task.n_features, 64, task.n_classes, seed=0)
    D = sum(p.numel() for p in model.parameters())
    P = SubspaceModel(model, d=50, seed=1).P.to_dense()  # (D, 50)
    nonzero = (P != 0).sum(0).float()  # (50,) per column: Binomial(D, 1 / sqrt(D)), mean sqrt(D)
    assert abs(nonzero.mean().item() / D ** 0.5 - 1) < 0.1 and nonzero.min() > 0
    # Each column's nonzeros are +-1 / sqrt(their count), both signs about equally often.
    torch.testing.assert_close(P.abs().sum(0), nonzero.sqrt())
    assert 0.4 < (P > 0).sum().item() / (P != 0).sum().item() < 0.6
    assert not torch.equal(P, SubspaceModel(model, d=50, seed=2).P.to_dense())  # the seed draws P
    assert torch.equal(P, SubspaceModel(model, d=50, seed=1).P.to_dense())


def test_subspace_model_bad_d(task):
    model = make_mlp(task.n_features, 4, task.n_classes)
    D = sum(p.numel() for p in model.parameters())
    for bad in (0, D + 1):
        with pytest.raises(ValueError, match="d must be"):
            SubspaceModel(model, d=bad)
    with pytest.raises(TypeError, match="d must be an int"):
        SubspaceModel(model, d=2.5)


def test_sweep_larger_subspace_learns_more(task):
    model = make_mlp(task.n_features, 16, task.n_classes, seed=0)
    scores = sweep_over_seeds(model, task.X_train, task.y_a_train, task.X_test, task.y_a_test, dims=[1, 200],
                              seeds=1, steps=150, lr=0.05, batch_size=64)[0]
    assert set(scores) == {1, 200}
    assert scores[200] > scores[1] + 0.1
    with pytest.raises(ValueError, match="dims is empty"):
        sweep_over_seeds(model, task.X_train, task.y_a_train, task.X_test, task.y_a_test, [], steps=1, lr=0.1)


def test_sweep_over_seeds_averages_independent_seeds(task):
    model = make_mlp(task.n_features, 8, task.n_classes, seed=0)
    data = task.X_train, task.y_b_train, task.X_test, task.y_b_test
    mean, runs = sweep_over_seeds(model, *data, dims=[2, 30], seeds=2, steps=20, lr=0.05, batch_size=32)
    assert runs[0] == sweep_over_seeds(model, *data, dims=[2, 30], seeds=1, steps=20, lr=0.05, batch_size=32)[1][0]
    assert runs[0] != runs[1]  # each seed its own P and batches
    assert mean == pytest.approx({d: (runs[0][d] + runs[1][d]) / 2 for d in (2, 30)})


def test_d90_threshold_and_find_d90():
    assert d90_threshold(0.5, 0.8) == pytest.approx(0.77)  # 90% of the gain, not 90% of 0.8
    assert d90_threshold(0.0, 0.8) == pytest.approx(0.72)
    assert d90_threshold(0.5, 0.9, fraction=0.5) == pytest.approx(0.7)
    scores = {4: 0.5, 16: 0.7, 64: 0.8, 256: 0.79}
    assert find_d90(scores, 0.7) == 16
    assert find_d90(scores, 0.75) == 64
    assert find_d90(scores, 0.5) == 4
    assert find_d90(scores, 0.9) is None


def _pair():
    pre = make_mlp(6, 8, 3, seed=0)
    ft = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ft:
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(torch.randn(m.weight.shape, generator=g))
    return pre, ft


def test_weight_deltas():
    pre, ft = _pair()
    deltas = weight_deltas(pre, ft)
    assert list(deltas) == ["0.weight", "2.weight", "4.weight"]
    for name, dW in deltas.items():
        torch.testing.assert_close(dW, ft.get_parameter(name) - pre.get_parameter(name))
        assert not dW.requires_grad
    with pytest.raises(ValueError, match="differ in names or shapes"):
        weight_deltas(pre, make_mlp(6, 8, 3)[:3])
    with pytest.raises(ValueError, match=r"\(9, 6\)"):
        weight_deltas(pre, make_mlp(6, 9, 3))


def test_with_rank_r_updates_full_rank_is_finetuned_and_zero_is_pretrained():
    pre, ft = _pair()
    deltas = weight_deltas(pre, ft)
    x = torch.randn(5, 6)
    torch.testing.assert_close(with_rank_r_updates(pre, deltas, 8)(x), ft(x))
    torch.testing.assert_close(with_rank_r_updates(pre, deltas, 0)(x), pre(x))
    m2 = with_rank_r_updates(pre, deltas, 2)
    W = m2[2].weight - pre[2].weight
    torch.testing.assert_close(W, best_rank_r(deltas["2.weight"], 2))
    assert torch.linalg.matrix_rank(W) == 2
    # The pretrained model is not modified.
    torch.testing.assert_close(pre(x), _pair()[0](x))
    with pytest.raises(ValueError, match="r must be"):
        with_rank_r_updates(pre, deltas, -1)
    with pytest.raises(TypeError, match="r must be an int"):
        with_rank_r_updates(pre, deltas, 2.0)
    with pytest.raises(ValueError, match="does not have"):
        with_rank_r_updates(pre, {"9.weight": torch.zeros(2, 2)}, 1)


def test_gain_kept():
    assert gain_kept(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert gain_kept(0.5, 0.5, 0.9) == 0.0
    with pytest.raises(ValueError, match="did not improve"):
        gain_kept(0.5, 0.6, 0.6)


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
    ui = update_rank_widget(pre, deltas, task.X_test, task.y_b_test, accuracy_finetuned=0.5, r=0, max_r=16)
    assert ui.result["accuracy"] == pytest.approx(accuracy(pre, task.X_test, task.y_b_test))
    assert ui.result["energy"] == 0.0
    ui.children[0].value = 3
    assert ui.result["r"] == 3 and 0.0 < ui.result["energy"] < 1.0
    ui.children[0].value = 16  # the widest layer's full rank
    assert ui.result["accuracy"] == pytest.approx(accuracy(ft, task.X_test, task.y_b_test))
    assert min(deltas[ui.result["layer"]].shape) == 16 and ui.result["energy"] == pytest.approx(1.0)


def test_effective_rank_checker_right_wrong_blank(verdict):
    verdict(lesson.check_effective_rank_fn(effective_rank), True)
    out = verdict(lesson.check_effective_rank_fn(stable_rank), False)
    assert "expected" in out and "Normalise" in out
    for blank in (None, ...):
        assert verdict(lesson.check_effective_rank_fn(blank), False).startswith("Not yet: fill in")

    def todo(S):
        raise NotImplementedError("your code here")

    assert "still raises NotImplementedError" in verdict(lesson.check_effective_rank_fn(todo), False)


def test_effective_rank_checker_rejects_nan_non_numbers_and_non_functions(verdict):
    verdict(lesson.check_effective_rank_fn(lambda S: float("nan")), False)
    assert "returned NoneType" in verdict(lesson.check_effective_rank_fn(lambda S: None), False)  # forgot `return`
    assert "return one number" in verdict(lesson.check_effective_rank_fn(lambda S: S), False)  # a whole tensor
    assert "function itself" in verdict(lesson.check_effective_rank_fn(2.5), False)  # called it, not passed it


# ----------------------------------------------------------------------------- where the update lies

def test_energy_in_input_directions():
    g = torch.Generator().manual_seed(0)
    inputs = torch.zeros(50, 4)
    inputs[:, :2] = torch.randn(50, 2, generator=g)  # the inputs span the first two coordinates only
    dW = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # energy 9 inside, 16 outside
    assert lesson.energy_in_input_directions(dW, inputs, 2) == pytest.approx(9 / 25)
    assert lesson.energy_in_input_directions(dW, inputs, 4) == pytest.approx(1.0)
    assert lesson.energy_in_input_directions(torch.zeros(2, 4), inputs, 1) == 1.0
    with pytest.raises(ValueError, match="share `in`"):
        lesson.energy_in_input_directions(dW, inputs[:, :3], 2)
    with pytest.raises(ValueError, match="q must be"):
        lesson.energy_in_input_directions(dW, inputs, 5)


# ----------------------------------------------------------------------------- the d90 exercise

def _sorted_search(scores, threshold):
    for d, acc in sorted(scores.items()):
        if acc >= threshold:
            return d
    return None


def _first_in_dict_order(scores, threshold):
    return next((d for d, acc in scores.items() if acc >= threshold), None)


def _numpy_int(scores, threshold):
    d = _sorted_search(scores, threshold)
    return None if d is None else np.int64(d)


@pytest.mark.parametrize("fn", [find_d90, _sorted_search, _numpy_int])
def test_find_d90_checker_accepts_right_answers(fn, capsys):
    assert lesson.check_find_d90_fn(fn)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("fn, hint", [
    (lambda s, t: min([d for d, a in s.items() if a > t], default=None), ">=, not >"),
    (_first_in_dict_order, "dict's order"),
    (lambda s, t: max([d for d, a in s.items() if a >= t], default=None), "largest d"),
    (lambda s, t: max(s, key=s.get), "best accuracy"),
    (lambda s, t: min([d for d, a in s.items() if a >= t], default=0), "return None"),
    (lambda s, t: min(d for d, a in s.items() if a >= t), "return None"),  # raises on an empty list
    (lambda s, t: s[find_d90(s, t)] if find_d90(s, t) else None, "an accuracy"),
    (lambda s, t: None if find_d90(s, t) is None else float(find_d90(s, t)), "as an int"),
    (lambda s, t: None, "reaches it"),
])
def test_find_d90_checker_explains_wrong_answers(fn, hint, capsys):
    assert not lesson.check_find_d90_fn(fn)
    out = capsys.readouterr().out
    assert out.startswith("Not yet:") and hint in out, out


def test_find_d90_checker_blank_and_not_a_function(capsys):
    def todo(scores, threshold):
        raise NotImplementedError

    for blank in (None, ...):
        assert not lesson.check_find_d90_fn(blank)
        assert capsys.readouterr().out.startswith("Not yet: fill in your function")
    assert not lesson.check_find_d90_fn(todo)
    assert capsys.readouterr().out.startswith("Not yet: fill in your function (it still raises")
    assert not lesson.check_find_d90_fn(16)
    assert "function itself" in capsys.readouterr().out


# ----------------------------------------------------------------------------- predict, then measure: a further task

DIMS = [64, 256, 1024]
SCORES = {16: 0.52, 64: 0.66, 256: 0.75, 1024: 0.81}  # first task: 0.49 -> 0.83, 90% of the gain at 0.796: d90 = 1024


@pytest.mark.parametrize("far, right", [({64: 0.50, 256: 0.70, 1024: 0.79}, "same"),  # 0.26 -> 0.82: bar 0.764
                                        ({64: 0.50, 256: 0.70, 1024: 0.75}, "higher"),  # never gets there
                                        ({64: 0.50, 256: 0.77, 1024: 0.79}, "lower")])
def test_further_task_checker_right_and_wrong(monkeypatch, verdict, far, right):
    monkeypatch.setattr(lesson, "_further_task", lambda pretrained, task, dims: (far, 0.26, 0.82))
    out = verdict(lesson.check_further_task_d90(right, None, None, SCORES, 0.49, 0.83), True)
    assert "first task B 50%, 76%, 94%" in out and "pretrained 0.260, against 0.490" in out
    assert "d90 is " + {"same": "1024", "higher": "over 1024", "lower": "256"}[right] + " here against 1024" in out
    assert ("about the same share" in out) == (right == "same")
    for wrong in {"lower", "same", "higher"} - {right}:
        out = verdict(lesson.check_further_task_d90(wrong.upper() + " ", None, None, SCORES, 0.49, 0.83), False)
        assert f"you predicted {wrong}; measured {right}" in out


def test_further_task_checker_blank_and_not_a_word(monkeypatch, verdict):
    monkeypatch.setattr(lesson, "_further_task", lambda *args: pytest.fail("measured before a prediction was made"))
    for blank in (None, ...):
        assert verdict(lesson.check_further_task_d90(blank, None, None, SCORES, 0.49, 0.83), False).startswith(
            "Not yet: fill in my_prediction")
    assert '"lower", "same" or "higher"' in verdict(lesson.check_further_task_d90(2, None, None, SCORES, 0.49, 0.83),
                                                    False)


def test_further_task_measurement_runs_the_notebook_experiment_on_a_new_task_b():
    near, far = make_task_pair(n_train=300, n_test=300, shift=0.7), make_task_pair(n_train=300, n_test=300, shift=1.4)
    assert torch.equal(near.X_train, far.X_train) and torch.equal(near.y_a_test, far.y_a_test)  # only task B moves
    assert not torch.equal(near.y_b_test, far.y_b_test)
    pre = make_mlp(far.n_features, 32, far.n_classes, seed=0)
    train_classifier(pre, far.X_train, far.y_a_train, steps=100, lr=3e-3, optimizer="adam", batch_size=64)
    mean, acc_pre, acc_ft = lesson._further_task(pre, far, [4, 400])
    assert acc_pre == accuracy(pre, far.X_test, far.y_b_test)
    assert acc_ft == accuracy(full_fine_tune(pre, far.X_train, far.y_b_train), far.X_test, far.y_b_test)
    assert mean == sweep_over_seeds(pre, far.X_train, far.y_b_train, far.X_test, far.y_b_test, dims=[4, 400])[0]
