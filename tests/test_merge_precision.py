"""Merging in half precision: the update is computed in fp32 and the base weight rounded once."""

import pytest
import torch
from torch import nn

from lora_course import LoRALinear


def layer_in(dtype, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear.from_linear(nn.Linear(256, 256).to(dtype), r=8, alpha=16)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.05)
    return layer


def drift_in_base_dtype(layer):
    """What merge -> unmerge leaves behind when dW is computed and added in the base's own dtype."""
    W0 = layer.base_layer.weight.detach().clone()
    dtype = W0.dtype
    delta = (layer.lora_B.to(dtype) @ layer.lora_A.to(dtype)) * layer.scaling  # (out, in)
    return ((W0 + delta) - delta - W0).abs().mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_unmerge_drift_is_below_computing_in_the_base_dtype(dtype):
    layer = layer_in(dtype)
    W0 = layer.base_layer.weight.detach().clone()
    assert layer.lora_A.dtype == torch.float32  # the factors stay fp32 on a half-precision base
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    expected = (W0.float() + layer.delta_weight()).to(dtype)  # computed in fp32, rounded once
    assert torch.equal(merged, expected)
    layer.unmerge()
    ours = (layer.base_layer.weight - W0).abs().float().mean().item()
    naive = drift_in_base_dtype(layer_in(dtype))
    assert ours <= naive, (ours, naive)
    assert layer.base_layer.weight.dtype == dtype


def test_forward_on_a_half_precision_base_returns_its_dtype():
    layer = layer_in(torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = layer.base_layer(x).float() + (x.float() @ layer.delta_weight().T)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_fp32_merge_is_exact_to_rounding():
    layer = layer_in(torch.float32)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert (layer.base_layer.weight - W0).abs().max().item() < 1e-6
