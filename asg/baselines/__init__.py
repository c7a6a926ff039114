"""Compressors to compare ASG with, behind the same call shape: `asg.compress(model, config)`, same save/load.

- `SGConfig`: Semantic Grouping (Zhang et al. 2024), the "SG" rows of the ASG paper;
- `LowRankConfig`: ALBERT-style truncated-SVD factorisation;
- `ScalarConfig(bits=8|4)`: per-row int8 / int4 quantization, for the size comparison.

A head tied to the input table is compressed with it (one module serves both, as for ASG). For SG
this means the tokens of one group get equal logits: SG is an input-side method, so for generation
use `targets=("input",)`, which unties the head and keeps it dense.
"""

from __future__ import annotations

from .. import methods
from .sg import GroupedEmbedding, SGConfig, fit_sg
from .lowrank import LowRankConfig, LowRankEmbedding, fit_lowrank
from .scalar import QuantizedEmbedding, ScalarConfig, fit_scalar

METHODS = methods.names()  # ASG's, then each baseline's as imported above (they register themselves)


def config_for_budget(method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                      m: int | None = None, element_size: int = 4, targets=("input", "output"), **kwargs):
    """The config of `method` with the largest table that fits `budget` (a fraction of the dense table).

    `by="params"` counts the numbers that define the table; `by="bytes"` counts everything stored, codes
    included, with dense values of `element_size` bytes. int8 and int4 have a fixed size and ignore it.
    `m` is ASG's; extra keyword arguments (niter, seed, backend) go to the methods that take them.
    """
    return methods.config_class(method).for_budget(
        method, vocab_size, dim, budget, by=by, element_size=element_size,
        **methods.accepted_options(method, dict(kwargs, m=m, targets=targets), strict=False))


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
