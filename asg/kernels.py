"""Fast CPU paths for ASG tables: a small C library, compiled on first use and loaded with ctypes.

The library (`csrc/asg_kernels.c`, OpenMP) scores hidden states against the compact codes with
per-segment lookup tables (paper eq. 2: it reads V·m small integers instead of V·D floats),
rebuilds table rows from codebooks, finds row minima for the k-means assignment step, and finds the nearest
centroid of low-dimensional points without a score matrix (`nearest`). It is built with the system C compiler (`$CC`, else `cc`) into
`$ASG_CACHE_DIR` (default `~/.cache/asg`), once per source version and CPU. Where no compiler works,
or `ASG_NO_KERNELS=1`, every caller falls back to torch code that computes the same numbers more
slowly, and asg says so once.

The C code trusts its indices, so every wrapper here checks them first: token ids against the code
table, codes against the codebooks (callers that checked a code table once, as `ASGEmbedding` does,
say so with `codes_checked=True`). A cached library is loaded only from a folder that no other user
can write, and only when its SHA-256 matches the one recorded when this package built it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).parent / "csrc" / "asg_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
COLS_CHUNK = 16  # batch rows per call of the transposed-table kernel: one segment's table stays in cache
ROWS_MAX = 2  # up to this many rows, the row kernel (one pass over the codes) is the faster one

_SUFFIX = {torch.uint8: "u8", torch.int16: "i16", torch.uint16: "u16", torch.int32: "i32"}
_state: dict[str, object] = {}
_UNSET = object()


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning) where it cannot be built."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True when the C kernels can be used."""
    return library() is not None


@contextlib.contextmanager
def disabled():
    """Within the block, every caller takes its torch fallback, as without a compiler or with
    `ASG_NO_KERNELS=1` (to compare the two paths in one process)."""
    saved = _state.get("lib", _UNSET)
    _state["lib"] = None
    try:
        yield
    finally:
        if saved is _UNSET:
            _state.pop("lib", None)
        else:
            _state["lib"] = saved


def lut_logits(tables: torch.Tensor, codes: torch.Tensor, *, codes_checked: bool = False) -> torch.Tensor:
    """out[b, t] = Σ_i tables[b, i, codes[t, i]]: tables (B, m, k) float32, codes (V, m) -> (B, V) float32."""
    lib = library()
    batch, m, k = tables.shape
    vocab = codes.shape[0]
    _check_float32(tables, "tables")
    _check_codes(codes, m, k, codes_checked)
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


def gather(codebooks: torch.Tensor, codes: torch.Tensor, step: int, ids: torch.Tensor | None = None, *,
           codes_checked: bool = False) -> torch.Tensor:
    """Rows concat_i codebooks[i·step + codes[t, i]] for t in `ids` (every token when None): (n, m·D/m) float32.

    IndexError for an id outside 0..V-1, as `nn.Embedding` raises."""
    lib = library()
    _check_float32(codebooks, "codebooks")
    if codes.dim() != 2:
        raise ValueError(f"codes must be a (V, m) table, got shape {tuple(codes.shape)}")
    m = codes.shape[1]
    dim = codebooks.shape[1]
    k = codebooks.shape[0] if step == 0 else step
    if step not in (0, k) or (step and codebooks.shape[0] != m * step):
        raise ValueError(f"codebooks of {codebooks.shape[0]} rows do not hold {m} segments of {step} concepts")
    _check_codes(codes, m, k, codes_checked)
    codes = codes.contiguous()
    codebooks = codebooks.contiguous()
    if ids is not None:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        check_ids(ids, codes.shape[0])
    count = codes.shape[0] if ids is None else ids.numel()
    out = torch.empty(count, m * dim, dtype=torch.float32)
    getattr(lib, f"asg_gather_{_SUFFIX[codes.dtype]}")(
        _ptr(codebooks), _ptr(codes), _ptr(ids) if ids is not None else None, _ptr(out), _i64(count), _i64(m),
        _i64(dim), _i64(step), ctypes.c_int(torch.get_num_threads()))
    return out


def scatter(grad: torch.Tensor, codes: torch.Tensor, step: int, rows: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient (rows, D/m) of the concept vectors that `gather` read: out[i·step + codes[t, i]] += grad[j, i]
    for t = ids[j] (every token when None); grad (n, m·D/m) float32. Codes and ids must have been checked
    (`gather` did, on the forward pass)."""
    _check_float32(grad, "grad")
    m = codes.shape[1]
    count = codes.shape[0] if ids is None else ids.numel()
    if grad.dim() != 2 or grad.shape[0] != count or grad.shape[1] % m:
        raise ValueError(f"grad must be ({count}, m·D/m) for m={m}, got {tuple(grad.shape)}")
    dim = grad.shape[1] // m
    if rows < (m * step if step else 1):
        raise ValueError(f"{rows} rows cannot hold {m} segments of {step} concepts")
    grad, codes = grad.contiguous(), codes.contiguous()
    if ids is not None:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.zeros(rows, dim, dtype=torch.float32)
    getattr(library(), f"asg_scatter_{_SUFFIX[codes.dtype]}")(
        _ptr(grad), _ptr(codes), _ptr(ids) if ids is not None else None, _ptr(out), _i64(count), _i64(m), _i64(dim),
        _i64(step), _i64(rows), ctypes.c_int(torch.get_num_threads()))
    return out


def argmin_rows(matrix: torch.Tensor, out: torch.Tensor) -> None:
    """out[r] = index of the first minimum of row r: matrix (n, k) float32 and out (n,) int64, both contiguous."""
    _check_float32(matrix, "matrix")
    if (matrix.dim() != 2 or out.dtype != torch.int64 or out.shape != matrix.shape[:1] or not out.is_contiguous()
            or out.device.type != "cpu"):
        raise ValueError("argmin_rows needs a (n, k) matrix and a contiguous (n,) int64 output")
    if not matrix.is_contiguous():
        raise ValueError("argmin_rows needs a contiguous matrix")
    library().asg_argmin_rows(_ptr(matrix), _i64(matrix.shape[0]), _i64(matrix.shape[1]), _ptr(out),
                              ctypes.c_int(torch.get_num_threads()))


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (n,) int64 of the centroid (k, d) nearest to each row of points (n, d) in squared distance (either
    one where two are equally near), float32 CPU tensors. Exact for rows in any order, fast for small d when
    the rows come sorted by their first value: a group of neighbouring rows then scores only the centroids
    whose first value is close to theirs (see `asg.lowdim`)."""
    _check_float32(points, "points")
    _check_float32(centroids, "centroids")
    if points.dim() != 2 or centroids.dim() != 2 or centroids.shape[1] != points.shape[1] or not len(centroids):
        raise ValueError("nearest needs points (n, d) and centroids (k, d) with k >= 1, of the same d")
    num, dim = points.shape
    k = len(centroids)
    lib = library()
    lanes, group = lib.asg_lanes(), lib.asg_group()  # the padding the build expects
    order = torch.argsort(centroids[:, 0], stable=True)  # blocks of neighbouring first values
    ranked = centroids[order]
    padded = -(-k // lanes) * lanes
    transposed = torch.zeros(dim, padded)
    transposed[:, :k] = ranked.T
    half_lengths = torch.full((padded,), torch.finfo(torch.float32).max)  # padding never wins a strict comparison
    half_lengths[:k] = 0.5 * ranked.square().sum(1)
    firsts = ranked[:, 0]
    low = firsts[::lanes].contiguous()
    high = firsts[torch.clamp(torch.arange(lanes - 1, padded, lanes), max=k - 1)].contiguous()
    whole = num - num % group
    points = points.contiguous()
    out = torch.empty(whole + (group if whole < num else 0), dtype=torch.int64)
    parts = [(points[:whole], 0)]
    if whole < num:  # the last rows, padded to a whole group with copies of the last one
        parts.append((torch.cat([points[whole:], points[-1:].expand(group - (num - whole), dim)]), whole))
    for rows, start in parts:
        if len(rows):
            lib.asg_nearest_sorted(_ptr(rows), _i64(len(rows)), _i64(dim), _ptr(transposed), _ptr(half_lengths),
                                   _ptr(low), _ptr(high), _i64(padded), _ptr(out[start:]),
                                   ctypes.c_int(torch.get_num_threads()))
    return order[out[:num]]


def transposed_codebooks(codebooks: torch.Tensor, m: int, shared: bool) -> torch.Tensor:
    """The codebooks ((k, ds) shared, or (m·k, ds)) as `segment_scores` reads them: (1 or m, ds, k), contiguous."""
    _check_float32(codebooks, "codebooks")
    ds = codebooks.shape[1]
    return codebooks.detach().reshape(1 if shared else m, -1, ds).transpose(1, 2).contiguous()


def segment_scores(hidden: torch.Tensor, transposed: torch.Tensor, m: int) -> torch.Tensor:
    """(m, k): the dot product of each segment of one hidden state (m·ds,) with each concept vector of its codebook,
    from `transposed_codebooks`: eq. 2's lookup tables, the same values as the module's einsum up to rounding."""
    _check_float32(hidden, "hidden")
    _check_float32(transposed, "transposed codebooks")
    books, ds, k = transposed.shape
    if books not in (1, m) or hidden.shape != (m * ds,) or not transposed.is_contiguous():
        raise ValueError(f"hidden must be ({m * ds},) and the codebooks (1 or {m}, {ds}, k) contiguous, got "
                         f"{tuple(hidden.shape)} and {tuple(transposed.shape)}")
    hidden = hidden.contiguous()
    out = torch.empty(m, k, dtype=torch.float32)
    library().asg_segment_scores(_ptr(hidden), _ptr(transposed), _i64(m), _i64(k), _i64(ds), _i64(0 if books == 1 else ds),
                                 _ptr(out), ctypes.c_int(torch.get_num_threads()))
    return out


class ByteCodes(NamedTuple):
    """A code table laid out for `lut_bytes`: per block of 64 tokens and segment, the codes' bits 0-7 as 64
    bytes (`low`, (blocks, m, 64) uint8) and each higher bit as a 64-bit mask (`high`, (blocks, m, levels - 1)
    int64; none while levels <= 1); `levels` = log2 of the 128-entry chunks a segment's table needs (0-3, so
    k <= 1024); every code < k. A code takes ⌈log2 k⌉ bits (at least 8): the kernel reads bytes at the speed it
    streams them, so each bit counts."""

    low: torch.Tensor
    high: torch.Tensor
    levels: int
    vocab: int
    k: int


def byte_lookups() -> bool:
    """Whether this build has the 8-bit lookup kernel (AVX-512 VBMI)."""
    lib = library()
    return lib is not None and bool(lib.asg_byte_lookups())


def byte_codes(codes: torch.Tensor, k: int) -> ByteCodes:
    """`codes` (V, m), values in 0..k-1 with k <= 1024, in the layout `lut_bytes` reads (1.25 bytes a code at
    k=1024)."""
    if not 2 <= k <= 1024:
        raise ValueError(f"8-bit lookups take k <= 1024 concepts per segment, not {k}")
    check_codes(codes, k)
    levels = max(0, (k - 1).bit_length() - 7)
    vocab, m = codes.shape
    blocks = -(-vocab // 64)
    padded = torch.zeros(blocks * 64, m, dtype=torch.int32)
    padded[:vocab] = codes
    per_block = padded.view(blocks, 64, m).transpose(1, 2)  # (blocks, m, 64 tokens)
    low = (per_block & 255).to(torch.uint8).contiguous()
    bits = torch.stack([(per_block >> (8 + h)) & 1 for h in range(levels - 1)], 2) if levels > 1 else \
        torch.zeros(blocks, m, 0, 64, dtype=torch.int32)
    weights = torch.ones(64, dtype=torch.int64) << torch.arange(64)  # bit j: token j of the block
    high = (bits.to(torch.int64) * weights).sum(-1).contiguous()  # wraps into the sign bit for token 63, as intended
    return ByteCodes(low, high, levels, vocab, k)


def lut_bytes(tables: torch.Tensor, layout: ByteCodes, step: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """step · Σ_i tables[i, code(t, i)] + offset for every token t (V,) float32, from 8-bit tables (m, 128 << levels)
    uint8 and codes in `byte_codes` layout; the sums of the integers are exact (the rounding is the caller's)."""
    blocks, m, _ = layout.low.shape
    if tables.dtype != torch.uint8 or tuple(tables.shape) != (m, 128 << layout.levels):
        raise ValueError(f"tables must be ({m}, {128 << layout.levels}) uint8, got {tuple(tables.shape)} {tables.dtype}")
    _check_layout(layout)
    if not byte_lookups():
        raise RuntimeError("this build has no 8-bit lookup kernel (it needs AVX-512 VBMI)")
    tables = tables.contiguous()
    out = torch.empty(blocks * 64, dtype=torch.float32)
    library().asg_lut_bytes(_ptr(tables), _ptr(layout.low), _ptr(layout.high), _i64(blocks), _i64(m),
                            _i64(layout.levels), ctypes.c_float(step), ctypes.c_float(offset), _ptr(out),
                            ctypes.c_int(torch.get_num_threads()))
    return out[:layout.vocab]


def _check_layout(layout: ByteCodes) -> None:
    """ValueError unless `layout`'s arrays have the shapes `byte_codes` gives them (what the kernels index by)."""
    blocks, m, width = layout.low.shape
    if (width != 64 or not 0 <= layout.levels <= 3 or tuple(layout.high.shape) != (blocks, m, max(layout.levels - 1, 0))
            or layout.low.dtype != torch.uint8 or layout.high.dtype != torch.int64
            or not (layout.low.is_contiguous() and layout.high.is_contiguous())
            or -(-layout.vocab // 64) != blocks or not 2 <= layout.k <= 128 << layout.levels):
        raise ValueError("codes are not in the layout byte_codes builds")


def lut_bytes_top(scores: torch.Tensor, layout: ByteCodes, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Eq. 2 for one hidden state from its lookup tables `scores` (m, k) float32, approximated with 8-bit tables
    and then exact for every token that could be the top one (`asg_lut_bytes_top` says how), times `scale` (V,)
    when given: the scores (V,) float32 and how many tokens were scored exactly."""
    blocks, m, _ = layout.low.shape
    _check_layout(layout)
    _check_float32(scores, "scores")
    if tuple(scores.shape) != (m, layout.k):
        raise ValueError(f"scores must be ({m}, {layout.k}), the layout's segments and concepts, got {tuple(scores.shape)}")
    if scale is not None:
        _check_float32(scale, "scale")
        if tuple(scale.shape) != (layout.vocab,):
            raise ValueError(f"scale must be ({layout.vocab},), one per token, got {tuple(scale.shape)}")
        scale = scale.contiguous()
    if not byte_lookups():
        raise RuntimeError("this build has no 8-bit lookup kernel (it needs AVX-512 VBMI)")
    scores = scores.contiguous()
    tables = torch.empty(m, 128 << layout.levels, dtype=torch.uint8)
    out = torch.empty(blocks * 64, dtype=torch.float32)
    rescored = library().asg_lut_bytes_top(
        _ptr(scores), _i64(layout.k), _ptr(layout.low), _ptr(layout.high), _i64(blocks), _i64(layout.vocab), _i64(m),
        _i64(layout.levels), _ptr(scale) if scale is not None else None, _ptr(tables), _ptr(out),
        ctypes.c_int(torch.get_num_threads()))
    if rescored < 0:
        raise MemoryError("out of memory in the 8-bit lookup kernel")
    return out[:layout.vocab], rescored


def check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """IndexError unless every token id is in 0..vocab_size-1 (what `nn.Embedding` raises, with the fix)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise IndexError(f"token id {bad} is outside the vocabulary of {vocab_size} tokens (ids 0..{vocab_size - 1}); "
                         "if the tokenizer has added tokens, call model.resize_token_embeddings(len(tokenizer))")


def check_codes(codes: torch.Tensor, k: int) -> None:
    """ValueError unless codes are an integer table whose values all lie in 0..k-1."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if not codes.numel():
        return
    if codes.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max for these
        codes = codes.to(torch.int64)
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= k:
        raise ValueError(f"codes must lie in 0..{k - 1} (k={k}), found values from {low} to {high}")


def _check_codes(codes: torch.Tensor, m: int, k: int, checked: bool) -> None:
    if codes.dtype not in _SUFFIX:
        raise ValueError(f"codes must be one of {sorted(str(d) for d in _SUFFIX)}, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] != m or codes.device.type != "cpu":
        raise ValueError(f"codes must be a (V, {m}) CPU table, got shape {tuple(codes.shape)} on {codes.device}")
    if not checked:
        check_codes(codes, k)


def _check_float32(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor, got {tensor.dtype} on {tensor.device}")


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
    lib.asg_argmin_rows.restype = lib.asg_nearest_sorted.restype = lib.asg_segment_scores.restype = None
    if lib.asg_byte_lookups():
        lib.asg_lut_bytes.restype = None
        lib.asg_lut_bytes_top.restype = ctypes.c_int64
    for suffix in _SUFFIX.values():
        for name in ("lut_rows", "lut_cols", "gather", "scatter"):
            getattr(lib, f"asg_{name}_{suffix}").restype = None
    return lib


def _build() -> Path:
    """The path of a library built from this source, verified: reused from the cache when the cache folder
    is private to this user and the file's SHA-256 is the one recorded at build time, else built anew."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    cache = _private_cache()
    target = cache / f"asg_kernels-{key}.so"
    record = cache / f"asg_kernels-{key}.sha256"
    if _verified(target, record):
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.chmod(tmp, 0o700)
                _write_private(record, _sha256(Path(tmp)) + "\n")
                os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
                return target
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _private_cache() -> Path:
    """`$ASG_CACHE_DIR` or ~/.cache/asg, created private (0700); refused (RuntimeError) when another user owns
    it or may write to it, since a library planted there would run inside this process."""
    cache = Path(os.environ.get("ASG_CACHE_DIR") or Path.home() / ".cache" / "asg")
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = cache.lstat()
    if hasattr(os, "getuid") and info.st_uid == os.getuid() and info.st_mode & 0o022 and stat.S_ISDIR(info.st_mode):
        # Ours but open to others (an older asg, or a umask of 002): close it. Files others planted meanwhile
        # stay unused, since only libraries and records owned by this user are ever loaded.
        cache.chmod(0o700)
    if not _private(cache):
        raise RuntimeError(f"the kernel cache {cache} is writable by other users or owned by another user; "
                           f"run chmod 700 {cache}, or set ASG_CACHE_DIR to a private folder")
    return cache


def _private(path: Path) -> bool:
    info = path.lstat()
    owner_ok = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return owner_ok and not info.st_mode & 0o022 and not stat.S_ISLNK(info.st_mode)


def _verified(library_path: Path, record: Path) -> bool:
    """True when both files are this user's, private, and the library's SHA-256 is the recorded one."""
    try:
        if not (_private(library_path) and _private(record)):
            return False
        return record.read_text().strip() == _sha256(library_path)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


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
