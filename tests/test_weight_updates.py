"""weight_updates.py: dW per layer, its spectrum vs a random baseline, rank-r truncation."""

import copy

import pytest
import torch

from lora_course.lowrank import best_rank_r
from lora_course.toy_tasks import make_mlp
from lora_course.weight_updates import gain_kept, update_spectrum, weight_deltas, with_rank_r_updates


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
    with pytest.raises(ValueError, match="different linear layers"):
        weight_deltas(pre, make_mlp(6, 8, 3)[:3])
    with pytest.raises(ValueError, match="shape"):
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
    with pytest.raises(ValueError, match="does not have"):
        with_rank_r_updates(pre, {"9.weight": torch.zeros(2, 2)}, 1)


def test_update_spectrum_low_rank_vs_random():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)  # rank 2
    s = update_spectrum(dW, r=2, generator=g)
    assert s.shape == (40, 30) and s.max_rank == 30
    assert s.energy_top_r == pytest.approx(1.0)
    assert s.energy_top_r_random < 0.5
    assert s.effective_rank <= 2.0 + 1e-6 < s.effective_rank_random
    assert s.stable_rank <= 2.0 + 1e-6 < s.stable_rank_random
    torch.testing.assert_close(s.S_random.square().sum(), s.S.square().sum())  # same norm


def test_gain_kept():
    assert gain_kept(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert gain_kept(0.5, 0.5, 0.9) == 0.0
    with pytest.raises(ValueError, match="did not improve"):
        gain_kept(0.5, 0.6, 0.6)
