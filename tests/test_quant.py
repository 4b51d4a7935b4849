"""NF4 from scratch (lora_course.quant): levels, packing, blockwise absmax, double quantization,
4-bit linear layers and QLoRA through add_lora; checked against bitsandbytes where it is installed."""

import copy
import json
import math

import pytest
import torch

from lora_course.adapters import CONFIG_NAME, load_adapter, save_adapter
from lora_course.layers import Conv1D, add_to_base_weight
from lora_course.linear4bit import (
    Linear4bit,
    Linear4bitFunction,
    base_bytes_by_format,
    quantize_model,
    quantized_layers,
    weight_bytes,
)
from lora_course.lora import LoRALinear, add_lora, count_parameters, lora_layers, merge_lora
from lora_course.models import toy_gpt2, toy_gpt2_config
from lora_course.quant import (
    ABSMAX_BLOCK_SIZE,
    BLOCK_SIZES,
    NF4_OFFSET,
    Weight4bit,
    bits_per_parameter,
    dynamic_levels,
    int4_levels,
    levels_for,
    nearest_level,
    nf4_levels,
    pack_4bit,
    quantize_4bit,
    quantize_nf4,
    unpack_4bit,
    weight4bit_nbytes,
)
from lora_course.skeletons import meta_gpt2

NEEDS_BNB = "bitsandbytes is not installed (pip install -e '.[qlora]'); the from-scratch checks still run"


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def trained_model_weights():
    """Real pretrained weights: the linear layers of the GPT-2 shipped with the package."""
    from lora_course.models import load_model

    model, _, _ = load_model("tiny-gpt2")
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, Conv1D)}


# ----------------------------------------------------------------------------- levels

def test_nf4_levels_are_normal_quantiles_with_an_exact_zero():
    levels = nf4_levels()
    assert levels.shape == (16,) and levels.dtype == torch.float32
    assert torch.all(levels[1:] > levels[:-1])  # ascending, distinct
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0  # 7 negative, zero, 8 positive
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7
    # the positive levels are Q(p) / Q(offset) at evenly spaced p in [0.5, offset]
    q = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64))
    assert torch.allclose(levels[7:].double().flip(0), q / q[0], atol=1e-6)
    assert abs(NF4_OFFSET - 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))) < 1e-7


def test_nf4_levels_spread_normal_data_evenly_and_uniform_levels_do_not():
    x = gaussian(1 << 16)
    x = x / x.abs().max()
    nf4_counts = torch.bincount(nearest_level(x * 1.0, nf4_levels()), minlength=16).float()
    int4_counts = torch.bincount(nearest_level(x, int4_levels()), minlength=15).float()
    # normal data uses NF4's levels far more evenly than uniform levels (entropy closer to 4 bits)
    entropy = lambda c: float(-(c / c.sum() * torch.log2(c / c.sum() + 1e-12)).sum())  # noqa: E731
    assert entropy(nf4_counts) > entropy(int4_counts) + 0.3


def test_uniform_int4_levels():
    levels = int4_levels()
    assert levels.shape == (15,) and levels[7] == 0 and torch.allclose(levels[1:] - levels[:-1], torch.tensor(1 / 7))


def test_dynamic_levels_shape():
    levels = dynamic_levels()
    assert levels.shape == (256,) and torch.all(levels[1:] >= levels[:-1])
    assert levels.max() == 1 and levels.min() > -1 and (levels == 0).sum() == 1


def test_nearest_level_picks_the_nearest_and_breaks_ties_low():
    levels = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-0.9, -0.5, 0.2, 0.25, 0.3, 0.76, 1.0])
    assert nearest_level(x, levels).tolist() == [0, 0, 1, 1, 2, 3, 3]


# ----------------------------------------------------------------------------- packing

def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.arange(16).repeat(3)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 24
    assert packed[0] == (0 << 4) | 1  # the first code sits in the high nibble
    assert torch.equal(unpack_4bit(packed), codes)


@pytest.mark.parametrize("bad, error", [(torch.arange(3), ValueError), (torch.tensor([0, 16]), ValueError),
                                        (torch.tensor([-1, 0]), ValueError)])
def test_pack_rejects_bad_codes(bad, error):
    with pytest.raises(error):
        pack_4bit(bad)


def test_unpack_rejects_a_non_byte_tensor():
    with pytest.raises(TypeError, match="uint8"):
        unpack_4bit(torch.zeros(4, dtype=torch.int32))


# ----------------------------------------------------------------------------- quantize / dequantize

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_quantize_stores_what_the_arithmetic_says(block_size, double_quant):
    W = gaussian(96, 256)
    q = quantize_nf4(W, block_size, double_quant)
    assert isinstance(q, Weight4bit) and q.packed.numel() == W.numel() // 2
    assert q.nbytes == weight4bit_nbytes(W.numel(), block_size, double_quant)
    assert abs(q.bits_per_parameter - bits_per_parameter(block_size, double_quant)) < 0.01
    out = q.dequantize()
    assert out.shape == W.shape and out.dtype == W.dtype


def test_bits_per_parameter_arithmetic():
    assert bits_per_parameter(64) == 4.5
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(bits_per_parameter(64) - bits_per_parameter(64, True), 3) == 0.373  # QLoRA's 0.373 bits saved


def test_dequantize_is_levels_times_absmax_and_keeps_each_block_max():
    W = gaussian(8, 64)
    q = quantize_nf4(W)
    blocks = W.view(-1, 64)
    assert torch.equal(q.absmax, blocks.abs().amax(1))
    out = q.dequantize().view(-1, 64)
    assert torch.allclose(out.abs().amax(1), q.absmax)  # the largest number of a block is exact: level +-1
    assert torch.equal(out, nf4_levels()[q.codes()].view(-1, 64) * q.absmax[:, None])
    # every number went to its nearest level
    err = (out - blocks).abs() / q.absmax[:, None]
    gaps = (nf4_levels()[1:] - nf4_levels()[:-1]).max()
    assert err.max() <= gaps / 2 + 1e-6


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_decodes_every_code_of_either_type(quant_type, double_quant):
    """Every code a type uses (15 for int4, 16 for nf4) decodes to its level, times its block's absmax."""
    W = gaussian(64, 128)
    q = quantize_4bit(W, 64, quant_type, double_quant)
    levels = levels_for(quant_type)
    assert set(q.codes().tolist()) == set(range(len(levels)))
    expected = (levels[q.codes()].view(-1, 64) * q.block_absmax()[:, None]).view(W.shape)
    assert torch.equal(q.dequantize(), expected)


def test_zero_is_exact_and_an_all_zero_block_survives():
    W = torch.zeros(2, 64)
    W[1] = gaussian(64)
    W[1, 5] = 0.0
    out = quantize_nf4(W).dequantize()
    assert torch.equal(out[0], torch.zeros(64)) and out[1, 5] == 0


def test_nf4_beats_uniform_int4_on_normal_and_on_real_weights():
    W = gaussian(256, 256)
    err = {t: (quantize_4bit(W, 64, t).dequantize() - W).norm() for t in ("nf4", "int4")}
    assert err["nf4"] < 0.9 * err["int4"]
    for name, W in trained_model_weights().items():
        err = {t: (quantize_4bit(W, 64, t).dequantize() - W).norm() for t in ("nf4", "int4")}
        assert err["nf4"] < err["int4"], name


def test_error_grows_with_block_size():
    W = gaussian(128, 512)
    errors = [(quantize_nf4(W, b).dequantize() - W).norm() for b in (32, 256, 4096)]
    assert errors[0] < errors[1] < errors[2]


def test_double_quant_changes_the_constants_a_little():
    W = gaussian(64, 1024)
    plain, double = quantize_nf4(W), quantize_nf4(W, double_quant=True)
    assert torch.equal(plain.packed, double.packed)  # same 4-bit codes
    assert double.absmax is None and double.absmax_codes.dtype == torch.uint8
    assert double.absmax_scale.numel() == math.ceil(plain.absmax.numel() / ABSMAX_BLOCK_SIZE)
    rel = ((double.block_absmax() - plain.absmax).abs() / plain.absmax).max()
    assert 0 < rel < 0.02


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_come_back_in_their_dtype(dtype):
    W = gaussian(16, 64).to(dtype)
    out = quantize_nf4(W).dequantize()
    assert out.dtype == dtype and (out.float() - W.float()).abs().max() < 0.5


@pytest.mark.parametrize("bad, kwargs, error, match", [
    (torch.arange(128), {}, TypeError, "floating-point"),
    ([0.5] * 64, {}, TypeError, "torch.Tensor"),
    (torch.randn(100), {}, ValueError, "does not split into blocks"),
    (torch.randn(128), {"block_size": 48}, ValueError, "not supported"),
    (torch.randn(128), {"block_size": 0}, ValueError, "positive"),
    (torch.randn(128), {"block_size": 64.0}, TypeError, "int"),
    (torch.tensor([float("nan")] * 64), {}, ValueError, "NaN"),
    (torch.randn(64), {"double_quant": 1}, TypeError, "double_quant"),
])
def test_bad_input_gets_a_clear_error(bad, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_nf4(bad, **kwargs)


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), quant_type="fp4")


def test_supported_block_sizes_are_those_of_bitsandbytes():
    assert BLOCK_SIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)


# ----------------------------------------------------------------------------- against bitsandbytes

@pytest.fixture(scope="module")
def bnb_functional():
    pytest.importorskip("bitsandbytes", reason=NEEDS_BNB)
    import bitsandbytes.functional as F

    return F


def _bnb_cases():
    weights = {"random 256x192": gaussian(256, 192), "random 64x4096": gaussian(64, 4096, seed=1)}
    weights.update({f"shipped {n}": W for n, W in list(trained_model_weights().items())[:4]})
    return weights


def test_levels_equal_bitsandbytes_tables(bnb_functional):
    from bitsandbytes.backends.utils import CODE

    assert torch.equal(nf4_levels(), CODE["nf4"])  # bit for bit
    assert torch.equal(dynamic_levels(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("block_size", [32, 64, 128, 1024])
def test_codes_and_values_equal_bitsandbytes(bnb_functional, block_size):
    """Codes and absmax always; values wherever a block lies within one row.

    bitsandbytes 0.50's CPU dequantize kernel mishandles blocks that straddle two rows
    (e.g. block 128 on rows of 192: its round trip is then twice as far from the weight
    as ours), so values are compared where rows are a multiple of the block.
    """
    compared = 0
    for name, W in _bnb_cases().items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = W.to(dtype)
            packed, state = bnb_functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
            ours = quantize_nf4(w, block_size)
            assert torch.equal(ours.packed, packed.flatten()), (name, dtype)
            assert torch.equal(ours.absmax, state.absmax), (name, dtype)
            if W.shape[-1] % block_size == 0:
                assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state)), (name, dtype)
                compared += 1
    assert compared >= 3


def test_double_quantization_equals_bitsandbytes(bnb_functional):
    """Same 4-bit codes, same absmax offset and scales, and bit-for-bit equal values from the same 8-bit codes.

    bitsandbytes' CPU kernel for the 8-bit step picks the second-nearest of two neighbouring
    levels in a few near-ties (about 0.3% of the constants on these weights); ours is the
    nearest. Those constants differ by one 8-bit step, so the values differ by at most
    that step times the level (checked below).
    """
    import dataclasses

    levels = dynamic_levels()
    total = differ = 0
    for name, W in _bnb_cases().items():
        packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = quantize_nf4(W, 64, double_quant=True)
        assert torch.equal(ours.packed, packed.flatten()), name
        assert torch.equal(ours.absmax_offset, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
        theirs = dataclasses.replace(ours, absmax_codes=state.absmax)  # their 8-bit codes, our arithmetic
        assert torch.equal(theirs.dequantize(), bnb_functional.dequantize_4bit(packed, state)), name
        mismatch = ours.absmax_codes != state.absmax
        total, differ = total + mismatch.numel(), differ + int(mismatch.sum())
        assert ((ours.absmax_codes.long() - state.absmax.long()).abs() <= 1).all()  # neighbours, never further
        plain = quantize_nf4(W, 64).absmax - state.offset  # the exact constants they both round
        scale = state.state2.absmax.repeat_interleave(ABSMAX_BLOCK_SIZE)[: plain.numel()]
        ours_err = (levels[ours.absmax_codes.long()] * scale - plain).abs()
        their_err = (levels[state.absmax.long()] * scale - plain).abs()
        assert (ours_err <= their_err + 1e-7).all(), name  # ours is the nearest level
        step = (levels[1:] - levels[:-1]).max() * scale.max()
        # |level| <= 1, so a value moves by at most one 8-bit step of its block's absmax
        assert (ours.dequantize() - bnb_functional.dequantize_4bit(packed, state)).abs().max() <= step + 1e-7
    assert differ <= 0.01 * total, (differ, total)


def test_linear4bit_matches_bitsandbytes_linear4bit(bnb_functional):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64)
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False)
    theirs.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=False, blocksize=64)
    theirs.bias = torch.nn.Parameter(layer.bias.data.clone())
    theirs = theirs.to("cpu")  # quantizes the weight
    ours = Linear4bit.from_linear(layer, double_quant=False)
    assert torch.equal(ours.packed, theirs.weight.data.flatten())
    x = gaussian(5, 128)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert torch.allclose(y_ours, y_theirs, atol=1e-6)
    g = gaussian(5, 64)  # the same upstream gradient into both: dL/dx = g W, W dequantized again in backward
    y_ours.backward(g)
    y_theirs.backward(g)
    assert torch.allclose(x_ours.grad, x_theirs.grad, atol=1e-5)


def test_the_4bit_function_passes_gradcheck_against_the_dequantized_linear():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    quantized = layer.quantized
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: Linear4bitFunction.apply(x, quantized, b), (x, bias))
    y = Linear4bitFunction.apply(x, quantized, bias)
    reference = torch.nn.functional.linear(x, quantized.dequantize(torch.float64), bias)
    assert torch.allclose(y, reference)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    (ref_x,) = torch.autograd.grad(reference.sum(), x)
    assert torch.allclose(grad_x, ref_x)


def test_a_4bit_layer_keeps_no_dequantized_weight_for_backward():
    """What autograd saves between the passes, counted with saved_tensors_hooks: with the 4-bit base,
    nothing of the base's (out, in) size (a plain F.linear on the dequantized weight would save it)."""
    layer = LoRALinear.from_linear(Linear4bit.from_linear(torch.nn.Linear(256, 128)), r=4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(gaussian(8, 256)).sum().backward()
    assert (128, 256) not in saved and (256, 128) not in saved, saved
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


# ----------------------------------------------------------------------------- layers and models

def test_linear4bit_from_conv1d_computes_the_dequantized_layer():
    conv = Conv1D(48, 16)
    torch.nn.init.normal_(conv.weight, std=0.2)
    layer = Linear4bit.from_linear(conv)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (16, 48, True)
    W = quantize_nf4(conv.weight.detach().T.contiguous(), double_quant=True).dequantize()
    assert torch.equal(layer.weight, W)
    x = gaussian(3, 7, 16)
    assert torch.allclose(layer(x), x @ W.T + conv.bias, atol=1e-6)
    assert not list(p for p in layer.parameters() if p.requires_grad)
    assert set(layer.state_dict()) >= {"packed", "absmax_codes", "absmax_scale", "absmax_offset", "bias"}


def test_linear4bit_rejects_what_it_cannot_hold():
    with pytest.raises(TypeError):
        Linear4bit.from_linear(torch.nn.Embedding(10, 64))
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 8))
    with pytest.raises(TypeError, match="already"):
        Linear4bit.from_linear(layer)
    with pytest.raises(ValueError, match="does not fit"):
        add_to_base_weight(layer, torch.zeros(64, 8))


def test_quantize_model_keeps_the_head_and_counts():
    model = toy_gpt2(toy_gpt2_config(n_embd=64))
    before = count_parameters(model)
    quantize_model(model)
    layers = quantized_layers(model)
    assert len(layers) == 4 * model.config.n_layer and "lm_head" not in layers
    assert count_parameters(model)[1] == before[1]  # the 4-bit weights still count as parameters
    assert not any(p.requires_grad for layer in layers.values() for p in layer.parameters())  # frozen, bias too
    assert weight_bytes(model) < 4 * before[1]


def test_quantize_model_refuses_a_model_with_lora():
    model = add_lora(toy_gpt2(), ["c_attn"], r=2)
    with pytest.raises(ValueError, match="already carries LoRA"):
        quantize_model(model)


def test_stored_bytes_match_the_arithmetic_on_a_meta_gpt2_and_a_real_model():
    formats = base_bytes_by_format(meta_gpt2("small"))
    assert formats["fp32"] == 2 * formats["fp16"] == 4 * 124_439_808
    assert formats["nf4 + double quant"] < formats["nf4"] < formats["fp16"]
    model = toy_gpt2(toy_gpt2_config(n_embd=64))
    predicted = base_bytes_by_format(model)["nf4 + double quant"]
    quantize_model(model.half())
    assert weight_bytes(model) == predicted


def test_qlora_add_lora_switch_trains_only_the_adapters():
    torch.manual_seed(0)
    model = add_lora(toy_gpt2(), ["c_attn"], r=4, alpha=8, quantize_base="nf4")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Linear4bit)  # the frozen rest is 4-bit too
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 256, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert count_parameters(model) == count_parameters(add_lora(toy_gpt2(), ["c_attn"], r=4, alpha=8))


def test_qlora_bad_settings_change_nothing():
    model = toy_gpt2()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="quantize_base"):
        add_lora(model, ["c_attn"], r=4, quantize_base="nf3")
    with pytest.raises(ValueError, match="matched no module"):
        add_lora(model, ["q_proj"], r=4, quantize_base="nf4")
    assert not quantized_layers(model) and not lora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_qlora_adapter_saves_in_peft_format_and_loads_on_either_base(tmp_path):
    torch.manual_seed(0)
    qlora = add_lora(toy_gpt2(), ["c_attn"], r=4, alpha=8, quantize_base="nf4")
    for layer in lora_layers(qlora).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    folder = save_adapter(qlora, tmp_path / "qlora")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]  # as for GPT-2's Conv1D
    ids = torch.randint(0, 256, (2, 16))
    again = load_adapter(quantize_model(toy_gpt2()), folder)  # a fresh 4-bit base
    full = load_adapter(toy_gpt2(), folder)  # or the full-precision base
    with torch.no_grad():
        assert torch.equal(again(ids).logits, qlora(ids).logits)
        assert (full(ids).logits - qlora(ids).logits).abs().max() < 1.0  # only the base's rounding differs


def test_merging_into_a_4bit_base_requantizes_and_adds_error():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(Linear4bit.from_linear(torch.nn.Linear(64, 32)), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    x = gaussian(6, 64)
    with torch.no_grad():
        exact = layer.base_layer.weight + layer.delta_weight()  # what the unmerged layer computes
        unmerged = layer(x)
        layer.merge()
        merged_W = layer.base_layer.weight
        assert isinstance(layer.base_layer, Linear4bit)
        assert 0 < (merged_W - exact).abs().max() <= layer.base_layer.quantized.block_absmax().max()
        assert not torch.allclose(layer(x), unmerged, atol=1e-6)  # requantizing changed the outputs
        layer.unmerge()
        assert layer.merged is False
    model = add_lora(toy_gpt2(), ["c_attn"], r=4, quantize_base="nf4")
    merge_lora(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit) and not lora_layers(model)


def test_dora_on_a_4bit_base_trains_and_merges_by_requantizing():
    torch.manual_seed(0)
    model = add_lora(toy_gpt2(), ["c_attn"], r=4, alpha=8, quantize_base="nf4", use_dora=True)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.config.use_dora and isinstance(layer.base_layer, Linear4bit)
    merge_lora(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit) and not lora_layers(model)
