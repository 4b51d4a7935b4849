"""memory.py: the calculator's arithmetic, measure.py's peak memory, and the two against each other."""

import pytest
import torch

from lora_course.measure import PeakMemory, peak_memory
from lora_course.memory import (
    MemoryBudget,
    compare_budgets,
    dtype_bytes,
    format_bytes,
    gpt2_activation_bytes,
    gpt2_training_budget,
    lora_trainable_params,
    training_budget,
)
from lora_course.train import measure_training_peak, train_steps

LLAMA_7B = 6_738_415_616


def test_card_budget_for_7b():
    b = training_budget(7_000_000_000, precision="fp16", optimizer="adamw")
    assert (b.weights, b.gradients, b.optimizer) == (14e9, 14e9, 56e9)
    assert b.total == 84e9
    assert b.optimizer / 7e9 == 8  # two fp32 moments per parameter


def test_exact_llama_and_master_weights():
    b = training_budget(LLAMA_7B)
    assert b.total == 12 * LLAMA_7B
    m = training_budget(LLAMA_7B, master_weights=True)
    assert m.master_weights == 4 * LLAMA_7B and m.total == 16 * LLAMA_7B
    # fp32 training has no separate master copy.
    assert training_budget(LLAMA_7B, precision="fp32", master_weights=True).master_weights == 0


def test_optimizers_and_precisions():
    assert training_budget(10, precision="fp32", optimizer="sgd").total == 10 * 4 * 2
    assert training_budget(10, precision="bf16", optimizer="sgd_momentum").optimizer == 10 * 4
    assert training_budget(10, precision=torch.float16).weights == 20
    assert dtype_bytes(torch.bfloat16) == 2 and dtype_bytes("fp32") == 4


def test_lora_budget_keeps_weights_drops_the_rest():
    c = compare_budgets(LLAMA_7B, 4096, 32, r=8, n_targets=2)
    assert c["trainable"] == 4_194_304
    assert c["lora"].weights == 2 * (LLAMA_7B + 4_194_304)
    assert c["lora"].gradients + c["lora"].optimizer == 10 * 4_194_304
    assert 5.5 < c["saving"] < 6.5
    # More rank or targets: more trainable, never more than full fine-tuning.
    assert compare_budgets(LLAMA_7B, 4096, 32, r=64, n_targets=4)["trainable"] == 16 * c["trainable"]


def test_bad_input():
    with pytest.raises(ValueError, match="precision"):
        training_budget(10, precision="int3")
    with pytest.raises(ValueError, match="optimizer"):
        training_budget(10, optimizer="lion")
    with pytest.raises(ValueError, match="n_trainable"):
        training_budget(10, 11)
    with pytest.raises(ValueError, match="r must be"):
        lora_trainable_params(64, 2, 0)
    with pytest.raises(ValueError, match="unknown GPT-2 target"):
        gpt2_activation_bytes(tiny_config(), 1, 4, lora_targets=["q_proj"])
    with pytest.raises(ValueError, match="cpu"):
        peak_memory(lambda: None, device="mps")
    with pytest.raises(ValueError, match="unit"):
        format_bytes(1, "TB")


def test_budget_parts_and_summary():
    b = MemoryBudget(weights=2_000_000_000, gradients=0, optimizer=1_000_000_000)
    assert b.parts() == {"weights": 2_000_000_000, "optimizer": 1_000_000_000}
    assert b.summary() == "weights 2.0 + optimizer 1.0 = 3.0 GB"


def test_peak_memory_counts_temporaries_not_what_existed():
    existing = torch.ones(1_000_000)  # 4 MB allocated before: not counted

    def fn():
        a = torch.ones(1_000_000)  # +4 MB
        b = torch.ones(2_000_000)  # +8 MB: peak 12 MB here
        del a, b
        return existing.sum() + torch.ones(500_000).sum()

    result, peak = peak_memory(fn, device="cpu")
    assert result.item() == 1_500_000
    assert 12_000_000 <= peak < 12_100_000


def test_peak_memory_propagates_errors():
    with pytest.raises(RuntimeError, match="boom"):
        peak_memory(lambda: (_ for _ in ()).throw(RuntimeError("boom")), device="cpu")


def tiny_config(**shape):
    pytest.importorskip("transformers")
    from lora_course.models import toy_gpt2_config

    return toy_gpt2_config(**{"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 2048, **shape})


# The first shape is the one the per-token counts were read from (saved-tensor hooks); the
# second differs in depth, width, heads, vocabulary, batch, sequence and LoRA targets.
SHAPES = {
    "calibration": (dict(), 4, 32, ["c_attn"], 8),
    "unseen": (dict(n_layer=6, n_embd=96, n_head=3, vocab_size=1000, n_positions=128), 2, 100,
               ["c_attn", "mlp.c_fc"], 4),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("lora", [False, True])
def test_prediction_within_15_percent_of_measured(lora, shape):
    from lora_course.lora import add_lora
    from lora_course.models import toy_gpt2

    overrides, batch, seq, targets, r = SHAPES[shape]

    def build():
        model = toy_gpt2(tiny_config(**overrides))
        return add_lora(model, targets, r=r, alpha=2 * r) if lora else model

    model, measured = measure_training_peak(build, batch_size=batch, seq_len=seq)
    predicted = gpt2_training_budget(model, batch, seq).peak
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_train_steps_moves_lora_and_lowers_the_loss():
    from lora_course.lora import add_lora, lora_layers
    from lora_course.models import toy_gpt2

    model = add_lora(toy_gpt2(), ["c_attn"], r=4, alpha=8)
    first = train_steps(model, 1, lr=1e-2)
    last = train_steps(model, 20, lr=1e-2)
    assert last < first
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in lora_layers(model).values())
    assert not model.training
    assert torch.equal(toy_gpt2().transformer.wte.weight, model.transformer.wte.weight)  # frozen stays frozen
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_steps(toy_gpt2().requires_grad_(False))
    with pytest.raises(ValueError, match="steps"):
        train_steps(toy_gpt2(), 0)


def test_measured_peak_grows_with_the_batch():
    from lora_course.models import toy_gpt2

    _, small = measure_training_peak(toy_gpt2, steps=1, batch_size=1, seq_len=16)
    _, large = measure_training_peak(toy_gpt2, steps=1, batch_size=8, seq_len=64)
    assert 0 < small < large


def test_activation_estimate_lora_saves_less():
    cfg = tiny_config()
    full = gpt2_activation_bytes(cfg, 4, 32)
    lora = gpt2_activation_bytes(cfg, 4, 32, lora_targets=["c_attn"], lora_r=8)
    per_block_diff = (30 * 128) - (25 * 128 + 8)
    assert full - lora == 4 * 4 * 32 * 2 * per_block_diff


def test_profiler_notices_are_filtered_but_other_stderr_is_kept(capfd):
    import os
    import sys

    before = [torch.ones(250_000)]  # allocated before measuring, freed inside: the allocator complains on fd 2

    def fn():
        before.pop()
        print("a message of the learner's own", file=sys.stderr)
        # What Kineto writes on a CUDA build of torch with no GPU driver (torch 2.14 writes it on stop).
        os.write(2, b"ERROR:2026-12-02 20:26:20 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
        return torch.ones(10)

    _, peak = peak_memory(fn, device="cpu")
    err = capfd.readouterr().err
    assert "a message of the learner's own" in err
    assert "Memory block of unknown size" not in err and "profiler_start" not in err
    assert "gpuGetDeviceCount" not in err
    assert peak < 1_000  # the free of the old block is not subtracted, the new 40 bytes are counted


def test_peak_memory_tracker_split_in_start_and_stop():
    tracker = PeakMemory("cpu").start()
    x = torch.ones(1_000_000)  # 4 MB allocated while measuring
    del x
    peak = tracker.stop()
    assert 4_000_000 <= peak < 5_000_000
    with pytest.raises(RuntimeError, match="not started"):
        tracker.stop()
    tracker.start()
    with pytest.raises(RuntimeError, match="already measuring"):
        tracker.start()
    tracker.stop()
    with pytest.raises(ValueError, match="MPS"):
        PeakMemory("mps")
