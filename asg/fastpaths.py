"""The C-kernel paths of an ASG table on the CPU, kept apart from `ASGEmbedding` as nanopq keeps its
`DistanceTable` apart from `PQ`: the row gather (with its autograd function), eq. 2 logits from
per-segment lookup tables, the choice between those and rebuild-then-matmul, and the cached row lengths.

Every path here gives the same numbers as the module's plain torch code, up to float rounding; the
module decides when a path applies (`FastPaths.applies`) and falls back to torch otherwise.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import kernels


class VersionCache:
    """One value computed from some tensors, reused while the very same tensors are unchanged (in-place
    updates bump a tensor's `_version`). Copies and pickles start empty: weak references do not copy."""

    def __init__(self) -> None:
        self._state: tuple | None = None  # (weak refs, versions, value)

    def get(self, tensors: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        versions = tuple(t._version for t in tensors)
        state = self._state
        if state is None or state[1] != versions or any(ref() is not t for ref, t in zip(state[0], tensors)):
            self._state = state = (tuple(weakref.ref(t) for t in tensors), versions, compute())
        return state[2]

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._state = None


class FastPaths:
    """The C-kernel paths of one ASG table (anything with `codebooks`, `checked_codes()`, `k`, `m`,
    `shared`, `norms`, `row_scale()` and `segment_scores()`), with what they learn as they run: the faster
    logits path per batch-size class, and the whole-vocabulary row scale while the tensors are unchanged."""

    def __init__(self) -> None:
        self.path_times: dict[int, dict[str, float]] = {}  # logits: seconds per row of each path, by size class
        self._scale = VersionCache()
        self._byte_codes = VersionCache()
        self._transposed = VersionCache()
        #: Small batches score with 8-bit lookup tables (`approximate_logits`) where the CPU has the kernel.
        self.approximate = False
        self.rescored = 0  # tokens the last approximate call scored again exactly

    @staticmethod
    def applies(codebooks: torch.Tensor) -> bool:
        """Whether the kernels can read this table: float32 on the CPU, with the library built."""
        return codebooks.device.type == "cpu" and codebooks.dtype == torch.float32 and kernels.available()

    @staticmethod
    def rows(table, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows (n, D) of `ids` (every token when None) from the gather kernel, differentiable in the codebooks."""
        step = 0 if table.shared else table.k
        return GatherRows.apply(table.codebooks, table.checked_codes(), step, ids)

    @staticmethod
    def squared_lengths(table) -> torch.Tensor:
        """||row||² of every row (V,): the lookup-table kernel summing each code's concept squared norm,
        differentiable in the codebooks."""
        return SquaredLengths.apply(table.codebooks.square().sum(-1), table.checked_codes(), table.m, table.shared)

    def row_scale(self, table, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The whole-vocabulary row scale for inference, computed again only when a tensor changed, so that
        decoding does not repeat V·m lookups at every step."""
        return self._scale.get((table.codebooks, table.codes, table.norms), compute)

    def logits(self, table, flat: torch.Tensor) -> torch.Tensor:
        """Scores (N, V) of hidden states (N, D), row scale applied, by the path `choose` picks."""
        path, bucket = self.choose(flat.shape[0])
        start = time.perf_counter()
        if path == "lookup" and self.approximate and flat.shape[0] <= kernels.ROWS_MAX and self.approximates(table):
            if flat.shape[0] == 1:
                return self.approximate_logits(table, flat[0])[None]  # a view: stacking would copy V scores
            return torch.stack([self.approximate_logits(table, row) for row in flat])
        if path == "lookup":
            out = kernels.lut_logits(table.segment_scores(flat), table.checked_codes(), codes_checked=True)
            if table.norms is not None:
                out *= table.row_scale()
        else:
            out = F.linear(flat, table.weight)
        if bucket is not None:
            bucket[path] = (time.perf_counter() - start) / flat.shape[0]
        return out

    @staticmethod
    def approximates(table) -> bool:
        """Whether `approximate_logits` can score this table here: k <= 1024, no kept rows (whose logits are
        scored exactly after the concepts', which the rescoring bound does not cover) and a CPU with AVX-512 VBMI."""
        return table.k <= 1024 and not table.kept_count and kernels.byte_lookups()

    def approximate_logits(self, table, hidden: torch.Tensor) -> torch.Tensor:
        """Scores (V,) of one hidden state (D,), row scale applied, from lookup tables rounded to 8 bits (one
        step for all segments, so that the kernel sums bytes 64 tokens at a time): each score is within
        m · step / 2 of eq. 2, and every token whose score could be the largest within that bound is scored
        again exactly, so the top token (and any other that could beat it) is exact (`kernels.lut_bytes_top`)."""
        layout = self._byte_codes.get((table.codes,), lambda: kernels.byte_codes(table.checked_codes(), table.k))
        books = self._transposed.get((table.codebooks,), lambda: kernels.transposed_codebooks(table.codebooks, table.m,
                                                                                                table.shared))
        scale = table.row_scale() if table.norms is not None else None
        out, self.rescored = kernels.lut_bytes_top(kernels.segment_scores(hidden, books, table.m), layout, scale)
        return out

    def choose(self, rows: int) -> tuple[str, dict | None]:
        """Lookups cost about what a matmul costs per row, but the matmul path first rebuilds the table, so
        small batches always use lookups. For larger ones, the first call of each size class (a power of
        two) tries lookups, the second the matmul, and later calls take the faster: exploring costs nothing,
        as both give the same logits. Returns the path and, while exploring, where to record its time."""
        if rows <= 2 * kernels.COLS_CHUNK:
            return "lookup", None
        times = self.path_times.setdefault(rows.bit_length(), {})
        for path in ("lookup", "rebuild"):
            if path not in times:
                return path, times
        return min(times, key=times.get), None

    def __getstate__(self) -> dict:
        return {"approximate": self.approximate}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # caches start empty; pickles from before a field existed get its default
        self.approximate = bool(state.get("approximate", False))


class SquaredLengths(torch.autograd.Function):
    """Σ_i squared[concept of row t in segment i] for every row t, from the lookup kernel; the backward adds,
    segment by segment, each row's gradient to the concepts it uses (no (V, m) index table)."""

    @staticmethod
    def forward(ctx, squared, codes, m, shared):
        ctx.save_for_backward(codes)
        k = squared.shape[0] if shared else squared.shape[0] // m
        ctx.shared, ctx.k = shared, k
        lut = squared.expand(m, k) if shared else squared.view(m, k)
        return kernels.lut_logits(lut.reshape(1, m, k).contiguous(), codes, codes_checked=True)[0]

    @staticmethod
    def backward(ctx, grad):
        (codes,) = ctx.saved_tensors
        weights = grad.contiguous()
        per_segment = torch.stack([torch.bincount(codes[:, i].long(), weights=weights, minlength=ctx.k)
                                   for i in range(codes.shape[1])]).to(grad.dtype)  # (m, k)
        return (per_segment.sum(0) if ctx.shared else per_segment.reshape(-1)), None, None, None


class GatherRows(torch.autograd.Function):
    """Rows of an ASG table from the C gather kernel; the backward adds each row's gradient into the
    concept vectors it was built from (what F.embedding's backward does)."""

    @staticmethod
    def forward(ctx, codebooks, codes, step, ids):
        ctx.save_for_backward(codes, ids if ids is not None else torch.empty(0, dtype=torch.long))
        ctx.step, ctx.all_rows, ctx.rows = step, ids is None, codebooks.shape[0]
        return kernels.gather(codebooks, codes, step, ids, codes_checked=True)

    @staticmethod
    def backward(ctx, grad):
        codes, ids = ctx.saved_tensors
        if grad.dtype == torch.float32 and kernels.available():  # one pass in C, no (n, m) index table
            return kernels.scatter(grad, codes, ctx.step, ctx.rows, None if ctx.all_rows else ids), None, None, None
        selected = codes if ctx.all_rows else codes[ids.reshape(-1)]
        m = codes.shape[1]
        concept_ids = selected.long() + torch.arange(m) * ctx.step
        flat = grad.reshape(-1, grad.shape[-1] // m)
        grad_codebooks = torch.zeros(ctx.rows, flat.shape[1], dtype=grad.dtype).index_add_(0, concept_ids.reshape(-1), flat)
        return grad_codebooks, None, None, None
