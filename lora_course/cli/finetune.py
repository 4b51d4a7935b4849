"""Fine-tune GPT-2 with LoRA (or fully) on the course's task, from a terminal.

    python -m lora_course.finetune                                   # shipped tiny GPT-2, LoRA r=8 on c_attn
    python -m lora_course.finetune --model gpt2 --steps 1000         # real GPT-2 from your cache or the hub
    python -m lora_course.finetune --model gpt2-random --steps 2 --val-records 4   # 124M shape, smoke run
    python -m lora_course.finetune --method full --lr 2e-3

The same experiment as notebook 06, through the same code: `load_model`, `add_lora`,
`train` and `evaluate_task`. It prints a progress bar, then a summary table, and saves the
adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`) together
with `run.json`, the numbers it measured. `--model gpt2` falls back to the shipped model,
with a message, where GPT-2's weights cannot be had; `--model gpt2-random` builds GPT-2
124M from its config with random weights (speed and smoke runs; its task scores mean
nothing). Bad input exits with status 2 and one line saying what to change, before
anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import save_adapter
from ..data import evaluate_task, make_splits
from ..lora import count_parameters, lora_layers
from ..runtime import get_device, seed_everything
from ..train import TrainConfig, train
from .common import Parser, UsageError, adapt, build_model, check_at_least, run_command

__all__ = ["main", "parse_args", "run"]

MODELS = ("tiny-gpt2", "gpt2", "gpt2-medium", "gpt2-random")
DEFAULT_LR = {("lora", True): 1e-2, ("lora", False): 1e-3, ("full", True): 2e-3, ("full", False): 1e-4}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser("python -m lora_course.finetune", prog="python -m lora_course.finetune",
               description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-gpt2",
                   help=f"one of {', '.join(MODELS)}, or a folder saved with save_pretrained (default tiny-gpt2)")
    p.add_argument("--method", choices=("lora", "full"), default="lora", help="LoRA or full fine-tuning")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--targets", default="c_attn", help="comma-separated target_modules (default c_attn)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-2 LoRA / 2e-3 full on the shipped model, 1e-3 / 1e-4 on GPT-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16 autocast or fp32 (default: bf16 on CUDA, else fp32); weights and LoRA factors stay fp32")
    p.add_argument("--eval-records", type=int, default=None,
                   help="test records scored by greedy decoding at the end (default 32; 0 for gpt2-random)")
    p.add_argument("--val-records", type=int, default=64,
                   help="validation records scored at the end (default 64; fewer for a quick run on a CPU)")
    p.add_argument("--out", default=None, help="folder for the adapter and run.json (default runs/<model>-<method>)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _output_folder(args) -> Path:
    """The folder to write to, checked before any work: writable, and not holding a run unless --overwrite."""
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.model).name}-{args.method}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} already holds files; pass --overwrite to replace them or choose another folder")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so no folder can be made there; choose another folder")
    try:  # a real probe (permissions, read-only file systems), removed at once
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {existing} ({err.strerror}); choose a folder you can write to")
    return out


def _build_model(args, device):
    """(model, tokenizer, a sentence saying what was loaded, whether it is the shipped model)."""
    if args.model not in MODELS and not Path(args.model).is_dir():
        raise UsageError(f"unknown --model {args.model!r}: use one of {', '.join(MODELS)}, "
                         "or a folder saved with save_pretrained")
    return build_model(args.model, seed=args.seed, device=device)


def run(args) -> dict:
    """Check everything, train, evaluate, save; returns the record written to run.json."""
    if args.eval_records is None:
        args.eval_records = 0 if args.model == "gpt2-random" else 32
    check_at_least(steps=(args.steps, 1), batch_size=(args.batch_size, 1), eval_records=(args.eval_records, 0),
                   val_records=(args.val_records, 1))
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    out = _output_folder(args)
    try:
        device = get_device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {args.device}: {str(err).splitlines()[0]}") from None
    bf16 = (device.type == "cuda") if args.precision is None else args.precision == "bf16"

    seed_everything(args.seed)
    base, tokenizer, loaded, shipped = _build_model(args, device)
    print(loaded)
    model = adapt(base, args.method, args.targets, args.r, args.alpha, use_rslora=args.rslora)
    lr = args.lr if args.lr is not None else DEFAULT_LR[(args.method, shipped)]
    splits = make_splits(n_validation=64, n_test=128, task="api", n_train=4096)  # notebook 06's six-field task
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed, device=str(device),
                         bf16=bf16, progress=not args.no_progress, desc=f"{args.method} {Path(args.model).name}",
                         memory_steps=2)  # the run's peak memory is reported
    t0 = time.perf_counter()
    record = train(model, tokenizer, splits.train, splits.validation[: args.val_records], config)
    wall = time.perf_counter() - t0
    scores = {}
    if args.eval_records:
        test = list(splits.test[: args.eval_records])
        scores = {k: v for k, v in evaluate_task(model, tokenizer, test, max_new_tokens=48).items()
                  if isinstance(v, float)}

    trainable, total = count_parameters(model)
    summary = {
        "model": args.model, "loaded": loaded, "method": record.method, "device": record.device,
        "precision": record.precision, "steps": record.steps, "batch_size": record.batch_size, "lr": lr,
        "trainable_params": trainable, "total_params": total, "final_train_loss": record.losses[-1],
        "val_loss": record.final_val_loss, "tokens_per_second": record.tokens_per_second,
        "peak_memory_bytes": record.peak_memory_bytes, "optimizer_state_bytes": record.optimizer_state_bytes,
        "wall_seconds": wall, "test_scores": scores, "seed": args.seed,
    }
    if args.method == "lora":
        summary["lora"] = asdict(next(iter(lora_layers(model).values())).config)
    out.mkdir(parents=True, exist_ok=True)
    if args.method == "lora":
        save_adapter(model, out, base_model_name_or_path=args.model)
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path) -> None:
    rows = [
        ("model", s["loaded"]),
        ("method", f"{s['method']} ({s['precision']}, {s['device']})"),
        ("trainable parameters", f"{s['trainable_params']:,d} of {s['total_params']:,d} "
                                 f"({100 * s['trainable_params'] / s['total_params']:.3f}%)"),
        ("steps x batch, lr", f"{s['steps']} x {s['batch_size']}, {s['lr']:g}"),
        ("final train loss / val loss", f"{s['final_train_loss']:.3f} / {s['val_loss']:.3f}"),
        ("tokens per second", f"{s['tokens_per_second']:,.0f}"),
        ("peak memory (training steps)", f"{s['peak_memory_bytes'] / 1e6:,.1f} MB"),
        ("optimizer state", f"{s['optimizer_state_bytes'] / 1e6:,.2f} MB"),
    ]
    rows += [(f"test {k.replace('_', ' ')}", f"{v:.3f}") for k, v in s["test_scores"].items()]
    rows.append(("saved to", f"{out}{os.sep}" + (" (PEFT adapter + run.json)" if "lora" in s else " (run.json)")))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv=None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
