"""Compressors to compare ASG with, behind the same call shape: `asg.compress(model, config)`, same save/load.

- `SGConfig`: Semantic Grouping (Zhang et al. 2024), the "SG" rows of the ASG paper;
- `LowRankConfig`: ALBERT-style truncated-SVD factorisation;
- `ScalarConfig(bits=8|4)`: per-row int8 / int4 quantization, for the size comparison.

A head tied to the input table is compressed with it (one module serves both, as for ASG). For SG
this means the tokens of one group get equal logits: SG is an input-side method, so for generation
use `targets=("input",)`, which unties the head and keeps it dense.
"""

from __future__ import annotations

from ..config import ASGConfig
from ..pq import code_dtype
from ..surgery import register_method
from .lowrank import LowRankConfig, LowRankEmbedding, fit_lowrank
from .scalar import QuantizedEmbedding, ScalarConfig, fit_scalar
from .sg import GroupedEmbedding, SGConfig, fit_sg

register_method(SGConfig, fit_sg, ("sg",))
register_method(LowRankConfig, fit_lowrank, ("lowrank",))
register_method(ScalarConfig, fit_scalar, ("int8", "int4"))

METHODS = ("asg", "sg", "lowrank", "int8", "int4")


def config_for_budget(method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                      m: int | None = None, element_size: int = 4, targets=("input", "output"), **kwargs):
    """The config of `method` with the largest table that fits `budget` (a fraction of the dense table).

    `by="params"` counts the numbers that define the table; `by="bytes"` counts everything stored, codes
    included, with dense values of `element_size` bytes. int8 and int4 have a fixed size and ignore it.
    Extra keyword arguments (niter, seed, backend) go to the ASG and SG configs.
    """
    if by not in ("params", "bytes"):
        raise ValueError(f"a budget is matched by 'params' or 'bytes', not {by!r}")
    if not 0 < budget < 1:
        raise ValueError(f"budget {budget!r} must be a fraction of the dense table in (0, 1), e.g. 0.01 for 1%")
    if method in ("int8", "int4"):
        return ScalarConfig(bits=int(method[3:]), targets=targets)
    value = element_size if by == "bytes" else 1
    allowed = budget * vocab_size * dim * value

    def index(n: int) -> int:  # bytes per token of an index over n entries
        return code_dtype(n).itemsize if by == "bytes" else 0

    if method == "asg":
        if m is None:
            raise ValueError("an ASG budget needs m, the number of segments")
        k = _largest(lambda k: k * dim * value + vocab_size * m * index(k), 2, vocab_size, allowed)
        if k is None:
            codes = vocab_size * m * index(2) / (vocab_size * dim * value)
            raise ValueError(f"budget {budget:.4%} is too small for ASG with m={m}: not even k=2 concept vectors fit"
                             + (f" (its codes alone take {codes:.2%} of the dense bytes; use a smaller m)" if codes else ""))
        return ASGConfig(k=k, m=m, targets=targets, **kwargs)
    if method == "sg":
        groups = _largest(lambda n: n * dim * value + vocab_size * index(n), 2, vocab_size, allowed)
        if groups is None:
            raise ValueError(f"budget {budget:.4%} is too small for SG: not even 2 groups fit")
        return SGConfig(ratio=groups / vocab_size, targets=targets, **kwargs)
    if method == "lowrank":
        rank = _largest(lambda r: r * (vocab_size + dim) * value, 1, min(vocab_size, dim) - 1, allowed)
        if rank is None:
            raise ValueError(f"budget {budget:.4%} is too small for a low-rank factorisation: not even rank 1 fits "
                             f"(it needs {(vocab_size + dim) / (vocab_size * dim):.3%})")
        return LowRankConfig(rank=rank, targets=targets)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _largest(cost, low: int, high: int, allowed: float) -> int | None:
    """The largest n in [low, high] with cost(n) <= allowed, for a non-decreasing cost; None if there is none."""
    if high < low or cost(low) > allowed:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= allowed else (low, mid - 1)
    return low


__all__ = [
    "METHODS",
    "GroupedEmbedding",
    "LowRankConfig",
    "LowRankEmbedding",
    "QuantizedEmbedding",
    "SGConfig",
    "ScalarConfig",
    "config_for_budget",
]
