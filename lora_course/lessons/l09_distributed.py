"""Notebook 09 (LoRA beyond one process): the hook's check (the reference is the library's), pictures, checkers."""

from __future__ import annotations

import copy
import functools
import itertools

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch

from ..distributed import Collective, Link, collective_seconds, counting_allreduce, measure_ddp, ring_schedule
from ..lora import add_lora, count_parameters
from ..models import load_model, toy_gpt2, toy_gpt2_config
from .common import Problem, call_number, close_to, is_blank, not_filled_in, verdict

__all__ = ["counting_allreduce", "check_comm_hook", "shipped_ddp_bytes", "draw_ring_allreduce", "draw_fsdp_step",
           "draw_losses", "draw_scale", "scale_widget", "check_bytes_prediction", "check_ring_time"]

ROWS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))  # (B, T): 2 ranks x 2 rows


def _toy_lora():
    return add_lora(toy_gpt2(toy_gpt2_config(n_layer=2, n_embd=32), seed=0), ["c_attn"], r=4)


def check_comm_hook(hook) -> str:
    """Build step: `hook(state, bucket)` counts each bucket's bytes into state.per_step[-1] and averages it."""
    if is_blank(hook) or not callable(hook):
        raise Problem("fill in count_and_allreduce, then run this cell again.")
    try:
        got = measure_ddp(_toy_lora, ROWS, hook, steps=2)
    except Exception as err:  # the learner's error, raised in a rank: its last sentence says what
        raise Problem("fill in count_and_allreduce (it still raises NotImplementedError), then run this cell again."
                      if isinstance(err, NotImplementedError) else f"DDP with your hook raised {type(err).__name__}: "
                      f"{str(err).splitlines()[0].rsplit('. ', 1)[-1][:200]}") from None
    model = _toy_lora().train()
    model(input_ids=ROWS, labels=ROWS).loss.backward()  # one process on the whole batch
    want = 4 * count_parameters(model)[0]
    if got.bytes_per_step != [[want, want]] * 2:
        hint = "numbers, not bytes: multiply by element_size()" if got.bytes_per_step[0][0] * 4 == want else \
            "add buffer.numel() * buffer.element_size() to state.per_step[-1] for each bucket"
        raise Problem(f"the ranks counted {got.bytes_per_step} bytes over 2 steps, expected {want:,d} per step: {hint}")
    grads = {n: (got.grads[n], p.grad) for n, p in model.named_parameters() if p.requires_grad}
    diff = max((mine - ref).abs().max().item() for mine, ref in grads.values())
    if diff > 1e-5:
        doubled = all(torch.allclose(mine, 2 * ref, atol=1e-5) for mine, ref in grads.values())
        raise Problem("the gradients are the sum over the ranks: divide by dist.get_world_size()" if doubled else
                      f"the averaged gradients differ from one process's on the whole batch by {diff:.2g}")
    return (f"both ranks counted {want:,d} bytes per step (the trainable gradients x 4 bytes), and DDP's averaged "
            f"gradients equal one process's on the whole batch (max |difference| {diff:.0e}).")


@functools.cache
def _shipped():
    return load_model("tiny-gpt2", fast=False, verbose=False)[0]


def shipped_ddp_bytes(hook, targets=("c_attn",), r: int = 8) -> tuple[int, int]:
    """(bytes one DDP step with `hook` all-reduces, trainable parameters): shipped GPT-2, LoRA on `targets` or full."""
    def build():
        model = copy.deepcopy(_shipped())
        return model.requires_grad_(True) if targets is None else add_lora(model, list(targets), r=r)

    return measure_ddp(build, ROWS, hook).bytes_per_step[0][0], count_parameters(build())[0]


def draw_ring_allreduce(world_size: int = 4):
    """Each step of a ring all-reduce: how many ranks' values each rank's copy of each chunk holds, and who sends."""
    steps = ring_schedule(world_size)
    fig, axes = plt.subplots(2, world_size - 1, figsize=(3 * (world_size - 1), 5.6), squeeze=False)
    for ax, (s, step) in zip(axes.flat, enumerate(steps)):
        ax.imshow(step["summed"], cmap="Blues", vmin=0, vmax=world_size + 1)
        for rank, chunk in itertools.product(range(world_size), repeat=2):
            ax.text(chunk, rank, str(step["summed"][rank][chunk]), ha="center", va="center", fontsize=9)
        for src, dst, chunk in step["sends"]:
            ax.annotate("", (chunk + 0.3, dst), (chunk + 0.3, src), arrowprops={
                "arrowstyle": "->", "color": "C3", "connectionstyle": f"arc3,rad={0.5 if dst < src else 0.2}"})
        ax.set(title=f"step {s + 1}: {step['phase']}", xticks=range(world_size), yticks=range(world_size),
               xlabel="chunk", ylabel="rank")
    fig.suptitle("ring all-reduce: how many ranks' values each copy holds; red: what each rank sends", fontsize=10)
    fig.tight_layout()
    return fig


def draw_fsdp_step(counts: dict, n_blocks: int = 3):
    """FSDP's collectives around `n_blocks` blocks (`skeletons.lora_counts`), LoRA vs full; widths in bytes."""
    colors = {"all-gather": "C0", "compute": "0.85", "reduce-scatter": "C1"}
    fig, ax = plt.subplots(figsize=(11, 2.6))
    for y, grads in enumerate((counts["block_trainable"], counts["block"])):
        rs = max(grads / counts["block"], 0.03)  # the reduce-scatter's width: its bytes over the gather's
        boxes = [b for i in range(n_blocks) for b in (("all-gather", 1, ""), ("compute", 1, f"forward {i}"))]
        boxes += [b for i in reversed(range(n_blocks))
                  for b in (("all-gather", 1, ""), ("compute", 1, f"backward {i}"), ("reduce-scatter", rs, ""))]
        x = 0.0
        for kind, width, label in boxes:
            ax.barh(y, width, left=x, color=colors[kind], edgecolor="k", linewidth=0.3)
            ax.text(x + width / 2, y, label, ha="center", va="center", fontsize=7)
            x += width
    ax.set(yticks=[0, 1], yticklabels=["LoRA", "full"], xticks=[], xlabel="time (bytes for the collectives)",
           title="FSDP per block: gather the weights, compute, free them; backward: gather again, compute, "
                 "reduce-scatter the gradients")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], fontsize=8, ncol=3, loc="upper center",
              bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    return fig


def draw_losses(record: dict):
    """Loss curves: DDP (mean over ranks, b rows each) against one process on the global batch."""
    fig, axes = plt.subplots(1, len(record["runs"]), figsize=(10, 3), squeeze=False)
    for ax, (method, run) in zip(axes[0], record["runs"].items()):
        ax.plot(run["losses"], "o-", label=f"DDP, {record['world_size']} x {record['batch_size_per_rank']} rows")
        ax.plot(record["reference"][method]["losses"], "x--", label=f"1 process, {record['global_batch_size']} rows")
        ax.set(xlabel="step", ylabel="training loss", title=method)
        ax.legend()
    fig.tight_layout()
    return fig


def draw_scale(rows: list[dict], link: str, ax=None):
    """Per model: compute time against one link's communication time, for each method and engine (log scale)."""
    ax = ax or plt.subplots(figsize=(9, 3.4))[1]
    models = list(dict.fromkeys(r["model"] for r in rows))
    kinds = [("full", "DDP"), ("full", "FSDP"), ("lora", "DDP"), ("lora", "FSDP")]
    xs = range(len(models))
    for k, (method, engine) in enumerate(kinds):
        mine = [next(r for r in rows if (r["model"], r["method"], r["engine"]) == (m, method, engine)) for m in models]
        ax.bar([i + 0.2 * k - 0.3 for i in xs], [r[f"s[{link}]"] for r in mine], width=0.2, color=f"C{k}",
               label=f"{method} {engine}", hatch=["//" if engine == "DDP" and not r["fits"] else "" for r in mine])
        if engine == "DDP":  # compute time, once per method
            ax.hlines([r["compute_s"] for r in mine], [i - 0.4 for i in xs], [i + 0.4 for i in xs], colors="k",
                      linestyles="--" if k else "-", label=f"{method} compute")
    ax.set(xticks=range(len(models)), xticklabels=models, yscale="log", ylabel="seconds per step",
           title=f"communication per step over {link} (hatched: a replica too big for DDP)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.figure.tight_layout()
    return ax


def scale_widget(table, world_size: int = 8, bandwidth_gbs: float = 12.5, latency_us: float = 14.0):
    """Sliders for ranks, bandwidth and per-step latency; `table(world_size, links)` gives the rows to draw."""
    def show(world_size, bandwidth_gbs, latency_us):
        link = f"{bandwidth_gbs:g} GB/s, {latency_us:g} us"
        draw_scale(table(world_size=world_size, links={link: Link(bandwidth_gbs * 1e9, latency_us * 1e-6)}), link)
        plt.show()

    log = functools.partial(w.FloatLogSlider, base=10, step=0.05, continuous_update=False)
    ranks = w.IntSlider(value=world_size, min=2, max=64, description="ranks N", continuous_update=False)
    return w.interactive(show, world_size=ranks, bandwidth_gbs=log(value=bandwidth_gbs, min=0, max=3,
                         description="GB/s"), latency_us=log(value=latency_us, min=0, max=2, description="us / step"))


# ----------------------------------------------------------------------------- exercise checkers

def check_bytes_prediction(answer, hook) -> bool:
    """Exercise 1: predict the bytes DDP all-reduces per step with LoRA r = 8 on c_attn and c_fc; measured here."""
    if is_blank(answer):
        return not_filled_in("your prediction (a number of bytes)")
    return verdict(_compare_bytes, answer, *shipped_ddp_bytes(hook, ("c_attn", "c_fc")), shipped_ddp_bytes(hook)[0])


def _compare_bytes(answer, measured: int, trainable: int, before: int) -> str:
    try:
        got = float(answer)
    except (TypeError, ValueError):
        raise Problem(f"give one number of bytes, not {type(answer).__name__}") from None
    if got == measured:
        return (f"measured {measured:,d} bytes per step: c_attn's {before:,d} plus c_fc's {measured - before:,d}, "
                f"{trainable:,d} trainable parameters x 4 bytes.")
    hint = {trainable: "that is the number of trainable parameters; each fp32 gradient is 4 bytes",
            measured - before: "that is c_fc's adapters alone; c_attn's still send theirs",
            before: "that is c_attn alone; c_fc's adapters add their gradients to the all-reduce"}.get(
        got, "each adapted layer sends r (d_in + d_out) gradients of 4 bytes")
    raise Problem(f"you predicted {got:,.0f}, DDP all-reduced {measured:,d} bytes per step: {hint}.")


def check_ring_time(fn) -> bool:
    """Exercise 2: the learner's `ring_time(nbytes, world_size, bandwidth, latency)`, the alpha-beta all-reduce."""
    if is_blank(fn) or not callable(fn):
        return not_filled_in("the function ring_time")
    return verdict(_check_ring_time, fn)


def _check_ring_time(fn) -> str:
    cases = [(1e9, 4, 10e9, 0.0), (8.4e6, 8, 12.5e9, 14e-6), (5.9e5, 8, 450e9, 3.4e-6), (5e8, 1, 1e9, 1e-5)]
    for nbytes, n, bw, lat in cases:
        got = call_number("your ring_time", fn, nbytes, n, bw, lat)
        want = collective_seconds(Collective("all-reduce", int(nbytes)), n, Link(bw, lat, base_latency=0.0))
        if close_to(got, want, rel=1e-6, floor=1e-12):
            continue
        where = f"for {nbytes:g} bytes, N = {n}, {bw:g} B/s, {lat:g} s per step"
        if close_to(got, want - 2 * (n - 1) * lat, rel=1e-6, floor=1e-12):
            raise Problem(f"{where}: that leaves out the latency, one per step, 2 (N-1) steps")
        if close_to(got, 2 * nbytes / bw + 2 * (n - 1) * lat, rel=1e-6):
            raise Problem(f"{where}: each step sends bytes / N, not all of it: 2 (N-1)/N x bytes in all")
        raise Problem(f"{where} you gave {got:.4g} s, expected {want:.4g} s")
    return f"all {len(cases)} cases equal 2 (N-1) x latency + 2 (N-1)/N x bytes / bandwidth (N = 1: 0 s)."
