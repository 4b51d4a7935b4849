"""Tests for lora_course.measure.optimizer_state_bytes: optimizer memory, measured from its state."""

import pytest
import torch
from torch import nn

from lora_course.measure import optimizer_state_bytes


def _step(opt, params):
    opt.zero_grad()
    sum(p.square().sum() for p in params).backward()
    opt.step()


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(6, 5, dtype=dtype)), nn.Parameter(torch.randn(7, dtype=dtype))]  # 37 numbers


@pytest.mark.parametrize("fused", [False, True])
def test_adam_keeps_two_moments_per_parameter_plus_a_step_counter(fused):
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-3, fused=fused)
    assert optimizer_state_bytes(opt) == 0  # state is created lazily, at the first step
    _step(opt, params)
    step_bytes = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert optimizer_state_bytes(opt) == 2 * 4 * 37 + step_bytes
    assert step_bytes <= 2 * 8  # one scalar counter per parameter tensor
    _step(opt, params)
    assert optimizer_state_bytes(opt) == 2 * 4 * 37 + step_bytes  # does not grow with steps


def test_bytes_follow_the_state_dtype_and_frozen_parameters_cost_nothing():
    params = _params(torch.float64)
    frozen = nn.Parameter(torch.randn(100, dtype=torch.float64), requires_grad=False)
    opt = torch.optim.SGD(params + [frozen], lr=0.1, momentum=0.9)
    _step(opt, params)
    assert optimizer_state_bytes(opt) == 8 * 37  # one float64 momentum buffer per trainable number


def test_plain_sgd_keeps_nothing():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    _step(opt, params)
    assert optimizer_state_bytes(opt) == 0


def test_non_optimizer_is_refused():
    with pytest.raises(TypeError, match="Optimizer"):
        optimizer_state_bytes(nn.Linear(2, 2))
