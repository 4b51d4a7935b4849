"""Unit tests for lora_course.lora: the from-scratch LoRALinear and the model surgery."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_course import (
    LoRALinear,
    add_lora,
    count_parameters,
    lora_layers,
    merge_lora,
    print_trainable_parameters,
    trainable_parameters_line,
    update_norm,
)


def _nonzero_B(layer: LoRALinear, seed: int = 1) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return layer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.down = nn.Linear(32, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.down(self.act(self.up(x))))


# --- the layer ---------------------------------------------------------------------


def test_shapes_and_initialisation():
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, r=4, alpha=8)
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (32, 4)
    assert layer.W0.shape == (32, 64)
    assert torch.count_nonzero(layer.lora_B) == 0, "B must start at zero so B A = 0"
    # A: PEFT's default, nn.Linear's Kaiming-uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(64)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_step_zero_output_equals_base_exactly():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4, alpha=8)
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_only_lora_B_gets_a_gradient_at_step_zero():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4, alpha=8)
    layer(torch.randn(8, 32)).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    # dL/dA = scaling * B^T (dL/dh) x^T = 0 because B = 0; dL/dB = scaling * (dL/dh) (A x)^T != 0
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_and_forward_formula(use_rslora, expected):
    torch.manual_seed(0)
    layer = _nonzero_B(LoRALinear(24, 12, r=4, alpha=16, use_rslora=use_rslora))
    assert layer.scaling == pytest.approx(expected)
    x = torch.randn(5, 24)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    manual = x @ W0.T + b + expected * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), expected * layer.lora_B @ layer.lora_A)


def test_dropout_acts_on_the_lora_branch_only():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(64, 32)
    # B = 0: whatever dropout does to the branch input, the base path is untouched.
    assert torch.equal(layer(x), layer.base_layer(x))
    _nonzero_B(layer)
    assert not torch.equal(layer(x), layer(x)), "train-mode dropout should vary"
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_merge_unmerge_roundtrip_and_errors():
    torch.manual_seed(0)
    layer = _nonzero_B(LoRALinear(32, 16, r=4, alpha=8, dropout=0.1)).eval()
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 32)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, W0 + layer.delta_weight())
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_linear_shares_the_pretrained_weight(kind):
    torch.manual_seed(0)
    base = nn.Linear(20, 12) if kind == "linear" else Conv1D(12, 20)  # Conv1D(nf=out, nx=in)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.1)
    x = torch.randn(3, 20)
    y0 = base(x)
    lora = LoRALinear.from_linear(base, r=2, alpha=4)
    assert lora.base_layer is base and lora.base_layer.weight.data_ptr() == base.weight.data_ptr()
    assert (lora.in_features, lora.out_features) == (20, 12)
    assert lora.fan_in_fan_out == (kind == "conv1d")
    assert not base.weight.requires_grad
    assert torch.equal(lora(x), y0)
    _nonzero_B(lora).eval()
    out = lora(x)
    torch.testing.assert_close(out, y0 + x @ lora.delta_weight().T, rtol=1e-5, atol=1e-5)
    lora.merge()
    torch.testing.assert_close(lora(x), out, rtol=1e-5, atol=1e-5)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(r=0), ValueError, "at least 1"),
        (dict(r=-3), ValueError, "at least 1"),
        (dict(r=17), ValueError, "exceeds min"),
        (dict(r=2.5), TypeError, "must be an int"),
        (dict(alpha=0), ValueError, "positive"),
        (dict(alpha=-1.0), ValueError, "positive"),
        (dict(alpha=float("nan")), ValueError, "positive"),
        (dict(dropout=1.0), ValueError, r"\[0, 1\)"),
        (dict(dropout=-0.1), ValueError, r"\[0, 1\)"),
    ],
)
def test_bad_hyperparameters_raise_with_a_fix(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear(32, 16, **kwargs)
    with pytest.raises(exc, match=match):
        LoRALinear.from_linear(nn.Linear(32, 16), **kwargs)


def test_from_linear_rejects_layers_it_cannot_wrap():
    with pytest.raises(TypeError, match="LoRA here wraps linear layers"):
        LoRALinear.from_linear(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="already carries LoRA"):
        LoRALinear.from_linear(LoRALinear(8, 8, r=2))


# --- add_lora / merge_lora / counting --------------------------------------------------


def test_add_lora_matches_by_suffix_and_freezes_everything_else():
    torch.manual_seed(0)
    model = add_lora(MLP(), ["up"], r=2, alpha=4)
    assert isinstance(model.up, LoRALinear) and isinstance(model.down, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.lora_A", "up.lora_B"}
    assert count_parameters(model) == (2 * 16 + 32 * 2, sum(p.numel() for p in model.parameters()))


def test_add_lora_regex_and_full_name():
    assert set(lora_layers(add_lora(MLP(), r"(up|down)", r=2))) == {"up", "down"}
    assert set(lora_layers(add_lora(MLP(), ["down"], r=2))) == {"down"}
    assert set(lora_layers(add_lora(MLP(), "u.", r=2))) == {"up"}


def test_add_lora_no_match_lists_what_the_learner_could_have_meant():
    with pytest.raises(ValueError, match=r"Did you mean \['up'\]") as err:
        add_lora(MLP(), ["upp"])
    assert "down" in str(err.value) and "up" in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        add_lora(MLP(), [])


def test_add_lora_rejects_non_linear_targets_and_double_adapters():
    with pytest.raises(TypeError, match="LayerNorm"):
        add_lora(MLP(), ["norm"])
    model = add_lora(MLP(), ["up"], r=2)
    with pytest.raises(ValueError, match="already carries LoRA"):
        add_lora(model, ["up"], r=2)


def test_merge_lora_restores_plain_layers_with_the_same_outputs():
    torch.manual_seed(0)
    model = add_lora(MLP(), ["up", "down"], r=2, alpha=4).eval()
    for layer in lora_layers(model).values():
        _nonzero_B(layer)
    x = torch.randn(5, 16)
    y = model(x)
    merged = merge_lora(model)
    assert type(merged.up) is nn.Linear and type(merged.down) is nn.Linear
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRALinear"):
        merge_lora(merged)


def test_update_norm_is_zero_at_init_then_the_norm_of_every_scaled_update_together():
    torch.manual_seed(0)
    model = add_lora(MLP(), ["up", "down"], r=2, alpha=4)
    assert update_norm(model) == 0.0  # B starts at zero
    layers = list(lora_layers(model).values())
    for layer in layers:
        _nonzero_B(layer)
    # the merged weight minus the base weight, layer by layer: Delta W as the model applies it
    deltas = [layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach() for layer in layers]
    expected = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
    assert update_norm(model) == pytest.approx(expected, rel=1e-6)
    layers[0].scaling *= 2  # the scaling counts: rsLoRA's larger factor is a larger update
    assert update_norm(model) > expected
    with pytest.raises(ValueError, match="no LoRALinear"):
        update_norm(MLP())


def test_print_trainable_parameters_format(capsys):
    model = add_lora(MLP(), ["up"], r=2)
    print_trainable_parameters(model)
    trainable, total = count_parameters(model)
    share = 100 * trainable / total
    expected = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
    assert capsys.readouterr().out.strip() == expected == trainable_parameters_line(model)


def test_card_layer_count_4096_r8():
    """The card's example: 4096 x 4096 at r = 8 trains 65,536 of 16.8M weights."""
    with torch.device("meta"):
        layer = LoRALinear(4096, 4096, r=8, alpha=16, bias=False)
    trainable, total = count_parameters(layer)
    assert trainable == (4096 + 4096) * 8 == 65_536
    assert total - trainable == 4096 * 4096 == 16_777_216


def test_add_lora_with_bad_hyperparameters_leaves_the_model_untouched():
    model = MLP()
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="exceeds min"):
        add_lora(model, ["up", "down"], r=12)  # fine for up (16 -> 32), too large for down (32 -> 8)
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]


def test_a_second_add_lora_keeps_the_first_adapter_trainable():
    model = add_lora(MLP(), ["up"], r=2)
    add_lora(model, ["down"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"}
