"""Exact k-means for segments of one or two values (m = D or D/2): Lloyd iterations whose assignment step is the
`nearest` C kernel, which scores groups of neighbouring points (sorted by their first value) against only the
centroids whose first value is close, a vector of them (16 with AVX-512) per instruction. faiss's exact
k-means writes a (points, k) score matrix with a matmul instead, which in one or two dimensions costs far
more than the arithmetic. See `MAX_DIM` for the measured gain.

Numbers only, like `asg.pq`, which calls it: points (N, d) float32 in, centroids (k, d) and codes out.
"""

from __future__ import annotations

import numpy as np
import torch

from . import kernels

#: The widest segment fitted here rather than by faiss: on 50,000 rows of Gemma 3's table, 2 cores, this path
#: took 2% of faiss's time at d=1 and 2 with k=1,024 (8% with k=256), but 0.9-1.2x at d=3-4 and 1.6-1.9x
#: at d=8-16, where faiss's own kernels are fast (benchmarks/bench_fine_segments.py).
MAX_DIM = 2
#: How far a split moves the two halves of a cluster apart (faiss's value); `pq`'s torch k-means uses it too.
SPLIT_EPS = 1.0 / 1024.0
_CHUNK = 1 << 22  # points sorted and assigned at once by `assign`


def applies(dim: int) -> bool:
    """Whether segments of `dim` values are fitted here: few values, and the C kernels built."""
    return dim <= MAX_DIM and kernels.available()


def kmeans(x: np.ndarray, k: int, niter: int, seed: int, weights: np.ndarray | None,
           bar) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (k, d) of Lloyd k-means on x (N, d), each point counting `weights[i]` times (all once when None),
    and the codes (N,) of x against them. The start is a grid spaced as an optimal quantizer's centroids are
    (`_start`); empty clusters are refilled by splitting a large one, as faiss does. `bar` advances once per
    iteration."""
    order = np.argsort(x[:, 0])  # sorted once: each assignment step then skips far centroids
    points = torch.from_numpy(np.ascontiguousarray(x[order], dtype=np.float32))
    mass_of = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)[order]
    weighted = [points.numpy()[:, j] * mass_of for j in range(x.shape[1])]  # float64, contiguous: bincount reads it
    rng = np.random.default_rng(seed)
    centroids = _start(points.numpy(), mass_of, k, rng)
    for _ in range(niter):
        codes = kernels.nearest(points, torch.from_numpy(centroids.astype(np.float32))).numpy()
        counts = np.bincount(codes, minlength=k)
        mass = counts if weights is None else np.bincount(codes, weights=mass_of, minlength=k)
        sums = np.stack([np.bincount(codes, weights=column, minlength=k) for column in weighted], 1)
        filled = mass > 0
        centroids[filled] = sums[filled] / mass[filled, None]
        _split_empty(centroids, counts, rng)
        bar.update()
    centroids = centroids.astype(np.float32)
    out = np.empty(len(x), dtype=np.int64)
    out[order] = kernels.nearest(points, torch.from_numpy(centroids)).numpy()
    return centroids, out


def assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (N,) int64 of the centroid nearest to each point (either one where two are equally near), in
    sorted chunks of `_CHUNK` points, so that the pooled segments of a shared codebook need no second copy."""
    out = np.empty(len(points), dtype=np.int64)
    table = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    for start in range(0, len(points), _CHUNK):
        chunk = points[start:start + _CHUNK]
        order = np.argsort(chunk[:, 0])
        out[start + order] = kernels.nearest(torch.from_numpy(np.ascontiguousarray(chunk[order], dtype=np.float32)),
                                             table).numpy()
    return out


def _start(points: np.ndarray, mass: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Initial centroids (k, d) float64 for d <= 2: a grid (k in one dimension, about √k × √k in two) whose
    values along each axis are spaced as the density^(1/3) of the points there, which is how the centroids of an
    optimal quantizer are spaced; points drawn by `rng` fill the places a non-square k leaves. From this start
    Lloyd's iterations ended 5-15x below faiss's error in one dimension and 10-30% below in two (Gemma 3's table
    and four synthetic shapes), where faiss starts from random points."""
    dim = points.shape[1]
    mass = mass if mass.sum() > 0 else np.ones(len(points))
    sides = [k] if dim == 1 else [int(np.sqrt(k)), k // int(np.sqrt(k))]
    axes = [_companded(points[:, j], mass, side) for j, side in enumerate(sides)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim)
    extra = points[rng.choice(len(points), size=k - len(grid), replace=False)]
    return np.concatenate([grid, extra]).astype(np.float64)


def _companded(values: np.ndarray, mass: np.ndarray, count: int, bins: int = 4096) -> np.ndarray:
    """`count` values spaced as the cube root of the weighted density of `values` (the midpoints of equal
    shares of its integral)."""
    density, edges = np.histogram(values, bins=bins, weights=mass)
    cumulative = np.concatenate([[0.0], np.cumsum(np.cbrt(density))])
    return np.interp((np.arange(count) + 0.5) / count, cumulative / cumulative[-1], edges)


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> None:
    """Give each empty cluster half of a cluster drawn in proportion to its size beyond one point, the two
    centroids nudged apart (embedding segments have many exact duplicates, which leave clusters empty)."""
    for empty in np.flatnonzero(counts == 0):
        spare = np.maximum(counts - 1, 0).astype(np.float64)
        if spare.sum() <= 0:
            return
        donor = rng.choice(len(counts), p=spare / spare.sum())
        sign = np.where(np.arange(centroids.shape[1]) % 2, -1.0, 1.0)
        centroids[empty] = centroids[donor] * (1 + SPLIT_EPS * sign)
        centroids[donor] = centroids[donor] * (1 - SPLIT_EPS * sign)
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
