"""Two-level k-means for large k (thousands of centroids and more), on faiss.

Exact k-means scores every point against every centroid at every iteration: O(points · k · d). For
mT5's shared k=32,768 or SG's 100,000 groups that is hours on a laptop-class CPU. Here k-means runs
twice at small k instead:

1. coarse: `c ≈ √k` cells by exact k-means on the training points;
2. fine: inside each cell, exact k-means with the cell's share of the k centroids (by mass × spread^p, p
   chosen by a pilot fit on a tenth of the points);
3. refinement: Lloyd iterations over all cells at once, where each point is scored only against the
   centroids of its `nprobe` nearest cells (an inverted-file search done as one matmul per cell), so that
   points near a cell border can move to the centroid that is really nearest.

Cost per iteration O(points · (c + nprobe · k/c) · d) instead of O(points · k · d). `assign` encodes
points with the same inverted-file search. What the approximation costs against exact k-means is
measured in `benchmarks/bench_large_k.py`; `pq.fit` uses this module where that benchmark showed it
pays (see `pq.TWO_LEVEL_MIN_WORK`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

#: cells scored per point in refinement and encoding: the nearest few hold the true nearest centroid
#: for almost every point (measured agreement with exact assignment in the benchmark).
NPROBE = 4
#: Lloyd iterations over all cells after the per-cell fits.
REFINE_ITERS = 8
#: Exponents p of a cell's allocation weight, mass · spread^p, that the pilot fit compares (the first wins ties
#: and is used where the data are too few for a pilot).
SPREAD_POWERS = (1.0, 2.0)
PILOT_FRACTION = 0.1  # of the points and of k, in the pilot fits
PILOT_MIN_POINTS = 1_000
_PILOT_WORK = PILOT_FRACTION ** 1.5  # a pilot's work against the fit's: a tenth of the points, cells √10 smaller
#: Another candidate replaces the first only where it lowers the pilot's squared error by more than this:
#: where p made no difference at full size the pilots differed by 0.01-0.11%; on SG of Gemma's rows, 1.6-2.0%.
PILOT_MARGIN = 0.005
_CHUNK_VALUES = 1 << 23  # values of the points handled at once: bounds every temporary (32 MiB of float32; the
# inverted-file search sorts nprobe int64 per point, 4x that)
_ADD_VALUES = 1 << 21  # values summed into the centroids at once (their float64 group sums: 16 MiB)


class TwoLevel(NamedTuple):
    """Fine centroids (k, d) grouped by cell, the coarse centroids (c, d), where each cell's fine centroids
    start (c + 1,) in `centroids`, and the exponent p of the allocation weight mass · spread^p it used."""

    centroids: np.ndarray
    coarse: np.ndarray
    starts: np.ndarray
    spread_power: float = SPREAD_POWERS[0]


def kmeans(faiss, kmeans_exact, x: np.ndarray, k: int, niter: int, seed: int, weights, bar) -> TwoLevel:
    """Two-level k-means of `x` (N, d) float32 into k centroids; `kmeans_exact(faiss, x, k, niter, seed,
    weights, bar)` is the exact k-means it runs at small k (it advances `bar` by one per iteration; the
    fine fits advance it by their share, so that the bar counts `units(niter)` for the whole fit)."""
    pilot_bar = _Scaled(bar, _PILOT_WORK)
    power = spread_power(faiss, kmeans_exact, x, k, niter, seed, weights, pilot_bar)
    bar.update(_pilot_units(niter) - pilot_bar.done)  # the pilot's whole share, also where it was skipped
    return _kmeans(faiss, kmeans_exact, x, k, niter, seed, weights, bar, power)


def spread_power(faiss, kmeans_exact, x: np.ndarray, k: int, niter: int, seed: int, weights, bar=None) -> float:
    """The exponent p of the allocation weight mass · spread^p (of `SPREAD_POWERS`) whose two-level fit of a
    random tenth of the points into a tenth of the k centroids leaves the smaller error (the first unless
    another is better by `PILOT_MARGIN`). How much a cell's spread should count depends on the data: on
    Gemma 3's normalised rows (SG) p=2 took the error from 2.98% to 1.86% above exact k-means, on isotropic
    data every cell has the same spread and p changes nothing, and p=3 was worse on a shared codebook; so it
    is measured on each fit (two fits of a tenth of the points and of k)."""
    count, pilot_k = int(len(x) * PILOT_FRACTION), int(k * PILOT_FRACTION)
    if count < PILOT_MIN_POINTS or pilot_k < 4 or len(SPREAD_POWERS) == 1:
        return SPREAD_POWERS[0]
    rows = np.sort(np.random.default_rng(seed).choice(len(x), count, replace=False))
    sample = np.ascontiguousarray(x[rows])
    w = None if weights is None else weights[rows]
    errors = []
    for power in SPREAD_POWERS:
        fit = _kmeans(faiss, kmeans_exact, sample, pilot_k, niter, seed, w, bar or _Scaled(None, 0), power)
        squared = _squared_distances(sample, fit.centroids, assign(faiss, fit, sample))
        errors.append(float(squared @ w) if w is not None else float(squared.sum()))
    best = int(np.argmin(errors))
    return SPREAD_POWERS[best] if errors[best] < (1 - PILOT_MARGIN) * errors[0] else SPREAD_POWERS[0]


def _kmeans(faiss, kmeans_exact, x: np.ndarray, k: int, niter: int, seed: int, weights, bar, power: float) -> TwoLevel:
    """`kmeans` with the allocation weight mass · spread^`power`."""
    num, dim = x.shape
    cells = int(min(max(2, round(k ** 0.5)), k // 2))
    coarse, _ = kmeans_exact(faiss, x, cells, niter, seed, weights, bar)
    probes = _probes(faiss, coarse, x, min(NPROBE, cells))  # the coarse cells stay put: searched once
    cell = probes[:, 0]
    counts = np.bincount(cell, minlength=cells)
    mass = np.bincount(cell, weights=weights, minlength=cells).astype(np.float64)
    spread = np.bincount(cell, weights=_squared_distances(x, coarse, cell), minlength=cells) / np.maximum(counts, 1)
    # A cell's k-means error falls as its centroids grow, in proportion to its mass times its spread (the
    # high-dimensional rate-distortion allocation, p=1): give each cell centroids in that proportion, or with
    # the spread weighed more where the pilot measured that to be better.
    share = _allocate(k, mass * spread ** power, counts)
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(cells + 1))
    centroids = np.empty((k, dim), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(share)])
    fine_bar = _Scaled(bar, 0.0)  # each fine fit advances the bar by its share of one coarse-sized pass
    for j in range(cells):
        members = order[bounds[j]:bounds[j + 1]]
        if share[j] == 0:
            continue
        points = np.ascontiguousarray(x[members])
        w = None if weights is None or weights[members].sum() <= 0 else weights[members]
        fine_bar.factor = len(members) / num
        if share[j] == 1:
            centroids[starts[j]] = np.average(points, axis=0, weights=w)
            fine_bar.update(niter)
        else:
            centroids[starts[j]:starts[j + 1]], _ = kmeans_exact(faiss, points, int(share[j]), niter, seed + 1 + j, w,
                                                                 fine_bar)
    fit = TwoLevel(centroids, coarse, starts, power)
    del order, bounds, cell  # refinement holds only the probes: every array of the size of x counts in the peak
    for _ in range(REFINE_ITERS):
        fit = _lloyd(faiss, fit, x, weights, probes)
        bar.update()
    return fit


def units(niter: int) -> float:
    """Progress-bar steps of one two-level fit: the pilot fits, the coarse and the fine iterations, then the
    refinement."""
    return _pilot_units(niter) + 2 * niter + REFINE_ITERS


def _pilot_units(niter: int) -> float:
    return (2 * niter + REFINE_ITERS) * _PILOT_WORK * len(SPREAD_POWERS) if len(SPREAD_POWERS) > 1 else 0.0


def assign(faiss, fit: TwoLevel, x: np.ndarray, nprobe: int = NPROBE) -> np.ndarray:
    """Index (N,) int64 of the nearest fine centroid of every point of `x`, among the centroids of its
    `nprobe` nearest cells."""
    out = np.empty(len(x), dtype=np.int64)
    for part in _chunks(x):
        probes = _nearest(faiss, fit.coarse, x[part], min(nprobe, len(fit.coarse)))
        out[part] = _assign_chunk(faiss, fit, x[part], probes)
    return out


def _assign_chunk(faiss, fit: TwoLevel, x: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """Nearest fine centroid of each point of `x` among those of its cells `probes` (N, nprobe): one flat
    search per cell, of the points that probe it."""
    cells = len(fit.coarse)
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(cells + 1))
    best = np.full(len(x), np.inf, dtype=np.float32)
    index = np.zeros(len(x), dtype=np.int64)
    width = probes.shape[1]
    for j in range(cells):
        lo, hi = fit.starts[j], fit.starts[j + 1]
        if lo == hi or bounds[j] == bounds[j + 1]:
            continue
        rows = order[bounds[j]:bounds[j + 1]] // width
        flat_index = faiss.IndexFlatL2(x.shape[1])
        flat_index.add(fit.centroids[lo:hi])
        dist, idx = flat_index.search(np.ascontiguousarray(x[rows]), 1)
        better = dist[:, 0] < best[rows]
        best[rows[better]] = dist[better, 0]
        index[rows[better]] = idx[better, 0] + lo
    return index


def _lloyd(faiss, fit: TwoLevel, x: np.ndarray, weights, probes: np.ndarray) -> TwoLevel:
    """One Lloyd iteration with inverted-file assignment; empty clusters keep their centroid."""
    k, dim = fit.centroids.shape
    sums = np.zeros((k, dim), dtype=np.float32)  # float32 (as faiss keeps them): it is the largest array here
    mass = np.zeros(k, dtype=np.float64)
    for part in _chunks(x):
        index = _assign_chunk(faiss, fit, x[part], probes[part])
        w = None if weights is None else weights[part].astype(np.float64)
        mass += np.bincount(index, weights=w, minlength=k)
        _add_rows(sums, index, x[part], w)
    filled = mass > 0  # the means, in place of the sums: no third (k, d) array (sums[filled] would copy)
    np.divide(sums, mass[:, None].astype(np.float32), out=sums, where=filled[:, None])
    sums[~filled] = fit.centroids[~filled]
    return fit._replace(centroids=sums)


def _add_rows(sums: np.ndarray, index: np.ndarray, rows: np.ndarray, weights: np.ndarray | None) -> None:
    """sums[index[i]] += weights[i] · rows[i] for every i, by sorting (np.add.at on rows is slow), a slice of
    `_ADD_VALUES` values at a time: where centroids have few points (SG) nearly every row starts a group of
    its own, and the float64 group sums are then twice the rows' size."""
    step = max(1, _ADD_VALUES // max(1, rows.shape[1]))
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        order = np.argsort(index[part], kind="stable")
        sorted_index = index[part][order]
        starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
        picked = rows[part][order]
        if weights is not None:
            picked = picked * weights[part][order, None]  # float64
        sums[sorted_index[starts]] += np.add.reduceat(picked, starts, axis=0, dtype=np.float64)


def _squared_distances(x: np.ndarray, centroids: np.ndarray, index: np.ndarray) -> np.ndarray:
    out = np.empty(len(x), dtype=np.float64)
    for part in _chunks(x):
        out[part] = ((x[part] - centroids[index[part]]) ** 2).sum(1)
    return out


def _chunks(x: np.ndarray) -> list[slice]:
    """Row slices of `x` of about _CHUNK_VALUES values each."""
    rows = max(1, _CHUNK_VALUES // max(1, x.shape[1]))
    return [slice(start, start + rows) for start in range(0, len(x), rows)]


def _probes(faiss, coarse: np.ndarray, x: np.ndarray, nprobe: int) -> np.ndarray:
    """The `nprobe` nearest cells (N, nprobe) int32 of every point, chunk by chunk."""
    out = np.empty((len(x), nprobe), dtype=np.int32)
    for part in _chunks(x):
        out[part] = _nearest(faiss, coarse, x[part], nprobe)
    return out


def _nearest(faiss, centroids: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(x), n)[1]


def _allocate(k: int, mass: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Centroids per cell: proportional to each cell's mass (largest remainders), at most its point count,
    at least one for every non-empty cell; sums to k."""
    if not mass.sum() > 0:
        mass = counts.astype(np.float64)
    share = np.minimum(counts, np.maximum(counts > 0, np.floor(k * mass / mass.sum()))).astype(np.int64)
    while share.sum() < k:
        room = counts - share
        want = np.where(room > 0, k * mass / mass.sum() - share, -np.inf)
        take = min(int(k - share.sum()), int((room > 0).sum()))
        share[np.argsort(-want, kind="stable")[:take]] += 1
    while share.sum() > k:
        share[np.argmax(share)] -= 1
    return share


class _Scaled:
    """A view of a progress bar (or of none) that advances it by `factor` of each step, and counts what it added:
    the pilot fits' share, or a fine fit's (its points over all)."""

    def __init__(self, bar: Any, factor: float) -> None:
        self.bar, self.factor, self.done = bar, factor, 0.0

    def update(self, n: float = 1) -> None:
        self.done += n * self.factor
        if self.bar is not None:
            self.bar.update(n * self.factor)
