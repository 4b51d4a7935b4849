"""Benchmark our training loop against Hugging Face `Trainer` + PEFT on the same LoRA fine-tune.

Same base model, same task records and collation (`lora_course.data.collate`), same batch
size, AdamW with the same learning rate, gradient clipping at 1.0, warm-up then cosine
decay. Ours: `add_lora` + `lora_course.train.train`. Theirs: `peft.get_peft_model` +
`transformers.Trainer`. Both time the same window (the steps after the first two, which
allocate the optimizer state and are measured for memory instead) and count the same
thing (non-padding tokens), so tokens/s compare the loops themselves. Peak memory is
measured over the first two steps of each, with `lora_course.measure.PeakMemory`. Runs
alternate ours / theirs in rotating order and the table reports medians and ratios from
this one run.

    python benchmarks/bench_trainer.py                 # shipped tiny GPT-2, CPU (or CUDA if present)
    python benchmarks/bench_trainer.py --rounds 5 --steps 40
    python benchmarks/bench_trainer.py --model gpt2    # real GPT-2 where its weights are cached
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from lora_course.notices import quiet_library_notices

quiet_library_notices()  # before PEFT is imported: bitsandbytes, where installed, logs a notice on import

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lora_course import add_lora, get_device, load_model, seed_everything  # noqa: E402
from lora_course.data import collate, make_splits  # noqa: E402
from lora_course.measure import PeakMemory  # noqa: E402
from lora_course.memory import format_bytes  # noqa: E402
from lora_course.train import TrainConfig, train  # noqa: E402

PROBE_STEPS = 2  # measured for memory, left out of the timing (as lora_course.train does)


class _Timing(TrainerCallback):
    """Peak memory over the first steps, then the time and tokens of every later step."""

    def __init__(self, device):
        self.device, self.tracker = device, PeakMemory(device)
        self.seconds, self.tokens, self.peak, self._t0 = 0.0, 0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.tracker.start()
        elif state.global_step >= PROBE_STEPS:
            _sync(self.device)
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == PROBE_STEPS:
            self.peak = self.tracker.stop()
        elif self._t0 is not None:
            _sync(self.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None


class _Records(torch.utils.data.Dataset):
    def __init__(self, records):
        self.records = list(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(base, tokenizer, splits, args, device) -> dict:
    model = add_lora(copy.deepcopy(base), ["c_attn"], r=args.r, alpha=args.alpha)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         n_eval=1, seed=0, device=str(device), progress=False, memory_steps=PROBE_STEPS)
    record = train(model, tokenizer, splits.train, splits.validation, config)
    return {"tokens/s": record.tokens_per_second, "peak": record.peak_memory_bytes}


def run_trainer(base, tokenizer, splits, args, device) -> dict:
    peft_config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["c_attn"], lora_dropout=0.0,
                             fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), peft_config)
    timing = _Timing(device)
    tokens = []

    def collator(records):
        batch = collate(tokenizer, records)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, weight_decay=0.0, warmup_steps=args.warmup, lr_scheduler_type="cosine",
            max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no", save_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
            use_cpu=device.type == "cpu", bf16=device.type == "cuda",
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=_Records(splits.train),
                          data_collator=collator, callbacks=[timing])
        trainer.remove_callback(PrinterCallback)  # its end-of-run log line would break up the table
        trainer.train()
    timed_tokens = sum(tokens[PROBE_STEPS:args.steps])
    return {"tokens/s": timed_tokens / timing.seconds, "peak": timing.peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-gpt2", help="tiny-gpt2 (shipped, default) or gpt2")
    p.add_argument("--steps", type=int, default=30, help="steps per run (the first 2 are not timed)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each loop")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.steps <= PROBE_STEPS:
        p.error(f"--steps must be more than {PROBE_STEPS}: the first {PROBE_STEPS} are measured for memory")

    device = get_device(args.device)
    seed_everything(0)
    base, tokenizer, info = load_model(args.model, device=device, fast=False, verbose=False)
    splits = make_splits(task="api", n_train=4096)  # notebook 06's six-field task
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"{info.summary()}\ndevice: {where}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"LoRA r={args.r}, alpha={args.alpha:g} on c_attn; batch {args.batch_size}; "
          f"{args.steps} steps per run ({args.steps - PROBE_STEPS} timed), {args.rounds} rounds\n")

    loops = {"ours": run_ours, "Trainer + PEFT": run_trainer}
    results = {name: [] for name in loops}
    names = list(loops)
    for i in range(args.rounds):  # rotate the order so neither loop always runs first
        for name in names[i % 2:] + names[:i % 2]:
            results[name].append(loops[name](base, tokenizer, splits, args, device))
    tps = {name: statistics.median(r["tokens/s"] for r in runs) for name, runs in results.items()}
    peak = {name: statistics.median(r["peak"] for r in runs) for name, runs in results.items()}

    print(f"{'loop':<16} {'tokens/s (median)':>18} {'per round':>28} {'peak memory':>12}")
    for name, runs in results.items():
        rounds = ", ".join(f"{r['tokens/s']:.0f}" for r in runs)
        print(f"{name:<16} {tps[name]:>18,.0f} {rounds:>28} {format_bytes(peak[name], 'MB'):>12}")
    ratio = tps["ours"] / tps["Trainer + PEFT"]
    print(f"\nours / Trainer tokens/s: {ratio:.2f}x (target on CPU >= 1.0x); "
          f"peak memory ours / Trainer: {peak['ours'] / max(peak['Trainer + PEFT'], 1):.2f}x")


if __name__ == "__main__":
    main()
