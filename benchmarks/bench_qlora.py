"""Benchmark QLoRA's memory and speed while it trains: a 4-bit base against an fp32 one.

For GPT-2 shapes (random weights: memory and speed do not depend on the values), LoRA r=8
on every linear layer (c_attn, c_proj, c_fc), AdamW, one batch of token ids, it measures
for each way of storing the frozen base:

* resident: the bytes held between steps (weights, buffers, AdamW state), counted;
* step peak: the most one training step allocates above them (activations, gradients,
  temporaries), from the allocator (`lora_course.measure.training_step_memory`);
* total = resident + step peak, and ms per step (interleaved rounds, the fastest).

Variants: LoRA on the fp32 base; our QLoRA (`add_lora(..., quantize_base="nf4")`, NF4 with
double quantization, `Linear4bitFunction` dequantizing again in backward); and, where
bitsandbytes trains on this machine, PEFT's LoRA on bitsandbytes' `Linear4bit` (the same
format). The last line says how much of the 4-bit base's saving at rest survives a
training step (target: at least 60% at the 6 x 768 shape).

    python benchmarks/bench_qlora.py            # CUDA if present, else CPU
    python benchmarks/bench_qlora.py --small    # the small shape only, quick
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from lora_course import add_lora, get_device, seed_everything
from lora_course.layers import base_weight, replace_module
from lora_course.memory import format_bytes
from lora_course.models import toy_gpt2
from lora_course.notices import quiet_library_notices
from lora_course.skeletons import gpt2_config
from lora_course.train import step_costs

TARGETS = ["c_attn", "c_proj", "c_fc"]
SHAPES = {  # name -> (n_layer, n_embd, n_head, vocabulary)
    "small (4 x 128)": (4, 128, 4, 8192),
    "6 x 768": (6, 768, 12, 50257),
    "GPT-2 124M (12 x 768)": (12, 768, 12, 50257),
}


def gpt2_shape(n_layer, n_embd, n_head, vocab_size):
    config = gpt2_config("small", n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return toy_gpt2(config, seed=0)


def bitsandbytes_qlora(base, r, alpha):
    """PEFT's LoRA on bitsandbytes' Linear4bit (NF4, double quantization, fp32 compute); None without bnb."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = copy.deepcopy(base)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            W = base_weight(module).detach()  # (out, in)
            layer = bnb.nn.Linear4bit(W.shape[1], W.shape[0], compute_dtype=torch.float32, quant_type="nf4",
                                      compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            replace_module(model, name, layer.to(W.device))  # .to() quantizes
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))


def variants(base, r, alpha):
    out = {"LoRA, fp32 base": lambda: add_lora(copy.deepcopy(base), TARGETS, r=r, alpha=alpha),
           "QLoRA (ours)": lambda: add_lora(copy.deepcopy(base), TARGETS, r=r, alpha=alpha, quantize_base="nf4")}
    if bitsandbytes_qlora(toy_gpt2(), r, alpha) is not None:
        out["QLoRA (bitsandbytes + PEFT)"] = lambda: bitsandbytes_qlora(base, r, alpha)
    return out


def bench(base, device, batch_size, seq_len, rounds, r, alpha):
    batch = torch.randint(0, base.config.vocab_size, (batch_size, seq_len),
                          generator=torch.Generator().manual_seed(0)).to(device)
    models = {name: build() for name, build in variants(base, r, alpha).items()}
    return step_costs(models, batch, rounds=rounds, device=device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="the small shape only")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    quiet_library_notices()
    device = get_device(args.device)
    seed_everything(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device: {where}; batch {args.batch} x {args.seq} tokens; LoRA r={args.r}, alpha={args.alpha:g} on "
          f"{', '.join(TARGETS)}; AdamW; {args.rounds} interleaved rounds; torch {torch.__version__}")
    print()
    head = f"{'shape':<22} {'base':<28} {'resident':>10} {'step peak':>10} {'total':>10} {'ms/step':>9}"
    print(head)
    print("-" * len(head))
    kept = {}
    for shape, dims in SHAPES.items():
        if args.small and shape != "small (4 x 128)":
            continue
        res = bench(gpt2_shape(*dims), device, args.batch, args.seq, args.rounds, args.r, args.alpha)
        for name, cost in res.items():
            m = cost.memory
            print(f"{shape:<22} {name:<28} {format_bytes(m.resident, 'MB'):>10} {format_bytes(m.step_peak, 'MB'):>10} "
                  f"{format_bytes(m.total, 'MB'):>10} {cost.ms:>9.1f}")
        fp32, ours = res["LoRA, fp32 base"].memory, res["QLoRA (ours)"].memory
        kept[shape] = (fp32.total - ours.total) / (fp32.resident - ours.resident)
    print()
    for shape, share in kept.items():
        print(f"{shape}: QLoRA keeps {100 * share:.0f}% of its saving at rest through a training step")
    if "6 x 768" in kept:
        share = kept["6 x 768"]
        print(f"target at 6 x 768: at least 60% -> {'met' if share >= 0.6 else 'NOT met'}")


if __name__ == "__main__":
    main()
