"""save_adapter / load_adapter: PEFT's on-disk format, both directions, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_course.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, save_adapter  # noqa: E402
from lora_course.fused import FusedLoRALinear, add_fused_lora  # noqa: E402
from lora_course.lora import add_lora, lora_layers  # noqa: E402


def tiny_config(n_embd=32):
    return transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)


def base_model(seed=0, n_embd=32):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(tiny_config(n_embd)).eval()


def randomize_lora(model, seed=1):
    """Give every B a non-zero value so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


INPUT = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise_same(model, before):
    after = model.state_dict()
    assert list(after) == list(before), "load_adapter changed the model's structure"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"load_adapter changed {k}"


def assert_load_rejected(model, folder, match=None):
    """load_adapter raises AdapterError (matching `match`) and leaves `model` bitwise as it was."""
    before = state_copy(model)
    with pytest.raises(AdapterError, match=match) as err:
        load_adapter(model, folder)
    assert_bitwise_same(model, before)
    return err


def edit_weights(folder, edit):
    """Rewrite the adapter's safetensors file after `edit(state)` changed its dict in place."""
    file = folder / WEIGHTS_NAME
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file))


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_ours_to_peft_same_outputs(tmp_path, targets):
    ours = add_lora(base_model(), targets, r=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    assert not torch.allclose(logits(theirs), logits(base_model()), atol=1e-3), "adapter had no effect"
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)


def test_peft_to_ours_same_outputs(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    theirs = peft.get_peft_model(base_model(), cfg)
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base_model(), tmp_path)
    assert len(lora_layers(ours)) == 4
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), rtol=0, atol=1e-5)


def randomize_peft(peft_model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_rslora_and_rank_pattern_round_trip(tmp_path):
    ours = add_lora(base_model(), ["c_attn"], r=4, alpha=8, use_rslora=True)
    add_lora(ours, ["mlp.c_fc"], r=2, alpha=3, use_rslora=True)
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["use_rslora"] and config["rank_pattern"] and config["alpha_pattern"]
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)
    again = load_adapter(base_model(), tmp_path)
    torch.testing.assert_close(logits(again), logits(ours), rtol=0, atol=1e-6)


def test_fused_update_leaves_k_exactly_zero():
    model = add_fused_lora(base_model(), ["c_attn"], enable_lora=(True, False, True), r=4, alpha=8)
    randomize_lora(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, FusedLoRALinear)
    d = 32
    delta = layer.delta_weight()  # (3 d, d)
    assert torch.count_nonzero(delta[d:2 * d]) == 0
    assert torch.count_nonzero(delta[:d]) > 0 and torch.count_nonzero(delta[2 * d:]) > 0
    # The forward pass too: k's output equals the frozen layer's, bit for bit.
    x = torch.randn(3, 5, d)
    with torch.no_grad():
        out, base = layer(x), layer.base_layer(x)
    assert torch.equal(out[..., d:2 * d], base[..., d:2 * d])
    assert not torch.allclose(out[..., :d], base[..., :d])
    # Same count as separate q_proj and v_proj adapters: 2 slices x r (in + out/3).
    assert layer.lora_A.numel() + layer.lora_B.numel() == 2 * 4 * (d + d)


def test_fused_ours_to_peft(tmp_path):
    ours = add_fused_lora(base_model(), ["c_attn"], r=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16  # rank k r, same alpha / r
    B = load_file(str(tmp_path / WEIGHTS_NAME))["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert torch.count_nonzero(B[32:64]) == 0  # PEFT's twin leaves k at zero too
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)


def test_fused_peft_to_ours(tmp_path):
    # A PEFT adapter on the whole c_attn whose B is zero for k (and block-diagonal for q, v).
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                                fan_in_fan_out=True))
    randomize_peft(theirs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:  # (96, 8): q rows use columns 0-3, v rows 4-7, k rows nothing
                p[:32, 4:] = 0
                p[32:64] = 0
                p[64:, :4] = 0
    theirs.save_pretrained(tmp_path)
    ours = add_fused_lora(base_model(), ["c_attn"], r=4, alpha=8)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), rtol=0, atol=1e-5)


def test_fused_rejects_adapter_that_moves_k(tmp_path):
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                                fan_in_fan_out=True))
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    ours = add_fused_lora(base_model(), ["c_attn"], r=4, alpha=8)
    assert_load_rejected(ours, tmp_path, match="disables")


@pytest.fixture
def saved(tmp_path):
    ours = add_lora(base_model(), ["c_attn"], r=4, alpha=8)
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    return tmp_path


def test_wrong_shape_leaves_model_unchanged(saved):
    wrong = base_model(n_embd=64)
    assert_load_rejected(wrong, saved, match="another shape")


def test_missing_key_leaves_model_unchanged(saved):
    edit_weights(saved, lambda state: state.pop("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"))
    model = base_model()
    assert_load_rejected(model, saved, match="has no 'base_model.model.transformer.h.1.attn.c_attn.lora_B.weight'")
    assert not lora_layers(model)


def test_unexpected_key_is_an_error(saved):
    extra = {"base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": torch.zeros(4, 32)}
    edit_weights(saved, lambda state: state.update(extra))
    model = base_model()
    assert_load_rejected(model, saved, match="no place for")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "config"])
def test_corrupt_file_leaves_model_unchanged(saved, damage):
    if damage == "config":
        (saved / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4,')
    else:
        file = saved / WEIGHTS_NAME
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\x01not safetensors" * 10)
    model = add_fused_lora(base_model(), ["c_attn"], r=2, alpha=4)  # a model that already has LoRA
    err = assert_load_rejected(model, saved, match="corrupt")
    if damage != "config":  # our message is ours; the reader's own error is chained, not pasted in
        assert err.value.__cause__ is not None and str(err.value.__cause__) not in str(err.value)


def test_existing_layer_with_other_rank_is_rejected(saved):
    model = add_lora(base_model(), ["c_attn"], r=2, alpha=8)
    assert_load_rejected(model, saved)


def test_missing_folder_and_no_lora():
    with pytest.raises(AdapterError, match="not a folder"):
        load_adapter(base_model(), "/nonexistent/adapter")
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_adapter(base_model(), "/tmp/never_written")


def test_adapter_is_small(saved):
    model_bytes = sum(p.numel() * p.element_size() for p in base_model().parameters())
    assert (saved / WEIGHTS_NAME).stat().st_size < model_bytes / 10


def test_existing_layer_must_have_the_adapters_scaling(tmp_path):
    ours = add_lora(base_model(), ["c_attn"], r=4, alpha=8, use_rslora=True)  # scaling 8 / sqrt(4) = 4
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    plain = add_lora(base_model(), ["c_attn"], r=4, alpha=8)  # same r, scaling 8 / 4 = 2
    assert_load_rejected(plain, tmp_path, match=r"\(scaling 4\) but .* scaling 2")
    same = load_adapter(add_lora(base_model(), ["c_attn"], r=4, alpha=8, use_rslora=True), tmp_path)
    torch.testing.assert_close(logits(same), logits(ours), rtol=0, atol=1e-6)
