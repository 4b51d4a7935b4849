"""The training loop: LoRA and full fine-tuning through one loop, and what it measures."""

import copy

import pytest
import torch

from lora_course import add_lora
from lora_course.data import collate, make_splits
from lora_course.measure import optimizer_state_bytes
from lora_course.models import toy_gpt2
from lora_course.train import StepCost, TrainConfig, autocast_for, step_costs, text_loss, train, validation_loss

SPLITS = make_splits(n_validation=16, n_test=16, seed=0)


def quick(**kw):
    settings = {"steps": 6, "batch_size": 4, "lr": 1e-2, "n_eval": 8, "progress": False, "device": "cpu"}
    return TrainConfig(**{**settings, **kw})


def test_lora_run_trains_only_the_adapters(base_model, tokenizer):
    model = add_lora(copy.deepcopy(base_model), ["c_attn"], r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = train(model, tokenizer, SPLITS.train, SPLITS.validation, quick(memory_steps=2))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A" in n or ".lora_B" in n for n in changed)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert record.method == "LoRA"
    assert record.trainable_params == n_lora
    assert record.total_params == sum(p.numel() for p in model.parameters())
    # AdamW: exp_avg and exp_avg_sq (fp32) per trainable number, plus one fp32 step counter per tensor
    n_tensors = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    assert record.optimizer_state_bytes == 2 * 4 * n_lora + 4 * n_tensors
    assert len(record.losses) == 6 and record.val_steps == [6] and len(record.val_losses) == 1
    assert record.peak_memory_bytes > 0
    assert record.time_per_step > 0 and record.tokens_per_second > 0
    assert record.timed_steps == 6 - 2  # the two memory steps are not timed


def test_memory_is_measured_only_when_asked(base_model, tokenizer):
    record = train(add_lora(copy.deepcopy(base_model), ["c_attn"], r=4, alpha=8), tokenizer, SPLITS.train,
                   SPLITS.validation, quick())
    assert TrainConfig().memory_steps == 0 and record.peak_memory_bytes == 0 and record.timed_steps == 6
    with pytest.raises(ValueError, match="memory_steps must be an int of at least 0"):
        quick(memory_steps=-1)


def test_full_run_trains_everything_and_costs_more_state(base_model, tokenizer):
    full = copy.deepcopy(base_model)
    full_record = train(full, tokenizer, SPLITS.train, SPLITS.validation, quick(lr=1e-3))
    lora = add_lora(copy.deepcopy(base_model), ["c_attn"], r=4, alpha=8)
    lora_record = train(lora, tokenizer, SPLITS.train, SPLITS.validation, quick())
    assert full_record.method == "full"
    assert full_record.trainable_params == full_record.total_params
    assert all(not torch.equal(p, q) for p, q in zip(full.parameters(), base_model.parameters()))
    assert lora_record.optimizer_state_bytes < 0.2 * full_record.optimizer_state_bytes


def test_training_lowers_the_loss(base_model, tokenizer):
    model = copy.deepcopy(base_model)
    val = SPLITS.validation[:8]
    before = validation_loss(model, tokenizer, val)
    record = train(model, tokenizer, SPLITS.train, val, quick(steps=20, lr=3e-3))
    assert record.final_val_loss < before - 0.5
    assert sum(record.losses[-3:]) < sum(record.losses[:3])


def test_same_seed_same_curve_other_seed_other_curve(base_model, tokenizer):
    runs = []
    for seed in (0, 0, 1):
        model = add_lora(copy.deepcopy(base_model), ["c_attn"], r=4, alpha=8)
        torch.manual_seed(123)  # the adapters' init: same for all three
        for m in model.modules():
            if hasattr(m, "reset_lora_parameters"):
                m.reset_lora_parameters()
        runs.append(train(model, tokenizer, SPLITS.train, SPLITS.validation, quick(seed=seed)).losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_eval_every_records_validation_curve(base_model, tokenizer):
    model = add_lora(copy.deepcopy(base_model), ["c_attn"], r=2, alpha=4)
    record = train(model, tokenizer, SPLITS.train, SPLITS.validation, quick(steps=6, eval_every=2))
    assert record.val_steps == [2, 4, 6]
    assert len(record.val_losses) == 3


def test_validation_loss_scores_target_tokens_like_transformers(base_model, tokenizer):
    record = SPLITS.validation[0]
    batch = collate(tokenizer, [record])
    hf = base_model(**batch).loss.item()  # transformers shifts labels and ignores -100
    assert validation_loss(base_model, tokenizer, [record]) == pytest.approx(hf, rel=1e-5)
    # padding in a batch does not change a record's contribution
    pair = [SPLITS.validation[0], SPLITS.validation[1]]
    n = [int((collate(tokenizer, [r])["labels"] != -100).sum()) for r in pair]  # scored tokens (none at position 0)
    each = [validation_loss(base_model, tokenizer, [r]) for r in pair]
    joint = validation_loss(base_model, tokenizer, pair)
    # masked kernels round differently
    assert joint == pytest.approx((each[0] * n[0] + each[1] * n[1]) / sum(n), rel=1e-5)


def test_text_loss_matches_transformers_on_one_block(base_model):
    torch.manual_seed(0)
    ids = torch.randint(0, base_model.config.vocab_size, (33,))
    hf = base_model(input_ids=ids[:32][None], labels=ids[:32][None]).loss.item()
    assert text_loss(base_model, ids, block_size=32) == pytest.approx(hf, rel=1e-5)
    with pytest.raises(ValueError, match="block"):
        text_loss(base_model, ids[:10], block_size=32)


def test_bad_input_is_refused(base_model, tokenizer):
    frozen = copy.deepcopy(base_model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, tokenizer, SPLITS.train, SPLITS.validation, quick())
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="no validation records"):
        validation_loss(base_model, tokenizer, [])


def test_optimizer_state_bytes_counts_adam_moments():
    p = torch.nn.Parameter(torch.zeros(10, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert optimizer_state_bytes(opt) == 0  # nothing until the first step
    p.grad = torch.ones_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 30 * 4 + 4


def test_autocast_only_on_cuda_by_default():
    x = torch.randn(2, 2)
    with autocast_for(torch.device("cpu")):
        assert (x @ x).dtype == torch.float32
    with autocast_for(torch.device("cpu"), bf16=True):
        assert (x @ x).dtype == torch.bfloat16


def test_target_loss_equals_transformers_loss(base_model, tokenizer):
    from lora_course.train import target_loss

    for records in (list(SPLITS.validation[:4]), list(SPLITS.train[:6])):
        batch = collate(tokenizer, records)
        with torch.no_grad():
            ours = target_loss(base_model, batch)
            theirs = base_model(**batch).loss
        assert abs(ours.item() - theirs.item()) < 1e-5


def test_checkpoint_is_called_every_n_steps_and_at_the_end(base_model, tokenizer):
    model = add_lora(copy.deepcopy(base_model), ["c_attn"], r=2)
    seen = []
    train(model, tokenizer, SPLITS.train, SPLITS.validation, quick(steps=7),
          checkpoint=lambda step, m: seen.append((step, m.training)), checkpoint_every=3)
    assert seen == [(3, True), (6, True), (7, True)]
    with pytest.raises(ValueError, match="checkpoint_every"):
        train(model, tokenizer, SPLITS.train, SPLITS.validation, quick(), checkpoint_every=-1)


def test_step_costs_measures_each_model_s_memory_and_its_step_in_wall_and_cpu_time():
    base = toy_gpt2(seed=0)
    models = {"lora": add_lora(copy.deepcopy(base), ["c_attn"], r=4), "full": copy.deepcopy(base)}
    before = {k: v.clone() for k, v in models["full"].state_dict().items()}
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    costs = step_costs(models, ids, rounds=2)
    assert set(costs) == {"lora", "full"} and all(isinstance(c, StepCost) for c in costs.values())
    for cost in costs.values():
        assert cost.ms > 0 and cost.cpu_ms > 0 and cost.memory.resident > 0 and cost.memory.step_peak > 0
    assert costs["full"].memory.resident > costs["lora"].memory.resident  # AdamW state for every weight
    assert any((before[k] != v).any() for k, v in models["full"].state_dict().items())  # it really stepped
    with pytest.raises(ValueError, match="rounds"):
        step_costs(models, ids, rounds=0)
