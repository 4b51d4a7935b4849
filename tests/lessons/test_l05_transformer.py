"""Notebook 05's lesson module: the pictures' numbers, the build step's check, the memory widget's logic and the
exercise checkers."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lora_course.fused import add_fused_lora  # noqa: E402
from lora_course.lessons.common import verdict as verdict_of  # noqa: E402
from lora_course.lessons.l05_transformer import (  # noqa: E402
    MEMORY_TARGETS,
    TARGET_QUIZ,
    check_fused_delta,
    check_saving_prediction,
    check_targets_prediction,
    draw_budgets,
    draw_gpt2_block,
    draw_peaks,
    fused_delta,
    memory_budget_view,
    row_runs,
)
from lora_course.lora import add_lora  # noqa: E402
from lora_course.memory import training_budget  # noqa: E402
from lora_course.models import toy_gpt2, toy_gpt2_config  # noqa: E402
from lora_course.skeletons import MODEL_PRESETS, meta_gpt2, meta_lora_counts, preset_shape  # noqa: E402
from lora_course.train import train_steps  # noqa: E402

LLAMA_7B = 6_738_415_616


# ----------------------------------------------------------------------------- the pictures

def _meta_adapted(adapt):
    model = meta_gpt2("small")
    with torch.device("meta"):
        adapt(model)
    return model


def test_block_picture_marks_exactly_the_adapted_rows():
    qv = _meta_adapted(lambda m: add_fused_lora(m, ["c_attn"], enable_lora=(True, False, True), r=8))
    assert draw_gpt2_block(qv) == {"transformer.h.0.attn.c_attn": [(0, 768), (1536, 2304)]}
    q = _meta_adapted(lambda m: add_fused_lora(m, ["c_attn"], enable_lora=(True, False, False), r=4))
    assert draw_gpt2_block(q, block=11) == {"transformer.h.11.attn.c_attn": [(0, 768)]}
    whole = _meta_adapted(lambda m: add_lora(m, ["c_attn", "mlp.c_fc"], r=8))
    assert draw_gpt2_block(whole) == {"transformer.h.0.attn.c_attn": [(0, 2304)],
                                      "transformer.h.0.mlp.c_fc": [(0, 3072)]}
    assert draw_gpt2_block(meta_gpt2("small")) == {}
    plt.close("all")


def test_the_drawn_rows_are_the_rows_a_trained_fused_layer_changes():
    model = add_fused_lora(toy_gpt2(toy_gpt2_config(n_layer=1, n_embd=48, n_head=4)), ["c_attn"], r=4, alpha=8)
    layer = model.transformer.h[0].attn.c_attn
    assert (layer.lora_B == 0).all()
    train_steps(model, steps=1, lr=1e-2)  # the notebook's one AdamW step
    assert (layer.lora_B != 0).all()  # one step moves every entry of B
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = (layer(x) != layer.base_layer(x)).flatten(0, 1).any(dim=0)
        dW = fused_delta(layer.lora_A, layer.lora_B, layer.enable_lora, layer.scaling)
    assert row_runs(moved) == row_runs((dW != 0).any(dim=1)) == [(0, 48), (96, 144)]
    assert torch.equal(dW, layer.delta_weight())


@pytest.mark.parametrize("mask, runs", [
    ([], []), ([False, False], []), ([True], [(0, 1)]), ([False, True, True, False, True], [(1, 3), (4, 5)]),
    ([True, True, True], [(0, 3)]),
])
def test_row_runs(mask, runs):
    assert row_runs(torch.tensor(mask, dtype=torch.bool)) == runs


def test_budget_bars_are_drawn_part_by_part_end_to_end():
    budgets = {"7B": training_budget(7_000_000_000), "LoRA": training_budget(LLAMA_7B + 4_194_304, 4_194_304),
               "master": training_budget(7_000_000_000, master_weights=True)}
    fig, ax = plt.subplots()
    drawn = draw_budgets(ax, {k: {p: v / 1e9 for p, v in b.parts().items()} for k, b in budgets.items()})
    assert drawn["7B"] == {"weights": (0.0, 14.0), "gradients": (14.0, 14.0), "optimizer": (28.0, 56.0)}
    assert drawn["master"]["master_weights"] == (84.0, 28.0)
    left, width = drawn["LoRA"]["optimizer"]
    assert abs((left + width) * 1e9 - budgets["LoRA"].total) < 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["weights", "gradients", "optimizer", "master weights"]  # one entry per part
    plt.close("all")


def test_peak_panels_show_every_part_activations_included_each_on_its_own_scale():
    small = training_budget(1_000_000, 10_000, precision="fp32", activations=3_000_000)
    large = training_budget(100_000_000, precision="fp32", activations=900_000_000)
    drawn = draw_peaks({"small": {"full": (small, 4.1e6)}, "large": {"full": (large, 1.3e9)}})
    assert set(drawn["small"]["full"]) == {"weights", "gradients", "optimizer", "activations"}
    left, width = drawn["small"]["full"]["activations"]
    assert abs(left + width - small.total / 1e6) < 1e-9  # the bar ends at all parts added, in MB
    axes = plt.gcf().axes
    assert axes[0].get_xlim()[1] < 10 < 1000 < axes[1].get_xlim()[1]  # separate axes: both rows readable
    plt.close("all")


# ----------------------------------------------------------------------------- the memory widget

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


# ----------------------------------------------------------------------------- the build step: a fused layer's dW

def _raises(*args):
    raise NotImplementedError


def _fused_delta(lora_A, lora_B, enable_lora, scaling, *, scale=True, packed=False, same_A=False, rows_only=False):
    enabled = [i for i, on in enumerate(enable_lora) if on]
    r, s = lora_A.shape[0] // len(enabled), lora_B.shape[0] // len(enabled)
    n_rows = len(enabled) * s if rows_only else len(enable_lora) * s
    dW = lora_A.new_zeros(n_rows, lora_A.shape[1])
    for j, (A_i, B_i, i) in enumerate(zip(lora_A.split(r), lora_B.split(s), enabled)):
        at = j if (packed or rows_only) else i
        dW[at * s:(at + 1) * s] = (scaling if scale else 1.0) * B_i @ (lora_A[:r] if same_A else A_i)
    return dW


def test_check_fused_delta_blank_right_and_wrong(verdict):
    check = lambda fn: verdict_of(check_fused_delta, fn)  # noqa: E731  (the build step's verdict line)
    assert "equal to FusedLoRALinear.delta_weight" in verdict(check(fused_delta), True)  # the reference
    assert "equal to FusedLoRALinear.delta_weight" in verdict(check(_fused_delta), True)
    assert "fill in fused_delta" in verdict(check(_raises), False)
    assert "fill in fused_delta, then" in verdict(check(None), False)  # None: a blank answer
    assert "left out scaling" in verdict(check(lambda *a: _fused_delta(*a, scale=False)), False)
    assert "one after another" in verdict(check(lambda *a: _fused_delta(*a, packed=True)), False)
    assert "covers all len(enable_lora) x 6 rows" in verdict(check(lambda *a: _fused_delta(*a, rows_only=True)), False)
    assert "next block of r rows of lora_A" in verdict(check(lambda *a: _fused_delta(*a, same_A=True)), False)
    assert "must be exactly zero" in verdict(check(lambda A, B, e, s: _fused_delta(A, B, e, s) + 1e-3), False)
    assert "raised RuntimeError" in verdict(check(lambda A, B, e, s: s * B @ A), False)
    assert "return a tensor" in verdict(check(lambda *a: 0.0), False)


def test_the_build_step_continues_with_the_learners_piece_or_the_reference(capsys):
    from lora_course.lessons.common import use_or_reference

    where = "lora_course.lessons.l05_transformer.fused_delta"
    assert use_or_reference("fused_delta", _fused_delta, check_fused_delta, fused_delta, where) is _fused_delta
    assert "uses your fused_delta" in capsys.readouterr().out
    assert use_or_reference("fused_delta", _raises, check_fused_delta, fused_delta, where) is fused_delta
    assert "uses the reference fused_delta" in capsys.readouterr().out


# ----------------------------------------------------------------------------- exercise 2: what target_modules picks

def _gpt2_names():
    return [n for n, m in meta_gpt2("small").named_modules() if type(m).__name__ == "Conv1D"]


def test_check_targets_prediction_measures_on_the_names(verdict):
    names = _gpt2_names()
    assert len(TARGET_QUIZ) == 4
    right = verdict(check_targets_prediction([12, 0, 1, 36], names), True)
    assert '"c_attn" picks 0' in right and "picks 36" in right
    # the plausible slips: "c_attn" as a suffix (12), h.1 also matching h.11 (2), mlp.c_proj as both c_proj (24)
    assert "regex on the whole name, and no full name is just c_attn" in verdict(
        check_targets_prediction([12, 12, 1, 36], names), False)
    assert "a suffix starts after a dot" in verdict(check_targets_prediction([12, 0, 2, 36], names), False)
    assert "not attention's" in verdict(check_targets_prediction([24, 0, 1, 36], names), False)
    assert "c_fc and both c_proj" in verdict(check_targets_prediction([12, 0, 1, 24], names), False)
    # on other names the checker measures again: a 2-block model picks 2, 0, 1, 6
    two = [n for n in names if n.startswith(("transformer.h.0.", "transformer.h.1."))]
    assert "picks 6" in verdict(check_targets_prediction([2, 0, 1, 6], two), True)
    for blank in (None, ..., [..., 0, 1, 36]):
        assert "fill in answer" in verdict(check_targets_prediction(blank, names), False)
    for junk in ("12, 0, 1, 36", [12, 0, 1], [12.0, 0, 1, 36], [True, 0, 1, 36]):
        assert "list of 4 whole numbers" in verdict(check_targets_prediction(junk, names), False)


# ----------------------------------------------------------------------------- exercise 1: predict, then measure

def test_check_saving_prediction_measures_and_compares(verdict):
    config = toy_gpt2_config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    args = (config, ["c_attn"], 4, 48)
    right = verdict(check_saving_prediction(" Smaller ", *args, batches=(1, 4)), True)  # the word, however written
    assert "at batch 1" in right and "the saving got smaller" in right and "grow with every token" in right
    wrong = verdict(check_saving_prediction("larger", *args, batches=(1, 4)), False)
    assert "you predicted larger" in wrong and "the saving got smaller" in wrong
    for blank in (None, ...):
        assert "fill in my_prediction" in verdict(check_saving_prediction(blank, *args), False)
    for junk in ("more", 2.0):
        assert '"larger" or "smaller"' in verdict(check_saving_prediction(junk, *args), False)
