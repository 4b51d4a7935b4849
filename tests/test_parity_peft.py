"""Parity with the reference implementation: our LoRA equals Hugging Face PEFT's.

Both are applied to the same modules of the same model; PEFT's A and B (with B made
non-zero so the update matters) are copied into ours. Outputs, trainable-parameter
counts and merged weights must agree.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lora_course import (
    add_lora,
    copy_lora_from_peft,
    copy_lora_to_peft,
    count_parameters,
    lora_layers,
    merge_lora,
    trainable_parameters_line,
)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) * self.v_proj(x))


def _paired(base, targets, r, alpha, use_rslora, fan_in_fan_out):
    ours = add_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, use_rslora=use_rslora)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, bias="none")
    theirs = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=g)  # make the update matter
    assert copy_lora_from_peft(theirs, ours) == len(lora_layers(ours))
    return ours.eval(), theirs.eval()


CASES = [
    pytest.param(tiny_gpt2, ["c_attn"], True, lambda: torch.randint(0, 128, (2, 16)), id="gpt2-c_attn"),
    pytest.param(tiny_gpt2, ["c_attn", "c_proj"], True, lambda: torch.randint(0, 128, (2, 16)),
                 id="gpt2-c_attn-c_proj"),
    pytest.param(TwoLayer, ["q_proj", "v_proj"], False, lambda: torch.randn(4, 32), id="linear-q-v"),
]


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("make_base, targets, fan_in_fan_out, make_input", CASES)
def test_outputs_counts_and_merged_weights_match_peft(make_base, targets, fan_in_fan_out, make_input, use_rslora):
    torch.manual_seed(0)
    base = make_base()
    x = make_input()
    ours, theirs = _paired(base, targets, r=4, alpha=8, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)

    assert (_out(ours, x) - _out(theirs, x)).abs().max().item() <= 1e-6
    assert (_out(ours, x) - _out(base, x)).abs().max().item() > 1e-3, "the update must matter"

    ours_trainable, ours_total = count_parameters(ours)
    theirs_trainable, theirs_total = theirs.get_nb_trainable_parameters()
    assert (ours_trainable, ours_total) == (theirs_trainable, theirs_total)

    merged_ours = merge_lora(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key in merged_ours:
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], rtol=0, atol=1e-6)


def test_trainable_parameters_line_is_peft_s(capsys):
    ours, theirs = _paired(tiny_gpt2(), ["c_attn"], r=8, alpha=16, use_rslora=False, fan_in_fan_out=True)
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == trainable_parameters_line(ours)


def test_default_initialisation_matches_peft_statistics():
    """Same A initialisation family as PEFT (Kaiming-uniform, a=sqrt(5)), B = 0 in both."""
    torch.manual_seed(0)
    ours, theirs = tiny_gpt2(), tiny_gpt2()
    add_lora(ours, ["c_attn"], r=8)
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True))
    a_ours = torch.cat([m.lora_A.flatten() for m in lora_layers(ours).values()])
    a_theirs = torch.cat([p.flatten() for n, p in theirs.named_parameters() if "lora_A" in n])
    b_theirs = torch.cat([p.flatten() for n, p in theirs.named_parameters() if "lora_B" in n])
    assert torch.count_nonzero(b_theirs) == 0
    assert a_ours.abs().max() <= a_theirs.abs().max() * 1.01
    assert a_ours.std().item() == pytest.approx(a_theirs.std().item(), rel=0.05)


def test_copy_lora_to_peft_makes_peft_compute_what_ours_computes():
    base = tiny_gpt2()
    ours = add_lora(copy.deepcopy(base), ["c_attn"], r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.normal_()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                            fan_in_fan_out=True))
    x = torch.randint(0, 128, (2, 16))
    assert (_out(ours, x) - _out(theirs, x)).abs().max() > 1e-3  # PEFT's B is still zero
    assert copy_lora_to_peft(ours, theirs) == 2
    assert (_out(ours.eval(), x) - _out(theirs.eval(), x)).abs().max().item() <= 1e-6


def test_copy_lora_refuses_mismatched_models():
    base = tiny_gpt2()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                            fan_in_fan_out=True))
    with pytest.raises(ValueError, match="use the same r"):
        copy_lora_to_peft(add_lora(copy.deepcopy(base), ["c_attn"], r=2), theirs)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        copy_lora_to_peft(add_lora(copy.deepcopy(base), ["c_fc"], r=4), theirs)
    with pytest.raises(ValueError, match="no LoRALinear"):
        copy_lora_from_peft(theirs, copy.deepcopy(base))
