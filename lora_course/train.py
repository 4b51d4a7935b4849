"""One small, readable training loop for LoRA and for full fine-tuning.

The loop does not know which one it runs: it trains whatever parameters have
`requires_grad=True`. After `add_lora` those are the adapters' A and B; on a plain
model they are all of them. Everything the lesson compares is measured here and kept
in a `TrainRecord`: the loss curve, validation loss, tokens per second, time per step,
peak memory, trainable parameters and the bytes of optimizer state (AdamW keeps two
numbers, exp_avg and exp_avg_sq, per trainable parameter).

Device: CUDA, then Apple MPS, then CPU (`lora_course.runtime.get_device`). On CUDA the
forward pass runs under bf16 autocast (weights and optimizer stay in fp32).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .data import Record, batches, collate, shard_batches
from .lora import count_parameters
from .measure import (
    StepMemory,
    fastest_of_rounds,
    optimizer_state_bytes,
    peak_memory,
    training_step_memory,
    wall_and_cpu_ms,
)
from .runtime import get_device, progress_bar, seed_everything
from .validate import check_int, check_positive

__all__ = [
    "TrainConfig",
    "TrainRecord",
    "train",
    "validation_loss",
    "text_loss",
    "trainable_parameters",
    "autocast_for",
    "target_loss",
    "optimizer_step",
    "StepCost",
    "step_costs",
    "train_steps",
    "measure_training_peak",
]


@dataclass
class TrainConfig:
    """Hyperparameters of one run. Equal configs and seeds give equal batches."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 10% of lr
    grad_clip: float | None = 1.0
    eval_every: int = 0  # validation loss every N steps (0: only at the end)
    n_eval: int = 64  # validation records used for the validation loss
    seed: int = 0
    device: str | None = None  # None: CUDA, then MPS, then CPU
    bf16: bool | None = None  # None: bf16 autocast exactly when the device is CUDA
    progress: bool = True  # tqdm progress bar
    memory_steps: int = 0  # first steps run under the peak-memory tracker, left out of the timing (0: not measured)
    desc: str = "train"
    shard: tuple[int, int] | None = None  # (rank, world_size): train on this rank's slice of each global batch

    def __post_init__(self):
        for name in ("steps", "batch_size", "n_eval"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "memory_steps"):
            check_int(name, getattr(self, name), minimum=0)
        check_positive("lr", self.lr, hint="1e-3 suits LoRA, 1e-4 full fine-tuning")


@dataclass
class TrainRecord:
    """What one run measured. Times are wall-clock seconds on `device`."""

    method: str
    device: str
    precision: str
    steps: int
    batch_size: int
    losses: list[float] = field(default_factory=list)  # training loss at every step
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    optimizer_state_bytes: int = 0
    peak_memory_bytes: int = 0  # above what was allocated when training started (0: not measured, or on MPS)
    train_seconds: float = 0.0  # timed training steps only (evaluation excluded)
    timed_steps: int = 0  # steps after the memory probe, the ones timed
    tokens: int = 0  # non-padding tokens seen in training

    @property
    def time_per_step(self) -> float:
        return self.train_seconds / max(self.timed_steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def final_val_loss(self) -> float:
        return self.val_losses[-1] if self.val_losses else float("nan")

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else float("nan")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer will update (those with requires_grad)."""
    return [p for p in model.parameters() if p.requires_grad]


def autocast_for(device: torch.device, bf16: bool | None = None):
    """bf16 autocast on CUDA (or when asked), otherwise a no-op context."""
    use = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use else nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def validation_loss(model: nn.Module, tokenizer, records: Sequence[Record], batch_size: int = 32,
                    bf16: bool | None = None) -> float:
    """Mean cross-entropy per target token over `records` (prompt tokens not scored)."""
    if not records:
        raise ValueError("no validation records; pass at least one")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenizer, records[start : start + batch_size]).items()}
        with autocast_for(device, bf16):
            logits, targets = _target_logits(model, batch)
        total += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def text_loss(model: nn.Module, token_ids: torch.Tensor, block_size: int = 128, batch_size: int = 16,
              max_blocks: int | None = None, bf16: bool | None = None) -> float:
    """Mean next-token cross-entropy on a long token stream, cut into blocks.

    Used to measure forgetting: the loss on the pretraining model's held-out text
    before and after fine-tuning.
    """
    token_ids = torch.as_tensor(token_ids).flatten()
    n_blocks = (len(token_ids) - 1) // block_size
    if n_blocks < 1:
        raise ValueError(f"{len(token_ids)} tokens cannot fill one block of {block_size}; "
                         "pass more text or a smaller block_size")
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    blocks = token_ids[: n_blocks * block_size].view(n_blocks, block_size)  # (N, block)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, n_blocks, batch_size):
        x = blocks[start : start + batch_size].to(device)
        with autocast_for(device, bf16):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits  # (B, block, V); no padding here
        total += nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
    model.train(was_training)
    return total / (n_blocks * (block_size - 1))


def _target_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, vocab) and next-token targets (N,) of a collated batch, the LM head run only where targets are.

    Position t predicts token t + 1, so the LM head (d x vocab, the largest matmul of a small
    model) runs only at the N positions whose next token is scored: `logits_to_keep` takes
    that (B, T) boolean mask and returns the N kept rows. Prompt and padding cost nothing.
    """
    labels = batch["labels"]  # (B, T), -100 on prompt and padding
    scored = labels[:, 1:] != -100  # (B, T-1): the next token is a target
    keep = torch.cat([scored, scored.new_zeros(labels.size(0), 1)], dim=1)  # (B, T); the last position has no next
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return logits.float(), labels[:, 1:][scored]  # (N, vocab), (N,)


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens: `model(**batch).loss`, with logits only where targets are."""
    return nn.functional.cross_entropy(*_target_logits(model, batch))


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, grad_clip: float | None = None,
                   scheduler=None) -> float:
    """Back-propagate `loss`, clip the gradients' norm, step the optimizer (and scheduler), free the gradients.

    The one optimizer step of the package: `train`, the lessons' small loops and the
    measurements all call it. Returns the loss as a float.
    """
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclass(frozen=True)
class StepCost:
    """One model's training step, measured: its memory (`memory.StepMemory`), and ms per step by the wall clock
    and in process CPU time (each its fastest round; on the CPU, CPU time is what a busy machine disturbs less)."""

    memory: StepMemory
    ms: float
    cpu_ms: float


def step_costs(models: dict[str, nn.Module], input_ids: torch.Tensor, rounds: int = 3, lr: float = 1e-4,
               device=None) -> dict[str, StepCost]:
    """Memory and time of one AdamW step of each causal LM on the same batch (labels = inputs).

    Memory: resident bytes and the step's peak above them (`memory.training_step_memory`).
    Time: wall and CPU ms of one step (`measure.wall_and_cpu_ms`), each model's fastest of `rounds`
    rounds in which every model steps in turn (`measure.fastest_of_rounds`).
    """
    check_int("rounds", rounds, minimum=1)  # before any model is moved or stepped
    device = torch.device(device) if device is not None else input_ids.device
    timings, costs = {}, {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)

        def step(model=model, optimizer=optimizer):
            with autocast_for(device):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            optimizer_step(loss, optimizer)

        timings[name] = lambda step=step: wall_and_cpu_ms(step, device)  # (wall ms, CPU ms) of one step
        costs[name] = training_step_memory(model, step, optimizer, device=device)
    ms = fastest_of_rounds(timings, rounds)
    return {name: StepCost(costs[name], *ms[name]) for name in models}


def train_steps(model: nn.Module, steps: int = 3, *, batch_size: int = 4, seq_len: int = 32,
                lr: float = 1e-4, seed: int = 0) -> float:
    """AdamW on the trainable parameters, `steps` steps on one fixed random batch of token ids.

    Enough to measure a training step's memory, or to move every LoRA B away from zero.
    `model` is a causal LM taking `input_ids` and `labels` (e.g. `GPT2LMHeadModel`); the
    batch (batch_size, seq_len) comes from a generator seeded with `seed`. The model is
    left in eval mode; returns the last step's loss.
    """
    check_int("steps", steps, minimum=1)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; add_lora(model, ...) or unfreeze some first")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g).to(params[0].device)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = optimizer_step(model(input_ids=x, labels=x).loss, optimizer)
    model.eval()
    return loss


def measure_training_peak(build: Callable[[], nn.Module], steps: int = 3, *, batch_size: int = 4,
                          seq_len: int = 32, lr: float = 1e-4, device="cpu") -> tuple[nn.Module, int]:
    """Build a model with `build()` and `train_steps` it, all inside `peak_memory`: (model, peak bytes).

    Building inside the measurement lets the CPU count see every byte the step frees (see
    `peak_memory`), so the figure is the whole training step: weights, gradients, AdamW
    state and activations. Compare it with `gpt2_training_budget(model, ...).peak`.
    """
    def run():
        model = build().to(device)
        train_steps(model, steps, batch_size=batch_size, seq_len=seq_len, lr=lr)
        return model

    return peak_memory(run, device=device)


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _start_record(model: nn.Module, config: TrainConfig, method: str | None, device: torch.device,
                  use_bf16: bool) -> TrainRecord:
    n_trainable, total_params = count_parameters(model)  # a 4-bit base's weights are codes, counted too
    return TrainRecord(
        method=method or ("full" if n_trainable == total_params else "LoRA"),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        precision="bf16 autocast" if use_bf16 else "fp32",
        steps=config.steps,
        batch_size=config.batch_size,
        trainable_params=n_trainable,
        total_params=total_params,
    )


def _training_batches(tokenizer, records: Sequence[Record], config: TrainConfig):
    if config.shard is None:
        return batches(tokenizer, records, config.batch_size, seed=config.seed)
    # every rank draws the same global batch of batch_size x world_size and keeps its own rows
    rank, world = config.shard
    return shard_batches(batches(tokenizer, records, config.batch_size * world, seed=config.seed), rank, world)


def _run_steps(step: Callable[[int, bool], None], config: TrainConfig, device: torch.device,
               record: TrainRecord) -> None:
    """All steps; the first `memory_steps` under the peak-memory tracker (slower, so left out of the timing
    when there are others): the first step allocates gradients and optimizer state, so later steps look alike."""
    n_probe = min(config.memory_steps, config.steps)
    probe = lambda: [step(i, n_probe == config.steps) for i in range(n_probe)]  # noqa: E731
    if n_probe and device.type in ("cuda", "cpu"):
        _, record.peak_memory_bytes = peak_memory(probe, device)
    else:  # not asked for, or on MPS (peak_memory measures CUDA and CPU only): the record keeps 0
        probe()
    for i in range(n_probe, config.steps):
        step(i, True)


def train(model: nn.Module, tokenizer, train_records: Sequence[Record], val_records: Sequence[Record],
          config: TrainConfig | None = None, method: str | None = None,
          checkpoint: Callable[[int, nn.Module], None] | None = None, checkpoint_every: int = 0) -> TrainRecord:
    """Train `model` in place on the task; return what was measured.

    LoRA or full fine-tuning is decided by which parameters require grad. `method`
    names the run in tables (default: "LoRA" if only some parameters train, else "full").
    `checkpoint(step, model)` is called every `checkpoint_every` steps and after the last
    one (outside the timing), e.g. to score the model along the way.
    """
    check_int("checkpoint_every", checkpoint_every, minimum=0)
    config = config or TrainConfig()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; call add_lora(...) or model.requires_grad_(True)")
    device = get_device(config.device)
    model.to(device)
    use_bf16 = device.type == "cuda" if config.bf16 is None else config.bf16
    record = _start_record(model, config, method, device, use_bf16)
    seed_everything(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    data = _training_batches(tokenizer, train_records, config)
    val_records = val_records[: config.n_eval]

    def step(index: int, timed: bool) -> None:
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(data).items()}
        with autocast_for(device, use_bf16):
            loss = target_loss(model, batch)  # mean cross-entropy over the target tokens
        record.losses.append(optimizer_step(loss, optimizer, grad_clip=config.grad_clip, scheduler=scheduler))
        if timed:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record.train_seconds += time.perf_counter() - t0
            record.tokens += int(batch["attention_mask"].sum())
            record.timed_steps += 1
        bar.update()
        bar.set_postfix(loss=f"{record.losses[-1]:.3f}", refresh=False)  # redrawn at mininterval
        done = index + 1
        if checkpoint is not None and (done == config.steps or (checkpoint_every and done % checkpoint_every == 0)):
            checkpoint(done, model)
            model.train()
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            record.val_steps.append(done)
            record.val_losses.append(validation_loss(model, tokenizer, val_records, bf16=use_bf16))

    model.train()
    bar = progress_bar(total=config.steps, desc=config.desc, disable=not config.progress)
    _run_steps(step, config, device, record)
    bar.close()
    record.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    record.val_steps.append(config.steps)
    record.val_losses.append(validation_loss(model, tokenizer, val_records, bf16=use_bf16))
    model.eval()
    return record
