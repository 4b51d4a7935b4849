"""Notebook 05's lesson module: the memory-budget widget's numbers and the exercise checkers."""

import pytest

from lora_course.fused import add_fused_lora
from lora_course.lessons.l05_transformer import (
    MEMORY_TARGETS,
    check_full_finetune_bytes,
    check_fused_untouched_rows,
    check_llama_qkvo_params,
    memory_budget_view,
)
from lora_course.lora import add_lora
from lora_course.skeletons import MODEL_PRESETS, meta_lora_counts, preset_shape

LLAMA_7B = 6_738_415_616


def test_memory_widget_logic_headless():
    v = memory_budget_view("LLaMA-7B", r=8, targets="q, v", precision="fp16")
    assert v["trainable"] == 4_194_304
    assert set(v["bars"]) == {"full fine-tuning", "LoRA"}
    assert abs(sum(v["bars"]["full fine-tuning"].values()) - 12 * LLAMA_7B / 1e9) < 1e-9
    more = memory_budget_view("LLaMA-7B", r=64, targets="q, k, v, o", precision="fp16")
    assert more["trainable"] == 16 * v["trainable"] and more["lora"].total > v["lora"].total
    fp32 = memory_budget_view("LLaMA-7B", r=8, targets="q, v", precision="fp32")
    assert fp32["full"].total == 16 * LLAMA_7B  # 4 + 4 + 8 bytes per parameter
    master = memory_budget_view("LLaMA-7B", master_weights=True)
    assert master["full"].total == 16 * LLAMA_7B and "master_weights" in master["bars"]["full fine-tuning"]
    assert memory_budget_view("GPT-2 small (124M)")["saving"] > 5
    assert list(MEMORY_TARGETS.values()) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="targets"):
        memory_budget_view(targets="everything")
    with pytest.raises(ValueError, match="unknown model"):
        memory_budget_view(model="LLaMA-1T")


def test_notebook_05_checks(capsys):
    def verdict(result, expected):
        out = capsys.readouterr().out
        assert result is expected and out.startswith("Correct" if expected else "Not yet"), out
        return out

    verdict(check_llama_qkvo_params(32 * 4 * 16 * (4096 + 4096)), True)
    verdict(check_llama_qkvo_params(4_194_304), False)
    verdict(check_full_finetune_bytes(16 * 124_439_808), True)
    verdict(check_full_finetune_bytes(12 * 124_439_808), False)
    verdict(check_fused_untouched_rows(768, 1536), True)
    verdict(check_fused_untouched_rows(0, 768), False)
    # A blank answer (None or ...) or a non-int gets "Not yet" with what to do, never a crash.
    for blank in (None, ...):
        assert "fill in" in verdict(check_llama_qkvo_params(blank), False)
        assert "fill in" in verdict(check_full_finetune_bytes(blank), False)
        assert "fill in" in verdict(check_fused_untouched_rows(blank, 1536), False)
        assert "fill in" in verdict(check_fused_untouched_rows(768, blank), False)
    assert "int" in verdict(check_llama_qkvo_params("16 million"), False)
    assert "int" in verdict(check_full_finetune_bytes(1.99e9), False)
    verdict(check_llama_qkvo_params(True), False)


# Which layers each MEMORY_TARGETS entry adapts: GPT-2's q, k, v are slices of c_attn, o is attn.c_proj.
_GPT2_SLICES = {"q": (True, False, False), "q, v": (True, False, True), "q, k, v": (True, True, True),
                "q, k, v, o": (True, True, True)}


_LLAMA_TARGETS = {"q": ["q_proj"], "q, v": ["q_proj", "v_proj"], "q, k, v": ["q_proj", "k_proj", "v_proj"],
                  "q, k, v, o": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _adapt(config, targets, r):
    if config.model_type == "llama":
        return lambda m: add_lora(m, _LLAMA_TARGETS[targets], r=r)

    def gpt2(m):
        add_fused_lora(m, ["c_attn"], enable_lora=_GPT2_SLICES[targets], r=r)
        if targets.endswith("o"):
            add_lora(m, ["attn.c_proj"], r=r)  # freezes everything else, c_attn's adapter too:
            for name, p in m.named_parameters():
                p.requires_grad_("lora_" in name)  # so train every adapter again
    return gpt2


@pytest.mark.parametrize("model", ["GPT-2 small (124M)", "GPT-2 large (774M)", "LLaMA-7B", "LLaMA-13B", "GPT-3 175B"])
def test_widget_closed_form_equals_meta_device_count(model):
    """The widget's closed form r (d + d) per projection, against LoRA layers built on the meta device."""

    config = MODEL_PRESETS[model]()
    n_params, _, _ = preset_shape(model)
    for targets in MEMORY_TARGETS:
        counts = meta_lora_counts(config, _adapt(config, targets, r=8))
        view = memory_budget_view(model, r=8, targets=targets)
        assert view["trainable"] == counts["trainable"], (model, targets)
        assert counts["base"] == n_params
