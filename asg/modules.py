"""Torch modules that stand in for a dense token table: `ASGEmbedding` (input) and `ASGHead` (output logits).

`CompressedEmbedding` is what every compressed table shares (ASG here, the baselines in
`asg.baselines`): a lookup of the rows asked for, the reconstructed `weight`, the scale some
architectures apply after the lookup, and a `spec` from which an empty twin can be rebuilt on load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import bitpack, kernels, pq
from .fastpaths import FastPaths, VersionCache
from .config import ASGConfig
from .format import NORM_MODES, STORAGE_DTYPES
from .methods import register
from .pq import code_dtype

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16,
                 np.dtype(np.uint16): torch.uint16, np.dtype(np.int32): torch.int32}


def index_dtype(n: int) -> torch.dtype:
    """The smallest torch integer dtype that holds the indices 0..n-1 (uint8 for n <= 256)."""
    return _TORCH_DTYPES[code_dtype(n)]


class CompressedEmbedding(nn.Module):
    """A (V, D) token table computed from compact state. Subclasses set `kind` (their method's name) and
    define `lookup` and `weight`.

    Where the replaced embedding scaled its output (Gemma's √D `embed_scale`), the same scale is
    applied after the lookup; the head, which reads `weight`, is not scaled, as in the original.
    """

    kind: ClassVar[str] = ""  # the table kind a checkpoint records: the name of the method that made it
    aliases: ClassVar[tuple[str, ...]] = ()  # more table kinds the class stands for, and older names it still loads
    kinds: ClassVar[dict[str, type["CompressedEmbedding"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for kind in (cls.kind, *cls.aliases) if cls.kind else ():
            CompressedEmbedding.kinds[kind] = cls

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 embed_scale: float | torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx  # kept for code that reads it; rows are shared, so it is not masked
        # A number, not a buffer: models built on the meta device (transformers' loading) never fill
        # non-persistent buffers that they do not know.
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.storage_dtype: torch.dtype | None = None  # the precision files store the values in; None: as held

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows (..., D) of the reconstructed table for ids (...,), computed from only the state they need."""
        raise NotImplementedError

    # One table may sit at several places of a model (T5's shared/encoder/decoder tables, a tied head).
    # Its tensors then appear in the state dict once, at the first place, so that every writer (ours,
    # transformers', Trainer's) stores them once and every loader finds them there.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        saved = getattr(destination, "_asg_saved_tables", None)
        if saved is None:
            saved = set()
            try:  # torch's own state dicts are OrderedDicts that take attributes; a plain dict falls back below
                destination._asg_saved_tables = saved
            except AttributeError:
                if any(_same_storage(t, v) for t in self._parameters.values() for v in destination.values()):
                    return
        if id(self) in saved:
            return  # already saved at an earlier place
        saved.add(id(self))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = list(self._parameters) + [n for n in self._buffers if n not in self._non_persistent_buffers_set]
        if not any(prefix + name in state_dict for name in names):
            return  # a later place of a table loaded at its first place
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed (V, D) table (computed, not stored; differentiable)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kernels.check_ids(input_ids, self.num_embeddings)
        out = self.lookup(input_ids)
        if self.embed_scale is not None:  # as Gemma does: the scale as float32, then in the table's dtype
            out = out * torch.tensor(self.embed_scale, dtype=torch.float32, device=out.device).to(out.dtype)
        return out

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (..., V) of hidden states (..., D) against every row of the table, plus `bias`: what a head computes."""
        return F.linear(hidden, self.weight, bias)

    def lookup_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores (..., V) computed from the compact state without rebuilding the table (eq. 2 for ASG);
        a table kind without such a path says so."""
        raise NotImplementedError(f"{type(self).__name__} has no lookup-table logits; use logits(hidden)")

    def spec(self) -> dict[str, Any]:
        """What `from_spec` needs to build an empty module of the same shape (JSON-ready)."""
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "embed_scale": self.embed_scale, "value_count": self.value_count(),
                "index_bytes": self.index_bytes(), "storage_bytes": self.storage_bytes(),
                "index_bytes_on_disk": self.index_bytes_on_disk(), "disk_bytes": self.disk_bytes(),
                "storage_dtype": None if self.storage_dtype is None else str(self.storage_dtype).removeprefix("torch.")}

    @staticmethod
    def from_spec(spec: dict[str, Any], *, dtype=None, device=None, embed_scale=None) -> "CompressedEmbedding":
        """An empty module of the kind and shape `spec` records, to load saved state into."""
        kind = spec.get("kind", "asg")
        if kind not in CompressedEmbedding.kinds:
            raise ValueError(f"unknown compressed table kind {kind!r}; known kinds are {sorted(CompressedEmbedding.kinds)}")
        module = CompressedEmbedding.kinds[kind].empty(spec, dtype=dtype, device=device, embed_scale=embed_scale)
        module.storage_dtype = STORAGE_DTYPES.get(spec.get("storage_dtype"))
        return module

    @classmethod
    def empty(cls, spec: dict[str, Any], *, dtype=None, device=None, embed_scale=None) -> "CompressedEmbedding":
        raise NotImplementedError

    def validate(self) -> None:
        """ValueError naming the tensor when the state is not a usable table (checked after loading a file):
        every floating-point tensor must be finite. Subclasses add their shapes, types and index ranges."""
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"tensor {name!r} holds NaN or infinite values")

    def resize_(self, count: int, mean_resizing: bool = True) -> None:
        """Change the vocabulary to `count` tokens in place (ASG tables only; others say what to do instead)."""
        raise ValueError(f"resize_token_embeddings supports ASG tables, not {type(self).__name__}: resize the "
                         "dense model first (model.resize_token_embeddings, then asg.compress)")

    def value_count(self) -> int:
        """How many numbers define the table's values (trainable or frozen), index tables excluded."""
        return sum(p.numel() for p in self.parameters())

    def index_tables(self) -> dict[str, int]:
        """{buffer name: how many values its entries index} of the fixed token→index tables (ASG codes: k,
        SG groups: the number of groups), which files store packed at ⌈log2 n⌉ bits (asg.bitpack)."""
        return {}

    def index_bits(self) -> dict[str, int]:
        """{buffer name: bits per entry} of the index tables as files store them: ⌈log2 n⌉."""
        return {name: bitpack.bits_for(count) for name, count in self.index_tables().items()}

    def index_bytes(self) -> int:
        """Bytes of the fixed token→index tables (ASG codes, SG groups) in memory; 0 where there are none."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self.index_tables())

    def storage_bytes(self) -> int:
        """Bytes of everything the module saves, as it holds them in memory."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def index_bytes_on_disk(self) -> int:
        """Bytes of the index tables as an ASG folder stores them: packed at ⌈log2 n⌉ bits."""
        return sum(bitpack.packed_size(getattr(self, name).numel(), bits) for name, bits in self.index_bits().items())

    def disk_bytes(self) -> int:
        """Bytes of everything the module saves, as an ASG folder stores them: index tables packed, values
        in `storage_dtype`."""
        values = sum(self._stored_size(t) for name, t in self.state_dict().items() if name not in self.index_tables())
        return values + self.index_bytes_on_disk()

    def _stored_size(self, tensor: torch.Tensor) -> int:
        """Bytes of one saved value tensor as an ASG folder stores it: floating-point ones in `storage_dtype`."""
        size = self.storage_dtype.itemsize if self.storage_dtype and tensor.is_floating_point() else tensor.element_size()
        return tensor.numel() * size

    def round_to_storage_(self, dtype: torch.dtype | None) -> None:
        """Store values in `dtype` from now on, rounding them to it now, so that files hold them exactly."""
        self.storage_dtype = dtype
        if dtype is not None:
            with torch.no_grad():
                for name, parameter in self.named_parameters():
                    rounded = parameter.to(dtype)
                    if not bool(torch.isfinite(rounded).all()):
                        raise ValueError(f"the {name} values exceed the range of {dtype}; store them as bfloat16 "
                                         "or float32")
                    parameter.copy_(rounded.to(parameter.dtype))


def _same_storage(a: torch.Tensor, b) -> bool:
    return (isinstance(b, torch.Tensor) and not a.is_meta and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.dtype == b.dtype)


class ASGEmbedding(CompressedEmbedding):
    """A token embedding built from shared concept vectors (paper eq. 1).

    Token t is the concatenation of m concept vectors, row `concept_ids()[t, i]` of `codebooks` for
    segment i. `codebooks` is the trainable E': (m·k, D/m) for separate codebooks, (k, D/m) shared.
    `codes` (V, m) is a fixed buffer in the smallest integer type that holds k, never trained.

    Norm-preserving reconstruction: the *norm mode* (`norm_mode`, the config's and CLI's `norms`
    setting) says which lengths are stored; the stored lengths themselves are the trainable `norms`,
    one per row (mode "row") or one for all rows (mode "scalar"). The concepts then give each row's
    direction and `norms` its length.

    Kept rows: the tokens `kept_ids` (sorted) keep rows of their own instead, `kept_rows` (int8, one row per
    kept token) times `kept_scales`; everything else (codes, norms) still exists for them but is not read.
    All three are fixed buffers: calibration and fine-tuning train the concepts.

    On the CPU in float32 the C kernels do the work (`asg.fastpaths`); everywhere else, plain torch.
    """

    kind = "asg"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        k: int,
        m: int,
        shared: bool = False,
        padding_idx: int | None = None,
        embed_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        norms: str | None = None,
        keep: int = 0,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, embed_scale)
        if norms not in NORM_MODES:
            raise ValueError(f"unknown norm mode {norms!r}: use None, 'row' or 'scalar'")
        if embedding_dim % m:
            raise ValueError(f"m={m} does not divide embedding_dim={embedding_dim}")
        self.k = k
        self.m = m
        self.shared = shared
        rows = k if shared else m * k
        self.codebooks = nn.Parameter(torch.zeros(rows, embedding_dim // m, dtype=dtype, device=device))
        self.register_buffer("codes", torch.zeros(num_embeddings, m, dtype=index_dtype(k), device=device))
        self.norm_mode = norms
        size = num_embeddings if norms == "row" else 1
        self.norms = nn.Parameter(torch.ones(size, dtype=dtype, device=device)) if norms else None
        if keep:  # a table without kept rows has no such tensors, so its state is what format 2 stored
            self._register_kept(torch.zeros(keep, dtype=torch.int32, device=device),
                                torch.zeros(keep, embedding_dim, dtype=torch.int8, device=device),
                                torch.zeros(keep, dtype=torch.float32, device=device))
        self._codes_checked = VersionCache()  # the code table last found in 0..k-1
        self.fast = FastPaths()

    @classmethod
    def from_pq(cls, codebooks, codes, *, norms=None, dtype=None, device=None, **kwargs) -> "ASGEmbedding":
        """Build from `pq.fit` output: codebooks (m, k, D/m) or shared (k, D/m), codes (V, m); `norms`, if
        given, are the stored lengths: one per row (V,) or one for all (1,)."""
        codebooks = torch.as_tensor(codebooks)
        codes = codes.long() if isinstance(codes, torch.Tensor) else torch.from_numpy(np.asarray(codes, dtype=np.int64))
        shared = codebooks.dim() == 2
        k = codebooks.shape[0] if shared else codebooks.shape[1]
        m = codes.shape[1]
        mode = None if norms is None else "row" if len(norms) == codes.shape[0] and len(norms) > 1 else "scalar"
        module = cls(codes.shape[0], m * codebooks.shape[-1], k, m, shared=shared,
                     dtype=dtype or codebooks.dtype, device=device, norms=mode, **kwargs)
        with torch.no_grad():
            module.codebooks.copy_(codebooks.reshape(module.codebooks.shape))
            module.codes.copy_(codes.to(module.codes.dtype))
            if norms is not None:
                module.norms.copy_(torch.as_tensor(norms).reshape(module.norms.shape))
        return module

    def set_norms_(self, mode: str | None, lengths: torch.Tensor) -> None:
        """Switch to norm mode `mode`, storing the lengths it keeps of `lengths` (V,), the original rows'
        lengths: each of them ("row"), their mean ("scalar"), or none (None)."""
        if mode not in NORM_MODES:
            raise ValueError(f"unknown norm mode {mode!r}: use None, 'row' or 'scalar'")
        self.norm_mode = mode
        if mode is None:
            self.norms = None
            return
        kept = lengths if mode == "row" else lengths.mean().reshape(1)
        self.norms = nn.Parameter(kept.detach().to(self.codebooks.dtype).to(self.codebooks.device).clone())

    def keep_rows_(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep `rows` (n, D) of the tokens `ids` (n,) apart from the concepts, each rounded to int8 with one
        scale (its largest magnitude / 127, so every value is within scale / 2 of the original)."""
        ids = torch.as_tensor(ids).reshape(-1).long()
        kernels.check_ids(ids, self.num_embeddings)
        order = torch.argsort(ids)
        ids, rows = ids[order], rows.detach().float()[order.to(rows.device)]
        if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("the kept token ids repeat a token; give each once")
        scales = rows.abs().amax(1) / 127
        if self.storage_dtype is not None:  # files store the scales in the values' precision: round them now
            scales = scales.to(self.storage_dtype).float()
        quantized = torch.round(rows / scales.clamp_min(1e-30)[:, None]).clamp(-127, 127)
        device = self.codes.device
        self._register_kept(ids.to(torch.int32).to(device), quantized.to(torch.int8).to(device), scales.to(device))

    def _register_kept(self, ids: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor) -> None:
        self.register_buffer("kept_ids", ids)
        self.register_buffer("kept_rows", rows)
        self.register_buffer("kept_scales", scales)

    @property
    def kept_count(self) -> int:
        """How many tokens keep rows of their own (0: every row comes from the concepts)."""
        ids = self._buffers.get("kept_ids")
        return 0 if ids is None else ids.shape[0]

    def kept_bytes_on_disk(self) -> int:
        """Bytes of the kept rows as a folder stores them: ids, int8 values and scales (0 without kept rows)."""
        if not self.kept_count:
            return 0
        return sum(self._stored_size(t) for t in (self.kept_ids, self.kept_rows, self.kept_scales))

    def kept_weight(self) -> torch.Tensor:
        """The kept rows (n, D) as float32: int8 values times their scales."""
        return self.kept_rows.float() * self.kept_scales.float()[:, None]

    def _with_kept(self, rows: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """`rows` (of `ids`, every token when None) with the kept tokens' rows put in (out of place, so that
        gradients still reach the concepts of the others)."""
        if not self.kept_count:
            return rows
        kept = self.kept_weight().to(rows.dtype)
        kept_ids = self.kept_ids.long()
        if ids is None:
            return rows.index_copy(0, kept_ids, kept)
        flat = ids.reshape(-1).long()
        slot = torch.searchsorted(kept_ids, flat).clamp_max(self.kept_count - 1)
        return torch.where((kept_ids[slot] == flat)[:, None], kept[slot], rows)

    def _kept_logits(self, logits: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of hidden states `flat` (N, D) with the kept tokens' columns scored on their rows."""
        if self.kept_count:
            logits[:, self.kept_ids.long()] = flat @ self.kept_weight().to(flat.dtype).T
        return logits

    def round_to_storage_(self, dtype: torch.dtype | None) -> None:
        super().round_to_storage_(dtype)
        if dtype is not None and self.kept_count:
            self.kept_scales = self.kept_scales.to(dtype).float()

    @classmethod
    def empty(cls, spec, *, dtype=None, device=None, embed_scale=None) -> "ASGEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["k"], spec["m"], shared=spec["shared"],
                   padding_idx=spec.get("padding_idx"), embed_scale=embed_scale, dtype=dtype, device=device,
                   norms=spec.get("norms"), keep=spec.get("keep", 0))

    @property
    def segment_dim(self) -> int:
        """D/m, the width of one concept vector."""
        return self.embedding_dim // self.m

    def concept_ids(self) -> torch.Tensor:
        """The paper's ConceptIDs (V, m) long: row i·k + s_i of E' (s_i itself for a shared codebook)."""
        return self.checked_codes().long() + self._offsets()

    def checked_codes(self) -> torch.Tensor:
        """`codes`, after making sure (once per change of the buffer) that every code lies in 0..k-1: a code
        outside would read another segment's concepts, or memory outside the codebooks in the C kernels."""
        codes = self.codes
        self._codes_checked.get((codes,), lambda: kernels.check_codes(codes, self.k))
        return codes

    def validate(self) -> None:
        """Codes in 0..k-1, kept ids increasing within 0..V-1, non-negative scales and finite values
        (ValueError naming the tensor)."""
        try:
            self.checked_codes()
        except ValueError as err:
            raise ValueError(f"tensor 'codes': {err}") from None
        if self.kept_count:
            ids = self.kept_ids.long()
            if int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings:
                raise ValueError(f"tensor 'kept_ids': ids must lie in 0..{self.num_embeddings - 1}")
            if not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError("tensor 'kept_ids': ids must be strictly increasing")
            if bool((self.kept_scales < 0).any()):
                raise ValueError("tensor 'kept_scales': scales must not be negative")
        super().validate()

    def _offsets(self) -> torch.Tensor:
        """i·k for each segment i: where segment i's codebook starts in E' (all 0 for a shared codebook)."""
        return torch.arange(self.m, device=self.codes.device) * (0 if self.shared else self.k)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(None)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids).reshape(*input_ids.shape, self.embedding_dim)

    def rows(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Reconstructed rows (n, D) of `ids` (every token when None), row lengths applied."""
        codes = self.checked_codes()
        if ids is not None:
            kernels.check_ids(ids, self.num_embeddings)
        if FastPaths.applies(self.codebooks):
            rows = self.fast.rows(self, ids)
        else:
            concept_ids = self.concept_ids() if ids is None else codes[ids.reshape(-1)].long() + self._offsets()
            rows = F.embedding(concept_ids, self.codebooks).flatten(-2)
        rows = rows if self.norms is None else rows * self.row_scale(ids)[:, None]
        return self._with_kept(rows, ids)

    def row_scale(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Stored length / concatenated length, per row of `ids` (every token when None): the factor that
        norm-preserving reconstruction applies. ||row||² is the sum of its concept vectors' squared norms."""
        if ids is not None:
            ids = ids.reshape(-1)
            kernels.check_ids(ids, self.num_embeddings)
            squared = self.codebooks.square().sum(-1)[self.checked_codes()[ids].long() + self._offsets()].sum(-1)
            return (self.norms[ids] if self.norm_mode == "row" else self.norms) / squared.clamp_min(1e-24).sqrt()
        if torch.is_grad_enabled() and (self.codebooks.requires_grad or self.norms.requires_grad):
            return self.norms / self._squared_lengths().clamp_min(1e-24).sqrt()

        def compute() -> torch.Tensor:
            with torch.no_grad():
                return self.norms / self._squared_lengths().clamp_min(1e-24).sqrt()

        return self.fast.row_scale(self, compute)

    def _squared_lengths(self) -> torch.Tensor:
        """||row||² of every row (V,)."""
        if FastPaths.applies(self.codebooks):
            return self.fast.squared_lengths(self)
        return self.codebooks.square().sum(-1)[self.concept_ids()].sum(-1)

    def logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (..., V) plus `bias`. On CPU in float32 without autograd, the kernels' eq. 2 or
        rebuild-then-matmul, whichever `FastPaths` finds faster for the batch size; elsewhere, the
        differentiable matmul."""
        grad = torch.is_grad_enabled() and (hidden.requires_grad or self.codebooks.requires_grad)
        if grad or hidden.device.type != "cpu" or hidden.dtype != torch.float32 or not FastPaths.applies(self.codebooks):
            return F.linear(hidden, self.weight, bias)
        flat = hidden.reshape(-1, self.embedding_dim)
        out = self._kept_logits(self.fast.logits(self, flat), flat)
        if bias is not None:
            out += bias
        return out.reshape(*hidden.shape[:-1], self.num_embeddings)

    def lookup_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Eq. 2 in torch: score each segment of hidden against its codebook, then sum the m scores each token picks."""
        flat = hidden.reshape(-1, self.embedding_dim)
        tables = self.segment_scores(flat).reshape(flat.shape[0], -1)
        rows = self.checked_codes().long() + torch.arange(self.m, device=hidden.device) * self.k  # (V, m) into the m·k scores
        logits = tables[:, rows].sum(-1)
        if self.norms is not None:
            logits = logits * self.row_scale()
        logits = self._kept_logits(logits, flat)
        return logits.reshape(*hidden.shape[:-1], self.num_embeddings)

    def segment_scores(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, m, k): the dot product of each segment of each row of `flat` (N, D) with every concept
        vector it may use (the per-segment lookup tables of eq. 2)."""
        segments = flat.reshape(-1, self.m, self.segment_dim)
        if self.shared:
            return torch.einsum("nsd,kd->nsk", segments, self.codebooks)
        return torch.einsum("nsd,skd->nsk", segments, self.codebooks.view(self.m, self.k, self.segment_dim))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "k": self.k, "m": self.m, "shared": self.shared, "norms": self.norm_mode,
                "keep": self.kept_count, "codebooks_shape": list(self.codebooks.shape),
                "code_dtype": str(self.codes.dtype).replace("torch.", "")}

    def index_tables(self) -> dict[str, int]:
        return {"codes": self.k}

    def value_count(self) -> int:
        """The concepts and norms, and each kept row's D values and scale."""
        kept = self.kept_rows.numel() + self.kept_scales.numel() if self.kept_count else 0
        return super().value_count() + kept

    def resize_(self, count: int, mean_resizing: bool = True) -> None:
        """Keep the first `count` tokens, or add tokens whose codes encode an initial vector (drawn from the
        old rows' mean and covariance, or their mean with `mean_resizing=False`) against the existing
        codebooks; with row lengths, new rows get the mean length."""
        old = self.num_embeddings
        codes = self.codes
        if count <= old:
            self.codes = codes[:count].clone()
        else:
            with torch.no_grad():
                rows = self.weight.float()
                mean = rows.mean(0)
                extra = mean.expand(count - old, -1)
                if mean_resizing:
                    covariance = torch.cov(rows.T) + 1e-6 * torch.eye(rows.shape[1], device=rows.device)
                    extra = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((count - old,))
                codebooks = self.codebooks.detach().float()
                if not self.shared:
                    codebooks = codebooks.view(self.m, self.k, self.segment_dim)
                new_codes = torch.as_tensor(pq.encode(codebooks, extra.cpu())).to(codes.device, codes.dtype)
            self.codes = torch.cat([codes, new_codes])
        if self.kept_count:
            inside = self.kept_ids < count
            self.kept_ids, self.kept_rows = self.kept_ids[inside], self.kept_rows[inside]
            self.kept_scales = self.kept_scales[inside]
        if self.norm_mode == "row":
            with torch.no_grad():
                kept = self.norms.data[:count]
                fill = kept.mean().expand(max(0, count - len(kept)))
                self.norms = nn.Parameter(torch.cat([kept, fill]), requires_grad=self.norms.requires_grad)
        self.num_embeddings = count

    def extra_repr(self) -> str:
        kind = "shared" if self.shared else "separate"
        norms = f", norms={self.norm_mode}" if self.norm_mode else ""
        kept = f", kept rows={self.kept_count}" if self.kept_count else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, k={self.k}, m={self.m}, codebook={kind}{norms}{kept}"


class ASGHead(nn.Module):
    """Output logits from a compressed table, plus the original head's bias.

    With an `ASGEmbedding` this is the paper's eq. 2, l_t = Σ_i H_i · u_{t,i}. For a head tied to the
    input table, `embedding` is the very module of the input side (one module, stored once); an
    untied head has its own (the paper's OE').
    """

    def __init__(self, embedding: CompressedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.bias = bias
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed (V, D) head matrix (computed, not stored)."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) for hidden states (..., D)."""
        return self.embedding.logits(hidden, self.bias)

    def resize_(self, count: int) -> None:
        """Follow the table's new vocabulary size: `out_features`, and the bias cut or padded with zeros."""
        self.out_features = count
        if self.bias is not None:
            old = self.bias.data
            bias = torch.zeros(count, dtype=old.dtype, device=old.device)
            bias[: min(len(old), count)] = old[:count]
            self.bias.data = bias

    @property
    def approximate(self) -> bool:
        """Score batches of one or two hidden states with 8-bit lookup tables (ASG tables, k <= 1024, on a CPU
        with AVX-512 VBMI; elsewhere this changes nothing): 2.8-3.7x faster than the exact lookups at batch 1
        (benchmarks/RESULTS.md). Every logit is within m · step / 2 of eq. 2 (step: the largest segment
        table's range / 255), and the tokens that could be the top one within that bound are scored exactly,
        so greedy decoding picks the same tokens."""
        fast = getattr(self.embedding, "fast", None)
        return bool(fast and fast.approximate)

    @approximate.setter
    def approximate(self, value: bool) -> None:
        if not hasattr(self.embedding, "fast"):
            raise ValueError(f"approximate logits need an ASG table, not {type(self.embedding).__name__}")
        self.embedding.fast.approximate = bool(value)

    def lookup_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Eq. 2 computed segment by segment (ASG tables only); equal to `forward` up to rounding."""
        logits = self.embedding.lookup_logits(hidden)
        return logits if self.bias is None else logits + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@register(ASGConfig, "asg")
def fit_asg(config: ASGConfig, weight: torch.Tensor, name: str, progress: bool, weights=None, kept_ids=None,
             **kwargs) -> tuple[ASGEmbedding, float]:
    """Product-quantize `weight` (V, D) into an `ASGEmbedding` (with the row lengths `config.norms` asks for);
    `weights` makes k-means count each row by its token's frequency; the rows of `kept_ids` are kept apart
    in int8. Returns it and its relative error."""
    if weights is not None and len(weights) != weight.shape[0]:
        raise ValueError(f"the {name} table has {weight.shape[0]} rows but the weights have {len(weights)}; "
                         "compress that table unweighted (targets) or give weights for its vocabulary")
    fit = pq.fit(weight, config.k, config.m, codebook=config.codebook, niter=config.niter, seed=config.seed,
                 backend=config.backend, progress=progress, desc=f"k-means {name}", weights=weights,
                 kmeans=config.kmeans)
    module = ASGEmbedding.from_pq(fit.codebooks, fit.codes, dtype=weight.dtype, device=weight.device, **kwargs)
    module.set_norms_(config.norms, torch.linalg.vector_norm(weight.detach().float(), dim=1))
    module.round_to_storage_(STORAGE_DTYPES.get(config.dtype))
    if kept_ids is not None and len(kept_ids):
        ids = torch.as_tensor(kept_ids)
        ids = ids[ids < weight.shape[0]]  # an untied head may have fewer rows than the input table
        module.keep_rows_(ids, weight.detach()[ids.to(weight.device)])
    ids = torch.arange(weight.shape[0], device=weight.device)
    with torch.no_grad():  # block by block, so that no second full table is built
        error = pq.relative_error(weight, lambda rows: module.rows(ids[rows]))
    return module, error
