"""intrinsic.py (random-subspace training, d90) and the generated task pair it trains on."""

import pytest
import torch

from lora_course.intrinsic import SubspaceModel, d90_threshold, find_d90, intrinsic_dimension_sweep
from lora_course.toy_tasks import accuracy, make_mlp, make_task_pair, train_classifier


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


def test_subspace_model_starts_at_theta0_and_only_z_trains(task):
    model = make_mlp(task.n_features, 16, task.n_classes, seed=0)
    D = sum(p.numel() for p in model.parameters())
    sub = SubspaceModel(model, d=7, seed=0)
    assert sub.D == D and sub.d == 7 and sub.P.shape == (D, 7)
    torch.testing.assert_close(sub.P.norm(dim=0), torch.ones(7))
    torch.testing.assert_close(sub(task.X_test), model(task.X_test))  # z = 0: same function
    assert [name for name, p in sub.named_parameters() if p.requires_grad] == ["z"]
    train_classifier(sub, task.X_train, task.y_b_train, steps=20, lr=0.1, optimizer="adam", batch_size=64)
    assert sub.z.abs().sum() > 0
    # theta moved only inside the span of P: theta - theta0 = P z exactly.
    torch.testing.assert_close(sub.theta() - sub.theta0, sub.P @ sub.z)
    # The materialised plain model computes the same function; the original is untouched.
    plain = sub.materialize()
    torch.testing.assert_close(plain(task.X_test), sub(task.X_test))
    torch.testing.assert_close(model(task.X_test), SubspaceModel(model, d=3)(task.X_test))


def test_subspace_model_bad_d(task):
    model = make_mlp(task.n_features, 4, task.n_classes)
    D = sum(p.numel() for p in model.parameters())
    for bad in (0, D + 1, 2.5):
        with pytest.raises(ValueError, match="d must be an int"):
            SubspaceModel(model, d=bad)


def test_sweep_larger_subspace_learns_more(task):
    model = make_mlp(task.n_features, 16, task.n_classes, seed=0)
    scores = intrinsic_dimension_sweep(model, task.X_train, task.y_a_train, task.X_test, task.y_a_test,
                                       dims=[1, 200], steps=150, lr=0.05, batch_size=64)
    assert set(scores) == {1, 200}
    assert scores[200] > scores[1] + 0.1
    with pytest.raises(ValueError, match="dims is empty"):
        intrinsic_dimension_sweep(model, task.X_train, task.y_a_train, task.X_test, task.y_a_test, [], 1, 0.1)


def test_d90_threshold_and_find_d90():
    assert d90_threshold(0.8) == pytest.approx(0.72)
    assert d90_threshold(0.8, baseline=0.5) == pytest.approx(0.77)
    with pytest.raises(ValueError, match="fraction"):
        d90_threshold(0.8, fraction=0.0)
    scores = {4: 0.5, 16: 0.7, 64: 0.8, 256: 0.79}
    assert find_d90(scores, 0.7) == 16
    assert find_d90(scores, 0.75) == 64
    assert find_d90(scores, 0.5) == 4
    assert find_d90(scores, 0.9) is None
