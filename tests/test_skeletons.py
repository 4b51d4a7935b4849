"""lora_course.skeletons: one registry of model shapes, counted on the meta device."""

import pytest
from torch import nn

from lora_course.skeletons import MODEL_PRESETS, MODELS, lora_counts, meta_gpt2, preset_shape, transformer_blocks


def test_the_memory_widget_offers_a_selection_of_the_one_registry():
    assert set(MODEL_PRESETS) < set(MODELS)
    assert all(MODEL_PRESETS[name] is MODELS[name].config for name in MODEL_PRESETS)
    with pytest.raises(ValueError, match="unknown model"):
        preset_shape("GPT-5")


@pytest.mark.parametrize("name", ["GPT-2 small (124M)", "LLaMA-7B"])
def test_lora_counts_split_into_blocks_and_root(name):
    c = lora_counts(name, r=8)
    assert c["blocks"] * c["block"] + c["root"] == c["total"]
    assert c["blocks"] * c["block_trainable"] == c["trainable"]  # every adapter sits in a block
    assert c["base"] == preset_shape(name)[0]


def test_lora_counts_of_gpt2_by_hand():
    c = lora_counts("GPT-2 small (124M)", r=8)
    assert (c["blocks"], c["block_trainable"]) == (12, 8 * (768 + 3 * 768))
    assert c["root"] == 50257 * 768 + 1024 * 768 + 2 * 768  # wte, wpe, ln_f (the head is tied to wte)


def test_transformer_blocks_finds_gpt2_and_says_what_it_needs():
    assert len(transformer_blocks(meta_gpt2("small"))) == 12
    with pytest.raises(ValueError, match="transformer.h"):
        transformer_blocks(nn.Linear(2, 2))
