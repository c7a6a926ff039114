"""`ASGConfig`: the settings of one Aggregate Semantic Grouping compression."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .bitpack import bits_for
from .format import NORM_MODES, STORAGE_DTYPES
from .methods import largest

CODEBOOKS = ("separate", "shared")
TARGETS = ("input", "output")
BACKENDS = ("faiss", "torch")
KMEANS = ("auto", "exact", "two-level")  # see pq.fit


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_targets(targets) -> tuple[str, ...]:
    """Normalise "input,output" or a sequence to a tuple; ValueError for an empty, unknown or repeated target."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one of 'input' and 'output'")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}: use 'input', 'output' or both")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets {targets} names a table twice; name each of 'input' and 'output' at most once")
    return targets


def suggest_k_m(vocab_size: int, dim: int) -> tuple[int, int, str]:
    """Settings for a (V, D) table when the user names none, and the reason, to print."""
    if vocab_size <= 65536:
        k, m = 256, max(1, dim // 4)
        why = (f"k={k} keeps one-byte codes and {k / vocab_size:.2%} of the embedding parameters; "
               f"m={m} gives concept vectors of {dim // m} values, which keeps all-MiniLM-L6-v2's sentence "
               "embeddings above 0.97 cosine to the original without fine-tuning")
    else:
        k, m = 1024, max(1, dim // 16)
        why = (f"the paper's setting for large multilingual vocabularies (XLM-R: k=1024, D/m=16): "
               f"{k / vocab_size:.2%} of the embedding parameters")
    return k, m, why


def array_record(values) -> dict[str, Any]:
    """What a config records of an array of weights: how many and their SHA-256 (as float64), not the values."""
    import hashlib

    import numpy as np

    data = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    return {"array": {"count": int(data.size), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}}


class SerializableConfig:
    """JSON round trip for the config dataclasses of every method, through an allow-list of fields."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the settings (tuples become lists). An array of weights is recorded by what
        identifies it, {"array": {"count", "sha256"}}, not stored; `from_dict` gives that record back."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif f.name == "weights" and value is not None and not isinstance(value, (str, dict)):
                value = array_record(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild a config from `to_dict` output; unknown keys are an error, not silently dropped."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(allowed)}")
        return cls(**data)


class MethodConfig(SerializableConfig):
    """The contract every compression method's config meets (ASG's and each baseline's):

    - `method`: the name its compressions are recorded under ("asg", "sg", "lowrank", "int8", "int4");
    - `targets`: the tables it replaces, ("input",), ("output",) or both;
    - `validate_for(num_rows, dim, what)`: a ValueError with the fix unless it fits a (V, D) table;
    - `settings()`: the few settings that name it in tables and reports;
    - `to_dict()` / `from_dict()`: the JSON round trip that checkpoints record;
    - `for_budget(method, V, D, budget, by=, element_size=, **options)`: the config with the largest table
      within `budget`, a fraction of the dense table's parameters or bytes;
    - `from_options(method, V, D, budget=, by=, **options)`: the config a command builds from its options
      (by default: `for_budget` at the given budget, else at `default_budget`).

    Its fitter is registered next to it with `asg.methods.register`; callers build configs through
    `asg.methods.config_from_options`.
    """

    method: ClassVar[str] = ""
    default_budget: ClassVar[float | None] = None  # the size `from_options` picks when given no budget

    def validate_for(self, num_rows: int, dim: int, what: str = "embedding") -> None:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def for_budget(cls, method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                   element_size: int = 4, **options) -> "MethodConfig":
        raise NotImplementedError

    @classmethod
    def from_options(cls, method: str, vocab_size: int, dim: int, *, budget: float | None = None, by: str = "params",
                     element_size: int = 4, **options) -> "MethodConfig":
        budget = cls.default_budget if budget is None else budget
        if budget is None:
            return cls(**options)
        return cls.for_budget(method, vocab_size, dim, budget, by=by, element_size=element_size, **options)

    @staticmethod
    def budget_units(vocab_size: int, dim: int, budget: float, by: str, element_size: int) -> tuple[float, int]:
        """(what the budget allows, the cost of one dense value) in parameters or bytes; ValueError for a bad budget."""
        if by not in ("params", "bytes"):
            raise ValueError(f"a budget is matched by 'params' or 'bytes', not {by!r}")
        if not 0 < budget < 1:
            raise ValueError(f"budget {budget!r} must be a fraction of the dense table in (0, 1), e.g. 0.01 for 1%")
        value = element_size if by == "bytes" else 1
        return budget * vocab_size * dim * value, value

    @staticmethod
    def index_bytes(entries: int, by: str) -> float:
        """Bytes per token of an index over `entries` values (codes, groups) when bytes are counted, as a
        folder stores it (packed at ⌈log2 entries⌉ bits), else 0."""
        return bits_for(entries) / 8 if by == "bytes" else 0


def check_kmeans(kmeans: str, backend: str) -> None:
    """ValueError unless `kmeans` is a k-means mode that `backend` runs."""
    if kmeans not in KMEANS:
        raise ValueError(f"unknown kmeans {kmeans!r}: use 'auto' (two-level where exact is slow), 'exact' or 'two-level'")
    if kmeans == "two-level" and backend != "faiss":
        raise ValueError("kmeans='two-level' runs on the faiss backend: use backend='faiss', or kmeans='exact'")


@dataclass
class ASGConfig(MethodConfig):
    """How to compress: k concept vectors per codebook, m segments per token, and how to fit them.

    `codebook="separate"` learns one codebook per segment (the paper's E', m·k rows);
    `"shared"` pools every segment into one codebook of k rows (paper section 3.3).
    `targets` names the tables to replace: the input embedding, the output head, or both.
    `weights` makes k-means count each token by how often it occurs: "wordfreq" or "wordfreq:LANG"
    (the wordfreq package), the path of a counts file, or an array with one weight per token.
    `norms="row"` keeps each token's original length (its direction comes from the concepts; one
    trainable norm per row), `"scalar"` gives every row one shared trainable length.
    `kmeans="auto"` fits paper-scale codebooks (k in the thousands over many points) by two-level k-means,
    minutes instead of hours, within 1% of exact k-means' error on the benchmarks' tables (`asg.twolevel`);
    "exact" and "two-level" force one.
    `dtype` ("bfloat16", "float16" or "float32") is the precision the codebooks and norms are stored in:
    the fitted values are rounded to it, so that the folder holds them exactly; None keeps the model's.
    `keep=N` keeps the rows of the N tokens that occur most often in text (ranked by `keep_by`: "wordfreq",
    "wordfreq:LANG[,LANG]" or a counts file; special tokens first) apart from the concepts, each stored in
    int8 with one scale: D + 1 numbers per kept row, and D + 6 bytes with its int32 id (D + 8 where the
    scale is stored in float32).
    """

    k: int
    m: int
    codebook: str = "separate"
    targets: tuple[str, ...] = TARGETS
    niter: int = 25
    seed: int = 0
    backend: str = "faiss"
    kmeans: str = "auto"
    weights: Any = field(default=None, compare=False, repr=False)
    norms: str | None = None
    dtype: str | None = None
    keep: int = 0
    keep_by: str = "wordfreq"

    method: ClassVar[str] = "asg"

    def __post_init__(self) -> None:
        self.targets = validate_targets(self.targets)
        for name in ("k", "m", "niter", "seed", "keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.k < 2:
            raise ValueError(f"k={self.k} is too small: a codebook needs at least 2 concept vectors; use k >= 2 (the paper uses 128 to 32768)")
        if self.m < 1:
            raise ValueError(f"m={self.m} must be at least 1 (the number of segments per token; the paper uses 32 to 64)")
        if self.niter < 1:
            raise ValueError(f"niter={self.niter} must be at least 1 (k-means iterations; 25 is the usual choice)")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"unknown codebook {self.codebook!r}: use 'separate' (one codebook per segment) or 'shared' (one for all)")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use 'faiss' (default) or 'torch' (no faiss needed, runs on GPU)")
        check_kmeans(self.kmeans, self.backend)
        if self.norms not in NORM_MODES:
            raise ValueError(f"unknown norms {self.norms!r}: use None, 'row' (one length per token) or 'scalar' (one for all)")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: store the codebooks as {', '.join(STORAGE_DTYPES)}")
        if isinstance(self.weights, str) and not self.weights.strip():
            raise ValueError("weights is an empty string: give 'wordfreq', 'wordfreq:LANG', a counts file or an array")
        if self.keep < 0:
            raise ValueError(f"keep={self.keep} must be 0 or more: the number of frequent tokens whose rows stay apart")
        if not isinstance(self.keep_by, str) or not self.keep_by.strip():
            raise ValueError(f"keep_by={self.keep_by!r}: give 'wordfreq', 'wordfreq:LANG' or a counts file")

    @property
    def shared(self) -> bool:
        """True when one codebook serves every segment."""
        return self.codebook == "shared"

    def settings(self) -> dict[str, Any]:
        """The settings that name this compression in tables and reports."""
        return {"k": self.k, "m": self.m, "codebook": self.codebook, **({"norms": self.norms} if self.norms else {}),
                **({"keep": self.keep} if self.keep else {}), **({"dtype": self.dtype} if self.dtype else {})}

    def validate_for(self, num_rows: int, dim: int, what: str = "embedding") -> None:
        """Check that this config fits a (num_rows, dim) table; raise ValueError with the fix otherwise."""
        if dim % self.m:
            choices = [d for d in _divisors(dim) if 8 <= d <= 128] or _divisors(dim)
            raise ValueError(
                f"m={self.m} does not divide the {what} dimension D={dim}: every segment must have D/m values. "
                f"Choose m from the divisors of {dim}, for example {choices}"
            )
        points = num_rows * self.m if self.shared else num_rows
        if self.k > points:
            where = f"the {num_rows}×{self.m} pooled segments" if self.shared else f"the {num_rows} vocabulary rows"
            hint = "" if self.shared else " or use codebook='shared', which pools all V·m segments"
            raise ValueError(
                f"k={self.k} is larger than the number of points to cluster ({where} of the {what}); "
                f"a codebook cannot have more concept vectors than points. Use k <= {points}{hint}"
            )
        if self.keep > num_rows:
            raise ValueError(f"keep={self.keep} is more than the {num_rows} rows of the {what}; use keep <= {num_rows}")

    @classmethod
    def for_budget(cls, method: str, vocab_size: int, dim: int, budget: float, *, by: str = "params",
                   element_size: int = 4, m: int | None = None, **options) -> "ASGConfig":
        """The largest k whose codebooks and norms (and, by bytes, codes packed and values in the stored `dtype`)
        fit the budget, at the given m."""
        allowed, value = cls.budget_units(vocab_size, dim, budget, by, element_size)
        if m is None:
            raise ValueError("an ASG budget needs m, the number of segments")
        if by == "bytes" and options.get("dtype"):
            value = STORAGE_DTYPES[options["dtype"]].itemsize
        width = dim // m if options.get("codebook") == "shared" else dim  # values per concept, over all codebooks
        norms = {"row": vocab_size, "scalar": 1}.get(options.get("norms"), 0) * value  # the lengths it keeps
        keep = options.get("keep", 0)  # kept rows: D int8 values (one parameter each), a scale, an int32 id
        kept = keep * (dim + 1) if by == "params" else keep * (dim + value + 4)
        k = largest(lambda k: k * width * value + norms + kept + vocab_size * m * cls.index_bytes(k, by), 2,
                    vocab_size, allowed)
        if k is None:
            codes = vocab_size * m * cls.index_bytes(2, by) / (vocab_size * dim * value)
            raise ValueError(f"budget {budget:.4%} is too small for ASG with m={m}: not even k=2 concept vectors fit"
                             + (f" (its codes alone take {codes:.2%} of the dense bytes; use a smaller m)" if codes else ""))
        return cls(k=k, m=m, **options)

    @classmethod
    def from_options(cls, method: str, vocab_size: int, dim: int, *, budget: float | None = None, by: str = "params",
                     element_size: int = 4, k: int | None = None, m: int | None = None, **options) -> "ASGConfig":
        """k and m as given; an unset m is `suggest_k_m`'s, an unset k comes from the budget or `suggest_k_m`."""
        default_k, default_m, _ = suggest_k_m(vocab_size, dim)
        m = default_m if m is None else m
        if k is None and budget is not None:
            return cls.for_budget(method, vocab_size, dim, budget, by=by, element_size=element_size, m=m, **options)
        return cls(k=default_k if k is None else k, m=m, **options)
