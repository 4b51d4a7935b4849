"""DoRA (lora_course.dora) against PEFT's `use_dora=True` on a small GPT-2 and on nn.Linear."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lora_course import add_lora, copy_lora_from_peft, count_parameters, load_adapter, merge_lora, save_adapter
from lora_course.adapters import AdapterError
from lora_course.dora import DoRALinear, dora_layers
from lora_course.lora import LoRALinear
from lora_course.models import toy_gpt2

TARGETS = [["c_attn"], ["c_attn", "c_proj", "c_fc"]]


def _tokens(seed=0):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _pair(targets, r=4, alpha=8):
    base = toy_gpt2()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                             use_dora=True, fan_in_fan_out=True))
    ours = add_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, use_dora=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=g)  # make the update (and the norm) matter
    copy_lora_from_peft(theirs, ours)
    return base, ours.eval(), theirs.eval()


def test_magnitude_starts_at_the_row_norms_of_w0_on_conv1d_and_linear():
    base = toy_gpt2()
    ours = add_lora(copy.deepcopy(base), ["c_attn"], r=4, use_dora=True)
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, DoRALinear)
    W0 = base.transformer.h[0].attn.c_attn.weight.T  # Conv1D stores (in, out)
    assert torch.allclose(layer.lora_magnitude_vector, W0.norm(dim=1))
    linear = nn.Linear(16, 8)
    dora = LoRALinear.from_linear(linear, r=2, use_dora=True)
    assert isinstance(dora, DoRALinear)
    assert torch.allclose(dora.lora_magnitude_vector, linear.weight.norm(dim=1))
    x = torch.randn(3, 16)
    assert torch.allclose(dora(x), linear(x), atol=1e-6)  # B = 0: the layer starts at W0


@pytest.mark.parametrize("targets", TARGETS, ids=["c_attn", "attn+mlp"])
def test_outputs_counts_and_gradients_equal_peft(targets):
    _, ours, theirs = _pair(targets)
    x = _tokens()
    assert (ours(x).logits - theirs(x).logits).abs().max().item() <= 1e-5
    assert count_parameters(ours) == count_parameters(theirs)
    ours.train()
    theirs.train()
    ours(x, labels=x).loss.backward()
    theirs(x, labels=x).loss.backward()
    for name, layer in dora_layers(ours).items():
        ref = theirs.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_magnitude_vector.grad, ref.lora_magnitude_vector["default"].weight.grad,
                              atol=1e-6)
        assert torch.allclose(layer.lora_B.grad, ref.lora_B["default"].weight.grad, atol=1e-6)
        assert torch.allclose(layer.lora_A.grad, ref.lora_A["default"].weight.grad, atol=1e-6)


def test_norm_is_detached_in_backward():
    layer = DoRALinear(6, 4, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_magnitude_vector.requires_grad_(False)
    x = torch.randn(5, 6)
    layer(x).sum().backward()
    # With n a constant, d/dB of sum((m/n) * s B A x) is (m/n) s (sum_x A x)^T exactly.
    scale = layer.lora_magnitude_vector / layer.weight_norm()
    expected = (scale[:, None] * layer.scaling) * (layer.lora_A @ x.T).sum(dim=1)[None, :]
    assert torch.allclose(layer.lora_B.grad, expected, atol=1e-5)


def test_merge_and_unmerge_are_exact():
    base, ours, _ = _pair(["c_attn", "c_fc"])
    x = _tokens()
    before = ours(x).logits
    for layer in dora_layers(ours).values():
        layer.merge()
    assert (ours(x).logits - before).abs().max().item() <= 1e-5
    for layer in dora_layers(ours).values():
        layer.unmerge()
    assert torch.allclose(ours.transformer.h[1].mlp.c_fc.base_layer.weight, base.transformer.h[1].mlp.c_fc.weight,
                          atol=1e-6)
    assert (ours(x).logits - before).abs().max().item() <= 1e-5
    merged = merge_lora(copy.deepcopy(ours))
    assert not dora_layers(merged) and (merged(x).logits - before).abs().max().item() <= 1e-5
    layer = next(iter(dora_layers(ours).values()))
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_adapter_files_load_both_ways(tmp_path):
    base, ours, theirs = _pair(["c_attn", "c_proj"])
    x = _tokens()
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert (peft_loaded(x).logits - ours(x).logits).abs().max().item() <= 1e-5
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    assert len(dora_layers(ours_loaded)) == len(dora_layers(ours))
    assert (ours_loaded(x).logits - theirs(x).logits).abs().max().item() <= 1e-5
    assert count_parameters(ours_loaded) == count_parameters(theirs)


def test_dora_file_into_a_plain_lora_model_is_refused_and_changes_nothing(tmp_path):
    base, ours, _ = _pair(["c_attn"])
    save_adapter(ours, tmp_path / "dora")
    plain = add_lora(copy.deepcopy(base), ["c_attn"], r=4, alpha=8)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(plain, tmp_path / "dora")
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_bad_settings_are_refused():
    with pytest.raises(NotImplementedError, match="DoRALinear"):
        LoRALinear(8, 8, r=2, use_dora=True)
    with pytest.raises(ValueError, match="exceeds"):
        DoRALinear(8, 4, r=5)


def test_a_model_mixing_dora_and_plain_layers_cannot_be_one_peft_config(tmp_path):
    model = add_lora(toy_gpt2(), ["c_attn"], r=2, use_dora=True)
    add_lora(model, ["c_fc"], r=2)
    assert len(dora_layers(model)) == 2 and all(p.requires_grad for n, p in model.named_parameters()
                                                if "lora_magnitude" in n)  # adding more LoRA keeps m trainable
    with pytest.raises(AdapterError, match="use_dora"):
        save_adapter(model, tmp_path / "mixed")
