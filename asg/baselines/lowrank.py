"""Low-rank factorisation (ALBERT-style): E ≈ A·B with A (V, r) and B (r, D), from a truncated SVD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import pq
from ..config import MethodConfig, validate_targets
from ..methods import largest, register
from ..modules import CompressedEmbedding


@dataclass
class LowRankConfig(MethodConfig):
    """A rank-r factorisation; give `rank`, or `budget` (a fraction of V·D parameters) to derive it."""

    rank: int | None = None
    budget: float | None = None
    targets: tuple[str, ...] = ("input", "output")

    method: ClassVar[str] = "lowrank"
    default_budget: ClassVar[float] = 0.01

    def __post_init__(self) -> None:
        self.targets = validate_targets(self.targets)
        if (self.rank is None) == (self.budget is None):
            raise ValueError("give exactly one of rank (e.g. 8) and budget (a fraction of the table's parameters, e.g. 0.01)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(f"budget={self.budget!r} must be a fraction of the table's parameters in (0, 1), e.g. 0.01")

    def rank_for(self, num_rows: int, dim: int) -> int:
        """The rank for a (num_rows, dim) table: the given one, or the largest within the budget."""
        if self.rank is not None:
            return self.rank
        return int(self.budget * num_rows * dim // (num_rows + dim))

    def validate_for(self, num_rows: int, dim: int, what: str = "embedding") -> None:
        """ValueError unless the rank is between 1 and min(V, D) - 1 for this table."""
        rank = self.rank_for(num_rows, dim)
        if rank < 1:
            need = (num_rows + dim) / (num_rows * dim)
            raise ValueError(f"budget={self.budget} is too small for a {num_rows} x {dim} {what}: the rank would be 0; "
                             f"a rank-1 factorisation needs a budget of at least {need:.3%}")
        if rank >= min(num_rows, dim):
            raise ValueError(f"rank={rank} is not below min(V, D) = {min(num_rows, dim)} for the {what}: it would "
                             "not compress; choose a smaller rank or budget")

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank} if self.rank is not None else {"budget": self.budget}

    @classmethod
    def for_budget(cls, method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                   element_size: int = 4, **options) -> "LowRankConfig":
        """The largest rank whose two factors fit the budget."""
        allowed, value = cls.budget_units(vocab_size, dim, budget, by, element_size)
        rank = largest(lambda r: r * (vocab_size + dim) * value, 1, min(vocab_size, dim) - 1, allowed)
        if rank is None:
            raise ValueError(f"budget {budget:.4%} is too small for a low-rank factorisation: not even rank 1 fits "
                             f"(it needs {(vocab_size + dim) / (vocab_size * dim):.3%})")
        return cls(rank=rank, **options)


class LowRankEmbedding(CompressedEmbedding):
    """A token table A·B: `left` (V, r) and `right` (r, D), both trainable."""

    kind = "lowrank"

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx=None, embed_scale=None,
                 dtype=None, device=None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, embed_scale)
        self.rank = rank
        self.left = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype, device=device))
        self.right = nn.Parameter(torch.zeros(rank, embedding_dim, dtype=dtype, device=device))

    @classmethod
    def empty(cls, spec, *, dtype=None, device=None, embed_scale=None) -> "LowRankEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["rank"], spec.get("padding_idx"),
                   embed_scale, dtype, device)

    @property
    def weight(self) -> torch.Tensor:
        return self.left @ self.right

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.left) @ self.right

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(F.linear(hidden, self.right), self.left, bias)  # (h·Bᵀ)·Aᵀ: never forms the V x D table

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


@register(LowRankConfig, "lowrank")
def fit_lowrank(config: LowRankConfig, weight: torch.Tensor, name: str, progress: bool,
                **kwargs) -> tuple[LowRankEmbedding, float]:
    """Truncated SVD of `weight`, split evenly: A = U·√S, B = √S·Vᵀ (the best rank-r approximation)."""
    rows = weight.detach().float()
    rank = config.rank_for(*rows.shape)
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    root = s[:rank].sqrt()
    module = LowRankEmbedding(*rows.shape, rank, dtype=weight.dtype, device=weight.device, **kwargs)
    with torch.no_grad():
        module.left.copy_(u[:, :rank] * root)
        module.right.copy_(root[:, None] * vh[:rank])
    return module, pq.relative_error(rows, module.weight)
