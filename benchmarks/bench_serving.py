"""Benchmark serving three adapters from one base: latency per generated token.

One GPT-2-shaped model (random weights; only the shapes matter for speed) carries three
LoRA adapters on c_attn, c_proj and c_fc. Greedy decoding of a batch is timed for

* base      no adapter: the floor;
* merged    one adapter folded into the weights: the same matmuls as the base;
* unmerged  one adapter beside the weights: two thin extra matmuls per layer;
* mixed     every row its own adapter (or none): the base matmul once, then each
            adapter's update on its rows (a gather and a scatter per layer and adapter).

The modes run in interleaved rounds in one process; compare ratios from one run.

    python benchmarks/bench_serving.py                  # CPU here, CUDA if present
    python benchmarks/bench_serving.py --n-embd 768 --n-layer 12 --batch 8   # GPT-2 small's shape
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from lora_course import add_lora, get_device, save_adapter, seed_everything
from lora_course.models import toy_gpt2, toy_gpt2_config
from lora_course.serving import MultiAdapterModel, serving_latency

NAMES = ("sql", "chat", "code")


def build_server(n_layer: int, n_embd: int, r: int, device) -> MultiAdapterModel:
    """A base model with three saved-and-loaded adapters (random non-zero B, so the updates do work)."""
    config = toy_gpt2_config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=1024,
                             n_positions=256)
    base = toy_gpt2(config)
    server = MultiAdapterModel(copy.deepcopy(base))
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(NAMES):
            seed_everything(i)
            model = add_lora(copy.deepcopy(base), ["c_attn", "c_proj", "c_fc"], r=r, alpha=2 * r)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "lora_B" in pname:
                        p.normal_(std=0.02)
            save_adapter(model, Path(tmp) / name)
            server.load_adapter(Path(tmp) / name, name)
    return server.to(device).eval()


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    device = get_device(args.device)
    server = build_server(args.n_layer, args.n_embd, args.r, device)
    prompt = torch.randint(1, 1024, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    mixed = [(NAMES + (None,))[i % (len(NAMES) + 1)] for i in range(args.batch)]
    with torch.inference_mode():
        ms = serving_latency(server, prompt, "sql", mixed, max_new_tokens=args.new_tokens, rounds=args.rounds)
    print(f"GPT-2 shape: {args.n_layer} layers x {args.n_embd}, r={args.r} on c_attn/c_proj/c_fc, batch "
          f"{args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, {device}")
    print(f"mixed batch rows: {mixed}")
    print(f"{'mode':<10}{'ms / token':>12}{'x base':>9}")
    for mode, value in ms.items():
        print(f"{mode:<10}{value:>12.3f}{value / ms['base']:>9.2f}")
    return ms


if __name__ == "__main__":
    main()
