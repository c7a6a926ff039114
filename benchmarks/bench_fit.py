"""Fitting speed and peak memory: asg.pq.fit (faiss and torch backends) against its peers, same data.

Peers: faiss.Kmeans called directly on each segment in a loop (train, then assign), and nanopq
(the paper's toolchain, scipy k-means). nanopq is timed on a row subsample, next to asg on the
same subsample (equal data), and its full-size time is estimated by scaling linearly in rows
(each k-means iteration costs O(rows · k · D)). The shared codebook pools all V·m segments.
Every measurement runs in its own process, so that its peak memory (from just before the fit) is its own.

    python benchmarks/bench_fit.py [--rows 250002 --dim 768 --m 48 --k 1024 --niter 25 --sample-rows 25000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from _common import machine, peak_bytes, start_peak

METHODS = ("faiss-loop", "asg-faiss", "asg-torch", "asg-shared", "nanopq-sample", "asg-faiss-sample")


def run_one(method: str, args) -> dict:
    """Time one fit in this process; report seconds and peak memory above the input matrix."""
    rows = args.sample_rows if method.endswith("sample") else args.rows
    x = np.random.default_rng(0).standard_normal((rows, args.dim), dtype=np.float32)  # no float64 temporary
    import faiss  # noqa: F401  (imported before the baseline so that library pages are not counted)
    import torch  # noqa: F401

    from asg import pq

    before = start_peak()
    start = time.perf_counter()
    if method == "faiss-loop":
        import faiss

        sub = args.dim // args.m
        for i in range(args.m):
            segment = np.ascontiguousarray(x[:, i * sub:(i + 1) * sub])
            km = faiss.Kmeans(sub, args.k, niter=args.niter, seed=i, verbose=False)
            km.train(segment)
            km.index.search(segment, 1)
    elif method in ("asg-faiss", "asg-faiss-sample"):
        pq.fit(x, args.k, args.m, niter=args.niter)
    elif method == "asg-torch":
        pq.fit(x, args.k, args.m, niter=args.niter, backend="torch")
    elif method == "asg-shared":
        pq.fit(x, args.k, args.m, codebook="shared", niter=args.niter)
    elif method == "nanopq-sample":
        import nanopq

        quantizer = nanopq.PQ(M=args.m, Ks=args.k, verbose=False)
        quantizer.fit(x, iter=args.niter, seed=0)
        quantizer.encode(x)
    seconds = time.perf_counter() - start
    peak = peak_bytes()
    return {"method": method, "rows": rows, "seconds": seconds, "matrix_bytes": x.nbytes,
            "peak_ratio": (x.nbytes + max(0, peak - before)) / x.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250002)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--m", type=int, default=48)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=25)
    parser.add_argument("--sample-rows", type=int, default=25000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return

    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method] + [
            f"--{name.replace('_', '-')}={getattr(args, name)}" for name in ("rows", "dim", "m", "k", "niter", "sample_rows")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {method}: {results[method]['seconds']:.1f} s", file=sys.stderr)

    loop = results.get("faiss-loop", {}).get("seconds")
    print(f"# Fitting a {args.rows:,} x {args.dim} matrix, m={args.m}, k={args.k}, niter={args.niter}; {machine()}")
    print("| method | rows | seconds | vs faiss loop | peak memory / input |")
    print("|---|---:|---:|---:|---:|")
    for method, r in results.items():
        ratio = f"{r['seconds'] / loop:.2f}" if loop and not method.endswith("sample") else ""
        print(f"| {method} | {r['rows']:,} | {r['seconds']:.1f} | {ratio} | {r['peak_ratio']:.2f} |")
    if "nanopq-sample" in results and "asg-faiss-sample" in results:
        nano, ours = results["nanopq-sample"]["seconds"], results["asg-faiss-sample"]["seconds"]
        scale = args.rows / args.sample_rows
        print(f"\nnanopq on {args.sample_rows:,} rows: {nano:.1f} s, asg (faiss) on the same rows: {ours:.1f} s "
              f"({nano / ours:.1f}x faster). Scaled linearly to {args.rows:,} rows (x{scale:.1f}), nanopq would "
              f"take about {nano * scale:.0f} s:")
        for method in ("asg-faiss", "asg-torch"):
            if method in results:
                print(f"- {method}: {nano * scale / results[method]['seconds']:.1f}x faster than nanopq (scaled)")


if __name__ == "__main__":
    main()
