"""Benchmark a fine-tuning step: LoRA vs full fine-tuning, and our LoRA vs PEFT's.

For two model shapes, the course's shipped tiny GPT-2 and a GPT-2 124M-shaped model
(random weights: speed and memory do not depend on the values), it times one complete
AdamW training step (forward, backward, optimizer step) of

* full fine-tuning (every parameter trains),
* our LoRA (`add_lora`, r=8, alpha=16 on `c_attn`),
* PEFT's LoRA with the same config (`fan_in_fan_out=True` for GPT-2's Conv1D),

and measures tokens/s and the peak memory of the first two steps from a fresh optimizer
(gradients + optimizer state + activations; the weights are already there). Variants are
timed in interleaved rounds inside one process and the table reports ratios from this
one run. On CUDA the forward pass runs under bf16 autocast, as in `lora_course.train`.

The FLOP count says a LoRA step costs about 2/3 of a full step at 124M (the frozen
weights still back-propagate to their inputs, but skip their weight gradients and the
optimizer's update); targets: LoRA/full <= 0.75 at the 124M shape, ours/PEFT <= 1.10.

    python benchmarks/bench_finetune.py            # CUDA if present, else CPU
    python benchmarks/bench_finetune.py --small    # quick CPU settings (small batch, few rounds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from lora_course import add_lora, get_device, seed_everything
from lora_course.measure import peak_memory
from lora_course.memory import format_bytes
from lora_course.models import load_model, toy_gpt2
from lora_course.skeletons import gpt2_config
from lora_course.train import autocast_for


def gpt2_124m_shape():
    """GPT-2 small's shape with random weights (speed and memory do not depend on the values), dropout off."""
    return toy_gpt2(gpt2_config("small", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), seed=0)


def shipped_model():
    model, _, _ = load_model("tiny-gpt2", verbose=False, device="cpu")
    return model


def variants(base, r: int, alpha: float) -> dict:
    full = copy.deepcopy(base).requires_grad_(True)
    ours = add_lora(copy.deepcopy(base), ["c_attn"], r=r, alpha=alpha)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True, bias="none"))
    return {"full": full, "ours": ours, "peft": peft}


def make_step(model, batch, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast_for(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name, base, device, batch_size, seq_len, rounds, steps_per_round, r, alpha):
    models = {k: m.to(device).train() for k, m in variants(base, r, alpha).items()}
    vocab = base.config.vocab_size
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    result = {k: {"params": sum(p.numel() for p in m.parameters() if p.requires_grad)} for k, m in models.items()}
    for k, m in models.items():  # peak memory of the first steps from a fresh optimizer
        step = make_step(m, batch, device)
        _, result[k]["peak"] = peak_memory(lambda: [step() for _ in range(2)], device=device)
    steps = {k: make_step(m, batch, device) for k, m in models.items()}
    for fn in steps.values():  # warm-up: allocate optimizer state, pick kernels
        fn()
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, fn in steps.items():  # interleaved, so drift in machine load hits all alike
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / steps_per_round)
    for k in models:
        result[k]["step"] = statistics.median(times[k])
        result[k]["tok/s"] = batch_size * seq_len / result[k]["step"]
    for m in models.values():
        m.to("cpu")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="quick CPU settings: batch 2 x 64 tokens, 3 rounds")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps-per-round", type=int, default=None)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    batch = args.batch or (2 if args.small else 8)
    seq = args.seq or (64 if args.small else (512 if device.type == "cuda" else 256))
    rounds = args.rounds or (3 if args.small else 7)
    per_round = args.steps_per_round or (2 if args.small else (10 if device.type == "cuda" else 3))
    seed_everything(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device: {where} ({precision}); batch {batch} x {seq} tokens; {rounds} rounds x {per_round} steps; "
          f"LoRA r={args.r}, alpha={args.alpha:g} on c_attn; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    rows = []
    for name, build in [("tiny-gpt2 (shipped)", shipped_model), ("GPT-2 124M shape", gpt2_124m_shape)]:
        res = bench(name, build(), device, batch, seq, rounds, per_round, args.r, args.alpha)
        rows.append((name, res))

    print()
    head = (f"{'model':<20} {'variant':<6} {'trainable':>12} {'ms/step':>9} {'tokens/s':>10} {'peak mem':>10}")
    print(head)
    print("-" * len(head))
    for name, res in rows:
        for k in ("full", "ours", "peft"):
            v = res[k]
            print(f"{name:<20} {k:<6} {v['params']:>12,d} {1000 * v['step']:>9.1f} {v['tok/s']:>10,.0f} "
                  f"{format_bytes(v['peak'], 'MB'):>10}")
    print()
    head = (f"{'model':<20} {'LoRA/full step':>15} {'LoRA/full peak mem':>19} {'ours/PEFT step':>15} "
            f"{'ours/PEFT peak mem':>19}")
    print(head)
    print("-" * len(head))
    for name, res in rows:
        ours, full, peft = res["ours"], res["full"], res["peft"]
        print(f"{name:<20} {ours['step'] / full['step']:>15.2f} {ours['peak'] / full['peak']:>19.3f} "
              f"{ours['step'] / peft['step']:>15.2f} {ours['peak'] / max(peft['peak'], 1):>19.3f}")
    big = rows[-1][1]
    lora_ratio = big["ours"]["step"] / big["full"]["step"]
    peft_ratio = big["ours"]["step"] / big["peft"]["step"]
    print()
    for what, ratio, target in (("LoRA/full", lora_ratio, 0.75), ("ours/PEFT", peft_ratio, 1.10)):
        print(f"target {what} step at 124M shape <= {target:.2f}: {ratio:.2f} -> "
              f"{'met' if ratio <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
