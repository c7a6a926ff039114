"""Where should two-level k-means start from sampled points instead of per-cell fits?

Fits the same rows with both starts (`asg.twolevel._kmeans` with "spread", per-cell fits, and "sample", k
sampled points) at several numbers of points per centroid, and prints their relative errors: the measurement
behind `asg.twolevel.SAMPLE_MAX_POINTS` (benchmarks/RESULTS.md, "Sampled starts where centroids get few
points").

    python experiments/twolevel_starts.py                          # isotropic random rows, 768 wide
    python experiments/twolevel_starts.py --table gemma.npy        # a table saved as in bench_large_k.py
    python experiments/twolevel_starts.py --table gemma.npy --columns 80 --rows 50000 --ratios 24 --probe --no-normalise
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", help="an .npy table (random normal values without one)")
    parser.add_argument("--rows", type=int, default=25_000)
    parser.add_argument("--columns", type=int, default=None, help="the first this many columns (default: all; 768 "
                                                                  "for random rows)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.5, 5, 10, 20], help="points per centroid")
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--probe", action="store_true", help="probe cells whatever the timed sample says, as on "
                                                             "tables too large to search flat")
    parser.add_argument("--no-normalise", action="store_true", help="keep the rows' lengths (SG normalises them)")
    args = parser.parse_args()

    import faiss
    import numpy as np

    from asg import pq, twolevel

    if args.table:
        source = np.load(args.table, mmap_mode="r")
        x = np.array(source[:args.rows, :args.columns or source.shape[1]], dtype=np.float32)
    else:
        x = np.random.default_rng(0).standard_normal((args.rows, args.columns or 768), dtype=np.float32)
    if not args.no_normalise:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if args.probe:
        twolevel._nprobe = lambda *_: twolevel.NPROBE
    print(f"{args.table or 'random normal'}: {x.shape[0]:,} x {x.shape[1]}, niter={args.niter}")
    print("| points a centroid | k | per-cell fits | sampled start | change |")
    print("|---:|---:|---:|---:|---:|")
    for ratio in args.ratios:
        k = int(len(x) / ratio)
        errors = []
        for start in ("spread", "sample"):
            fit = twolevel._kmeans(faiss, pq._faiss_kmeans, x, k, args.niter, 0, None, twolevel._Scaled(None, 0), start)
            codes = twolevel.training_codes(faiss, fit, x)
            errors.append(float(np.linalg.norm(x - fit.centroids[codes]) / np.linalg.norm(x)))
        print(f"| {ratio:g} | {k:,} | {errors[0]:.5f} | {errors[1]:.5f} | {100 * (errors[1] / errors[0] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
