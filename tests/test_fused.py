"""FusedLoRALinear (q, v of GPT-2's c_attn, k untouched) and meta-device parameter accounting."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_course.fused import FusedLoRALinear, add_fused_lora  # noqa: E402
from lora_course.lora import (  # noqa: E402
    LoRALinear,
    add_lora,
    count_parameters,
    matches_target,  # noqa: E402
    merge_lora,
    trainable_parameters_line,
)
from lora_course.models import toy_gpt2, toy_gpt2_config  # noqa: E402
from lora_course.skeletons import gpt2_config, llama_7b_config, meta_gpt2, meta_llama_7b, meta_lora_counts, meta_model  # noqa: E402


def conv1d(d=16, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    layer = Conv1D(3 * d, d)
    torch.nn.init.normal_(layer.weight)
    return layer


def test_k_slice_is_exactly_zero_even_after_training():
    layer = FusedLoRALinear.from_linear(conv1d(), r=2, alpha=4)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-3)
    x = torch.randn(8, 16)
    for _ in range(5):
        loss = layer(x).pow(2).sum()  # a loss that would like to move k too
        opt.zero_grad()
        loss.backward()
        opt.step()
    delta = layer.delta_weight()  # (48, 16)
    assert torch.count_nonzero(delta[16:32]) == 0
    assert torch.count_nonzero(delta[:16]) > 0 and torch.count_nonzero(delta[32:]) > 0
    # The forward pass adds the same update as delta_weight (Conv1D stores (in, out)).
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.W0 + delta).T + layer.base_layer.bias, atol=1e-4, rtol=1e-5)


def test_merge_and_unmerge_round_trip():
    layer = FusedLoRALinear.from_linear(conv1d(), r=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    w0 = layer.base_layer.weight.clone()
    before = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    assert torch.equal(layer.base_layer.weight[:, 16:32], w0[:, 16:32])  # k columns of Conv1D weight untouched
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_bad_enable_lora():
    with pytest.raises(ValueError, match="enables no slice"):
        FusedLoRALinear.from_linear(conv1d(), enable_lora=(False, False, False))
    with pytest.raises(ValueError, match="equal slices"):
        FusedLoRALinear.from_linear(conv1d(), enable_lora=(True, False, True, False, True))
    with pytest.raises(TypeError):
        FusedLoRALinear.from_linear(torch.nn.Conv2d(3, 3, 1))


def test_fused_counts_equal_separate_q_and_v_and_is_two_thirds_of_whole_c_attn():
    cfg = gpt2_config("small", n_layer=2)
    fused = meta_model(cfg)
    with torch.device("meta"):
        add_fused_lora(fused, ["c_attn"], r=4)
    whole = meta_model(cfg)
    with torch.device("meta"):
        add_lora(whole, ["c_attn"], r=4)
    t_fused, _ = count_parameters(fused)
    t_whole, _ = count_parameters(whole)
    assert t_fused == 2 * 2 * 4 * (768 + 768)  # layers x (q, v) x r (in + out)
    assert t_whole == 2 * 4 * (768 + 3 * 768)
    assert isinstance(fused.transformer.h[0].attn.c_attn, FusedLoRALinear)
    assert type(whole.transformer.h[0].attn.c_attn) is LoRALinear


def test_merge_lora_puts_back_plain_layer():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config("small", n_layer=1, n_embd=32, n_head=4, vocab_size=50,
                                                     bos_token_id=0, eos_token_id=0)).eval()
    add_fused_lora(model, r=2)
    for layer in [model.transformer.h[0].attn.c_attn]:
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        before = model(x).logits
        merge_lora(model)
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_llama_7b_line_on_meta():
    model = meta_llama_7b()
    with torch.device("meta"):
        add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
    assert trainable_parameters_line(model) == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    )


def test_gpt2_medium_counts_on_meta():
    model = meta_gpt2("medium")
    assert count_parameters(model)[1] == 354_823_168
    with torch.device("meta"):
        add_fused_lora(model, r=4)
    assert count_parameters(model)[0] == 24 * 2 * 4 * (1024 + 1024)


def test_matches_target_follows_peft_rule():
    assert matches_target("transformer.h.0.attn.c_attn", ["c_attn"])
    assert matches_target("transformer.h.0.mlp.c_proj", ["c_proj"])
    assert matches_target("transformer.h.0.attn.c_proj", ["c_proj"])
    assert not matches_target("transformer.h.0.mlp.c_proj", ["attn.c_proj"])
    assert not matches_target("transformer.h.0.attn.xc_attn", ["c_attn"])  # a suffix must start at a dot
    assert matches_target("transformer.h.11.attn.c_attn", r".*\.h\.(0|11)\.attn\.c_attn")  # a string is a regex
    assert not matches_target("transformer.h.1.attn.c_attn", r".*\.h\.(0|11)\.attn\.c_attn")


def test_meta_lora_counts_split_a_and_b_and_match_peft():
    counts = meta_lora_counts(llama_7b_config(), lambda m: add_lora(m, ["q_proj", "v_proj"], r=8))
    assert counts == {"trainable": 4_194_304, "total": 6_742_609_920, "base": 6_738_415_616,
                      "lora_A": 2_097_152, "lora_B": 2_097_152}
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(meta_llama_7b(), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert theirs.get_nb_trainable_parameters() == (counts["trainable"], counts["total"])
    fused = meta_lora_counts(gpt2_config("medium"), lambda m: add_fused_lora(m, ["c_attn"], r=1))
    assert (fused["lora_A"], fused["lora_B"]) == (24 * 2 * 1024, 24 * 2 * 1024)
    with pytest.raises(ValueError, match="no LoRA layer"):
        meta_lora_counts(gpt2_config("small"), lambda m: None)


def test_toy_gpt2_is_reproducible_and_leaves_the_random_state_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = toy_gpt2(seed=5), toy_gpt2(seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.transformer.wte.weight, toy_gpt2(seed=6).transformer.wte.weight)
    assert not a.training and a.config.resid_pdrop == a.config.attn_pdrop == a.config.embd_pdrop == 0.0
    wide = toy_gpt2(toy_gpt2_config(n_embd=128))
    assert tuple(wide.transformer.h[0].attn.c_attn.weight.shape) == (128, 384)
