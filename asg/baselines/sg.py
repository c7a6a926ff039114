"""Semantic Grouping (Zhang et al. 2024, "Tomato, tomahto, tomate"): tokens of one group share one vector.

Rows are L2-normalised and clustered by k-means (cosine geometry) into a number of groups given as a
ratio of V (they use 5, 10, 20 and 40%; the ASG paper compares at 40%). Every token of a group then
uses one trainable vector, initialised to the mean of the group's original (unnormalised) rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, pq
from ..config import BACKENDS, MethodConfig, check_kmeans, validate_targets
from ..methods import largest, register
from ..modules import CompressedEmbedding, index_dtype


@dataclass
class SGConfig(MethodConfig):
    """Semantic Grouping into round(ratio·V) groups (ratio 0.4 is the paper's "40% SG"); `kmeans` as in
    `ASGConfig` (at 40% of a 250k vocabulary "auto" runs two-level k-means: minutes instead of hours)."""

    ratio: float = 0.4
    niter: int = 25
    seed: int = 0
    backend: str = "faiss"
    kmeans: str = "auto"
    targets: tuple[str, ...] = ("input", "output")

    method: ClassVar[str] = "sg"
    default_budget: ClassVar[float] = 0.4  # the paper's "40% SG"

    def __post_init__(self) -> None:
        self.targets = validate_targets(self.targets)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio!r} must be a fraction of the vocabulary in (0, 1], e.g. 0.4 for 40% SG")
        if self.niter < 1:
            raise ValueError(f"niter={self.niter} must be at least 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use 'faiss' or 'torch'")
        check_kmeans(self.kmeans, self.backend)

    def groups_for(self, num_rows: int) -> int:
        """The number of groups for a table of `num_rows` tokens."""
        return max(1, round(self.ratio * num_rows))

    def validate_for(self, num_rows: int, dim: int, what: str = "embedding") -> None:
        """ValueError unless this ratio leaves at least 2 groups for the table."""
        if self.groups_for(num_rows) < 2:
            raise ValueError(f"ratio={self.ratio} leaves {self.groups_for(num_rows)} group for the {num_rows} rows of the "
                             f"{what}; use a ratio of at least {2 / num_rows:.2g}")

    def settings(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    @classmethod
    def for_budget(cls, method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                   element_size: int = 4, **options) -> "SGConfig":
        """The most groups whose vectors (and, by bytes, the group index) fit the budget."""
        allowed, value = cls.budget_units(vocab_size, dim, budget, by, element_size)
        groups = largest(lambda n: n * dim * value + vocab_size * cls.index_bytes(n, by), 2, vocab_size, allowed)
        if groups is None:
            raise ValueError(f"budget {budget:.4%} is too small for SG: not even 2 groups fit")
        return cls(ratio=groups / vocab_size, **options)


class GroupedEmbedding(CompressedEmbedding):
    """A token table where every token of a group shares one trainable vector: `vectors` (G, D), `groups` (V,)."""

    kind = "sg"

    def __init__(self, num_embeddings: int, embedding_dim: int, num_groups: int, padding_idx=None,
                 embed_scale=None, dtype=None, device=None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, embed_scale)
        self.num_groups = num_groups
        self.vectors = nn.Parameter(torch.zeros(num_groups, embedding_dim, dtype=dtype, device=device))
        self.register_buffer("groups", torch.zeros(num_embeddings, dtype=index_dtype(num_groups), device=device))

    @classmethod
    def empty(cls, spec, *, dtype=None, device=None, embed_scale=None) -> "GroupedEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["num_groups"], spec.get("padding_idx"),
                   embed_scale, dtype, device)

    @property
    def weight(self) -> torch.Tensor:
        return self.vectors[self.groups.long()]

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.groups[input_ids].long(), self.vectors)

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        scores = F.linear(hidden, self.vectors)[..., self.groups.long()]  # score each group once
        return scores if bias is None else scores + bias

    def validate(self) -> None:
        """Every group index in 0..G-1, finite vectors."""
        try:
            kernels.check_codes(self.groups, self.num_groups)
        except ValueError as err:
            raise ValueError(f"tensor 'groups': {err}") from None
        super().validate()

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "num_groups": self.num_groups}

    def index_tables(self) -> dict[str, int]:
        return {"groups": self.num_groups}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, groups={self.num_groups}"


@register(SGConfig, "sg")
def fit_sg(config: SGConfig, weight: torch.Tensor, name: str, progress: bool, **kwargs) -> tuple[GroupedEmbedding, float]:
    """Group the rows of `weight` by k-means on their directions; each group's vector is its members' mean."""
    rows = weight.detach().float()
    num_rows, dim = rows.shape
    num_groups = config.groups_for(num_rows)
    fit = pq.fit(F.normalize(rows, dim=1), num_groups, 1, niter=config.niter, seed=config.seed,
                 backend=config.backend, progress=progress, desc=f"k-means {name} (SG)", kmeans=config.kmeans)
    groups = torch.from_numpy(fit.codes[:, 0].astype(np.int64)).to(rows.device)
    sums = torch.zeros(num_groups, dim, device=rows.device).index_add_(0, groups, rows)
    counts = torch.bincount(groups, minlength=num_groups).clamp_min(1)
    vectors = sums / counts[:, None]
    module = GroupedEmbedding(num_rows, dim, num_groups, dtype=weight.dtype, device=weight.device, **kwargs)
    with torch.no_grad():
        module.vectors.copy_(vectors)
        module.groups.copy_(groups.to(module.groups.dtype))
    return module, pq.relative_error(rows, vectors[groups])
