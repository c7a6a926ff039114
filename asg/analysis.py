"""Read a compressed checkpoint without building the model: the paper's parameter tables and concept neighbours."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import format as fmt, kernels, pq
from .checkpoint import packed_layout, read_plan
from .format import WEIGHTS_NAME
from .methods import config_from_plan
from .modules import CompressedEmbedding


def parameter_table(path: str | os.PathLike) -> dict[str, Any]:
    """Table 5 / appendices B–C of the paper for one checkpoint: per replaced table and for the whole model."""
    plan = read_plan(path)
    weights = Path(path) / WEIGHTS_NAME
    fmt.check_plan_digest(fmt.read_metadata(weights), plan, Path(path))
    report = plan.get("report", {})
    tables = []
    for name, entry in plan["tables"].items():
        if entry.get("tied"):
            continue  # a tied head is the input table itself, listed once
        vocab, dim = entry["num_embeddings"], entry["embedding_dim"]
        float32 = vocab * dim * 4
        memory = entry["storage_bytes"]
        empty = CompressedEmbedding.from_spec(entry, device="meta")
        index_on_disk = empty.index_bytes_on_disk()
        # what format 2 stores (recorded since then); format 1 stored `memory`
        disk = entry.get("disk_bytes", memory - entry["index_bytes"] + index_on_disk)
        row = {
            "table": name,
            "tied_head": name == "input" and bool(plan["tables"].get("output", {}).get("tied")),
            "kind": entry.get("kind", "asg"),
            "vocab_size": vocab,
            "dim": dim,
            "dense_params": vocab * dim,
            "params": entry["value_count"],
            "embedding_percent": 100.0 * entry["value_count"] / (vocab * dim),
            "index_bytes": entry["index_bytes"],
            "disk_bytes": disk,
            "disk_percent_float32": 100.0 * disk / float32,
            "disk_percent_bf16": 200.0 * disk / float32,
            "memory_bytes": memory,
            "memory_percent_float32": 100.0 * memory / float32,
            "memory_percent_bf16": 200.0 * memory / float32,
            "reconstruction_error": report.get("reconstruction_error", {}).get(name),
        }
        if row["kind"] == "asg":
            k, m = entry["k"], entry["m"]
            row.update({
                "k": k,
                "m": m,
                "codebook": "shared" if entry["shared"] else "separate",
                "embedding_shape": entry["codebooks_shape"],
                "code_dtype": entry["code_dtype"],
                "code_bytes": entry["index_bytes"],
                "code_bytes_packed": index_on_disk,
                "code_overhead_percent": 100.0 * index_on_disk / float32,  # appendix C: packed codes / float32 table
                "code_memory_percent": 100.0 * entry["index_bytes"] / float32,
            })
            if empty.kept_count:
                kept_bytes = empty.kept_bytes_on_disk()
                row.update(kept_rows=empty.kept_count, kept_bytes=kept_bytes, kept_percent=100.0 * kept_bytes / float32)
        tables.append(row)
    out = {
        "path": str(path),
        "method": plan.get("method", "asg"),
        "settings": config_from_plan(plan).settings(),
        "format_version": plan["format_version"],
        "asg_version": plan.get("asg_version"),
        "source_model": plan.get("source_model"),
        "tables": tables,
    }
    if report:
        out.update({key: report[key] for key in ("embedding_params_before", "embedding_params_after",
                                                 "model_params_before", "model_params_after")})
        out.update(embedding_percent=100.0 * report["embedding_ratio"], model_percent=100.0 * report["model_ratio"])
    return out


def load_table(path: str | os.PathLike, table: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """Codebooks (m, k, D/m) or shared (k, D/m) and codes (V, m) of one replaced table ("input" or "output"),
    read from the weights file alone."""
    plan = read_plan(path)
    tables = plan["tables"]
    if table not in tables:
        raise ValueError(f"{path} has no compressed {table} table; it has {sorted(tables)}")
    if tables[table].get("kind", "asg") != "asg":
        raise ValueError(f"{path} holds a {plan.get('method')} table, not ASG concepts; inspect reads ASG checkpoints")
    # A tied head's tensors are the input's, stored once under whichever name came first.
    prefixes = [loc + ".embedding" for loc in tables[table]["locations"]] if table == "output" else []
    if table == "input" or tables[table].get("tied"):
        prefixes += tables["input"]["locations"]
    entry = tables[table]
    weights = Path(path) / WEIGHTS_NAME
    derived = packed_layout(plan)
    names = set(fmt.tensor_names(weights, derived))
    prefix = next((p for p in prefixes if f"{p}.codes" in names), None)
    if prefix is None:
        raise ValueError(f"{weights} holds no code table for {table} (looked under {prefixes})")
    state, metadata = fmt.read_weights(weights, [f"{prefix}.codebooks", f"{prefix}.codes"],
                                       expected=plan.get(fmt.WEIGHTS_DIGEST), derived=derived)
    fmt.check_plan_digest(metadata, plan, Path(path))
    codebooks, codes = state[f"{prefix}.codebooks"], state[f"{prefix}.codes"]
    k, m, dim = entry["k"], entry["m"], entry["embedding_dim"]
    expected = {"codebooks": (k if entry["shared"] else m * k, dim // m), "codes": (entry["num_embeddings"], m)}
    for name, tensor in (("codebooks", codebooks), ("codes", codes)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{weights}: tensor '{prefix}.{name}' has shape {list(tensor.shape)}, but the config "
                             f"describes {list(expected[name])}; the checkpoint is damaged, save it again")
    if not codebooks.is_floating_point() or not bool(codebooks.isfinite().all()):
        raise ValueError(f"{weights}: tensor '{prefix}.codebooks' is not finite floating point; the checkpoint is damaged")
    try:
        kernels.check_codes(codes, k)
    except ValueError as err:
        raise ValueError(f"{weights}: tensor '{prefix}.codes': {err}; the checkpoint is damaged") from None
    codebooks, codes = codebooks.float().numpy(), codes.long().numpy()
    if not entry["shared"]:
        codebooks = codebooks.reshape(m, k, -1)
    return codebooks, codes


def concept_neighbours(codebooks: np.ndarray, codes: np.ndarray, token_id: int, segments: list[int] | None = None,
                       limit: int = 30) -> list[dict[str, Any]]:
    """For each segment, the tokens whose concept there is the same as `token_id`'s (paper Figure 2).

    Each entry has the segment, the concept index s_i, how many tokens share it, and up to `limit` of
    their ids: the token itself first, then the others by cosine similarity of their whole ASG embedding.
    """
    vocab, m = codes.shape
    if not 0 <= token_id < vocab:
        raise ValueError(f"token id {token_id} is outside the vocabulary of {vocab} tokens")
    segments = list(range(m)) if segments is None else segments
    bad = [s for s in segments if not 0 <= s < m]
    if bad:
        raise ValueError(f"segment(s) {bad} do not exist; this checkpoint has segments 0..{m - 1}")
    table = pq.decode(codebooks, codes)
    norms = np.linalg.norm(table, axis=1).clip(1e-12)
    similarity = table @ table[token_id] / (norms * norms[token_id])
    out = []
    for segment in segments:
        concept = int(codes[token_id, segment])
        members = np.flatnonzero(codes[:, segment] == concept)
        others = members[members != token_id]
        others = others[np.argsort(-similarity[others], kind="stable")]
        out.append({
            "segment": segment,
            "concept": concept,
            "count": int(len(members)),
            "token_ids": [token_id] + [int(t) for t in others[: max(limit - 1, 0)]],
        })
    return out
