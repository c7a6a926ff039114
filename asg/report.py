"""`CompressionReport`: what a compression did to a model, in the paper's terms (appendices B and C)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CompressionReport:
    """Parameter and byte accounting of one compression, plus the reconstruction error of each replaced table.

    `embedding_params_*` count the numbers that define the replaced tables (a tied head counts once);
    `code_bytes` is the size of the fixed token→concept tables (appendix C), which are not parameters;
    `dense_bytes` and `embedding_bytes_after` are everything the tables take before and after, in memory
    (codes in whole bytes, as the kernels read them). On disk an ASG folder packs the codes at ⌈log2 k⌉
    bits: `code_bytes_on_disk` and `embedding_bytes_on_disk`. Shares are reported against the dense
    tables in float32 and in bf16, whatever the model's own dtype.
    """

    method: str
    settings: dict[str, Any]
    embedding_params_before: int
    embedding_params_after: int
    model_params_before: int
    model_params_after: int
    code_bytes: int
    dense_bytes: int
    embedding_bytes_after: int
    reconstruction_error: dict[str, float] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    code_bytes_on_disk: int = 0
    embedding_bytes_on_disk: int = 0

    @property
    def dense_float32_bytes(self) -> int:
        """Bytes of the replaced dense tables in float32."""
        return 4 * self.embedding_params_before

    @property
    def dense_bf16_bytes(self) -> int:
        """Bytes of the replaced dense tables in bf16."""
        return 2 * self.embedding_params_before

    @property
    def embedding_ratio(self) -> float:
        """Embedding parameters after / before (k/V for separate codebooks)."""
        return self.embedding_params_after / self.embedding_params_before

    @property
    def model_ratio(self) -> float:
        """Model parameters after / before."""
        return self.model_params_after / self.model_params_before

    @property
    def bytes_ratio(self) -> float:
        """Bytes of the replacement tables (values and codes) / bytes of the dense tables."""
        return self.embedding_bytes_after / self.dense_bytes

    @property
    def code_overhead(self) -> float:
        """Bytes of the code tables relative to the bytes of the dense tables they replace."""
        return self.code_bytes / self.dense_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the derived ratios included."""
        out = asdict(self)
        out.update(embedding_ratio=self.embedding_ratio, model_ratio=self.model_ratio, bytes_ratio=self.bytes_ratio,
                   code_overhead=self.code_overhead, dense_float32_bytes=self.dense_float32_bytes,
                   dense_bf16_bytes=self.dense_bf16_bytes,
                   disk_share_of_float32=self.embedding_bytes_on_disk / self.dense_float32_bytes,
                   disk_share_of_bf16=self.embedding_bytes_on_disk / self.dense_bf16_bytes,
                   memory_share_of_float32=self.embedding_bytes_after / self.dense_float32_bytes,
                   memory_share_of_bf16=self.embedding_bytes_after / self.dense_bf16_bytes)
        return out

    def __str__(self) -> str:
        label = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        rows = [
            ("embedding parameters", self.embedding_params_before, self.embedding_params_after, self.embedding_ratio),
            ("model parameters", self.model_params_before, self.model_params_after, self.model_ratio),
        ]
        lines = [f"{self.method.upper()} compression ({label})",
                 f"  {'':24}{'before':>14}{'after':>14}{'ratio':>10}"]
        for name, before, after, ratio in rows:
            lines.append(f"  {name:24}{before:>14,}{after:>14,}{ratio:>10.2%}")
        lines.append(f"  {'embedding bytes':24}{'':>14}{'':>14}{'of fp32':>10}{'of bf16':>10}")
        for name, size in (("  dense, float32", self.dense_float32_bytes), ("  dense, bf16", self.dense_bf16_bytes),
                           ("  compressed, on disk", self.embedding_bytes_on_disk),
                           ("  compressed, in memory", self.embedding_bytes_after),
                           ("    codes on disk", self.code_bytes_on_disk), ("    codes in memory", self.code_bytes)):
            lines.append(f"  {name:24}{'':>14}{size:>14,}{size / self.dense_float32_bytes:>10.2%}"
                         f"{size / self.dense_bf16_bytes:>10.2%}")
        for name, err in self.reconstruction_error.items():
            lines.append(f"  {'reconstruction error':24}{name:>14}{err:>14.4f}{'':>10}  (relative Frobenius)")
        return "\n".join(lines)
