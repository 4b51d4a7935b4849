"""4-bit NormalFloat (NF4) from scratch: the weight format (the layers that store it are in `linear4bit`).

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) keeps the frozen base model in 4 bits and
trains LoRA factors in higher precision on top. Its weight format, step by step:

    1. cut the flattened weight into blocks of `block_size` (64) numbers;
    2. per block, absmax = max |w|; divide the block by it, so it lies in [-1, 1];
    3. round each number to the nearest of 16 levels (a 4-bit code, 0..15);
    4. pack two codes per byte (first one in the high nibble, as bitsandbytes does);
    5. optionally (double quantization) store the fp32 absmax constants themselves in 8 bits,
       in blocks of 256, with one fp32 scale per block and one fp32 offset (their mean).

Dequantizing is a table look-up and a multiply: w ~ levels[code] * absmax. NF4's 16 levels
are quantiles of the standard normal (pretrained weights are roughly normal), rescaled to
[-1, 1], 8 positive and 7 negative so that zero is exact; `int4_levels` is the uniform
alternative. Storage: 4 + 32/64 = 4.5 bits a parameter, or 4 + 8/64 + 32/(64*256) = 4.127
with double quantization. Codes and values equal bitsandbytes' `quantize_4bit(w,
blocksize=64, quant_type="nf4")` bit for bit (tests check it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .validate import check_int

__all__ = ["BLOCK_SIZES", "ABSMAX_BLOCK_SIZE", "NF4_OFFSET", "QUANT_TYPES", "nf4_levels", "int4_levels",
           "dynamic_levels", "levels_for", "nearest_level", "check_block_size", "pack_4bit", "unpack_4bit",
           "Weight4bit", "quantize_4bit", "quantize_nf4", "bits_per_parameter", "weight4bit_nbytes"]

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes supports
ABSMAX_BLOCK_SIZE = 256  # double quantization: absmax constants in 8 bits, blocks of 256 (QLoRA's choice)
# The outermost probability: halfway between 1 - 1/(2*15) and 1 - 1/(2*16) (0.96770833...), so the largest
# level is a finite quantile (Q(1) is infinite). QLoRA's code rounds it to 7 digits; so do we, to get its table.
NF4_OFFSET = 0.9677083
QUANT_TYPES = ("nf4", "int4")


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending, float32: normal quantiles with an exact zero.

    8 evenly spaced probabilities in [0.5, offset) give the positive half (0 and 7 more),
    7 give the negative half; the quantiles Q(p) of N(0, 1) are divided by the largest, so
    the ends are exactly -1 and 1.
    """
    p_pos = torch.linspace(offset, 0.5, 9)[:-1]  # 8 probabilities, float32 as bitsandbytes makes them
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]  # 7
    pos = torch.special.ndtri(p_pos.double()).float()  # Q(p): the inverse normal CDF, (8,)
    neg = -torch.special.ndtri(p_neg.double()).float()  # (7,)
    levels = torch.cat([neg, torch.zeros(1), pos]).sort().values  # (16,)
    return levels / levels.max()


def int4_levels() -> torch.Tensor:
    """Uniform 4-bit absmax levels k/7, k = -7..7 (15 levels, zero exact): round(7 w / absmax)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def dynamic_levels() -> torch.Tensor:
    """The 256 levels of the signed 8-bit dynamic data type used for double quantization.

    Dettmers' dynamic tree type (arXiv:1511.04561), as bitsandbytes builds it: for each
    exponent e = 10^-6 .. 10^0, 2^i evenly spaced fractions in [0.1, 1], both signs, then
    0 and 1. Dense near zero, so small and large constants both keep relative precision.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2  # 2^i fractions
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()  # float32 products
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def levels_for(quant_type: str) -> torch.Tensor:
    """The level table of a 4-bit data type: "nf4" or "int4"."""
    if quant_type == "nf4":
        return nf4_levels()
    if quant_type == "int4":
        return int4_levels()
    raise ValueError(f"quant_type must be one of {list(QUANT_TYPES)}, got {quant_type!r}")


@functools.lru_cache(maxsize=None)
def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Cached decoding tables, never modified: "dynamic" (256 levels for the absmax constants) or a 4-bit
    type's (256, 2) table of the two levels each byte's high and low nibble stand for."""
    if kind == "dynamic":
        return dynamic_levels().to(device)
    levels = levels_for(kind).to(device)
    levels = torch.cat([levels, levels[-1:].expand(16 - len(levels))])  # int4 has 15 levels: code 15 never occurs
    return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte b -> (b >> 4, b & 15)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ascending table) for each entry of x; a tie goes to the lower level."""
    midpoints = (levels[:-1] + levels[1:]) / 2  # the decision boundaries between neighbouring levels
    return torch.bucketize(x, midpoints)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (0..15) per byte: codes[0::2] in the high nibble, codes[1::2] in the low. (n,) -> (n/2,)"""
    codes = codes.flatten()
    if codes.numel() % 2:
        raise ValueError(f"pack_4bit needs an even number of codes, got {codes.numel()}")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("4-bit codes must lie in 0..15")
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_4bit: (n/2,) uint8 -> (n,) int64 codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes are uint8, got {packed.dtype}")
    packed = packed.flatten().long()
    return torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()  # (n/2, 2) -> (n,)


def check_block_size(block_size) -> int:
    """A block size bitsandbytes supports, or a ValueError that lists them."""
    check_int("block_size", block_size, minimum=1)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported; use one of {list(BLOCK_SIZES)} "
                         "(64 is QLoRA's choice)")
    return block_size


def _check_weight(weight, block_size: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor (fp32, fp16 or bf16), got {weight.dtype}; "
                        "integer tensors are already quantized, or are not weights")
    check_block_size(block_size)
    if weight.numel() == 0 or weight.numel() % block_size:
        raise ValueError(f"a weight of {weight.numel():,d} numbers {tuple(weight.shape)} does not split into blocks "
                         f"of {block_size}; use a block size that divides it (e.g. 64 for most model widths)")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds NaN or inf values; they cannot be quantized")


def _absmax_quantize(x: torch.Tensor, block_size: int, levels: torch.Tensor):
    """Blockwise absmax quantization of flat fp32 x (last block may be short): (codes (n,), absmax (n_blocks,))."""
    n = x.numel()
    full = n - n % block_size
    absmax = x[:full].view(-1, block_size).abs().amax(dim=1)  # (n_blocks,)
    if full < n:
        absmax = torch.cat([absmax, x[full:].abs().amax().view(1)])
    scale = 1.0 / absmax.clamp(min=1e-38)  # multiply by the reciprocal, as bitsandbytes does
    per_number = scale.repeat_interleave(block_size)[:n]
    scaled = (x * per_number).clamp(-1, 1)
    return nearest_level(scaled, levels), absmax


@dataclass
class Weight4bit:
    """A weight stored in 4 bits: packed codes plus per-block absmax constants (maybe 8-bit themselves).

    `dequantize()` gives back the approximation levels[code] * absmax in the original shape
    and dtype; `nbytes` is what is stored (the level tables, shared by every tensor of a
    data type, are not counted).
    """

    packed: torch.Tensor  # (numel / 2,) uint8, two codes per byte
    absmax: torch.Tensor | None  # (n_blocks,) fp32, or None with double quantization
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = 64
    quant_type: str = "nf4"
    absmax_codes: torch.Tensor | None = None  # (n_blocks,) uint8: 8-bit codes of absmax - offset
    absmax_scale: torch.Tensor | None = None  # (ceil(n_blocks / 256),) fp32: absmax of each block of 256
    absmax_offset: torch.Tensor | None = None  # () fp32: the mean of the absmax constants

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """The 4-bit code of every number, (numel,) int64 in 0..15."""
        return unpack_4bit(self.packed)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block, (n_blocks,) (reconstructed from 8 bits with double quantization)."""
        if not self.double_quant:
            return self.absmax
        n = self.absmax_codes.numel()
        scale = self.absmax_scale.repeat_interleave(ABSMAX_BLOCK_SIZE)[:n]
        levels = _table("dynamic", self.absmax_codes.device)
        return levels[self.absmax_codes.long()] * scale + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """levels[code] * absmax, reshaped to `shape`, in `dtype` (default: the original dtype).

        Each byte holds two codes, so one look-up in a 256-row table of level pairs decodes
        both (the same as `levels[self.codes()]`, with half the indices and no unpacking).
        """
        pairs = _table(self.quant_type, self.packed.device)  # (256, 2): byte -> (levels[hi], levels[lo])
        values = pairs[self.packed.long()].view(-1, self.block_size)  # (n_blocks, block), fp32
        return (values * self.block_absmax().view(-1, 1)).view(self.shape).to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the packed codes and the constants."""
        parts = [self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.numel

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what `Linear4bit` keeps as buffers)."""
        names = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def quantize_4bit(weight: torch.Tensor, block_size: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> Weight4bit:
    """Blockwise absmax 4-bit quantization of `weight` (any shape; numel divisible by `block_size`).

    `double_quant=True` also stores the absmax constants in 8 bits (blocks of 256, minus
    their mean), as QLoRA does. Equal to bitsandbytes' `quantize_4bit(weight,
    blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)`.
    """
    _check_weight(weight, block_size)
    levels = levels_for(quant_type).to(weight.device)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    codes, absmax = _absmax_quantize(weight.detach().flatten().float(), block_size, levels)
    out = Weight4bit(pack_4bit(codes), absmax, tuple(weight.shape), weight.dtype, block_size, quant_type)
    if double_quant:
        offset = absmax.mean()
        codes8, scale = _absmax_quantize(absmax - offset, ABSMAX_BLOCK_SIZE, dynamic_levels().to(weight.device))
        out.absmax, out.absmax_codes, out.absmax_scale, out.absmax_offset = None, codes8.to(torch.uint8), scale, offset
    return out


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> Weight4bit:
    """NF4: `quantize_4bit(weight, block_size, "nf4", double_quant)`."""
    return quantize_4bit(weight, block_size, "nf4", double_quant)


def bits_per_parameter(block_size: int = 64, double_quant: bool = False, bits: int = 4) -> float:
    """The arithmetic: bits + 32/block (fp32 absmax), or bits + 8/block + 32/(block*256) with double quantization."""
    if double_quant:
        return bits + 8 / block_size + 32 / (block_size * ABSMAX_BLOCK_SIZE)
    return bits + 32 / block_size


def weight4bit_nbytes(numel: int, block_size: int = 64, double_quant: bool = False) -> int:
    """Exact bytes of a `Weight4bit` of `numel` numbers (what `quantize_4bit(...).nbytes` returns)."""
    n_blocks = numel // block_size
    if double_quant:
        return numel // 2 + n_blocks + 4 * math.ceil(n_blocks / ABSMAX_BLOCK_SIZE) + 4
    return numel // 2 + 4 * n_blocks
