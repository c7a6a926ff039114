"""Two-level k-means for large k (thousands of centroids and more), on faiss.

Exact k-means scores every point against every centroid at every iteration: O(points · k · d). For
mT5's shared k=32,768 or SG's 100,000 groups that is hours on a laptop-class CPU. Here cells split the work:

1. coarse: `c ≈ √k` cells by exact k-means on the training points;
2. fine: where centroids get many points each, exact k-means inside each cell with the cell's share of the k
   centroids (by mass × spread^p, p chosen by pilot fits on a tenth of the points); where they get few
   (`SAMPLE_MAX_POINTS`), k training points drawn at random (as exact k-means starts);
3. refinement: Lloyd iterations over all cells at once. Where cells are probed (wide rows), one wide search
   first keeps each point's `CANDIDATES` nearest centroids among its `WIDE_NPROBE` nearest cells (an
   inverted-file search done as one matmul per cell), and every later pass scores each point against its
   candidates only, so that points near a cell border can move to the centroid that is really nearest at a
   small cost per pass;
4. relocation: per-cell fits fix how many centroids each cell gets, and Lloyd iterations cannot move a
   centroid far, so centroids whose removal costs least move to split the clusters that gain most, up to a
   tenth of k per round, each round kept only where it lowered the error and followed by Lloyd iterations.
   It runs where points probe cells; where one flat search of all centroids is no slower (low-dimensional
   segments, measured per fit), refinement uses that and is exact Lloyd iteration.

Cost per iteration O(points · CANDIDATES · d) (or O(points · (c + nprobe · k/c) · d) for points
not trained on) instead of O(points · k · d). `training_codes` encodes the training points with their
candidates, `assign` other points with the fit's own search. What the approximation costs against exact k-means is
measured in `benchmarks/bench_large_k.py`; `pq.fit` uses this module where that benchmark showed it
pays (see `pq.TWO_LEVEL_MIN_WORK`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

#: cells scored per point in encoding points not trained on: the nearest few hold the true nearest centroid for almost
#: every point of high-dimensional data; low-dimensional data search all centroids instead (`_nprobe`).
NPROBE = 4
#: Where cells are probed, the training points' candidates: the `CANDIDATES` nearest centroids among the `WIDE_NPROBE`
#: nearest cells, found once after the fine fits. On Gemma 3's first 25,000 rows (SG: 10,000 centroids in 100 cells)
#: probing 8, 16 and 32 cells ended about +0.9%, +0.15% and -0.52% in error against exact k-means (scoring the 4
#: nearest cells at every pass, as before: +1.74%); 32 candidates in place of 16 changed nothing. 32 cells took SG of
#: 250,002 x 768 random rows from 312 to 515 s (no error change there), so 16.
WIDE_NPROBE = 16
CANDIDATES = 16
#: The flat search is exact, so it is kept unless probing was this many times faster on the sample (on 16-value
#: segments the two took 0.04 and 0.06 s: a plain comparison went either way from segment to segment).
FLAT_PREFERENCE = 2.0
#: Lloyd iterations over all cells after the per-cell fits; fewer where each searches all centroids (each is then
#: an iteration of exact k-means; on 8,192 centroids of 16 values 3 brought the error from 1.42% above exact k-means
#: to 0.49%, 8 to 0.40%, at 0.6 s each).
REFINE_ITERS = 8
REFINE_ITERS_FLAT = 4
#: How the fine centroids start where centroids get many points each: exact k-means inside each cell, the cell given
#: centroids by mass · spread^p, p = 1 or 2 (`_POWERS`), whichever the pilot fits measure to be better (the first
#: wins ties and is used where the data are too few for a pilot). p=2 took SG of Gemma 3's rows from 2.98% to 1.86%
#: above exact k-means; on isotropic data p changes nothing, and p=3 was worse on a shared codebook.
STARTS = ("spread", "spread2")
_POWERS = {"spread": 1.0, "spread2": 2.0}
#: Where the training points are at most this many per centroid, the fine centroids start instead as k training
#: points drawn at random ("sample", as exact k-means starts), each point then scored against the nearest of them
#: among its candidates, across cell borders: a cluster of a few points is a few near neighbours, which per-cell fits
#: miss where a cell border falls between them. On 25,000 of Gemma 3's normalised rows the sampled start was 2.4%,
#: 1.0% and 0.2% lower in error at 2.5, 5 and 10 points a centroid and 0.3% higher at 20 (isotropic random rows:
#: lower at 2.5-20; 80 columns of Gemma's rows at 24: 1.7% higher). SG (2.5 a centroid) of 250,002 random rows of
#: 768 values: 0.71% above exact k-means instead of 1.64%. Pilot fits (a tenth of the points into a tenth of k) did
#: not predict this choice: on Gemma's rows at 2.5 they preferred per-cell fits.
SAMPLE_MAX_POINTS = 10
PILOT_FRACTION = 0.1  # of the points and of k, in the pilot fits
PILOT_MIN_POINTS = 1_000
_PILOT_WORK = PILOT_FRACTION ** 1.5  # a pilot's work against the fit's: a tenth of the points, cells √10 smaller
#: Another candidate replaces the first only where it lowers the pilot's squared error by more than this:
#: where p made no difference at full size the pilots differed by 0.01-0.11%; on SG of Gemma's rows, 1.6-2.0%.
PILOT_MARGIN = 0.005
#: Relocation rounds after the refinement (`_relocate`; they stop at the first that does not pay), the share of k a
#: round may move, and the Lloyd iterations after each round's moves. On 10,000 of Gemma 3's normalised rows into
#: 4,000 (SG's regime: 2.5 points a centroid), with cells probed, two rounds took the error from 1.9% above exact
#: k-means to 0.2% below it (benchmarks/RESULTS.md); with candidates (cheap passes) on 25,000 rows, the third to sixth
#: rounds lowered the squared error by another 0.5%. On isotropic random rows no move pays.
RELOCATE_ROUNDS = 6
RELOCATE_SHARE = 0.1
RELOCATE_ITERS = 3
_CHUNK_VALUES = 1 << 23  # values of the points handled at once: bounds every temporary (32 MiB of float32; the
# inverted-file search sorts nprobe int64 per point, 4x that)
#: At least this many points per chunk of a search pass, which goes cell by cell: SG's 768-wide rows would make
#: chunks of _CHUNK_VALUES 10,922 points. More points per chunk did not make a pass faster with torch's matmuls,
#: and 2^18 took SG's peak memory from 2.50x to 2.71x the input.
_SEARCH_ROWS = 1 << 14
_ADD_VALUES = 1 << 19  # values summed into the centroids at once (their float64 group sums: 4 MiB; 16 MiB took
# SG's peak over 2.5x the input once the candidates were kept)
_TIMING_SAMPLE = 20_000  # points `_nprobe` times both searches on
_TIMING_WORK = 1e10  # multiply-adds of that flat search, at most: beyond, probing is taken untimed
_BLOCK_VALUES = 1 << 22  # scores of one cell's points against its centroids, or its points, at once (16 MiB)
_SLICE_ROWS = 4096  # centroids whose squared lengths are computed at once
_GATHER_VALUES = 1 << 20  # values of the candidates gathered for scoring at once (4 MiB, and as much for their squares)


class TwoLevel(NamedTuple):
    """Fine centroids (k, d) grouped by cell, the coarse centroids (c, d), where each cell's fine centroids
    start (c + 1,) in `centroids`, how they started (of `STARTS`, or "sample"), the
    cells each point not trained on is scored against (`nprobe`; 0: every centroid, one flat search), and
    where cells are probed, the centroids each training point is scored against (N, CANDIDATES) int32."""

    centroids: np.ndarray
    coarse: np.ndarray
    starts: np.ndarray
    start: str = STARTS[0]
    nprobe: int = NPROBE
    candidates: np.ndarray | None = None


def kmeans(faiss, kmeans_exact, x: np.ndarray, k: int, niter: int, seed: int, weights, bar) -> TwoLevel:
    """Two-level k-means of `x` (N, d) float32 into k centroids; `kmeans_exact(faiss, x, k, niter, seed,
    weights, bar)` is the exact k-means it runs at small k (it advances `bar` by one per iteration; the
    fine fits advance it by their share, so that the bar counts `units(niter)` for the whole fit)."""
    pilot_bar = _Scaled(bar, _PILOT_WORK)
    if len(x) <= SAMPLE_MAX_POINTS * k:
        start = "sample"
    else:
        start = choose_start(faiss, kmeans_exact, x, k, niter, seed, weights, pilot_bar)
    bar.update(_pilot_units(niter) - pilot_bar.done)  # the pilot's whole share, also where it was skipped
    return _kmeans(faiss, kmeans_exact, x, k, niter, seed, weights, bar, start)


def choose_start(faiss, kmeans_exact, x: np.ndarray, k: int, niter: int, seed: int, weights, bar=None) -> str:
    """The start (of `STARTS`) whose two-level fit of a random tenth of the points into a tenth of the k centroids
    leaves the smallest error (the first unless another is better by `PILOT_MARGIN`). How much a cell's spread should
    count depends on the data (on isotropic data every cell has the same spread), so it is measured on each fit: one
    pilot per start, each a tenth of the points and of k."""
    count, pilot_k = int(len(x) * PILOT_FRACTION), int(k * PILOT_FRACTION)
    if count < PILOT_MIN_POINTS or pilot_k < 4 or len(STARTS) == 1:
        return STARTS[0]
    rows = np.sort(np.random.default_rng(seed).choice(len(x), count, replace=False))
    sample = np.ascontiguousarray(x[rows])
    w = None if weights is None else weights[rows]
    errors = []
    for start in STARTS:
        fit = _kmeans(faiss, kmeans_exact, sample, pilot_k, niter, seed, w, bar or _Scaled(None, 0), start)
        squared = _squared_distances(sample, fit.centroids, training_codes(faiss, fit, sample))
        errors.append(float(squared @ w) if w is not None else float(squared.sum()))
    best = int(np.argmin(errors))
    return STARTS[best] if errors[best] < (1 - PILOT_MARGIN) * errors[0] else STARTS[0]


def _kmeans(faiss, kmeans_exact, x: np.ndarray, k: int, niter: int, seed: int, weights, bar, start: str) -> TwoLevel:
    """`kmeans` from the start `start` (of `STARTS`, or "sample")."""
    cells = int(min(max(2, round(k ** 0.5)), k // 2))
    coarse, _ = kmeans_exact(faiss, x, cells, niter, seed, weights, bar)
    if start == "sample":
        fit = _sampled(faiss, coarse, x, k, seed)
        bar.update(niter)  # the per-cell fits' share
    else:
        fit = _per_cell(faiss, kmeans_exact, coarse, x, k, niter, seed, weights, bar, _POWERS[start])
    fit = fit._replace(start=start, nprobe=_nprobe(faiss, fit, x, seed))
    if fit.nprobe:
        fit = fit._replace(candidates=_candidates(faiss, fit, x))
    bar.update()
    # exact Lloyd iterations after per-cell fits need few passes; from sampled points they are the whole fit
    passes = REFINE_ITERS if fit.nprobe or start == "sample" else REFINE_ITERS_FLAT
    for _ in range(passes):
        fit = _lloyd(faiss, fit, x, weights)
        bar.update()
    bar.update(REFINE_ITERS - passes)
    # Relocation moves centroids between cells, which probed Lloyd iterations cannot; where every pass searches all
    # centroids it gained 0.2% in error for 2.2x the time (8,192 centroids of 16 values), so it runs where cells probe.
    ran, moved = 0, True
    while moved and ran < (RELOCATE_ROUNDS if fit.nprobe else 0):
        fit, moved = _relocate(faiss, fit, x, weights, bar)  # here, so that the fit it replaced is freed
        for _ in range(RELOCATE_ITERS - 1 if moved else 0):
            fit = _lloyd(faiss, fit, x, weights)
            bar.update()
        ran += 1
    bar.update((RELOCATE_ROUNDS - ran) * (2 + RELOCATE_ITERS))  # the rounds not run
    return fit


def _per_cell(faiss, kmeans_exact, coarse: np.ndarray, x: np.ndarray, k: int, niter: int, seed: int, weights, bar,
              power: float) -> TwoLevel:
    """The fine centroids by exact k-means inside each cell of `coarse`, each cell given centroids by its mass ·
    spread^`power`; advances `bar` by `niter` in all."""
    num, dim = x.shape
    cells = len(coarse)
    cell = _cells(faiss, coarse, x)
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
    del order, bounds, cell  # every array of the size of x counts in the peak
    return TwoLevel(centroids, coarse, starts)


def _sampled(faiss, coarse: np.ndarray, x: np.ndarray, k: int, seed: int) -> TwoLevel:
    """k distinct points of `x` drawn at random as the fine centroids, grouped by their nearest cell of `coarse`."""
    chosen = np.sort(np.random.default_rng(seed).choice(len(x), k, replace=False))
    cell = _cells(faiss, coarse, x, chosen)
    order = np.argsort(cell, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=len(coarse)))])
    return TwoLevel(np.ascontiguousarray(x[chosen[order]]), coarse, starts)


def _relocate(faiss, fit: TwoLevel, x: np.ndarray, weights, bar) -> tuple[TwoLevel, bool]:
    """One relocation round: up to `RELOCATE_SHARE` of the centroids move from where removing them costs least
    (their points' distance to the second-nearest centroid less that to their own, summed) to the member farthest
    from the centroid of a cluster whose split gains more than that (the member's own distance at least), then
    one Lloyd iteration (the caller runs the other RELOCATE_ITERS - 1). Returns that fit where it has the lower error,
    else the fit it was given, as it was, and which: Lloyd iterations cannot move a centroid between cells, this can.
    It holds two centroid arrays at a time, as a Lloyd iteration does."""
    k = len(fit.centroids)
    index, best, second = _assign_all(faiss, fit, x)
    w = np.ones(len(x)) if weights is None else weights.astype(np.float64)
    before = float(best @ w)
    cost = np.bincount(index, weights=w * (second - best), minlength=k)
    # each cluster's farthest member: its gain, where the cluster has another member to keep the centroid
    farthest = np.full(k, -1.0)
    np.maximum.at(farthest, index, best * w)
    members = np.bincount(index, minlength=k)
    gain = np.where(members >= 2, farthest, 0.0)
    points = np.full(k, -1, dtype=np.int64)
    at_far = np.flatnonzero((best * w == farthest[index]) & (members[index] >= 2))
    points[index[at_far]] = at_far
    del best, second
    bar.update()
    count = int(RELOCATE_SHARE * k)
    cheap = np.argsort(cost, kind="stable")[:count]
    taken = np.zeros(k, dtype=bool)
    taken[cheap] = True
    rich = [j for j in np.argsort(-gain, kind="stable")[:2 * count] if not taken[j] and points[j] >= 0][:count]
    pairs = [(j, r) for j, r in zip(cheap, rich) if gain[r] > cost[j]]
    if not pairs:
        bar.update(RELOCATE_ITERS + 1)
        return fit, False
    if fit.candidates is not None:
        # a moved centroid becomes a candidate of the points of the cluster it splits, in place of the last (the
        # farthest when the candidates were found; the one before it where the last is the point's own)
        target = np.full(k, -1, dtype=np.int64)
        target[[r for _, r in pairs]] = [j for j, _ in pairs]
        joining = np.flatnonzero(target[index] >= 0)
        slot = np.where(fit.candidates[joining, -1] == index[joining], fit.candidates.shape[1] - 2, -1)
        replaced = fit.candidates[joining, slot]
        fit.candidates[joining, slot] = target[index[joining]]
    del index
    # the centroids change in place (restored where the round does not pay): a copy of SG's 100,001 x 768 would
    # take the peak over 2.5x the input
    centroids, leaving = fit.centroids, np.array([j for j, _ in pairs])
    old = centroids[leaving]
    cell_of = np.repeat(np.arange(len(fit.coarse)), np.diff(fit.starts))
    for j, r in pairs:
        centroids[j], cell_of[j] = x[points[r]], cell_of[r]
    order = np.argsort(cell_of, kind="stable")  # keep centroids grouped by cell
    centroids[:] = centroids[order]
    _renumber(fit.candidates, np.argsort(order))
    starts = np.concatenate([[0], np.cumsum(np.bincount(cell_of, minlength=len(fit.coarse)))])
    moved = _lloyd(faiss, fit._replace(starts=starts), x, weights)  # the moved centroids, updated once
    after = _error(faiss, moved, x, weights)
    bar.update(2)
    if after >= before:
        del moved
        centroids[order] = centroids.copy()
        centroids[leaving] = old
        _renumber(fit.candidates, order)
        if fit.candidates is not None:
            fit.candidates[joining, slot] = replaced
        bar.update(RELOCATE_ITERS - 1)
        return fit, False
    return moved, True


def _renumber(candidates: np.ndarray | None, new: np.ndarray) -> None:
    """Candidates (where there are any) of centroids that moved from place i to `new[i]`, in place, a chunk at a
    time (a renumbered copy of all would count in the peak)."""
    if candidates is None:
        return
    new = new.astype(candidates.dtype)
    for part in _chunks(candidates):
        candidates[part] = new[candidates[part]]


def _error(faiss, fit: TwoLevel, x: np.ndarray, weights) -> float:
    """The (weighted) squared error of assigning `x` to the fit's centroids."""
    error = 0.0
    for part in _chunks(x, _SEARCH_ROWS):
        best = _search_training(faiss, fit, x, part, False)[1].astype(np.float64)
        error += float(best @ weights[part]) if weights is not None else float(best.sum())
    return error


def units(niter: int) -> float:
    """Progress-bar steps of one two-level fit: the pilot fits, the coarse and the fine iterations, the
    candidates' search, then the refinement and the relocation rounds."""
    return _pilot_units(niter) + _fit_units(niter)


def _fit_units(niter: int) -> float:
    return 2 * niter + 1 + REFINE_ITERS + RELOCATE_ROUNDS * (2 + RELOCATE_ITERS)  # 1: the candidates' search


def _pilot_units(niter: int) -> float:
    return _fit_units(niter) * _PILOT_WORK * len(STARTS) if len(STARTS) > 1 else 0.0


def assign(faiss, fit: TwoLevel, x: np.ndarray, nprobe: int | None = None) -> np.ndarray:
    """Index (N,) int64 of the nearest fine centroid of every point of `x`, among the centroids of its
    `nprobe` nearest cells (the fit's own by default; 0: of all centroids)."""
    out = np.empty(len(x), dtype=np.int64)
    for part in _chunks(x, _SEARCH_ROWS):
        out[part] = _search(faiss, fit, x[part], False, nprobe)[0]
    return out


def training_codes(faiss, fit: TwoLevel, x: np.ndarray) -> np.ndarray:
    """Index (N,) int64 of the nearest fine centroid of every point of `x`, the points the fit was trained on:
    among each point's candidates where the fit kept them, else as `assign`."""
    out = np.empty(len(x), dtype=np.int64)
    for part in _chunks(x, _SEARCH_ROWS):
        out[part] = _search_training(faiss, fit, x, part, False)[0]
    return out


def _search_training(faiss, fit: TwoLevel, x: np.ndarray, part: slice, second: bool):
    """`_search` of the training points `x[part]`: among their candidates where the fit kept them."""
    if fit.candidates is None:
        return _search(faiss, fit, x[part], second)
    return _search_candidates(fit.centroids, x[part], fit.candidates[part], second)


def _search_candidates(centroids: np.ndarray, x: np.ndarray, candidates: np.ndarray, second: bool):
    """`_search_chunk`'s results, among each point's candidates (N, C): the centroids are gathered and scored a
    block of `_GATHER_VALUES` of their values at a time."""
    count = candidates.shape[1]
    index = np.empty(len(x), dtype=np.int64)
    best = np.empty(len(x), dtype=np.float32)
    runner_up = np.empty(len(x), dtype=np.float32) if second else None
    books = torch.from_numpy(centroids)
    step = max(1, _GATHER_VALUES // (count * x.shape[1]))
    for start in range(0, len(x), step):
        rows = slice(start, start + step)
        points = torch.from_numpy(x[rows])
        picked = torch.from_numpy(candidates[rows]).long()
        gathered = books[picked]  # (n, C, d)
        scores = torch.bmm(gathered, points[:, :, None])[:, :, 0].mul_(-2).add_(gathered.square().sum(2))
        if second and count > 1:  # a candidate repeated (where the cells held too few) is not a second centroid
            ranked, place = picked.sort(1)
            repeat = torch.zeros_like(ranked, dtype=torch.bool)
            repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
            scores.masked_fill_(torch.zeros_like(repeat).scatter_(1, place, repeat), np.inf)
        dist, at = scores.topk(2 if second and count > 1 else 1, dim=1, largest=False)
        dist = (dist + points.square().sum(1, keepdim=True)).clamp_min_(0).numpy()
        index[rows] = picked.gather(1, at[:, :1])[:, 0].numpy()
        best[rows] = dist[:, 0]
        if second:
            runner_up[rows] = dist[:, 1] if dist.shape[1] > 1 else np.inf
    return index, best, runner_up


def _candidates(faiss, fit: TwoLevel, x: np.ndarray) -> np.ndarray:
    """The `CANDIDATES` nearest fine centroids (N, CANDIDATES) int32 of every point of `x` among those of its
    `WIDE_NPROBE` nearest cells (fewer where the cells hold fewer: the nearest repeats), nearest first."""
    count = min(CANDIDATES, len(fit.centroids))
    out = np.empty((len(x), count), dtype=np.int32)
    lengths = _squared_lengths(fit.centroids)
    for part in _chunks(x, _SEARCH_ROWS):
        points = x[part]
        probes = _nearest(faiss, fit.coarse, points, min(WIDE_NPROBE, len(fit.coarse)))
        near = torch.full((len(points), count), np.inf)  # the running nearest scores, ||c||² - 2 x·c
        index = torch.zeros((len(points), count), dtype=torch.int64)
        for members, lo, _, scores in _cell_scores(fit, points, probes, lengths):
            rows = torch.from_numpy(members)
            dist, idx = scores.topk(min(count, scores.shape[1]), dim=1, largest=False)
            merged, at = torch.cat([near[rows], dist], 1).topk(count, dim=1, largest=False)
            near[rows] = merged
            index[rows] = torch.cat([index[rows], idx + lo], 1).gather(1, at)
        # where the probed cells held fewer than `count` centroids, the nearest fills the empty places
        empty = torch.isinf(near)
        index = torch.where(empty, index[:, :1], index)
        out[part] = index.numpy()
    return out


def _search(faiss, fit: TwoLevel, x: np.ndarray, second: bool, nprobe: int | None = None):
    """`_search_chunk` among the centroids of each point's `nprobe` nearest cells (the fit's own by default), or
    with nprobe 0 among all centroids (one flat search)."""
    nprobe = fit.nprobe if nprobe is None else nprobe
    if nprobe == 0:
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(fit.centroids)
        dist, idx = index.search(np.ascontiguousarray(x), 2 if second and len(fit.centroids) > 1 else 1)
        dist = np.maximum(dist, 0)
        runner_up = (dist[:, 1] if dist.shape[1] > 1 else np.full(len(x), np.inf, dtype=np.float32)) if second else None
        return idx[:, 0], dist[:, 0], runner_up
    probes = _nearest(faiss, fit.coarse, x, min(nprobe, len(fit.coarse)))
    return _search_chunk(faiss, fit, x, probes, second)


def _nprobe(faiss, fit: TwoLevel, x: np.ndarray, seed: int) -> int:
    """NPROBE, or 0 (one flat search of all centroids) unless that search of a sample of the points took more than
    FLAT_PREFERENCE times as long as probing NPROBE cells. Low-dimensional points need many cells probed (16
    values into 8,192 centroids: the nearest centroid lay among the 4 nearest of 90 cells for 94% of the points,
    the nearest 16 for 99.8%), and there the flat search, with no per-cell scores in memory, is the faster (0.5 s
    against 2.4 s a pass over 250,112 points); where rows are wide (SG's 768) probing is far cheaper, and more
    probed cells did not lower the error."""
    (num, dim), k = x.shape, len(fit.centroids)
    # enough points that fixed costs do not decide (faiss searched 4,550 points in 0.14 s, 20,000 in 0.04 s, and
    # probing pays a cost per cell that only many points amortise): where a flat search of that many would cost more
    # than _TIMING_WORK, it is far slower than probing over all the points (SG of Gemma 3's rows: 2,000 points timed
    # chose it, at about 19 minutes a pass)
    size = min(num, _TIMING_SAMPLE)
    if size * k * dim > _TIMING_WORK:
        return NPROBE
    sample = np.ascontiguousarray(x[np.sort(np.random.default_rng(seed).choice(num, size, replace=False))])
    flat = _seconds(lambda: _search(faiss, fit, sample, False, 0))
    return 0 if flat <= FLAT_PREFERENCE * _seconds(lambda: _search(faiss, fit, sample, False, NPROBE)) else NPROBE


def _seconds(work: Callable[[], Any]) -> float:
    """Wall-clock seconds `work()` took."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _search_chunk(faiss, fit: TwoLevel, x: np.ndarray, probes: np.ndarray, second: bool):
    """Nearest fine centroid (N,) int64 of each point of `x` among those of its cells `probes` (N, nprobe), its
    squared distance (N,) float32 and, with `second`, the squared distance to the second nearest (inf where the
    cells hold one centroid; else None): per cell, one matmul of the points that probe it with its centroids (torch's:
    3.5x faster than a faiss flat index per cell on SG's 768-wide rows), a block of `_BLOCK_VALUES` scores at a time."""
    best = np.full(len(x), np.inf, dtype=np.float32)
    runner_up = np.full(len(x), np.inf, dtype=np.float32) if second else None
    index = np.zeros(len(x), dtype=np.int64)
    for rows, lo, points, scores in _cell_scores(fit, x, probes, _squared_lengths(fit.centroids)):
        if second and scores.shape[1] > 1:
            dist, idx = scores.topk(2, dim=1, largest=False)
        else:
            dist, idx = scores.min(1, keepdim=True)
        # ||x||² + the above; the expansion can dip below zero
        dist = (dist + points.square().sum(1, keepdim=True)).clamp_min_(0).numpy()
        idx = idx.numpy()
        if second:  # the second smallest of (best, runner-up) and this cell's (first, second)
            own = dist[:, 1] if dist.shape[1] > 1 else np.inf
            runner_up[rows] = np.minimum(np.minimum(np.maximum(best[rows], dist[:, 0]), runner_up[rows]), own)
        better = dist[:, 0] < best[rows]
        best[rows[better]] = dist[better, 0]
        index[rows[better]] = idx[better, 0] + lo
    return index, best, runner_up


def _squared_lengths(centroids: np.ndarray) -> torch.Tensor:
    """||c||² (k,) of every centroid, in slices: squaring them all at once would hold a second (k, d) array
    (SG: 0.4x the input)."""
    return torch.cat([part.square().sum(1) for part in torch.from_numpy(centroids).split(_SLICE_ROWS)])


def _cell_scores(fit: TwoLevel, x: np.ndarray, probes: np.ndarray, lengths: torch.Tensor):
    """For each cell and each block of the points of `x` that probe it (`probes` (N, nprobe)): (the points' rows
    (n,) int64, the cell's first centroid, the points (n, d) as a tensor, their scores (n, cell size)
    ||c||² - 2 x·c against the cell's centroids). One matmul per block, of at most `_BLOCK_VALUES` scores and
    point values; `lengths` are the centroids' ||c||²."""
    cells = len(fit.coarse)
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(cells + 1))
    books = torch.from_numpy(fit.centroids)
    for j in range(cells):
        lo, hi = int(fit.starts[j]), int(fit.starts[j + 1])
        if lo == hi or bounds[j] == bounds[j + 1]:
            continue
        members = order[bounds[j]:bounds[j + 1]] // probes.shape[1]
        step = max(1, _BLOCK_VALUES // max(hi - lo, x.shape[1]))  # scores and the points' copy both bounded
        for start in range(0, len(members), step):
            rows = members[start:start + step]
            points = torch.from_numpy(x[rows])  # a copy
            yield rows, lo, points, torch.addmm(lengths[lo:hi], points, books[lo:hi].T, alpha=-2)


def _assign_all(faiss, fit: TwoLevel, x: np.ndarray):
    """`_search` with the second distance over all of `x`, chunk by chunk: index, best, second."""
    index = np.empty(len(x), dtype=np.int64)
    best, second = np.empty(len(x), dtype=np.float64), np.empty(len(x), dtype=np.float64)
    for part in _chunks(x, _SEARCH_ROWS):
        index[part], best[part], second[part] = _search_training(faiss, fit, x, part, True)
    return index, best, second


def _lloyd(faiss, fit: TwoLevel, x: np.ndarray, weights) -> TwoLevel:
    """One Lloyd iteration with the fit's search; empty clusters keep their centroid."""
    k, dim = fit.centroids.shape
    sums = np.zeros((k, dim), dtype=np.float32)  # float32 (as faiss keeps them): it is the largest array here
    mass = np.zeros(k, dtype=np.float64)
    for part in _chunks(x, _SEARCH_ROWS):
        index = _search_training(faiss, fit, x, part, False)[0]
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


def _chunks(x: np.ndarray, least: int = 1) -> list[slice]:
    """Row slices of `x` of about _CHUNK_VALUES values each, or `least` rows where that is more."""
    rows = max(least, _CHUNK_VALUES // max(1, x.shape[1]))
    return [slice(start, start + rows) for start in range(0, len(x), rows)]


def _cells(faiss, coarse: np.ndarray, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The nearest cell (int32) of every point, or of the points `rows` only, chunk by chunk."""
    count = len(x) if rows is None else len(rows)
    out = np.empty(count, dtype=np.int32)
    for part in _chunks(x[:count]):
        points = x[part] if rows is None else x[rows[part]]
        out[part] = _nearest(faiss, coarse, points, 1)[:, 0]
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
