"""Notebook 10's lesson module: its analysis functions and every checker on blank, right and wrong answers."""

import torch

from lora_course.lessons.common import Problem, verdict
from lora_course.lessons.l10_adapter_algebra import (
    check_cat,
    check_dare,
    check_density_prediction,
    check_intruders,
    check_ties,
    intruders,
    reference_ties,
    similarity,
)
from lora_course.merging import trim


def _blank(*args):
    raise NotImplementedError


def test_intruders_counts_new_directions_only():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(10, 6, generator=g)
    u = torch.linalg.svd(W0, full_matrices=True)[0][:, -1:]  # outside W0's column space
    assert intruders(W0, 2 * W0, 3) == 0
    assert intruders(W0, W0 + 50 * u @ torch.ones(1, 6), 3) == 1
    assert similarity(W0, W0, 3).shape == (3, 6)


def test_check_ties(capsys):
    assert not verdict(check_ties, _blank)
    assert "fill in your ties" in capsys.readouterr().out
    assert verdict(check_ties, reference_ties)

    def summed(tvs, ws, d):  # forgets the sign election and the mean
        return sum(w * trim(t, d) for t, w in zip(tvs, ws))

    assert not verdict(check_ties, summed)
    assert "average only the entries that agree" in capsys.readouterr().out
    assert not verdict(check_ties, lambda tvs, ws, d: reference_ties(tvs, ws, 1.0))  # no trim


def test_check_cat(capsys):
    assert not check_cat(...)
    assert not check_cat(_blank)

    def right(A1, B1, s1, A2, B2, s2, w1, w2):
        return torch.cat([w1 * s1 * A1, w2 * s2 * A2]), torch.cat([B1, B2], dim=1)

    def both_scaled(A1, B1, s1, A2, B2, s2, w1, w2):  # the scale on A and on B: squared
        return torch.cat([w1 * s1 * A1, w2 * s2 * A2]), torch.cat([w1 * s1 * B1, w2 * s2 * B2], dim=1)

    assert check_cat(right)
    assert not check_cat(both_scaled)
    assert "once" in capsys.readouterr().out
    assert not check_cat(lambda *a: (a[0], a[1]))  # rank r1 only


def test_check_dare(capsys):
    assert not check_dare(...)
    assert not check_dare(_blank)

    def right(t, density, g):
        return t * torch.bernoulli(torch.full_like(t, density), generator=g) / density

    assert check_dare(right)
    assert not check_dare(lambda t, d, g: t * torch.bernoulli(torch.full_like(t, d), generator=g))  # no rescale
    assert "divided by the density" in capsys.readouterr().out
    assert not check_dare(lambda t, d, g: t * torch.bernoulli(torch.full_like(t, 1 - d), generator=g) / d)


def test_check_intruders():
    assert not check_intruders(...)
    assert not check_intruders(_blank)
    assert check_intruders(intruders)
    assert not check_intruders(lambda W0, W, k, th: 0)
    assert not check_intruders(lambda W0, W, k, th: k - intruders(W0, W, k, th))  # counts the familiar ones


def test_check_density_prediction(capsys):
    assert not check_density_prediction(..., 2.0, 1.0)
    assert check_density_prediction("higher", 2.0, 1.0)
    assert "as you predicted" in capsys.readouterr().out
    assert not check_density_prediction("lower", 2.0, 1.0)
    assert check_density_prediction("lower", 0.9, 1.0)
    assert not check_density_prediction("more", 2.0, 1.0)


def test_check_ties_raises_problem_for_wrong_shape():
    try:
        check_ties(lambda tvs, ws, d: torch.zeros(2))
    except Problem as problem:
        assert "shaped like a task vector" in str(problem)
    else:
        raise AssertionError("a wrong shape must be refused")
