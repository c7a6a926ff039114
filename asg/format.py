"""The files of an ASG checkpoint: names and format version, the weights file (safetensors, written in a
fixed order with a digest of every tensor), the checks that a folder read from disk passes before any of
it is used, the notice for plain transformers, the `quantization_config` class, and the renaming of a
plan's table places for another class of the same model family.

It imports nothing from asg but `bitpack`: the bottom layer that `surgery`, `checkpoint`, `hf` and `analysis` share.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin
from transformers.quantizers import register_quantization_config

from . import bitpack

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: 3: an ASG table may keep rows apart (kept_ids, kept_rows, kept_scales: ASGConfig.keep); 2: index tables
#: (ASG codes, SG groups) stored packed at ⌈log2 n⌉ bits (asg.bitpack); 1: in whole bytes.
FORMAT_VERSION = 3
METHOD = "asg"  # the quantization method name transformers knows ASG folders by
INDEX_NAME = "asg.safetensors.index.json"
ASG_NOTICE = "this-is-an-ASG-checkpoint--pip-install-asg-and-import-asg-before-from_pretrained.safetensors"
TABLES = ("input", "output")
NORM_MODES = (None, "row", "scalar")  # which lengths an ASG table stores: none, one per row, one for all
#: the precisions a compressed table's values may be stored in (None: as the model holds them)
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL"}
_DIGESTS = "asg_sha256"  # metadata key: {tensor name: SHA-256 of its bytes}, JSON
_PLAN_DIGEST = "asg_plan_sha256"  # metadata key: SHA-256 of the config's `asg` section as written
#: metadata key: {tensor name: {"shape": [...], "bits": b, "dtype": "U16"}} of the index tables stored packed,
#: each under its name + PACKED_SUFFIX as a 1-D U8 tensor in asg.bitpack's layout
PACKED = "asg_packed"
PACKED_SUFFIX = "_packed"
_INTEGER_TYPES = {_DTYPES[t]: t for t in (torch.uint8, torch.int16, torch.uint16, torch.int32)}  # index tables' types
#: In config.json's `asg` section only (never in memory): SHA-256 of the weights file's digest table, so that
#: damage to the file's metadata (which could drop the digests) is caught from the config.
WEIGHTS_DIGEST = "weights_sha256"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in row-major order."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def plan_digest(plan: dict[str, Any]) -> str:
    """SHA-256 of the `asg` section as canonical JSON: what the weights file records of the config it belongs to."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def digest_table(tensors: dict[str, torch.Tensor]) -> str:
    """{tensor name: SHA-256} as the JSON text that a weights file records."""
    return json.dumps({name: tensor_digest(t) for name, t in sorted(tensors.items())}, sort_keys=True)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def in_memory(plan: dict[str, Any]) -> dict[str, Any]:
    """The `asg` section without what only describes one folder's files (for `model.config.asg`)."""
    return {key: value for key, value in plan.items() if key != WEIGHTS_DIGEST}


def write_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  plan: dict[str, Any] | None = None, digests: str | None = None,
                  packed: dict[str, int] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and metadata: names sorted, the header
    in a fixed order (the safetensors writer orders metadata differently from run to run), each tensor's
    SHA-256 (`digests`, from `digest_table`, of the tensors as they are in memory) and the plan's recorded
    so that a damaged file is refused on load instead of read wrongly. `packed` names the index tables to
    store packed, with the bits of each one's entries."""
    metadata = {**metadata, _DIGESTS: digests if digests is not None else digest_table(tensors)}
    if packed:
        tensors = dict(tensors)
        layout = {}
        for name, bits in sorted(packed.items()):
            table = tensors.pop(name)
            layout[name] = {"shape": list(table.shape), "bits": bits, "dtype": _DTYPES[table.dtype]}
            tensors[name + PACKED_SUFFIX] = bitpack.pack(table, bits)
        metadata[PACKED] = json.dumps(layout, sort_keys=True)
    if plan is not None:
        metadata[_PLAN_DIGEST] = plan_digest(plan)
    # Larger elements first keeps every tensor aligned to its element size (the data starts 8-aligned).
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot store tensor {name!r} of type {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name in order:
            handle.write(memoryview(tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()))
        handle.flush()
        os.fsync(handle.fileno())


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (ValueError when the file is missing, truncated or corrupt)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is missing, truncated or corrupt ({err}); save the checkpoint again") from None


def tensor_names(path: Path, derived: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The names of the tensors in a safetensors file, packed ones by the name they unpack to (ValueError
    when the file is missing, truncated or corrupt); `derived` as for `stored_types`."""
    return list(stored_types(path, derived))


def stored_types(path: Path, derived: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """{tensor name: safetensors dtype ("U8", "F32", ...)} from a file's header, without reading the data; a
    packed index table by the name and type it unpacks to. `derived` is the packed layout the config
    implies (`packed_layout` entries), for files whose metadata does not record it."""
    return _header(path, derived)[0]


def _header(path: Path, derived: dict[str, dict[str, Any]] | None) -> tuple[dict[str, str], dict[str, dict]]:
    """(stored types by unpacked name, the packed layout) of a weights file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            layout = packed_layout(dict(handle.metadata() or {}), path)
            types = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is missing, truncated or corrupt ({err}); save the checkpoint again") from None
    for name, entry in (derived or {}).items():
        if name not in layout and name + PACKED_SUFFIX in types:
            layout[name] = entry  # written by transformers' own save_pretrained, which records no layout
        elif name in layout and layout[name] != entry:
            raise ValueError(f"{path}: the {PACKED} metadata of {name!r} ({layout[name]}) is not what the config "
                             f"describes ({entry}); the checkpoint is damaged, save it again")
    for name, entry in layout.items():
        if types.pop(name + PACKED_SUFFIX, None) != "U8":
            raise ValueError(f"{path} holds no U8 tensor {name + PACKED_SUFFIX!r} that its {PACKED} metadata names; "
                             "the checkpoint is damaged, save it again")
        types[name] = entry["dtype"]
    return types, layout


def packed_layout(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"shape", "bits", "dtype"}} of the index tables a weights file stores packed, checked."""
    layout = _json_field(metadata, PACKED, dict, path) or {}
    for name, entry in layout.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(_is_int(n) and n >= 0 for n in shape)
                or not _is_int(entry.get("bits")) or not 1 <= entry["bits"] <= 32
                or entry.get("dtype") not in _INTEGER_TYPES):
            raise ValueError(f"{path}: the {PACKED} metadata of {name!r} is damaged; save the checkpoint again")
    return layout


def unpacked(path: Path, name: str, data: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """The index table `name` from its packed bytes (ValueError when the bytes do not fit its layout)."""
    try:
        return bitpack.unpack(data, tuple(entry["shape"]), entry["bits"], _INTEGER_TYPES[entry["dtype"]])
    except ValueError as err:
        raise ValueError(f"{path}: tensor {name!r}: {err}; the checkpoint is damaged, save it again") from None


def type_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return _DTYPES[dtype]


def read_weights(path: Path, names: list[str] | None = None, expected: str | None = None,
                 derived: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (all, or `names`) and metadata of a safetensors file, each tensor checked against the
    digest recorded when it was written (files written by other tools carry none and are read as they are).
    `expected`, the config's record of the digest table, makes digests required and checks the table.
    Packed index tables are unpacked (their layout recorded in the file, or `derived` from the config)."""
    types, packed = _header(path, derived)
    available = set(types)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            wanted = sorted(available) if names is None else names
            missing = [name for name in wanted if name not in available]
            if missing:
                raise ValueError(f"{path} holds no tensor {missing[0]!r}; the checkpoint is incomplete, save it again")
            state = {name: unpacked(path, name, handle.get_tensor(name + PACKED_SUFFIX), packed[name])
                     if name in packed else handle.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}); save the checkpoint again") from None
    _check_digest_table(metadata, expected, path)
    digests = _json_field(metadata, _DIGESTS, dict, path)
    if digests is not None:
        unknown = sorted(available - set(digests))
        if unknown:
            raise ValueError(f"{path}: tensor {unknown[0]!r} was not written with this file; the file is damaged")
        for name, tensor in state.items():
            if digests[name] != tensor_digest(tensor):
                raise ValueError(f"{path}: tensor {name!r} does not match the checksum recorded when it was "
                                 "written; the file is damaged, save the checkpoint again")
    return state, metadata


def recorded_digests(metadata: dict[str, str], path: Path) -> dict[str, str] | None:
    """{tensor name: SHA-256} that a weights file recorded when it was written; None for other tools' files."""
    return _json_field(metadata, _DIGESTS, dict, path)


def check_plan_digest(metadata: dict[str, str], plan: dict[str, Any], path: Path) -> None:
    """ValueError when the weights file records a different `asg` section than the config holds, or (for a
    config that records the weights' digest table) a different digest table than the config says."""
    _check_digest_table(metadata, plan.get(WEIGHTS_DIGEST), path / WEIGHTS_NAME)
    recorded = metadata.get(_PLAN_DIGEST)
    if recorded is not None and recorded != plan_digest(plan):
        raise ValueError(f"{path / CONFIG_NAME}: the 'asg' section differs from the one {WEIGHTS_NAME} was written "
                         "with; the config was edited or damaged. Restore it, or compress the model again")


def _check_digest_table(metadata: dict[str, str], expected: str | None, path: Path) -> None:
    if expected is not None and (_DIGESTS not in metadata or text_digest(metadata[_DIGESTS]) != expected
                                 or _PLAN_DIGEST not in metadata):
        raise ValueError(f"{path}: the file's checksums are not the ones its config.json records; the file is "
                         "damaged or from another save, save the checkpoint again")


def aliases_of(metadata: dict[str, str], path: Path) -> dict[str, str]:
    """{alias name: stored name} from a weights file's metadata (ValueError when malformed)."""
    aliases = _json_field(metadata, "asg_aliases", dict, path) or {}
    if not all(isinstance(a, str) and isinstance(n, str) for a, n in aliases.items()):
        raise ValueError(f"{path}: the asg_aliases metadata must map tensor names to tensor names")
    return aliases


def _json_field(metadata: dict[str, str], key: str, kind: type, path: Path):
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: the {key} metadata is damaged (not a JSON {kind.__name__}); save the checkpoint again")
    return value


# --- the config's `asg` section -------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """A folder's config.json as a dict (ValueError with the fix when absent, not JSON, or not an object)."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"{path} is not an ASG checkpoint (it has no {CONFIG_NAME}); "
                         "create one with asg.save_pretrained or `asg compress`")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the checkpoint is damaged, save it again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not an object; the checkpoint is "
                         "damaged, save it again")
    return config


def validate_plan(plan: Any, where: str) -> dict[str, Any]:
    """Check the structure of an `asg` section before anything is built from it; ValueError naming the field."""
    def fail(field: str, need: str):
        raise ValueError(f"{where}: the asg section's {field} {need}; the checkpoint is damaged, save it again")

    if not isinstance(plan, dict):
        fail("value", "must be an object")
    version = plan.get("format_version")
    if not _is_int(version) or version < 1:
        fail("format_version", f"must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} was written in ASG format {version}, but this asg reads format {FORMAT_VERSION} "
                         "or older; upgrade asg (pip install -U asg)")
    if not isinstance(plan.get("method", "asg"), str):
        fail("method", "must be a string")
    if not isinstance(plan.get("config", {}), dict):
        fail("config", "must be an object")
    tables = plan.get("tables")
    if not isinstance(tables, dict) or not tables or set(tables) - set(TABLES):
        fail("tables", f"must be an object with an 'input' and/or 'output' entry, got {_short(tables)}")
    for name, entry in tables.items():
        _validate_table(name, entry, fail)
    if tables.get("output", {}).get("tied") and "input" not in tables:
        fail("tables.output.tied", "is true but there is no input table to tie to")
    return plan


def _validate_table(name: str, entry: Any, fail) -> None:
    field = f"tables.{name}"
    if not isinstance(entry, dict):
        fail(field, "must be an object")
    locations = entry.get("locations")
    if not isinstance(locations, list) or not locations or not all(isinstance(p, str) and p for p in locations):
        fail(f"{field}.locations", "must be a non-empty list of module paths")
    if not isinstance(entry.get("kind", "asg"), str):
        fail(f"{field}.kind", "must be a string")
    for key in ("num_embeddings", "embedding_dim"):
        if not _is_int(entry.get(key)) or entry[key] < 1:
            fail(f"{field}.{key}", f"must be a positive integer, got {_short(entry.get(key))}")
    for key in ("value_count", "index_bytes", "storage_bytes"):
        if not _is_int(entry.get(key)) or entry[key] < 0:
            fail(f"{field}.{key}", f"must be a non-negative integer, got {_short(entry.get(key))}")
    if entry.get("storage_dtype") is not None and entry["storage_dtype"] not in STORAGE_DTYPES:
        fail(f"{field}.storage_dtype", f"must be null or one of {sorted(STORAGE_DTYPES)}")
    for key in ("index_bytes_on_disk", "disk_bytes"):  # recorded since format 2
        if key in entry and (not _is_int(entry[key]) or entry[key] < 0):
            fail(f"{field}.{key}", f"must be a non-negative integer, got {_short(entry.get(key))}")
    if entry.get("padding_idx") is not None and not _is_int(entry["padding_idx"]):
        fail(f"{field}.padding_idx", "must be an integer or null")
    scale = entry.get("embed_scale")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale)):
        fail(f"{field}.embed_scale", "must be a finite number or null")
    if name == "output":
        for key in ("tied", "bias"):
            if not isinstance(entry.get(key), bool):
                fail(f"{field}.{key}", "must be true or false")
    if entry.get("kind") == "sg" and (not _is_int(entry.get("num_groups")) or entry["num_groups"] < 1):
        fail(f"{field}.num_groups", f"must be a positive integer, got {_short(entry.get('num_groups'))}")
    group = entry.get("group_size")
    if group is not None and (not _is_int(group) or group < 1 or entry["embedding_dim"] % group):
        fail(f"{field}.group_size", f"must be null or a positive divisor of embedding_dim, got {_short(group)}")
    if entry.get("kind", "asg") == "asg":
        for key in ("k", "m"):
            if not _is_int(entry.get(key)) or entry[key] < 1:
                fail(f"{field}.{key}", f"must be a positive integer, got {_short(entry.get(key))}")
        if entry["embedding_dim"] % entry["m"]:
            fail(f"{field}.m", f"({entry['m']}) must divide embedding_dim ({entry['embedding_dim']})")
        if not isinstance(entry.get("shared"), bool):
            fail(f"{field}.shared", "must be true or false")
        if entry.get("norms") not in NORM_MODES:
            fail(f"{field}.norms", "must be null, 'row' or 'scalar'")
        if entry["k"] > (1 << 31) - 1:
            fail(f"{field}.k", "is too large")
        keep = entry.get("keep", 0)  # recorded since format 3
        if not _is_int(keep) or not 0 <= keep <= entry["num_embeddings"]:
            fail(f"{field}.keep", f"must be an integer in 0..num_embeddings, got {_short(keep)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- what plain transformers reads ----------------------------------------------------------------


@register_quantization_config(METHOD)
class ASGQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of an ASG folder; the tables themselves are described by the config's `asg` section."""

    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs) -> None:
        self.quant_method = METHOD
        self.format_version = format_version
        self.note = "Aggregate Semantic Grouping checkpoint: pip install asg, then import asg before from_pretrained"

    def to_dict(self) -> dict:
        return {"quant_method": METHOD, "format_version": self.format_version, "note": self.note}


def write_notice_index(folder: Path, tensor_names: list[str]) -> None:
    """The index that plain transformers reads instead of the weights (see the module docstring)."""
    index = {"metadata": {"note": ASGQuantizationConfig().note},
             "weight_map": {name: ASG_NOTICE for name in tensor_names}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


# --- another class of the same family -------------------------------------------------------------


def renamer(model: nn.Module, saved_class, state: dict[str, Any]):
    """Map names of one class of a model family to another (the same base model, other heads), as
    transformers does through `base_model_prefix`; None for a head the new class does not share."""
    prefix = getattr(saved_class, "base_model_prefix", "") or ""
    saved_wrapped = bool(prefix) and any(key.startswith(prefix + ".") for key in state)
    target_wrapped = bool(prefix) and base_prefix(model) == prefix

    def rename(name: str) -> str | None:
        if saved_wrapped and not name.startswith(prefix + "."):
            return name if target_wrapped else None  # a head of the saved class: kept only where names match
        base = name[len(prefix) + 1:] if saved_wrapped else name
        return f"{prefix}.{base}" if target_wrapped else base

    return rename


def adapt_plan(plan, model: nn.Module, saved_class, state, path: Path) -> dict[str, Any]:
    """The plan with its table places renamed for `model`; a table it has no place for is left out."""
    rename = renamer(model, saved_class, state)
    modules = {n for n, _ in model.named_modules(remove_duplicate=False)}
    tables = {}
    for name, entry in plan["tables"].items():
        places = [p for p in (rename(loc) for loc in entry["locations"]) if p in modules]
        if places:
            tables[name] = {**entry, "locations": places}
        elif name == "input":
            raise ValueError(f"{path}: {type(model).__name__} has no place for the compressed input table "
                             f"{entry['locations']}; load it with the architecture it was saved from")
    return {**plan, "tables": tables}


def base_prefix(model: nn.Module) -> str:
    """The attribute under which a task model holds its base model ('bert', 'transformer'...), or ''."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return prefix if prefix and getattr(model, prefix, None) is not None and getattr(model, prefix) is not model else ""
