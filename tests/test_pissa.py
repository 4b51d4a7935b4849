"""PiSSA (lora_course.pissa) against PEFT's `init_lora_weights="pissa"`, and the PiSSA-to-LoRA conversion."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lora_course import add_lora, count_parameters, load_adapter, lora_layers, save_adapter
from lora_course.adapters import AdapterError
from lora_course.lora import LoRALinear
from lora_course.lowrank import best_rank_r
from lora_course.models import toy_gpt2
from lora_course.pissa import pissa_factors, pissa_initial_state, pissa_to_lora_state, save_pissa_as_lora

TARGETS = ["c_attn", "c_fc"]


def _tokens(seed=0):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _pair(r=4, alpha=8, targets=TARGETS):
    base = toy_gpt2()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                             init_lora_weights="pissa", fan_in_fan_out=True))
    ours = add_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, init_lora_weights="pissa")
    return base, ours.eval(), theirs.eval()


def _nudge(model, seed=3):
    """Stand-in for training: move every adapter a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_factors_are_the_best_rank_r_part_and_the_layer_starts_at_w0():
    W = torch.randn(12, 20)
    A, B = pissa_factors(W, r=3, scaling=2.0)
    assert A.shape == (3, 20) and B.shape == (12, 3)
    assert torch.allclose(2.0 * B @ A, best_rank_r(W, 3), atol=1e-5)
    linear = nn.Linear(20, 12)
    layer = LoRALinear.from_linear(linear, r=3, alpha=6, init_lora_weights="pissa")
    x = torch.randn(4, 20)
    assert torch.allclose(layer(x), linear(x), atol=1e-5)
    assert torch.count_nonzero(layer.lora_B) > 0
    assert not torch.equal(layer.base_layer.weight, linear.weight)  # the residual is a new tensor ...
    assert torch.allclose(layer.base_layer.weight, linear.weight - best_rank_r(linear.weight, 3), atol=1e-5)


def test_init_residual_outputs_and_counts_equal_peft():
    base, ours, theirs = _pair()
    x = _tokens()
    for name, layer in lora_layers(ours).items():
        ref = theirs.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_A, ref.lora_A["default"].weight, atol=1e-5)
        assert torch.allclose(layer.lora_B, ref.lora_B["default"].weight, atol=1e-5)
        assert torch.allclose(layer.base_layer.weight, ref.base_layer.weight, atol=1e-5)
    assert (ours(x).logits - theirs(x).logits).abs().max().item() <= 1e-5
    assert (ours(x).logits - base(x).logits).abs().max().item() <= 1e-5  # step 0 computes W0
    assert count_parameters(ours) == count_parameters(theirs)


def test_original_layer_keeps_w0():
    base = toy_gpt2()
    original = base.transformer.h[0].attn.c_attn
    W0 = original.weight.detach().clone()
    add_lora(base, ["c_attn"], r=4, init_lora_weights="pissa")
    layer = base.transformer.h[0].attn.c_attn
    assert layer.base_layer is not original and torch.equal(original.weight, W0)  # the residual lives in a copy
    assert not torch.allclose(layer.base_layer.weight, W0)


def test_adapter_files_load_both_ways(tmp_path):
    base, ours, theirs = _pair()
    _nudge(ours)
    with torch.no_grad():  # give PEFT the same trained adapter
        for name, layer in lora_layers(ours).items():
            ref = theirs.base_model.model.get_submodule(name)
            ref.lora_A["default"].weight.copy_(layer.lora_A)
            ref.lora_B["default"].weight.copy_(layer.lora_B)
    x = _tokens()
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert (peft_loaded(x).logits - ours(x).logits).abs().max().item() <= 1e-5
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()  # redoes the SVD on W0
    assert (ours_loaded(x).logits - theirs(x).logits).abs().max().item() <= 1e-5


def test_conversion_to_a_rank_2r_lora_equals_peft_and_runs_on_the_original_base(tmp_path):
    base, ours, theirs = _pair()
    initial = pissa_initial_state(ours)
    theirs.save_pretrained(str(tmp_path / "init"))  # PEFT's way: keep the untrained adapter on disk
    _nudge(ours)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            ref = theirs.base_model.model.get_submodule(name)
            ref.lora_A["default"].weight.copy_(layer.lora_A)
            ref.lora_B["default"].weight.copy_(layer.lora_B)
    x = _tokens()
    trained = ours(x).logits
    save_pissa_as_lora(ours, tmp_path / "ours", initial)
    theirs.save_pretrained(str(tmp_path / "theirs"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert (ours_cfg["r"], ours_cfg["lora_alpha"], ours_cfg["init_lora_weights"]) == (8, 16, True)
    assert (peft_cfg["r"], peft_cfg["lora_alpha"], peft_cfg["init_lora_weights"]) == (8, 16, True)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    on_w0 = load_adapter(copy.deepcopy(base), tmp_path / "ours").eval()  # a plain LoRA on the untouched W0
    assert lora_layers(on_w0)["transformer.h.0.attn.c_attn"].r == 8
    assert (on_w0(x).logits - trained).abs().max().item() <= 1e-5
    peft_on_w0 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert (peft_on_w0(x).logits - trained).abs().max().item() <= 1e-5


def test_rank_larger_than_the_layer_is_refused_and_the_model_is_unchanged():
    base = toy_gpt2()  # n_embd 64: c_attn is 64 -> 192, so r = 65 cannot exist
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="r=65"):
        add_lora(base, ["c_attn", "c_fc"], r=65, init_lora_weights="pissa")
    assert not lora_layers(base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match=r"PiSSA needs r <= min\(out, in\) = 4"):
        pissa_factors(torch.randn(4, 9), r=5, scaling=1.0)


def test_conversion_errors():
    base = toy_gpt2()
    plain = add_lora(copy.deepcopy(base), ["c_attn"], r=2)
    with pytest.raises(ValueError, match="no PiSSA layers"):
        pissa_initial_state(plain)
    pissa = add_lora(copy.deepcopy(base), ["c_attn"], r=2, init_lora_weights="pissa")
    with pytest.raises(AdapterError, match="initial"):
        pissa_to_lora_state(pissa, {})
    with pytest.raises(TypeError, match="slices"):
        from lora_course.fused import add_fused_lora

        add_fused_lora(copy.deepcopy(base), r=2, init_lora_weights="pissa")


def test_adapters_whose_init_changes_the_base_otherwise_are_refused(tmp_path):
    base = toy_gpt2()
    folder = save_adapter(add_lora(copy.deepcopy(base), ["c_attn"], r=2), tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "olora"}))
    model = copy.deepcopy(base)
    with pytest.raises(AdapterError, match="init_lora_weights='olora'"):
        load_adapter(model, folder)
    assert not lora_layers(model)
