"""Compress one model with each method at a matched budget and compare them: table, JSON and PNG plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .baselines import METHODS
from .fidelity import fidelity
from .methods import accepted_options, config_from_options
from .surgery import compress, copy_with_own_tables


def compare_methods(model, tokenizer, texts: list[str], *, budget: float | Sequence[float], by: str = "params",
                    m: int | Sequence[int], methods=METHODS, group_sizes: Sequence[int] = (), progress: bool = False,
                    **fit_options) -> list[dict[str, Any]]:
    """One row per distinct config: each method at each `budget` (ASG at each `m`; scalar quantization also
    with each of `group_sizes`), with its sizes, reconstruction error and fidelity to `model`. Several
    budgets trace each method's fidelity against its bytes: the frontier that `plot_comparison` draws.

    A method that cannot meet a budget gets a row with its `error` instead of numbers.
    """
    weight = model.get_input_embeddings().weight
    vocab_size, dim = weight.shape
    budgets = [budget] if isinstance(budget, (int, float)) else list(budget)
    segments = [m] if isinstance(m, int) else list(m)
    rows, done = [], []
    for method in methods:
        for fraction in budgets:
            for options in _variants(segments, group_sizes):
                try:
                    config = config_from_options(method, (vocab_size, dim), budget=fraction, by=by, strict=False,
                                                 element_size=weight.element_size(), **options, **fit_options)
                except ValueError as err:
                    if not any(row.get("error") == str(err) for row in rows):
                        rows.append({"method": method, "budget": fraction, "error": str(err)})
                    continue
                if config in done:  # a method of fixed size, or one that takes neither m nor groups
                    continue
                done.append(config)
                taken = accepted_options(method, options, strict=False)  # the variant's settings this method uses
                series = " ".join([method] + [f"{key}={value}" for key, value in taken.items()])
                rows.append({**_measure(model, config, tokenizer, texts, fraction, vocab_size, progress),
                             "series": series})
    return rows


def _variants(segments: Sequence[int], group_sizes: Sequence[int]) -> list[dict[str, Any]]:
    return [{"m": m} for m in segments] + [{"m": segments[0], "group_size": g} for g in group_sizes]


def _measure(model, config, tokenizer, texts, fraction: float, vocab_size: int, progress: bool) -> dict[str, Any]:
    candidate = copy_with_own_tables(model)
    report = compress(candidate, config, tokenizer=tokenizer, progress=progress)
    row = {
        "method": config.method,
        "budget": fraction,
        "settings": _settings(config, vocab_size),
        "embedding_percent": 100 * report.embedding_ratio,
        "bytes_percent": 100 * report.embedding_bytes_on_disk / report.dense_bytes,  # as a folder stores it
        "disk_percent_float32": 100 * report.embedding_bytes_on_disk / report.dense_float32_bytes,
        "memory_bytes_percent": 100 * report.bytes_ratio,
        "model_percent": 100 * report.model_ratio,
        "reconstruction_error": report.reconstruction_error,
        **fidelity(candidate, model, tokenizer, texts, progress=progress),
    }
    del candidate
    return row


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
    head = ["method", "settings", "budget", "emb. params %", "emb. bytes % (disk)", "recon. error ↓", *fid_head]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | does not fit: {row['error']} | {row['budget']:.2%} |"
                         + " |" * (len(head) - 3))
            continue
        error = ", ".join(f"{v:.3f}" for v in row["reconstruction_error"].values())
        fid = ([f"{row['kl']:.4f}", f"{row['top1_agreement']:.3f}", f"{row['perplexity']:.2f}"] if generative
               else [f"{row['mean_cosine']:.4f}", f"{row['min_cosine']:.4f}"])
        cells = [row["method"], row["settings"], f"{row['budget']:.2%}", f"{row['embedding_percent']:.2f}",
                 f"{row['bytes_percent']:.2f}",
                 error, *fid]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], path: str | os.PathLike, title: str) -> None:
    """Fidelity and reconstruction error against bytes on disk (% of the float32 table): one point per row,
    one colour and line per method and variant (ASG's m), so that the upper left of the fidelity panel is
    the frontier."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if "error" not in row]
    generative = any(row.get("generative") for row in done)
    fid_name = "next-token KL to the original (lower is better)" if generative else "mean cosine to the original"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for series in dict.fromkeys(row.get("series", row["method"]) for row in done):
        points = sorted((row for row in done if row.get("series", row["method"]) == series),
                        key=lambda row: row["disk_percent_float32"])
        x = [row["disk_percent_float32"] for row in points]
        for ax, values in zip(axes, ([row["kl"] if generative else row["mean_cosine"] for row in points],
                                     [max(row["reconstruction_error"].values()) for row in points])):
            ax.plot(x, values, marker="o", label=series)
            for xi, yi, row in zip(x, values, points):
                ax.annotate(row["settings"], (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax, name in zip(axes, (fid_name, "reconstruction error (relative Frobenius)")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}%"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("embedding bytes on disk, % of the float32 table (log)")
        ax.set_title(name, fontsize=10)
        if done:
            ax.legend(fontsize=8)
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
