"""Fine segments (issue 15, item 5): k-means of segments of 1-2 values (asg.lowdim) against faiss, and a whole
table at m = D/2 against m = D/16.

Two tables:

1. per segment: for d = 1, 2, 4 and 16 values, `pq.fit` of `--segments` segments of the table against faiss's
   exact k-means of the same segments (what `pq.fit` ran before), seconds and reconstruction error;
2. the whole table (all rows, all columns) fitted by `pq.fit` at m = D/16, D/8 and D/2: seconds and error.

The table is read from `--table` (an .npy file, as in bench_large_k.py, whose docstring says how to write
Gemma 3 270M's), or random normal values when none is given:

    python benchmarks/bench_fine_segments.py --table gemma.npy
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine


class _Bar:
    def update(self, n=1):
        pass


def load(path: str | None, rows: int, columns: int) -> np.ndarray:
    if path:
        source = np.load(path, mmap_mode="r")
        return np.array(source[:rows, :columns], dtype=np.float32)
    return np.random.default_rng(0).standard_normal((rows, columns), dtype=np.float32)


def per_segment(x: np.ndarray, k: int, niter: int, segments: int) -> None:
    import faiss

    from asg import lowdim, pq

    print(f"| values per segment | path | asg s / segment | faiss s / segment | speed-up | asg error / faiss error |")
    print("|---:|---|---:|---:|---:|---:|")
    for dim in (1, 2, 4, 16):
        part = np.ascontiguousarray(x[:, : dim * segments])
        start = time.perf_counter()
        fit = pq.fit(part, k, segments, niter=niter)
        ours = (time.perf_counter() - start) / segments
        error = float(np.linalg.norm(part - pq.decode(fit.codebooks, fit.codes)))
        start, squared = time.perf_counter(), 0.0
        for i in range(segments):  # what pq.fit ran before: faiss's exact k-means, then a flat search
            segment = np.ascontiguousarray(part[:, i * dim:(i + 1) * dim])
            centroids, index = pq._faiss_kmeans(faiss, segment, k, niter, i, None, _Bar())
            squared += float(((segment - centroids[index.search(segment, 1)[1][:, 0]]) ** 2).sum())
        theirs = (time.perf_counter() - start) / segments
        path = "asg.lowdim" if lowdim.applies(dim) else "faiss"
        print(f"| {dim} | {path} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x | {error / np.sqrt(squared):.3f} |",
              flush=True)


def whole_table(x: np.ndarray, k: int, niter: int) -> None:
    from asg import pq

    dim = x.shape[1]
    print(f"\n| m | values per segment | seconds | vs m = D/16 | relative error |")
    print("|---:|---:|---:|---:|---:|")
    base = None
    for m in (dim // 16, dim // 8, dim // 2):
        start = time.perf_counter()
        fit = pq.fit(x, k, m, niter=niter)
        seconds = time.perf_counter() - start
        base = base or seconds
        error = pq.relative_error(x, pq.decode(fit.codebooks, fit.codes))
        print(f"| {m} | {dim // m} | {seconds:.1f} | {seconds / base:.2f} | {error:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", help="an .npy matrix (rows x columns); random normal values when absent")
    parser.add_argument("--rows", type=int, default=262_144)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=25)
    parser.add_argument("--segments", type=int, default=4, help="segments per width in the first table")
    args = parser.parse_args()
    x = load(args.table, args.rows, args.dim)
    from asg import kernels

    kernels.library()  # built (or loaded) before anything is timed
    print(f"# Fine segments: {x.shape[0]:,} x {x.shape[1]} from {args.table or 'random normal values'}, "
          f"k={args.k}, niter={args.niter}; {machine()}\n")
    per_segment(x, args.k, args.niter, args.segments)
    whole_table(x, args.k, args.niter)


if __name__ == "__main__":
    main()
