"""methods.py: a fine-tuning method as data, built onto a base model (and fused.add_attention_lora, which it uses)."""

import pytest

from lora_course.fused import add_attention_lora
from lora_course.lora import lora_layers
from lora_course.methods import Method
from lora_course.models import toy_gpt2, toy_gpt2_config


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_each_method_builds_what_it_names(base_model):
    frozen = Method("frozen", targets=None, frozen=("transformer.wte", "transformer.wpe")).build(base_model)
    assert not frozen.transformer.wte.weight.requires_grad and not frozen.lm_head.weight.requires_grad  # tied
    assert frozen.transformer.h[0].attn.c_attn.weight.requires_grad
    embedding = Method("emb", targets=("c_attn",), train_embedding=True).build(base_model)
    copy_weight = embedding.transformer.wte.modules_to_save.weight
    assert copy_weight.requires_grad and embedding.lm_head.weight is copy_weight  # the head trains with it
    assert {n for n in _trainable(embedding) if "lora_" in n} == {n for n in _trainable(embedding) if "c_attn" in n}
    lora_emb = Method("lora emb", targets=("c_attn",), embedding_r=4).build(base_model)
    assert any("wte.lora_embedding" in n for n in _trainable(lora_emb))
    attention = Method("W_o", r=8, weights=("o",)).build(base_model)
    assert {n.rsplit(".", 1)[0] for n in lora_layers(attention)} == {f"transformer.h.{i}.attn" for i in range(2)}
    assert all(p.requires_grad for p in base_model.parameters())  # every method built on a copy


def test_in_place_builds_on_the_base_itself(base_model):
    import copy

    base = copy.deepcopy(base_model)
    model = Method("LoRA", r=2).build(base, in_place=True)
    assert model is base and lora_layers(base) and not base.transformer.wte.weight.requires_grad


def test_add_attention_lora_refuses_unknown_weights_and_changes_nothing():
    model = toy_gpt2(toy_gpt2_config(n_layer=2, n_embd=32, n_head=2), seed=0)
    for weights in (["q", "z"], []):
        with pytest.raises(ValueError, match="subset"):
            add_attention_lora(model, weights, 4)
    assert not lora_layers(model)
