"""Notebook 09 (LoRA beyond one process): the hook's check (the reference is the library's), pictures, checkers."""

import copy
import functools
import itertools

import ipywidgets as w
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch

from ..distributed import Link, counting_allreduce, measure_ddp, ring_schedule
from ..lora import add_lora, count_parameters
from ..models import load_model, toy_gpt2, toy_gpt2_config
from ..validate import is_number
from .common import Problem, checker, close_to, is_blank, one_word, seeded

__all__ = ["counting_allreduce", "check_comm_hook", "shipped_ddp_bytes", "draw_ring_allreduce", "draw_fsdp_step",
           "draw_losses", "draw_scale", "scale_widget", "check_token_prediction", "check_scaling_prediction"]

ROWS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))  # (B, T): 2 ranks x 2 rows


def _toy_lora():  # the same LoRA model in every process and every call: A's init is seeded too
    with seeded(0):
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
    def build():  # the same model on every rank: LoRA on `targets`, or all of it trainable
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
    ax.set(yticks=[0, 1], yticklabels=["LoRA", "full"], xticks=[], xlabel="time (bytes for the collectives)", title=(
        "FSDP per block: gather the weights, compute, free them; backward: gather again, compute, reduce-scatter"))
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
    xs = range(len(models))
    for k, (method, engine) in enumerate([("full", "DDP"), ("full", "FSDP"), ("lora", "DDP"), ("lora", "FSDP")]):
        mine = [next(r for r in rows if (r["model"], r["method"], r["engine"]) == (m, method, engine)) for m in models]
        ax.bar([i + 0.2 * k - 0.3 for i in xs], [r[f"s[{link}]"] for r in mine], width=0.2, color=f"C{k}",
               label=f"{method} {engine}", hatch=["//" if engine == "DDP" and not r["fits"] else "" for r in mine])
        if engine == "DDP":  # compute time, once per method
            ax.hlines([r["compute_s"] for r in mine], [i - 0.4 for i in xs], [i + 0.4 for i in xs], colors="k",
                      linestyles="--" if k else "-", label=f"{method} compute")
    ax.set(xticks=range(len(models)), xticklabels=models, yscale="log", ylabel="seconds per step",
           title=f"communication per step over {link} (hatched: weights, gradients, AdamW state too big for DDP)")
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

@checker('my_prediction: "equal" or "different"')
def check_token_prediction(prediction, hook) -> str:
    """Exercise 1: with uneven target tokens per rank, are DDP's gradients still one process's? Measured here."""
    word = one_word(prediction, ("equal", "different"))
    labels = ROWS.clone()
    labels[2:, 4:] = -100  # rank 1's rows keep 3 target tokens each (positions 1..3), rank 0's all 15
    ddp = measure_ddp(_toy_lora, ROWS, hook, labels=labels).grads  # 2 ranks, each the mean over its own targets
    (model := _toy_lora().train())(input_ids=ROWS, labels=labels).loss.backward()  # one process: all 36 targets
    pairs = [(ddp[n].flatten(), p.grad.flatten()) for n, p in model.named_parameters() if p.requires_grad]
    gap = (torch.cat([a - b for a, b in pairs]).norm() / torch.cat([b for _, b in pairs]).norm()).item()
    measured = "equal" if gap < 1e-4 else "different"  # gap: |DDP's gradient - one process's| / |one process's|
    what = f"measured, DDP's gradients differ from one process's by {gap:.0%} of their norm: {measured}."
    if word != measured:
        raise Problem(f"you predicted {word}; {what} Each rank's loss is a mean over its own target tokens.")
    return (f"{what} Each rank averages over its own targets and DDP averages the ranks, so each of rank 1's 6 "
            "tokens weighs 5x one of rank 0's 30. Weight each rank's loss by its share of all the target tokens.")


@checker("answer: two growth factors")
def check_scaling_prediction(answer, table) -> str:
    """Exercise 2: predict how much two rows' communication time grows from 8 to 64 ranks (`scale_table`)."""
    if not isinstance(answer, (list, tuple)) or len(answer) != 2 or not all(map(is_number, answer)):
        raise Problem(f"give two numbers, the growth factors of the two rows, not {answer!r}.")
    keys, link = (("LLaMA-7B", "lora", "DDP"), ("LLaMA-7B", "full", "FSDP")), "s[Ethernet 100 Gb/s]"
    times = [[next(r[link] for r in table(world_size=n) if (r["model"], r["method"], r["engine"]) == key)
              for key in keys] for n in (8, 64)]
    growth = [b / a for a, b in zip(*times)]
    said = f"the model gives x{growth[0]:.2f} for LoRA under DDP and x{growth[1]:.2f} for full FSDP"
    if not close_to(answer[0], growth[0], 0.25):
        raise Problem(f"{said}. LoRA's 8 MB all-reduce is mostly latency: 2 (N-1) ring steps of 14 us each.")
    if not close_to(answer[1], growth[1], 0.25):
        raise Problem(f"{said}. FSDP's ~40 GB is mostly bandwidth: each rank sends (N-1)/N of it, barely more at 64.")
    return (f"{said}. Latency grows with the ring's steps, 2 (N-1); the bytes each rank sends, 2 (N-1)/N of the "
            "payload, barely grow: LoRA's small all-reduce follows the latency, FSDP's gathers the bandwidth.")
