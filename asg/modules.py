"""Torch modules that stand in for a dense token table: `ASGEmbedding` (input) and `ASGHead` (output logits)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .pq import code_dtype

_TORCH_CODE_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16,
                      np.dtype(np.uint16): torch.uint16, np.dtype(np.int32): torch.int32}


def torch_code_dtype(k: int) -> torch.dtype:
    """The torch dtype of a code table for k concept vectors per codebook (uint8 for k <= 256)."""
    return _TORCH_CODE_DTYPES[code_dtype(k)]


class ASGEmbedding(nn.Module):
    """A token embedding built from shared concept vectors (paper eq. 1).

    Token t is the concatenation of m concept vectors, row `concept_ids()[t, i]` of `codebooks` for
    segment i. `codebooks` is the trainable E': (m·k, D/m) for separate codebooks, (k, D/m) shared.
    `codes` (V, m) is a fixed buffer, never trained. Where the replaced embedding scaled its output
    (Gemma's √D `embed_scale`), the same scale is applied after the lookup.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        k: int,
        m: int,
        shared: bool = False,
        padding_idx: int | None = None,
        embed_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim % m:
            raise ValueError(f"m={m} does not divide embedding_dim={embedding_dim}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.k = k
        self.m = m
        self.shared = shared
        self.padding_idx = padding_idx  # kept for code that reads it; concept vectors are shared, so it is not masked
        rows = k if shared else m * k
        self.codebooks = nn.Parameter(torch.zeros(rows, embedding_dim // m, dtype=dtype, device=device))
        self.register_buffer("codes", torch.zeros(num_embeddings, m, dtype=torch_code_dtype(k), device=device))
        offsets = torch.zeros(m, dtype=torch.long) if shared else torch.arange(m) * k
        self.register_buffer("segment_offsets", offsets.to(device), persistent=False)
        if embed_scale is not None:
            self.register_buffer("embed_scale", torch.as_tensor(embed_scale).to(device), persistent=False)
        else:
            self.embed_scale = None

    @classmethod
    def from_pq(cls, codebooks, codes, *, dtype=None, device=None, **kwargs) -> "ASGEmbedding":
        """Build from `pq.fit` output: codebooks (m, k, D/m) or shared (k, D/m), codes (V, m)."""
        codebooks = torch.as_tensor(codebooks)
        codes = codes.long() if isinstance(codes, torch.Tensor) else torch.from_numpy(np.asarray(codes, dtype=np.int64))
        shared = codebooks.dim() == 2
        k = codebooks.shape[0] if shared else codebooks.shape[1]
        m = codes.shape[1]
        module = cls(codes.shape[0], m * codebooks.shape[-1], k, m, shared=shared,
                     dtype=dtype or codebooks.dtype, device=device, **kwargs)
        with torch.no_grad():
            module.codebooks.copy_(codebooks.reshape(module.codebooks.shape))
            module.codes.copy_(codes.to(module.codes.dtype))
        return module

    @property
    def segment_dim(self) -> int:
        """D/m, the width of one concept vector."""
        return self.embedding_dim // self.m

    def concept_ids(self) -> torch.Tensor:
        """The paper's ConceptIDs (V, m) long: row i·k + s_i of E' (s_i itself for a shared codebook)."""
        return self.codes.long() + self.segment_offsets

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed (V, D) table, computed from the codebooks (not stored, differentiable)."""
        return F.embedding(self.concept_ids(), self.codebooks).reshape(self.num_embeddings, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Concatenated concept vectors of each token: (...,) ids -> (..., D), in the codebooks' dtype."""
        ids = self.codes[input_ids].long() + self.segment_offsets
        out = F.embedding(ids, self.codebooks).flatten(-2)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        kind = "shared" if self.shared else "separate"
        return f"{self.num_embeddings}, {self.embedding_dim}, k={self.k}, m={self.m}, codebook={kind}"


class ASGHead(nn.Module):
    """Output logits from concept vectors (paper eq. 2): l_t = Σ_i H_i · u_{t,i}, plus the original bias.

    `embedding` holds the output codebooks OE'. For a head tied to the input table it is the very
    `ASGEmbedding` of the input side (one module, stored once); an untied head has its own.
    """

    def __init__(self, embedding: ASGEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.bias = bias
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed (V, D) head matrix (computed, not stored)."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) for hidden states (..., D)."""
        return F.linear(hidden, self.weight, self.bias)

    def lookup_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Eq. 2 literally: score each segment against its codebook, then sum the m scores each token picks."""
        emb = self.embedding
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, emb.m, emb.segment_dim)
        if emb.shared:
            tables = torch.einsum("nsd,kd->nsk", h, emb.codebooks)
        else:
            tables = torch.einsum("nsd,skd->nsk", h, emb.codebooks.view(emb.m, emb.k, emb.segment_dim))
        tables = tables.reshape(h.shape[0], -1)
        rows = emb.codes.long() + torch.arange(emb.m, device=h.device) * emb.k  # (V, m) into (m·k)
        logits = tables[:, rows].sum(-1)
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*lead, emb.num_embeddings)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
