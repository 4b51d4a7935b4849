"""layers.py: one place that knows both linear layouts, and model surgery by name."""

import pytest
import torch
from torch import nn

from lora_course.layers import Conv1D, is_adaptable, is_conv1d, linear_features, replace_module, transpose


def test_linear_features_for_both_layouts():
    assert linear_features(nn.Linear(5, 3)) == (5, 3)
    conv = Conv1D(3, 5)  # transformers' Conv1D(nf=out, nx=in): weight (in, out)
    assert conv.weight.shape == (5, 3) and linear_features(conv) == (5, 3)
    assert is_conv1d(conv) and not is_conv1d(nn.Linear(5, 3))
    assert is_adaptable(conv) and is_adaptable(nn.Linear(2, 2)) and not is_adaptable(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="LoRA here wraps linear layers"):
        linear_features(nn.Embedding(4, 4))


def test_transpose_gives_out_by_in_for_either_layout():
    torch.manual_seed(0)
    conv, linear = Conv1D(3, 5), nn.Linear(5, 3)
    x = torch.randn(2, 5)
    for layer, fan_in_fan_out in ((conv, True), (linear, False)):
        W = transpose(layer.weight, fan_in_fan_out)  # (out, in)
        assert W.shape == (3, 5)
        torch.testing.assert_close(layer(x), x @ W.T + layer.bias)


def test_replace_module_by_dotted_name():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    new = nn.Linear(2, 2)
    replace_module(model, "1.0", new)
    assert model[1][0] is new
    replace_module(model, "0", nn.Identity())
    assert isinstance(model[0], nn.Identity)
    with pytest.raises(AttributeError):
        replace_module(model, "nope.0", new)
