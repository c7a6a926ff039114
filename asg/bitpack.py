"""Index tables packed at ⌈log2 n⌉ bits per entry, as ASG folders store codes (and SG groups) on disk.

The layout, little-endian at the bit level: the entries are taken in row-major order, and entry j takes
bits j·b to j·b + b - 1 of the stream, least significant bit first, where bit i of the stream is bit
i mod 8 (value 2^(i mod 8)) of byte i // 8. The last byte is padded with zero bits. With b = 8 or 16
this is exactly the little-endian bytes of a uint8 or uint16 array.

It imports nothing from asg.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_BLOCK = 1 << 20  # entries per pass (a multiple of 8, so that each block starts on a byte)


def bits_for(count: int) -> int:
    """Bits per entry for indices 0..count-1: ⌈log2 count⌉, at least 1."""
    if count < 1:
        raise ValueError(f"an index table needs at least one value, got {count}")
    return max(1, math.ceil(math.log2(count)))


def packed_size(entries: int, bits: int) -> int:
    """Bytes that `entries` entries of `bits` bits take."""
    return (entries * bits + 7) // 8


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The entries of an integer tensor (any shape, each in 0..2^bits - 1) as a 1-D uint8 tensor."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be between 1 and 32, got {bits}")
    flat = values.detach().reshape(-1).cpu().numpy().astype(np.int64, copy=False)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"values must lie in 0..{(1 << bits) - 1} to be packed at {bits} bits")
    shifts = np.arange(bits, dtype=np.int64)
    out = np.empty(packed_size(flat.size, bits), dtype=np.uint8)
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK]
        stream = ((block[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        packed = np.packbits(stream, bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack(data: torch.Tensor, shape: tuple[int, ...], bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` and integer `dtype` that `pack` stored in `data`; ValueError when `data` does
    not have exactly the bytes that shape and bits need."""
    entries = math.prod(shape)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_size(entries, bits):
        raise ValueError(f"packed data must be {packed_size(entries, bits)} bytes (uint8, 1-D) for {list(shape)} "
                         f"entries of {bits} bits, got {data.dtype} of shape {list(data.shape)}")
    raw = data.numpy()
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))
    out = np.empty(entries, dtype=np.int64)
    for start in range(0, entries, _BLOCK):
        count = min(_BLOCK, entries - start)
        first = start * bits // 8
        chunk = np.unpackbits(raw[first:first + packed_size(count, bits)], bitorder="little", count=count * bits)
        out[start:start + count] = chunk.reshape(count, bits).astype(np.int64) @ weights
    return torch.from_numpy(out).to(dtype).reshape(shape)
