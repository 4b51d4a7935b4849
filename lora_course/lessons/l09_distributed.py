"""Notebook 09 (LoRA beyond one process): pictures of the torchrun records, the ring-time widget, the checkers."""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt

from ..distributed import BANDWIDTHS, allreduce_bytes, ring_allreduce_seconds, scale_table
from ..lora import add_lora
from ..skeletons import gpt2_config, meta_lora_counts
from .common import call_learner_fn, close_to, is_blank, not_filled_in, report

__all__ = ["table_rows", "draw_bytes", "draw_losses", "draw_checkpointing", "draw_scale", "ring_view",
           "ring_widget", "check_allreduce_bytes", "check_lora_allreduce_bytes_fn", "check_ring_time"]


def table_rows(rows: list[dict], bandwidths=BANDWIDTHS) -> list[str]:
    """`scale_table` rows as aligned text lines (times in milliseconds)."""
    names = list(bandwidths)
    head = f"{'model':<11} {'method':<6} {'trainable':>15} {'bytes/step':>12} " + " ".join(
        f"{'ring ms, ' + n.split()[0]:>18}" for n in names) + f" {'compute ms':>11}"
    lines = [head]
    for r in rows:
        rings = " ".join(f"{1e3 * r[f'ring_s[{n}]']:>18,.2f}" for n in names)
        lines.append(f"{r['model']:<11} {r['method']:<6} {r['trainable']:>15,d} {r['allreduce_bytes'] / 1e6:>9,.1f} MB "
                     f"{rings} {1e3 * r['compute_s']:>11,.1f}")
    return lines


def draw_bytes(record: dict):
    """Bars: bytes all-reduced per step, measured by the hook and predicted (trainable x bytes per element)."""
    runs = record["runs"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(runs)
    measured = [runs[m]["allreduce_bytes_per_step"][0] for m in names]
    predicted = [runs[m]["trainable_params"] * runs[m]["bytes_per_element"] for m in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured (communication hook)")
    ax.bar([i + 0.2 for i in x], predicted, width=0.4, label="trainable params x 4 bytes", alpha=0.7)
    for i, m in enumerate(measured):
        ax.annotate(f"{m / 1e6:.3g} MB", (i - 0.2, m), ha="center", va="bottom", fontsize=9)
    ax.set(xticks=list(x), xticklabels=names, yscale="log", ylabel="bytes all-reduced per step",
           title=f"DDP traffic per step, {record['world_size']} processes",
           ylim=(min(measured) / 10, max(measured) * 10))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def draw_losses(record: dict):
    """Loss curves: DDP (mean over ranks, b rows each) against one process on the global batch."""
    fig, axes = plt.subplots(1, len(record["runs"]), figsize=(10, 3.2), squeeze=False)
    for ax, (method, run) in zip(axes[0], record["runs"].items()):
        ax.plot(run["losses"], "o-", label=f"DDP, {record['world_size']} x {record['batch_size_per_rank']} rows")
        ref = record["reference"].get(method)
        if ref:
            ax.plot(ref["losses"], "x--", label=f"1 process, {ref['batch_size']} rows")
        ax.set(xlabel="step", ylabel="training loss", title=method)
        ax.legend()
    fig.tight_layout()
    return fig


def draw_checkpointing(results: dict):
    """Peak memory and time of one step for each checkpointing variant that ran."""
    ran = {k: v for k, v in results.items() if v["error"] is None}
    labels = [k.replace(" + ", "\n+ ") for k in ran]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
    ax[0].bar(labels, [v["peak_bytes"] / 1e6 for v in ran.values()], color="C0")
    ax[0].set(ylabel="MB", title="peak memory of one step")
    ax[1].bar(labels, [v["ms"] for v in ran.values()], color="C1")
    ax[1].set(ylabel="ms", title="time of one step (median)")
    for a in ax:
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def draw_scale(rows: list[dict], ax=None, title: str | None = None):
    """Per model: compute time and ring all-reduce time at each bandwidth, LoRA and full (log scale)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.6))
    models = list(dict.fromkeys(r["model"] for r in rows))
    bw_names = [k[len("ring_s["):-1] for k in rows[0] if k.startswith("ring_s[")]
    series = [("compute", lambda r: r["compute_s"])] + [(n, lambda r, n=n: r[f"ring_s[{n}]"]) for n in bw_names]
    width = 0.8 / (2 * len(series))
    for j, method in enumerate(("full", "lora")):
        for k, (name, get) in enumerate(series):
            xs = [i + (j * len(series) + k) * width - 0.4 for i in range(len(models))]
            ys = [get(next(r for r in rows if r["model"] == m and r["method"] == method)) for m in models]
            ax.bar(xs, ys, width=width, color=f"C{k}", alpha=1.0 if method == "full" else 0.5,
                   hatch="" if method == "full" else "//", label=f"{method}: {name}")
    ax.set(xticks=range(len(models)), xticklabels=models, yscale="log", ylabel="seconds per step",
           title=title or "one step: compute vs ring all-reduce of the gradients")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.figure.tight_layout()
    return ax


def ring_view(world_size: int = 8, bandwidth_gbs: float = 12.5) -> dict:
    """`scale_table` at one world size and one bandwidth (GB/s): rows and a one-line summary."""
    rows = scale_table(world_size=world_size, bandwidths={f"{bandwidth_gbs:g} GB/s": bandwidth_gbs * 1e9})
    worst = max(rows, key=lambda r: r["ratio"])
    summary = (f"{world_size} ranks at {bandwidth_gbs:g} GB/s: full fine-tuning's all-reduce takes "
               f"{worst['ratio']:.2f} x its compute, LoRA's "
               f"{max(r['ratio'] for r in rows if r['method'] == 'lora'):.4f} x")
    return {"rows": rows, "summary": summary}


def ring_widget(world_size: int = 8, bandwidth_gbs: float = 12.5):
    """Sliders for the number of ranks and the link bandwidth; redraws the at-scale picture."""
    def show(world_size, bandwidth_gbs):
        view = ring_view(world_size, bandwidth_gbs)
        fig, ax = plt.subplots(figsize=(9, 3.6))
        draw_scale(view["rows"], ax=ax, title=view["summary"])
        plt.show()

    return w.interactive(
        show,
        world_size=w.IntSlider(value=world_size, min=2, max=64, description="ranks N", continuous_update=False),
        bandwidth_gbs=w.FloatLogSlider(value=bandwidth_gbs, base=10, min=0, max=3, step=0.05,
                                       description="GB/s", continuous_update=False),
    )


# ----------------------------------------------------------------------------- exercise checkers

def check_allreduce_bytes(answer, r: int = 8) -> bool:
    """Exercise 09.1: bytes DDP all-reduces per step for LoRA rank r on c_attn of GPT-2 124M, bf16 gradients."""
    if is_blank(answer):
        return not_filled_in("the number of bytes (an int)")
    trainable = meta_lora_counts(gpt2_config("small"), lambda m: add_lora(m, ["c_attn"], r=r))["trainable"]
    want = allreduce_bytes(trainable, 2)
    try:
        got = float(answer)
    except (TypeError, ValueError):
        return report(False, f"give one number of bytes, not {type(answer).__name__}.")
    if got == want:
        return report(True, f"{want:,d} bytes = {trainable:,d} trainable parameters x 2 bytes (bf16); "
                            "the frozen 124M weights send nothing.")
    if got == trainable:
        return report(False, "that is the number of trainable parameters; each gradient is 2 bytes in bf16.")
    if got == 2 * want:
        return report(False, "that counts 4 bytes per gradient (fp32); the question says bf16.")
    if got > 1e8:
        return report(False, "that is the whole model's gradient: DDP only all-reduces parameters that require grad.")
    return report(False, f"not {got:,.0f}: count r (d_in + d_out) per c_attn (768 in, 3 x 768 out) in each of 12 "
                         "layers, times the bytes per gradient.")


def check_lora_allreduce_bytes_fn(fn) -> bool:
    """Exercise 09.3: the learner's `lora_allreduce_bytes(n_layer, d_in, d_out, r, bytes_per_grad)`,
    LoRA on one d_in -> d_out layer per block, against the library's count on several configs."""
    if is_blank(fn):
        return not_filled_in("the function lora_allreduce_bytes")
    cases = [(12, 768, 3 * 768, 8, 2), (24, 1024, 3 * 1024, 16, 4), (32, 4096, 4096, 8, 2), (1, 10, 20, 1, 4)]
    for n_layer, d_in, d_out, r, per_grad in cases:
        want = allreduce_bytes(n_layer * r * (d_in + d_out), per_grad)
        got, problem = call_learner_fn(fn, n_layer, d_in, d_out, r, per_grad)
        if problem:
            return report(False, problem)
        if got == want:
            continue
        where = f"for {n_layer} layers of {d_in} -> {d_out} at r = {r} with {per_grad}-byte gradients"
        if got == want / per_grad:
            return report(False, f"{where} you count trainable parameters; multiply by the bytes per gradient.")
        if got == n_layer * d_in * d_out * per_grad:
            return report(False, f"{where} you count the frozen weight's gradient; DDP only all-reduces A and B.")
        return report(False, f"{where} expected {want:,d} bytes, got {got:,.0f}: each layer's A and B hold "
                             "r (d_in + d_out) numbers.")
    return report(True, f"all {len(cases)} configs match, e.g. GPT-2 124M with r = 8 on c_attn in bf16: "
                        f"{allreduce_bytes(12 * 8 * (768 + 3 * 768), 2):,d} bytes per step.")


def check_ring_time(fn) -> bool:
    """Exercise 09.2: the learner's `ring_time(nbytes, world_size, bandwidth)` against the library's."""
    if is_blank(fn):
        return not_filled_in("the function ring_time")
    cases = [(1e9, 4, 10e9), (8.4e6, 8, 12.5e9), (13.5e9, 64, 450e9), (1e6, 2, 1e9), (5e8, 1, 1e9)]
    for nbytes, n, bw in cases:
        got, problem = call_learner_fn(fn, nbytes, n, bw)
        if problem:
            return report(False, problem)
        want = ring_allreduce_seconds(nbytes, n, bw)
        if close_to(got, want, rel=1e-6, floor=1e-12):
            continue
        if close_to(got, 2 * nbytes / bw, rel=1e-6):
            return report(False, f"N={n}: that is 2 x bytes / bandwidth; each rank sends (N-1)/N of it, not all.")
        if close_to(got, (n - 1) / n * nbytes / bw, rel=1e-6):
            return report(False, f"N={n}: that is the reduce-scatter alone; the all-gather sends as much again.")
        return report(False, f"for {nbytes:g} bytes, N={n}, {bw:g} B/s you gave {got:.4g} s, expected {want:.4g} s.")
    return report(True, f"all {len(cases)} cases equal 2 (N-1)/N x bytes / bandwidth (N = 1: 0 s).")
