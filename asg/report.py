"""`CompressionReport`: what a compression did to a model, in the paper's terms (appendices B and C)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CompressionReport:
    """Parameter and byte accounting of one compression, plus the reconstruction error of each replaced table.

    `embedding_params_*` count the numbers that define the replaced tables (a tied head counts once);
    `code_bytes` is the size of the fixed token→concept tables (appendix C), which are not parameters;
    `dense_bytes` and `embedding_bytes_after` are everything the tables take before and after.
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
                   code_overhead=self.code_overhead)
        return out

    def __str__(self) -> str:
        label = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        rows = [
            ("embedding parameters", self.embedding_params_before, self.embedding_params_after, self.embedding_ratio),
            ("model parameters", self.model_params_before, self.model_params_after, self.model_ratio),
            ("embedding bytes", self.dense_bytes, self.embedding_bytes_after, self.bytes_ratio),
        ]
        lines = [f"{self.method.upper()} compression ({label})",
                 f"  {'':24}{'before':>14}{'after':>14}{'ratio':>10}"]
        for name, before, after, ratio in rows:
            lines.append(f"  {name:24}{before:>14,}{after:>14,}{ratio:>10.2%}")
        lines.append(f"  {'code table bytes':24}{'':>14}{self.code_bytes:>14,}{self.code_overhead:>10.2%}"
                     "  (of the dense tables' bytes)")
        for name, err in self.reconstruction_error.items():
            lines.append(f"  {'reconstruction error':24}{name:>14}{err:>14.4f}{'':>10}  (relative Frobenius)")
        return "\n".join(lines)
