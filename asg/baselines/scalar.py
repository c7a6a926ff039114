"""Scalar quantization of the embedding rows to int8 or int4 with one scale per row, or per group of
`group_size` values as real int4 schemes do (GGUF's Q4_0 uses groups of 32), dequantized on lookup.

What a user gets from generic quantization tools: the same number of values at fewer bits. The
quantized values are frozen buffers (fine-tuning does not change them); only bytes shrink.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import pq
from ..config import MethodConfig, validate_targets
from ..methods import register
from ..modules import CompressedEmbedding


@dataclass
class ScalarConfig(MethodConfig):
    """Symmetric quantization to `bits` (8 or 4) bits, with one scale per row, or per `group_size`
    consecutive values of a row."""

    bits: int = 8
    targets: tuple[str, ...] = ("input", "output")
    group_size: int | None = None

    def __post_init__(self) -> None:
        self.targets = validate_targets(self.targets)
        if self.bits not in (8, 4):
            raise ValueError(f"bits={self.bits!r}: scalar quantization supports 8 (int8) or 4 (int4) bits")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size={self.group_size!r} must be an even number of values, e.g. 32")

    @property
    def method(self) -> str:
        return f"int{self.bits}"

    def validate_for(self, num_rows: int, dim: int, what: str = "embedding") -> None:
        """Every table can be quantized per row; groups must divide its rows."""
        if self.group_size is not None and dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the {what} dimension D={dim}; "
                             f"choose a divisor of {dim}")

    def settings(self) -> dict[str, Any]:
        return {"bits": self.bits, **({"group_size": self.group_size} if self.group_size else {})}

    @classmethod
    def for_budget(cls, method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                   element_size: int = 4, **options) -> "ScalarConfig":
        """int8 and int4 have a fixed size: the budget is checked, not used."""
        cls.budget_units(vocab_size, dim, budget, by, element_size)
        return cls.from_options(method, vocab_size, dim, **options)

    @classmethod
    def from_options(cls, method: str, vocab_size: int, dim: int, *, budget: float | None = None, by: str = "params",
                     element_size: int = 4, **options) -> "ScalarConfig":
        """The bits are in the method's name: int8 or int4."""
        return cls(bits=int(method.removeprefix("int")), **options)


class QuantizedEmbedding(CompressedEmbedding):
    """A token table of int8 values (or int4 pairs packed into bytes) times a `scale` per row (V,) or per
    group of `group_size` values (V, D / group_size)."""

    kind = "int8"
    aliases = ("int4", "scalar")  # "scalar": what older folders record for both

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, padding_idx=None, embed_scale=None,
                 dtype=None, device=None, group_size: int | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, embed_scale)
        self.bits = bits
        self.group_size = group_size
        width = embedding_dim if bits == 8 else (embedding_dim + 1) // 2
        store = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("values", torch.zeros(num_embeddings, width, dtype=store, device=device))
        shape = (num_embeddings,) if group_size is None else (num_embeddings, embedding_dim // group_size)
        self.register_buffer("scale", torch.zeros(shape, dtype=dtype or torch.float32, device=device))

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    @classmethod
    def empty(cls, spec, *, dtype=None, device=None, embed_scale=None) -> "QuantizedEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec.get("padding_idx"),
                   embed_scale, dtype, device, spec.get("group_size"))

    @property
    def groups(self) -> int:
        """Scales per row: D / group_size, or one."""
        return self.embedding_dim // (self.group_size or self.embedding_dim)

    def _grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., D) as (..., groups, values per group): one group per row without `group_size`."""
        return rows.reshape(*rows.shape[:-1], self.groups, self.embedding_dim // self.groups)

    def quantize_(self, rows: torch.Tensor) -> None:
        """Store `rows` (V, D): scale = max|group| / qmax for each row or group, values = round(value / scale)."""
        grouped = self._grouped(rows.detach().float())
        scale = grouped.abs().amax(-1) / self.qmax
        q = torch.round(grouped / scale.clamp_min(1e-30)[..., None]).clamp(-self.qmax, self.qmax).to(torch.int8)
        q, scale = q.flatten(-2), scale.reshape(self.scale.shape)
        if self.bits == 4:
            q = (F.pad(q, (0, 2 * self.values.shape[1] - q.shape[1])) + 8).to(torch.uint8)  # 1..15: a nibble each
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        self.values.copy_(q)
        self.scale.copy_(scale)

    def _dequantize(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            low, high = (values & 0x0F).to(torch.int8) - 8, (values >> 4).to(torch.int8) - 8
            values = torch.stack((low, high), -1).flatten(-2)[..., : self.embedding_dim]
        scale = scale.reshape(*values.shape[:-1], self.groups)  # per row: one group of D values
        return (self._grouped(values.to(scale.dtype)) * scale[..., None]).flatten(-2)

    @property
    def weight(self) -> torch.Tensor:
        return self._dequantize(self.values, self.scale)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize(self.values[input_ids], self.scale[input_ids])

    def value_count(self) -> int:
        return self.num_embeddings * self.embedding_dim + self.scale.numel()

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "kind": f"int{self.bits}", "bits": self.bits, "group_size": self.group_size}

    def extra_repr(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{groups}"


@register(ScalarConfig, "int8", "int4")
def fit_scalar(config: ScalarConfig, weight: torch.Tensor, name: str, progress: bool,
               **kwargs) -> tuple[QuantizedEmbedding, float]:
    """Quantize every row of `weight` to `config.bits` bits with its own scale."""
    module = QuantizedEmbedding(*weight.shape, config.bits, dtype=weight.dtype, device=weight.device,
                                group_size=config.group_size, **kwargs)
    with torch.no_grad():
        module.quantize_(weight)
    return module, pq.relative_error(weight, module.weight)
