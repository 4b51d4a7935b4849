"""Notebook 07's lesson module: weight errors, the block-size sweep and its widget, the exercise checkers."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lora_course.lessons.common import use_or_reference  # noqa: E402
from lora_course.lessons.l07_qlora import (  # noqa: E402
    check_absmax_quantize,
    check_block_size_prediction,
    check_nf4_levels,
    check_pack,
    draw_levels,
    draw_sweep,
    errors_by_layer,
    linear_weights,
    quant_tradeoff_widget,
    relative_error,
    sweep_block_sizes,
)
from lora_course.models import toy_gpt2, toy_gpt2_config  # noqa: E402
from lora_course.quant import BLOCK_SIZES, bits_per_parameter, int4_levels, nf4_levels  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    model = toy_gpt2(toy_gpt2_config(n_embd=64))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return linear_weights(model)


# ----------------------------------------------------------------------------- measurements

def test_linear_weights_are_out_by_in_and_skip_the_head(weights):
    assert len(weights) == 4 * 2 and not any("lm_head" in n for n in weights)
    assert weights["transformer.h.0.attn.c_attn"].shape == (192, 64)  # Conv1D (64, 192) read as (out, in)


def test_relative_errors_order_nf4_int4_fp16(weights):
    err = {fmt: relative_error(weights, fmt) for fmt in ("nf4", "int4", "fp16")}
    assert err["fp16"] < 0.01 * err["nf4"] < err["nf4"] < err["int4"]
    by_layer = errors_by_layer(weights)
    assert set(by_layer) == set(weights) and all(e["nf4"] < e["int4"] for e in by_layer.values())


def test_relative_error_of_an_exactly_representable_weight_is_zero():
    W = nf4_levels().repeat(4, 1) * 0.5  # (4, 16): every block of 64 holds the levels, absmax 0.5
    assert relative_error({"w": W}, "nf4") == 0.0


def test_sweep_bits_fall_and_errors_rise_with_block_size(weights):
    sweep = sweep_block_sizes(weights, block_sizes=(32, 64, 256))
    for fmt in ("nf4", "int4"):
        blocks, bits, errs = zip(*sweep[fmt])
        assert blocks == (32, 64, 256) and list(bits) == [bits_per_parameter(b, True) for b in blocks]
        assert errs[0] < errs[1] < errs[2]


def test_pictures_draw(weights):
    fig, ax = plt.subplots(1, 2)
    draw_levels(ax[0], weights)
    assert len(ax[0].collections) >= 2  # the two sets of level lines
    draw_levels(ax[0], weights, {"mine": nf4_levels(), "int4": int4_levels(), "third": int4_levels() / 2})
    assert [t.get_text() for t in ax[0].get_legend().get_texts()][-1] == "third levels (15)"
    sweep = sweep_block_sizes(weights, block_sizes=(32, 64))
    draw_sweep(ax[1], sweep, highlight=("int4", 64), fp16_error=1e-4)
    assert len(ax[1].lines) == 4  # nf4, int4, the highlighted point, the fp16 line
    plt.close(fig)


def test_widget_controls_change_the_readout(weights, monkeypatch):
    titles = []
    monkeypatch.setattr(plt, "show", lambda: (titles.append(plt.gca().get_title()), plt.close("all")))
    widget = quant_tradeoff_widget(weights)
    block, levels = widget.children[:2]
    assert list(block.options) == list(BLOCK_SIZES) and block.value == 64 and levels.value == "nf4"
    block.value = 256
    levels.value = "int4"
    assert len(titles) == 3 and len(set(titles)) == 3  # drawn once, then redrawn with a new readout per change
    assert titles[-1].startswith("int4, block 256: 4.0")


# ----------------------------------------------------------------------------- checkers

def _solution(x, levels, block_size):
    blocks = x.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=1e-38)[:, None]
    return torch.bucketize(scaled.flatten(), (levels[:-1] + levels[1:]) / 2), absmax


def test_check_absmax_quantize_blank_right_and_wrong(verdict):
    verdict(check_absmax_quantize(...), False)

    def blank(x, levels, block_size):
        raise NotImplementedError

    assert "fill in" in verdict(check_absmax_quantize(blank), False)
    verdict(check_absmax_quantize(_solution), True)

    def one_absmax(x, levels, block_size):  # the whole tensor's absmax, not per block
        codes, _ = _solution(x, levels, block_size)
        return codes, x.abs().max().repeat(1)

    assert "one per block" in verdict(check_absmax_quantize(one_absmax), False)

    def uniform(x, levels, block_size):  # evenly spaced codes, ignoring the table
        blocks = x.view(-1, block_size)
        absmax = blocks.abs().amax(1)
        scaled = (blocks / absmax[:, None]).flatten()
        return torch.round((scaled + 1) / 2 * (len(levels) - 1)).long(), absmax

    assert "nearest" in verdict(check_absmax_quantize(uniform), False)

    def floor(x, levels, block_size):  # rounds down instead of to the nearest level
        blocks = x.view(-1, block_size)
        absmax = blocks.abs().amax(1)
        scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).flatten()
        return (torch.bucketize(scaled, levels, right=True) - 1).clamp(min=0), absmax

    assert "codes differ" in verdict(check_absmax_quantize(floor), False)
    assert "pair" in verdict(check_absmax_quantize(lambda x, levels, b: _solution(x, levels, b)[0]), False)

    def crash(x, levels, block_size):
        raise RuntimeError("shape mismatch")

    assert "raised RuntimeError" in verdict(check_absmax_quantize(crash), False)


def test_check_pack_blank_right_and_wrong(verdict):
    def pack(codes):
        codes = codes.to(torch.uint8)
        return (codes[0::2] << 4) | codes[1::2]

    def unpack(packed):
        return torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()

    verdict(check_pack(..., unpack), False)
    verdict(check_pack(pack, unpack), True)

    def swapped(codes):
        codes = codes.to(torch.uint8)
        return (codes[1::2] << 4) | codes[0::2]

    assert "swapped" in verdict(check_pack(swapped, unpack), False)
    assert "uint8" in verdict(check_pack(lambda c: pack(c).long(), unpack), False)
    assert "32 bytes" in verdict(check_pack(lambda c: c.to(torch.uint8), unpack), False)

    def unpack_low_first(packed):
        return torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()

    assert "give the codes back" in verdict(check_pack(pack, unpack_low_first), False)

    def blank(codes):
        raise NotImplementedError

    assert "fill in" in verdict(check_pack(blank, unpack), False)


def _levels(offset=0.9677083):
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9).double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([negative, positive]).float().sort().values
    return levels / levels.max()


def test_check_nf4_levels_blank_right_and_each_slip(verdict):
    verdict(check_nf4_levels(...), False)

    def blank(offset):
        raise NotImplementedError

    assert "fill in" in verdict(check_nf4_levels(blank), False)
    verdict(check_nf4_levels(_levels), True)
    slips = {
        "has no zero": lambda o: (lambda q: torch.cat([-q.flip(0), q]) / q.max())(
            torch.special.ndtri(torch.linspace(0.53, o, 8))),
        "divide by the largest": lambda o: _levels(o) * 1.848,
        "ascending": lambda o: _levels(o).flip(0),
        "infinite": lambda o: torch.special.ndtri(torch.linspace(1.0, 0.5, 16)),
        "16": lambda o: _levels(o)[1:],
        "QLoRA's is": lambda o: (lambda lv: lv / lv.abs().max())(  # 8 + 8 spaced to 0.99: the wrong outer edge
            torch.cat([-torch.special.ndtri(torch.linspace(0.99, 0.5, 8)[:-1]), torch.zeros(1),
                       torch.special.ndtri(torch.linspace(0.99, 0.5, 9)[:-1])]).sort().values),
    }
    words = {"has no zero": "zero is not one of your levels", "divide by the largest": "divide by the largest",
             "ascending": "ascending", "infinite": "infinite", "16": "16", "QLoRA's is": "QLoRA's is"}
    for slip, fn in slips.items():
        assert words[slip] in verdict(check_nf4_levels(fn), False), slip


def test_the_build_step_continues_with_the_reference_when_the_levels_are_wrong(capsys):
    assert use_or_reference("NF4 levels", _levels, check_nf4_levels, nf4_levels, "ref") is _levels
    assert "uses your NF4 levels" in capsys.readouterr().out

    def blank(offset):
        raise NotImplementedError

    assert use_or_reference("NF4 levels", blank, check_nf4_levels, nf4_levels, "lora_course.quant") is nf4_levels
    out = capsys.readouterr().out
    assert out.startswith("Not yet") and "uses the reference NF4 levels (lora_course.quant)" in out


def test_check_block_size_prediction_blank_right_wrong_and_unknown(verdict, weights):
    verdict(check_block_size_prediction(..., weights), False)
    assert "predict" in verdict(check_block_size_prediction("much higher", weights), False)
    measured = "higher" if relative_error(weights, "nf4", 4096) > relative_error(weights, "int4", 64) else "lower"
    other = {"higher": "lower", "lower": "higher"}[measured]
    assert "4096" in verdict(check_block_size_prediction(measured, weights, 4096), True)
    assert f"the answer is {measured!r}" in verdict(check_block_size_prediction(other, weights, 4096), False)
