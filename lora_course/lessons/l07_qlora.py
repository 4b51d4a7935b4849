"""Notebook 07 (QLoRA): reconstruction errors over a model's linear layers, the error-vs-memory sweep and its
widget, and the checkers. NF4 itself is library code: `lora_course.quant.nf4_levels` is the build step's reference."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import nn

from .. import quant
from ..layers import base_weight, is_linear
from ..quant import BLOCK_SIZES, bits_per_parameter, levels_for, nf4_levels, quantize_4bit
from .common import Problem, call, checker, one_word, play

__all__ = ["linear_weights", "relative_error", "errors_by_layer", "sweep_block_sizes", "draw_levels",
           "draw_sweep", "quant_tradeoff_widget", "check_nf4_levels", "check_absmax_quantize", "check_pack",
           "check_block_size_prediction", "play"]


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (out, in) weight of every linear layer but the output head, by name (detached)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: base_weight(m).detach().contiguous() for n, m in model.named_modules()
            if n and is_linear(m) and m is not head}


def relative_error(weights: dict[str, torch.Tensor], fmt: str, block_size: int = 64,
                   double_quant: bool = False) -> float:
    """||W_hat - W|| / ||W|| over all `weights` together; `fmt` is "nf4", "int4" or "fp16"."""
    num = den = 0.0
    for W in weights.values():
        W_hat = W.half().float() if fmt == "fp16" else quantize_4bit(W, block_size, fmt, double_quant).dequantize()
        num += float((W_hat - W).pow(2).sum())
        den += float(W.pow(2).sum())
    return (num / den) ** 0.5


def errors_by_layer(weights: dict[str, torch.Tensor], block_size: int = 64) -> dict[str, dict[str, float]]:
    """Relative reconstruction error of each layer in NF4, uniform int4 and fp16."""
    return {name: {fmt: relative_error({name: W}, fmt, block_size) for fmt in ("nf4", "int4", "fp16")}
            for name, W in weights.items()}


def sweep_block_sizes(weights: dict[str, torch.Tensor], block_sizes=BLOCK_SIZES,
                      double_quant: bool = True) -> dict[str, list[tuple[int, float, float]]]:
    """For NF4 and int4: (block size, bits per parameter, relative error) at each block size."""
    return {fmt: [(b, bits_per_parameter(b, double_quant), relative_error(weights, fmt, b, double_quant))
                  for b in block_sizes] for fmt in ("nf4", "int4")}


def draw_levels(ax, weights: dict[str, torch.Tensor], levels: dict[str, torch.Tensor] | None = None,
                block_size: int = 64) -> None:
    """Histogram of a model's weights divided by their block's absmax, with sets of levels (default NF4, int4)."""
    levels = levels or {"nf4": nf4_levels(), "int4": quant.int4_levels()}
    scaled = torch.cat([(W.flatten().view(-1, block_size) / W.flatten().view(-1, block_size).abs().amax(1, True))
                        .flatten() for W in weights.values()])
    ax.hist(scaled.numpy(), bins=200, density=True, color="0.8", label="weights / block absmax")
    for i, (name, values) in enumerate(levels.items()):
        ymax = ax.get_ylim()[1]
        ax.vlines(values.numpy(), 0, ymax * (0.9 - 0.25 * i), color=f"C{i}", lw=1.2,
                  label=f"{name} levels ({len(values)})")
    ax.set(xlabel="w / absmax of its block", ylabel="density", xlim=(-1.05, 1.05))
    ax.legend(fontsize=8, loc="upper left")


def draw_sweep(ax, sweep: dict, highlight: tuple[str, int] | None = None, fp16_error: float | None = None) -> None:
    """Error against bits per parameter, one line per data type, block sizes annotated."""
    for fmt, style in (("nf4", "o-"), ("int4", "s--")):
        bits, errs = [b for _, b, _ in sweep[fmt]], [e for _, _, e in sweep[fmt]]
        ax.plot(bits, errs, style, label=fmt, ms=4)
        for block, b, e in sweep[fmt]:
            if fmt == "nf4":
                ax.annotate(str(block), (b, e), textcoords="offset points", xytext=(2, -10), fontsize=7)
    if highlight is not None:
        fmt, block = highlight
        _, b, e = next(row for row in sweep[fmt] if row[0] == block)
        ax.plot([b], [e], "*", color="k", ms=14, label=f"{fmt}, block {block}")
    if fp16_error is not None:
        ax.axhline(fp16_error, color="gray", ls=":", label="fp16 (16 bits)")
    ax.set(xlabel="bits per parameter (block size annotated)", ylabel="relative error ||W_hat - W|| / ||W||",
           yscale="log")
    ax.legend(fontsize=8)


def quant_tradeoff_widget(weights: dict[str, torch.Tensor], block_size: int = 64, quant_type: str = "nf4"):
    """A block-size slider and a data-type toggle: the readout says error and bits; the plot shows the trade-off."""
    import ipywidgets as w

    sweep = sweep_block_sizes(weights)

    def show(block_size, quant_type):
        _, bits, err = next(row for row in sweep[quant_type] if row[0] == block_size)
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        draw_sweep(ax, sweep, highlight=(quant_type, block_size))
        ax.set_title(f"{quant_type}, block {block_size}: {bits:.3f} bits per parameter, relative error {err:.4f}",
                     fontsize=9)
        plt.tight_layout()
        plt.show()

    return w.interactive(show, block_size=w.SelectionSlider(options=list(BLOCK_SIZES), value=block_size,
                                                           description="block size"),
                         quant_type=w.ToggleButtons(options=["nf4", "int4"], value=quant_type, description="levels"))


# ----------------------------------------------------------------------------- the learner's levels

@checker("your nf4_levels function", function=True)
def check_nf4_levels(fn) -> str:
    """Build step: `fn(offset)` -> NF4's 16 levels, ascending, from normal quantiles (equal to `quant.nf4_levels`)."""
    got = torch.as_tensor(call("your nf4_levels(offset)", fn, quant.NF4_OFFSET)).flatten().float()
    want = nf4_levels()
    if got.numel() != 16:
        raise Problem(f"you returned {got.numel()} levels; a 4-bit code has 16: 7 negative, zero, 8 positive")
    if not torch.isfinite(got).all():
        raise Problem("a level is infinite: Q(1) is, so the outer probability must stay below 1 (use `offset`)")
    if not torch.all(got[1:] > got[:-1]):
        raise Problem("the levels must be ascending and distinct (sort them), so the nearest-level search works")
    if not (got == 0).any():
        raise Problem("zero is not one of your levels: NF4 keeps zero exact, which is why one side has 8 levels "
                      "and the other 7 (an even split 8 + 8 of quantiles has no zero)")
    if got[0] != -1 or got[-1] != 1:
        raise Problem(f"your levels run from {got[0]:.4f} to {got[-1]:.4f}; divide by the largest |level| so "
                      "they end at -1 and 1 (a block is divided by its absmax, so it lies in [-1, 1])")
    if not torch.allclose(got, want, atol=1e-6):
        worst = int((got - want).abs().argmax())
        raise Problem(f"level {worst} is {got[worst]:.4f}, QLoRA's is {want[worst]:.4f}: the positive side uses 9 "
                      "evenly spaced probabilities from 0.5 to `offset` (0.5 gives zero), the negative side 8 "
                      "(0.5 left out), each through the normal quantile Q(p) = torch.special.ndtri(p)")
    return f"your 16 levels equal QLoRA's NF4 table (largest difference {(got - want).abs().max():.1e})."


# ----------------------------------------------------------------------------- exercise checkers

@checker("your absmax_quantize function", function=True)
def check_absmax_quantize(fn) -> str:
    """Exercise 1: `fn(x, levels, block_size)` -> (codes (n,), absmax (n / block_size,)) for a flat x."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4 * 64, generator=g), torch.randn(2 * 32, generator=g) * 0.02
    x[70], y[:32] = 0.0, 0.0  # an exact zero; an all-zero block
    cases = [(x, "nf4", 64), (x, "int4", 64), (y, "nf4", 32), (torch.randn(128, generator=g) * 3, "nf4", 128)]
    for x, fmt, block in cases:
        levels = levels_for(fmt)
        out = call("your absmax_quantize", fn, x.clone(), levels, block)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Problem("return a pair: (codes, absmax)")
        codes, absmax = (torch.as_tensor(t) for t in out)
        want = quantize_4bit(x, block, fmt)
        blocks = x.view(-1, block).abs().amax(1)
        if absmax.shape != blocks.shape:
            raise Problem(f"absmax has shape {tuple(absmax.shape)}; there is one per block of {block}: "
                          f"{tuple(blocks.shape)} (hint: x.view(-1, block_size))")
        if not torch.allclose(absmax.float(), blocks):
            raise Problem("absmax should be the largest |x| in each block")
        if codes.numel() != x.numel():
            raise Problem(f"return one code per number ({x.numel()}), got {codes.numel()}")
        codes = codes.flatten().long()
        if codes.min() < 0 or codes.max() >= len(levels):
            raise Problem(f"codes index the levels: 0..{len(levels) - 1}")
        scaled = (x.view(-1, block) / blocks.clamp(min=1e-38)[:, None]).flatten()
        # A division instead of a multiplication by 1/absmax can flip an exact tie: accept either.
        if torch.equal(codes, want.codes()) or torch.equal(codes, quant.nearest_level(scaled.clamp(-1, 1), levels)):
            continue
        if torch.equal(codes, torch.round((scaled + 1) / 2 * (len(levels) - 1)).long()):
            raise Problem("these are codes of evenly spaced levels; pick the index of the *nearest* entry of "
                          "`levels` (hint: compare with the midpoints between levels)")
        wrong = int((codes != want.codes()).sum())
        raise Problem(f"{wrong} of {x.numel()} codes differ; divide each block by its absmax, then take the nearest "
                      f"level ({fmt}, block {block})")
    return "blockwise absmax quantization: one absmax per block, each number to its nearest level."


@checker("your pack and unpack functions", answers=("pack", "unpack"), function=True)
def check_pack(pack, unpack) -> str:
    """Exercise 2: `pack(codes)` -> uint8 (n/2,), first code in the high nibble; `unpack` inverts it."""
    codes = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(3))
    packed = torch.as_tensor(call("your pack", pack, codes.clone())).flatten()
    if packed.numel() != 32:
        raise Problem(f"64 codes should fill 32 bytes, got {packed.numel()} values")
    if packed.dtype != torch.uint8:
        raise Problem(f"store bytes: the packed tensor should be uint8, got {packed.dtype}")
    want = quant.pack_4bit(codes)
    if not torch.equal(packed, want):
        swapped = (codes[1::2].to(torch.uint8) << 4) | codes[0::2].to(torch.uint8)
        if torch.equal(packed, swapped):
            raise Problem("the nibbles are swapped: bitsandbytes puts the first code of each pair in the high "
                          "nibble (codes[0::2] << 4)")
        raise Problem("each byte should be (first code << 4) | second code")
    back = torch.as_tensor(call("your unpack", unpack, want.clone())).flatten()
    if not torch.equal(back.long(), quant.unpack_4bit(want)):
        raise Problem("unpack(pack(codes)) should give the codes back, in order: high nibble first (byte >> 4), "
                      "then the low one (byte & 15)")
    return "two codes per byte, first in the high nibble, as bitsandbytes stores NF4."


@checker('your prediction, "higher" or "lower"')
def check_block_size_prediction(prediction, weights: dict[str, torch.Tensor], block_size: int = 4096) -> str:
    """Exercise 3: will NF4 at `block_size` err "higher" or "lower" than uniform int4 at block 64? Measured."""
    prediction = one_word(prediction, ("higher", "lower"))
    nf4, int4 = relative_error(weights, "nf4", block_size), relative_error(weights, "int4", 64)
    measured = "higher" if nf4 > int4 else "lower"
    numbers = (f"NF4 at block {block_size} errs {nf4:.4f} ({bits_per_parameter(block_size):.3f} bits), uniform int4 "
               f"at block 64 {int4:.4f} ({bits_per_parameter(64):.3f} bits)")
    why = {"higher": f"one absmax per {block_size} weights lets the largest weight of a block stretch the grid for "
                     "all the others, which costs more than NF4's better placed levels win back",
           "lower": "NF4's levels, placed where the weights are, win back more than the coarser blocks cost"}[measured]
    if prediction != measured:
        raise Problem(f"{numbers}, so the answer is {measured!r}: {why}.")
    return f"{numbers}: {why}."
