"""Fast CPU paths for ASG tables: a small C library, compiled on first use and loaded with ctypes.

The library (`csrc/asg_kernels.c`, OpenMP) scores hidden states against the compact codes with
per-segment lookup tables (paper eq. 2: it reads V·m small integers instead of V·D floats),
rebuilds table rows from codebooks, and finds row minima for the k-means assignment step. It is built with the system C compiler (`$CC`, else `cc`) into
`$ASG_CACHE_DIR` (default `~/.cache/asg`), once per source version and CPU. Where no compiler works,
or `ASG_NO_KERNELS=1`, every caller falls back to torch code that computes the same numbers more
slowly, and asg says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "asg_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
COLS_CHUNK = 16  # batch rows per call of the transposed-table kernel: one segment's table stays in cache
ROWS_MAX = 2  # up to this many rows, the row kernel (one pass over the codes) is the faster one

_SUFFIX = {torch.uint8: "u8", torch.int16: "i16", torch.uint16: "u16", torch.int32: "i32"}
_state: dict[str, object] = {}


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning) where it cannot be built."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when the C kernels can be used."""
    return library() is not None


def lut_logits(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """out[b, t] = Σ_i tables[b, i, codes[t, i]]: tables (B, m, k) float32, codes (V, m) -> (B, V) float32."""
    lib = library()
    batch, m, k = tables.shape
    vocab = codes.shape[0]
    out = torch.empty(batch, vocab, dtype=torch.float32)
    suffix = _SUFFIX[codes.dtype]
    codes = codes.contiguous()
    threads = torch.get_num_threads()
    if batch <= ROWS_MAX:
        tables = tables.contiguous()
        getattr(lib, f"asg_lut_rows_{suffix}")(_ptr(tables), _ptr(codes), _ptr(out), _i64(batch), _i64(vocab),
                                                _i64(m), _i64(k), ctypes.c_int(threads))
        return out
    for start in range(0, batch, COLS_CHUNK):
        chunk = tables[start:start + COLS_CHUNK]
        rows = chunk.shape[0]
        transposed = chunk.permute(1, 2, 0).contiguous()  # (m, k, rows): each lookup reads a contiguous row
        getattr(lib, f"asg_lut_cols_{suffix}")(_ptr(transposed), _ptr(codes), _ptr(out[start:start + rows]),
                                                _i64(rows), _i64(vocab), _i64(m), _i64(k), ctypes.c_int(threads))
    return out


def gather(codebooks: torch.Tensor, codes: torch.Tensor, step: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows concat_i codebooks[i·step + codes[t, i]] for t in `ids` (every token when None): (n, m·D/m) float32."""
    lib = library()
    m = codes.shape[1]
    dim = codebooks.shape[1]
    codes = codes.contiguous()
    codebooks = codebooks.contiguous()
    if ids is not None:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
    count = codes.shape[0] if ids is None else ids.numel()
    out = torch.empty(count, m * dim, dtype=torch.float32)
    getattr(lib, f"asg_gather_{_SUFFIX[codes.dtype]}")(
        _ptr(codebooks), _ptr(codes), _ptr(ids) if ids is not None else None, _ptr(out), _i64(count), _i64(m),
        _i64(dim), _i64(step), ctypes.c_int(torch.get_num_threads()))
    return out


def argmin_rows(matrix: torch.Tensor, out: torch.Tensor) -> None:
    """out[r] = index of the first minimum of row r: matrix (n, k) float32 and out (n,) int64, both contiguous."""
    library().asg_argmin_rows(_ptr(matrix), _i64(matrix.shape[0]), _i64(matrix.shape[1]), _ptr(out),
                              ctypes.c_int(torch.get_num_threads()))


# --- building the library ------------------------------------------------------------------------


def _load() -> ctypes.CDLL | None:
    if os.environ.get("ASG_NO_KERNELS") == "1":
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"asg: could not build its C kernels ({err}); the ASG head falls back to slower torch code. "
                      "Install a C compiler with OpenMP (gcc) to get the fast path.", stacklevel=3)
        return None
    lib.asg_argmin_rows.restype = None
    for suffix in _SUFFIX.values():
        for name in ("lut_rows", "lut_cols", "gather"):
            getattr(lib, f"asg_{name}_{suffix}").restype = None
    return lib


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ASG_CACHE_DIR") or Path.home() / ".cache" / "asg")
    target = cache / f"asg_kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
                return target
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_fingerprint() -> str:
    """What -march=native depends on, so a shared cache never hands one CPU's build to another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _i64(value: int) -> ctypes.c_int64:
    return ctypes.c_int64(value)
