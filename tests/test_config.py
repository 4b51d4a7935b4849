"""LoRAConfig: PEFT's names, validated in one place; add_lora's config form and keyword form agree."""

import copy

import pytest
import torch
from torch import nn

from lora_course import LoRAConfig, LoRALinear, add_lora, lora_layers, make_config
from lora_course.fused import add_fused_lora


def two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def test_defaults_and_derived_values():
    config = LoRAConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (8, 16, 0.0, False)
    assert config.alpha == 16 and config.dropout == 0.0 and config.scaling == 2.0
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)
    assert LoRAConfig(target_modules=["0", "2"]).target_modules == ("0", "2")  # lists become tuples
    assert LoRAConfig(target_modules=r".*\.c_attn").target_modules == r".*\.c_attn"  # a regex stays a string


def test_config_form_and_keyword_form_build_the_same_model():
    a = add_lora(two_layer(), LoRAConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    b = add_lora(two_layer(), ["0", "2"], r=4, alpha=8)
    c = add_lora(two_layer(), target_modules=["0", "2"], r=4, lora_alpha=8)
    for other in (b, c):
        assert lora_layers(a).keys() == lora_layers(other).keys()
        for name, layer in lora_layers(a).items():
            twin = lora_layers(other)[name]
            assert layer.config == twin.config and torch.equal(layer.lora_A, twin.lora_A)
    x = torch.randn(3, 16)
    assert torch.equal(a(x), b(x))


def test_keywords_replace_config_fields():
    base = LoRAConfig(r=4, lora_alpha=8, target_modules=["0"])
    model = add_lora(two_layer(), base, r=2)
    assert lora_layers(model)["0"].r == 2 and lora_layers(model)["0"].alpha == 8
    assert make_config(base, alpha=1).lora_alpha == 1 and base.lora_alpha == 8  # frozen: a copy, not a change


@pytest.mark.parametrize("settings, error, match", [
    (dict(r=0), ValueError, "at least 1"),
    (dict(r=2.0), TypeError, "r must be an int"),
    (dict(r=True), TypeError, "r must be an int"),
    (dict(lora_alpha=0), ValueError, "positive"),
    (dict(lora_alpha=float("nan")), ValueError, "positive"),
    (dict(lora_alpha=True), ValueError, "positive"),
    (dict(lora_dropout=1.0), ValueError, r"\[0, 1\)"),
    (dict(lora_dropout=-0.1), ValueError, r"\[0, 1\)"),
    (dict(use_rslora="yes"), TypeError, "True or False"),
    (dict(init_lora_weights="pizza"), ValueError, "init_lora_weights"),
    (dict(init_lora_weights=1), ValueError, "init_lora_weights"),
    (dict(target_modules=[]), ValueError, "empty"),
    (dict(target_modules=[3]), TypeError, "strings"),
])
def test_bad_settings_are_refused_with_a_fix(settings, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(**settings)


def test_make_config_names_unknown_and_doubled_settings():
    with pytest.raises(TypeError, match="unknown LoRA setting"):
        make_config(rank=8)
    with pytest.raises(TypeError, match="not both"):
        make_config(alpha=8, lora_alpha=8)
    with pytest.raises(TypeError, match="LoRAConfig"):
        make_config({"r": 8})
    with pytest.raises(TypeError, match="twice"):
        add_lora(two_layer(), ["0"], target_modules=["2"])
    with pytest.raises(ValueError, match="name target_modules"):
        add_lora(two_layer(), r=4)


def test_init_lora_weights_choices():
    torch.manual_seed(0)
    default = LoRALinear(64, 32, r=4)
    bound = 1 / 64 ** 0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert default.lora_A.abs().max() <= bound and torch.count_nonzero(default.lora_B) == 0
    gaussian = LoRALinear(4096, 32, r=4, init_lora_weights="gaussian")
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05) and torch.count_nonzero(gaussian.lora_B) == 0
    noisy = LoRALinear(64, 32, r=4, init_lora_weights=False)
    x = torch.randn(5, 64)
    assert torch.count_nonzero(noisy.lora_B) > 0 and not torch.allclose(noisy(x), noisy.base_layer(x))


def test_use_dora_is_refused_by_the_plain_layer():
    with pytest.raises(NotImplementedError, match="DoRA"):
        LoRALinear(8, 8, r=2, use_dora=True)


def test_fused_layer_takes_the_same_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    config = LoRAConfig(r=2, lora_alpha=4)
    fused = add_fused_lora(copy.deepcopy(gpt2), config)  # target_modules defaults to c_attn
    (name, layer), = lora_layers(fused).items()
    assert name.endswith("attn.c_attn") and layer.scaling == 2.0
    assert layer.lora_A.shape == (2 * 2, 32) and layer.lora_B.shape == (2 * 32, 2)  # allocated at their final shape
