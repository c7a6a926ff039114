"""Product quantization of a (V, D) matrix into m segments of k concept vectors each.

Numbers only: this module knows nothing of models. Shapes, for a matrix of V rows and D columns
split into m segments of D/m values:

- separate codebooks: `codebooks` is (m, k, D/m), one codebook per segment (paper section 2.1);
- shared codebook: `codebooks` is (k, D/m), one codebook for all segments (paper section 3.3);
- `codes` is (V, m) in the smallest integer type that holds k (see `code_dtype`): row v, column i
  is the index of the concept vector that segment i of row v uses.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import kernels, lowdim, twolevel

#: faiss's default cap on training points per centroid; larger inputs are subsampled for training
#: (every point is still assigned to its nearest centroid afterwards).
MAX_POINTS_PER_CENTROID = 256
_ASSIGN_BLOCK = 1 << 25  # distance-matrix elements computed at once by the torch backend (GPU)
_CPU_TILE = 512  # points scored at once per segment on CPU: the (tile, k) scores stay in cache
_warned_no_faiss = False
#: What `kmeans="auto"` runs: exact k-means, or two-level k-means (`asg.twolevel`) where exact would do at
#: least this much work (training points · k · D/m · niter multiply-adds) and k >= TWO_LEVEL_MIN_K. Measured
#: on 2 cores (benchmarks/bench_large_k.py): below it exact k-means takes seconds and two-level saves little;
#: above it two-level was 2.2x faster on a k=8,192 segment, 4.4x at shared k=32,768 (on 50,000 rows) and 6.9x
#: at 40% SG (on 10,000 rows; hours against minutes at full size), at +1.2%, +0.6% and +3% error.
TWO_LEVEL_MIN_WORK = 5e11
TWO_LEVEL_MIN_K = 1024


class PQFit(NamedTuple):
    """The result of `fit`: codebooks (m, k, D/m) or (k, D/m) float32, and codes (V, m)."""

    codebooks: np.ndarray
    codes: np.ndarray


def code_dtype(k: int) -> np.dtype:
    """The smallest integer dtype that holds the indices 0..k-1 (uint8 for k <= 256)."""
    if k <= 1 << 8:
        return np.dtype(np.uint8)
    if k <= 1 << 15:
        return np.dtype(np.int16)
    if k <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def fit(
    matrix,
    k: int,
    m: int,
    codebook: str = "separate",
    niter: int = 25,
    seed: int = 0,
    backend: str = "faiss",
    progress: bool = False,
    desc: str = "k-means",
    weights=None,
    kmeans: str = "auto",
) -> PQFit:
    """Fit product-quantization codebooks to `matrix` (V, D) by per-segment k-means and encode every row.

    `backend="faiss"` runs faiss k-means segment by segment; `"torch"` runs all segments at once as a
    batched k-means on the matrix's device (a GPU where the tensor lives there). Same seed and input give
    the same codes. Inputs larger than 256·k points are subsampled (seeded) for training only.
    `weights` (V,), non-negative, makes each row count as much as its weight (weighted k-means).
    `kmeans` ("auto", "exact" or "two-level") picks how each codebook is found on the faiss backend: "auto"
    runs two-level k-means (`asg.twolevel`) where exact k-means would be slow (see `TWO_LEVEL_MIN_WORK`);
    the torch backend is always exact. Exact k-means of segments of one or two values runs in `asg.lowdim`
    (3-100x faster than faiss there, and to a lower error), of wider ones in faiss.
    """
    if codebook not in ("separate", "shared"):
        raise ValueError(f"unknown codebook {codebook!r}: use 'separate' or 'shared'")
    if backend not in ("faiss", "torch"):
        raise ValueError(f"unknown backend {backend!r}: use 'faiss' or 'torch'")
    num_rows, dim = matrix.shape
    if dim % m:
        raise ValueError(f"m={m} does not divide D={dim}; choose m among the divisors of {dim}")
    points = num_rows * m if codebook == "shared" else num_rows
    if not 2 <= k <= points:
        raise ValueError(f"k={k} must be between 2 and the number of points to cluster ({points})")
    if kmeans not in ("auto", "exact", "two-level"):
        raise ValueError(f"unknown kmeans {kmeans!r}: use 'auto', 'exact' or 'two-level'")
    weights = check_weights(weights, num_rows)
    _check_finite(matrix)
    if backend == "faiss" and not _have_faiss():
        _warn_no_faiss()
        backend = "torch"
    if backend == "torch" and kmeans == "two-level":
        raise ValueError("two-level k-means runs on the faiss backend: use backend='faiss' (pip install faiss-cpu), "
                         "or kmeans='exact' with backend='torch'")
    if backend == "faiss":
        x = _as_numpy32(matrix)
        return _fit_faiss(x, k, m, codebook, niter, seed, progress, desc, weights, kmeans)
    x = _as_torch32(matrix)
    return _fit_torch(x, k, m, codebook, niter, seed, progress, desc, weights)


def check_weights(weights, num_rows: int) -> np.ndarray | None:
    """`weights` as float32 (V,), or None; ValueError unless there is one finite, non-negative weight per row
    and at least one is positive."""
    if weights is None:
        return None
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    if w.shape != (num_rows,):
        raise ValueError(f"weights must hold one number per row: expected shape ({num_rows},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative (a token's count or frequency)")
    if w.sum() <= 0:
        raise ValueError("weights are all zero: at least one row must count")
    return (w / w.max()).astype(np.float32)


def decode(codebooks, codes):
    """Rebuild the (V, D) matrix from codebooks and codes; numpy in, numpy out, torch in, torch out."""
    if isinstance(codebooks, torch.Tensor):
        idx = torch.as_tensor(codes, device=codebooks.device).long()
        if codebooks.dim() == 3:
            idx = idx + torch.arange(codebooks.shape[0], device=codebooks.device) * codebooks.shape[1]
            segments = codebooks.reshape(-1, codebooks.shape[-1])[idx]
        else:
            segments = codebooks[idx]
        return segments.reshape(idx.shape[0], -1)
    codebooks = np.asarray(codebooks)
    idx = np.asarray(codes).astype(np.int64)
    if codebooks.ndim == 3:
        segments = codebooks[np.arange(codebooks.shape[0])[None, :], idx]
    else:
        segments = codebooks[idx]
    return segments.reshape(idx.shape[0], -1)


def encode(codebooks, matrix) -> np.ndarray:
    """Codes (V, m) of each row of `matrix` (V, D): the nearest concept vector of every segment."""
    cb = _as_torch32(codebooks)
    codes = _encode(_as_torch32(matrix).to(cb.device), cb)
    return codes.cpu().numpy().astype(code_dtype(cb.shape[-2]))


def relative_error(matrix, reconstruction, block: int = 8192) -> float:
    """Relative Frobenius error ||E - Ê|| / ||E|| between a matrix and its reconstruction (`reconstruction`
    may also be a function of a row slice, so that no second full matrix is ever built)."""
    a = _as_torch32(matrix)
    error = norm = 0.0
    for start in range(0, a.shape[0], block):
        rows = slice(start, start + block)
        part = reconstruction(rows) if callable(reconstruction) else reconstruction[rows]
        x = a[rows].double()
        error += float((x - _as_torch32(part).double().to(x.device)).square().sum())
        norm += float(x.square().sum())
    return (error / max(norm, 1e-300)) ** 0.5


# --- faiss backend -----------------------------------------------------------------------------


def two_level(points: int, k: int, dim: int, niter: int, kmeans: str = "auto") -> bool:
    """Whether `kmeans` ("auto", "exact" or "two-level") runs two-level k-means for `points` of `dim` values."""
    if kmeans != "auto":
        return kmeans == "two-level"
    work = min(points, MAX_POINTS_PER_CENTROID * k) * k * dim * niter
    return k >= TWO_LEVEL_MIN_K and work >= TWO_LEVEL_MIN_WORK


def _fit_faiss(x: np.ndarray, k, m, codebook, niter, seed, progress, desc, weights, kmeans) -> PQFit:
    import faiss

    num_rows, dim = x.shape
    sub = dim // m
    points = num_rows * m if codebook == "shared" else num_rows
    fast = two_level(points, k, sub, niter, kmeans)
    small = not fast and lowdim.applies(sub)
    label = "faiss, two-level" if fast else ("low-dimensional" if small else "faiss")
    per_fit = twolevel.units(niter) if fast else niter
    if codebook == "shared":
        pooled = x.reshape(num_rows * m, sub)
        with _Progress(per_fit + 1, desc=f"{desc} (shared, {label})", disable=not progress) as bar:
            sample = _training_sample(len(pooled), k, seed)
            train = pooled if len(sample) == len(pooled) else pooled[sample]
            train_weights = None if weights is None else np.repeat(weights, m)[sample]
            del sample  # 8 bytes a training point: not held through the fit
            assign = _fit_codebook(faiss, train, k, niter, seed, train_weights, bar, fast, small)
            del train, train_weights
            bar.set_postfix_str(f"assigning {len(pooled):,} segments")
            idx = assign(pooled)
            bar.update()
        return PQFit(assign.centroids, idx.reshape(num_rows, m).astype(code_dtype(k)))

    codebooks = np.empty((m if m > 1 else 0, k, sub), dtype=np.float32)
    codes = np.empty((num_rows, m), dtype=code_dtype(k))
    with _Progress(m * per_fit, desc=f"{desc} ({label})", disable=not progress) as bar:
        for i in range(m):
            bar.set_postfix_str(f"segment {i + 1}/{m}")
            segment = np.ascontiguousarray(x[:, i * sub : (i + 1) * sub])
            # faiss subsamples for exact k-means itself (so that codes stay what they were); the others get the sample
            own_sample = (fast or small) and num_rows > MAX_POINTS_PER_CENTROID * k
            sample = _training_sample(num_rows, k, seed + i) if own_sample else slice(None)
            assign = _fit_codebook(faiss, segment[sample] if own_sample else segment, k, niter, seed + i,
                                   None if weights is None else weights[sample], bar, fast, small)
            codes[:, i] = assign(segment)
            if m == 1:  # one segment (SG's groups): its centroids are the codebook, not copied into a second one
                codebooks = np.ascontiguousarray(assign.centroids, dtype=np.float32)[None]
            else:
                codebooks[i] = assign.centroids
    return PQFit(codebooks, codes)


class _Progress(tqdm):
    """A fit's progress bar in iterations. Two-level fits advance it by fractional shares of one: then it shows
    the percentage and the time left instead of fractional counts, and rounding never takes it past its total
    (which would show a negative time left)."""

    def __init__(self, total: float, **options) -> None:
        if not float(total).is_integer():
            options["bar_format"] = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
        super().__init__(total=total, unit="iter", **options)

    def update(self, n: float = 1) -> bool | None:
        return super().update(max(0.0, min(n, self.total - self.n)))


class _Assign(NamedTuple):
    """Fitted centroids (k, d) and how points are encoded with them (exact, two-level or low-dimensional)."""

    centroids: np.ndarray
    encode: Callable[[np.ndarray], np.ndarray]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return self.encode(points)


def _fit_codebook(faiss, x: np.ndarray, k: int, niter: int, seed: int, weights, bar, fast: bool,
                  small: bool = False) -> _Assign:
    """k-means of `x` into k centroids, as the `_Assign` that holds them and encodes points with them: two-level
    (`fast`), low-dimensional (`small`, `asg.lowdim`) or faiss's exact k-means."""
    if fast:
        fit = twolevel.kmeans(faiss, _faiss_kmeans, x, k, niter, seed, weights, bar)
        # the training points are scored against the candidates the fit kept for them, others by the fit's search
        return _Assign(fit.centroids, lambda points: twolevel.training_codes(faiss, fit, points) if points is x
                       else twolevel.assign(faiss, fit, points))
    if small:
        centroids, codes = lowdim.kmeans(x, k, niter, seed, weights, bar)
        # the training points' codes come with the fit: encoding them again would repeat its last pass
        return _Assign(centroids, lambda points: codes if points is x else lowdim.assign(points, centroids))
    centroids, index = _faiss_kmeans(faiss, x, k, niter, seed, weights, bar)
    return _Assign(centroids, lambda points: index.search(points, 1)[1][:, 0])


def _faiss_kmeans(faiss, x: np.ndarray, k: int, niter: int, seed: int, weights, bar) -> tuple[np.ndarray, Any]:
    """faiss k-means of `x`, one iteration per call of faiss (bit-identical to one call of `niter` iterations), so
    that `bar` advances by iteration and estimates the time left; returns the centroids and the flat index that
    holds them."""
    clustering = faiss.Clustering(x.shape[1], k)
    clustering.niter, clustering.seed, clustering.verbose = 1, seed, False
    # min_points_per_centroid=1: tiny vocabularies are legal, and faiss's warning about them is noise.
    clustering.min_points_per_centroid, clustering.max_points_per_centroid = 1, MAX_POINTS_PER_CENTROID
    index = faiss.IndexFlatL2(x.shape[1])
    for _ in range(niter):  # each call starts from the centroids the last one left
        clustering.train(x, index, weights)
        bar.update()
    return faiss.vector_to_array(clustering.centroids).reshape(k, x.shape[1]), index


# --- torch backend -----------------------------------------------------------------------------


def _fit_torch(x: torch.Tensor, k, m, codebook, niter, seed, progress, desc, weights) -> PQFit:
    num_rows, dim = x.shape
    sub = dim // m
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if codebook == "shared":
        points = x.reshape(1, num_rows * m, sub)
    else:
        points = x.reshape(num_rows, m, sub).transpose(0, 1).contiguous()  # (m, V, D/m): one copy of the input
    sample = _training_sample(points.shape[1], k, seed)
    subsampled = len(sample) < points.shape[1]
    train = points[:, torch.as_tensor(sample, device=x.device)] if subsampled else points
    point_weights = None
    if weights is not None:
        point_weights = torch.from_numpy(np.repeat(weights, m) if codebook == "shared" else weights).to(x.device)
        point_weights = point_weights[torch.as_tensor(sample, device=x.device)] if subsampled else point_weights
    centroids = _kmeans(train, k, niter, gen, progress, f"{desc} ({'shared, ' if codebook == 'shared' else ''}torch)",
                        point_weights)
    codes = _assign(points, centroids)  # (m, V), or (1, V·m) for the pooled segments
    codes = codes.reshape(num_rows, m) if codebook == "shared" else codes.T
    codebooks = centroids[0] if codebook == "shared" else centroids
    return PQFit(codebooks.cpu().numpy(), codes.cpu().numpy().astype(code_dtype(k)))


def _encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codes (V, m) long of x (V, D) against codebooks (m, k, D/m) or shared (k, D/m)."""
    num_rows, sub = x.shape[0], codebooks.shape[-1]
    m = x.shape[1] // sub
    if codebooks.dim() == 3:
        return _assign(x.reshape(num_rows, m, sub).transpose(0, 1), codebooks).T
    return _assign(x.reshape(1, num_rows * m, sub), codebooks[None]).reshape(num_rows, m)


def _kmeans(x: torch.Tensor, k: int, niter: int, gen: torch.Generator, progress: bool, desc: str,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batched Lloyd k-means: x (S, N, d) -> centroids (S, k, d), one clustering per leading index;
    `weights` (N,) weighs every point (the same in each of the S clusterings)."""
    batch, num, dim = x.shape
    init = torch.randperm(num, generator=gen, device=x.device)[:k]  # the same k distinct points in every segment
    centroids = x[:, init].clone()
    if weights is None:
        mass = torch.ones(1, 1, device=x.device, dtype=x.dtype).expand(batch, num)
        weighted = x
    else:
        mass = weights.to(x.dtype)[None, :].expand(batch, num)
        weighted = x * mass[..., None]
    for _ in tqdm(range(niter), desc=desc, unit="iter", disable=not progress):
        assign = _assign(x, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), weighted)
        counts = torch.zeros(batch, k, device=x.device, dtype=x.dtype).scatter_add_(1, assign, mass)
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centroids)
        _split_empty_clusters(centroids, counts, gen)
    return centroids


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every point: x (S, N, d), centroids (S, k, d) -> (S, N) long."""
    batch, num, _ = x.shape
    k = centroids.shape[1]
    norms = (centroids * centroids).sum(-1)
    out = torch.empty(batch, num, dtype=torch.long, device=x.device)
    if x.device.type == "cpu" and kernels.available():
        # Segment by segment, in tiles that stay in cache: a matmul scores, a SIMD kernel picks the minimum.
        x = x.contiguous()
        scores = torch.empty(_CPU_TILE, k)
        for s in range(batch):
            transposed = centroids[s].T.contiguous()
            for start in range(0, num, _CPU_TILE):
                tile = scores[: min(_CPU_TILE, num - start)]
                torch.addmm(norms[s], x[s, start:start + _CPU_TILE], transposed, alpha=-2.0, out=tile)
                kernels.argmin_rows(tile, out[s, start:start + _CPU_TILE])
        return out
    block = max(1, _ASSIGN_BLOCK // (batch * k))
    for start in range(0, num, block):
        dist = torch.baddbmm(norms[:, None, :], x[:, start : start + block], centroids.transpose(1, 2), alpha=-2.0)
        out[:, start : start + block] = dist.min(-1).indices
    return out


def _split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> None:
    """Refill empty clusters by splitting large ones, as faiss does (embedding segments have many near-duplicates)."""
    for s in torch.nonzero((counts == 0).any(1)).flatten().tolist():
        for ci in torch.nonzero(counts[s] == 0).flatten().tolist():
            weights = (counts[s] - 1).clamp_min(0)
            if weights.sum() <= 0:
                return
            cj = int(torch.multinomial(weights, 1, generator=gen))
            sign = torch.ones_like(centroids[s, cj])
            sign[1::2] = -1
            centroids[s, ci] = centroids[s, cj] * (1 + lowdim.SPLIT_EPS * sign)
            centroids[s, cj] = centroids[s, cj] * (1 - lowdim.SPLIT_EPS * sign)
            counts[s, ci] = torch.floor(counts[s, cj] / 2)
            counts[s, cj] -= counts[s, ci]


# --- helpers -------------------------------------------------------------------------------------


def _training_sample(num_points: int, k: int, seed: int) -> np.ndarray:
    """Indices of the points k-means trains on: all of them, or a seeded sample of 256·k."""
    cap = MAX_POINTS_PER_CENTROID * k
    if num_points <= cap:
        return np.arange(num_points)
    return np.sort(np.random.default_rng(seed).choice(num_points, size=cap, replace=False))


def _check_finite(matrix) -> None:
    """ValueError unless every value of the matrix is a finite number (k-means of NaN or inf is meaningless)."""
    check = (lambda rows: bool(torch.isfinite(rows).all())) if isinstance(matrix, torch.Tensor) \
        else (lambda rows: bool(np.isfinite(rows).all()))
    if not all(check(matrix[start:start + 8192]) for start in range(0, len(matrix), 8192)):  # no full-size mask
        raise ValueError("the matrix to quantize holds NaN or infinite values: the model's weights are damaged or "
                         "were loaded in a dtype that overflowed; load it in float32 and check the file")


def _as_numpy32(matrix) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _as_torch32(matrix) -> torch.Tensor:
    if isinstance(matrix, torch.Tensor):
        return matrix.detach().to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _warn_no_faiss() -> None:
    global _warned_no_faiss
    if not _warned_no_faiss:
        warnings.warn("faiss is not installed: using the torch k-means backend instead (pip install faiss-cpu)", stacklevel=3)
        _warned_no_faiss = True
