"""Benchmark one LoRA layer: ours vs PEFT's vs a frozen nn.Linear, and merged inference.

At GPT-2's layer sizes (in -> out: 768 -> 768, 768 -> 2304, 768 -> 3072) and a batch of
8 sequences x 512 tokens, it measures

* forward + backward time and peak memory of a training step through the layer (the input
  requires grad, as it does inside a network, so the frozen layer still back-propagates);
* inference time of our merged LoRALinear against a plain nn.Linear.

All variants are timed in interleaved rounds inside one process, and the table reports
ratios from this one run (a shared machine is noisy; ratios from one run are what count).

    python benchmarks/bench_lora_layer.py            # CPU here, CUDA if present
    python benchmarks/bench_lora_layer.py --rounds 3 --tokens 1024   # quicker
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_course import add_lora, copy_lora_to_peft, get_device, seed_everything
from lora_course.measure import median_ms, peak_memory

SIZES = [(768, 768), (768, 2304), (768, 3072)]  # (in_features, out_features)


class _Holder(nn.Module):
    """PEFT adapts modules inside a model; this one holds the single layer."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.proj = layer


def paired_layers(base: nn.Linear, r: int, alpha: float) -> tuple[nn.Module, nn.Module]:
    """Our LoRALinear and PEFT's LoRA layer around copies of `base`, with the same A and a non-zero B."""
    ours = add_lora(_Holder(copy.deepcopy(base)), ["proj"], r=r, alpha=alpha)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, bias="none")
    theirs = get_peft_model(_Holder(copy.deepcopy(base)), config)
    with torch.no_grad():
        nn.init.normal_(ours.proj.lora_B, std=0.02)  # both do the same arithmetic
    copy_lora_to_peft(ours, theirs)
    return ours.proj, theirs.base_model.model.proj


def train_step(layer: nn.Module, x: torch.Tensor):
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).float().pow(2).mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8 * 512, help="batch x sequence (default 8 x 512)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per variant")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: best available)")
    args = parser.parse_args()

    device = get_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {device} | dtype: {dtype} | torch {torch.__version__} | threads: {torch.get_num_threads()}")
    print(f"tokens per step: {args.tokens} | r = {args.r}, alpha = {args.alpha} | rounds: {args.rounds}\n")

    header = (f"{'in -> out':>12} | {'Linear fwd+bwd':>14} {'ours':>9} {'PEFT':>9} {'ours/PEFT':>9} "
              f"{'ours/Linear':>11} | {'peak MB ours':>12} {'PEFT':>10} {'Linear':>11} | "
              f"{'Linear inf':>10} {'merged':>9} {'merged/Linear':>13}")
    print(header)
    print("-" * len(header))
    worst_train, worst_merged = 0.0, 0.0
    for d_in, d_out in SIZES:
        seed_everything(0)
        base = nn.Linear(d_in, d_out).to(device, dtype).requires_grad_(False)
        ours, theirs = paired_layers(base, r=args.r, alpha=args.alpha)
        x = torch.randn(args.tokens, d_in, device=device, dtype=dtype, requires_grad=True)

        variants = {"linear": base, "ours": ours, "peft": theirs}
        times = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.rounds):  # rotate the order each round so no variant always runs first
            for name in names[i % 3:] + names[:i % 3]:
                times[name].append(median_ms(train_step(variants[name], x), min_run_time=0.3))
        t = {name: statistics.median(v) for name, v in times.items()}
        peak = {}
        for name, layer in variants.items():
            x.grad = None  # measure each step from the same clean start
            layer.zero_grad(set_to_none=True)
            peak[name] = peak_memory(train_step(layer, x), device)[1]

        merged = copy.deepcopy(ours).eval()
        merged.merge()
        x_inf = x.detach()
        inf = {"linear": [], "merged": []}
        with torch.inference_mode():
            for i in range(args.rounds):
                for name in (["linear", "merged"] if i % 2 == 0 else ["merged", "linear"]):
                    layer = base if name == "linear" else merged
                    inf[name].append(median_ms(lambda: layer(x_inf), min_run_time=0.3))
        t_inf = {name: statistics.median(v) for name, v in inf.items()}

        train_ratio, merged_ratio = t["ours"] / t["peft"], t_inf["merged"] / t_inf["linear"]
        worst_train, worst_merged = max(worst_train, train_ratio), max(worst_merged, merged_ratio)
        print(f"{f'{d_in} -> {d_out}':>12} | {t['linear']:>11.2f} ms {t['ours']:>6.2f} ms {t['peft']:>6.2f} ms "
              f"{train_ratio:>8.3f}x {t['ours'] / t['linear']:>10.3f}x | {peak['ours'] / 1e6:>12.3f} "
              f"{peak['peft'] / 1e6:>10.3f} {peak['linear'] / 1e6:>11.3f} | "
              f"{t_inf['linear']:>7.2f} ms {t_inf['merged']:>6.2f} ms {merged_ratio:>12.3f}x")

    print(f"\nworst ours/PEFT fwd+bwd: {worst_train:.3f}x (target <= 1.00x)")
    print(f"worst merged/Linear inference: {worst_merged:.3f}x (target <= 1.02x)")


if __name__ == "__main__":
    main()
