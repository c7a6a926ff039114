"""Compress one model with each method at a matched budget and compare them: table, JSON and PNG plot."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .baselines import METHODS
from .fidelity import fidelity
from .methods import config_from_options
from .surgery import compress


def compare_methods(model, tokenizer, texts: list[str], *, budget: float, by: str = "params", m: int,
                    methods=METHODS, progress: bool = False, **fit_options) -> list[dict[str, Any]]:
    """One row per method: its settings at `budget`, sizes, reconstruction error and fidelity to `model`.

    A method that cannot meet the budget gets a row with its `error` instead of numbers.
    """
    weight = model.get_input_embeddings().weight
    vocab_size, dim = weight.shape
    rows = []
    for method in methods:
        try:
            config = config_from_options(method, (vocab_size, dim), budget=budget, by=by, m=m, strict=False,
                                         element_size=weight.element_size(), **fit_options)
        except ValueError as err:
            rows.append({"method": method, "error": str(err)})
            continue
        candidate = copy.deepcopy(model)
        report = compress(candidate, config, progress=progress)
        rows.append({
            "method": method,
            "settings": _settings(config, vocab_size),
            "embedding_percent": 100 * report.embedding_ratio,
            "bytes_percent": 100 * report.embedding_bytes_on_disk / report.dense_bytes,  # as a folder stores it
            "memory_bytes_percent": 100 * report.bytes_ratio,
            "model_percent": 100 * report.model_ratio,
            "reconstruction_error": report.reconstruction_error,
            **fidelity(candidate, model, tokenizer, texts, progress=progress),
        })
        del candidate
    return rows


def write_comparison(rows: list[dict[str, Any]], out_dir: str | os.PathLike, title: str) -> dict[str, Path]:
    """Write compare.md (the table), compare.json (the rows) and compare.png (the plot) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "compare.md", "json": out / "compare.json", "plot": out / "compare.png"}
    paths["table"].write_text(f"# {title}\n\n{markdown_table(rows)}\n")
    paths["json"].write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    plot_comparison(rows, paths["plot"], title)
    return paths


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table; the fidelity columns follow the kind of model."""
    generative = any(row.get("generative") for row in rows)
    fid_head = ["next-token KL ↓", "top-1 agree ↑", "perplexity"] if generative else ["mean cosine ↑", "min cosine"]
    head = ["method", "settings", "emb. params %", "emb. bytes % (disk)", "recon. error ↓", *fid_head]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | does not fit: {row['error']} |" + " |" * (len(head) - 2))
            continue
        error = ", ".join(f"{v:.3f}" for v in row["reconstruction_error"].values())
        fid = ([f"{row['kl']:.4f}", f"{row['top1_agreement']:.3f}", f"{row['perplexity']:.2f}"] if generative
               else [f"{row['mean_cosine']:.4f}", f"{row['min_cosine']:.4f}"])
        cells = [row["method"], row["settings"], f"{row['embedding_percent']:.2f}", f"{row['bytes_percent']:.2f}",
                 error, *fid]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], path: str | os.PathLike, title: str) -> None:
    """Bar charts of fidelity, reconstruction error and stored bytes, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if "error" not in row]
    labels = [f"{row['method']}\n{row['settings']}" for row in done]
    generative = any(row.get("generative") for row in done)
    panels = [
        ("next-token KL to the original (lower is better)" if generative else "mean cosine to the original",
         [row["kl"] if generative else row["mean_cosine"] for row in done]),
        ("reconstruction error (relative Frobenius)", [max(row["reconstruction_error"].values()) for row in done]),
        ("embedding bytes on disk, % of dense", [row["bytes_percent"] for row in done]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (name, values) in zip(axes, panels):
        bars = ax.bar(range(len(values)), values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(name, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _settings(config, vocab_size: int) -> str:
    settings = config.settings()
    if "ratio" in settings:  # SG: say how many groups, as well as the ratio
        groups = config.groups_for(vocab_size)
        return f"groups={groups}"
    return ", ".join(f"{key}={value}" for key, value in settings.items() if key != "codebook")
