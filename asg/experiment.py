"""Run an experiment YAML: the base model and compressed variants fine-tuned on one task, as in the
paper's tables, with a Markdown table (embedding %, model %, metric, %Base) and a PNG plot of %Base
against embedding parameters.

    name: minilm-toy-ner
    task: ner                      # xnli, wikiann, tydiqa, bc5cdr, sst2, or classify/nli/ner/qa on local files
    model: default                 # a folder or hub name; "default" is all-MiniLM-L6-v2
    train_files: [experiments/data/toy-ner/train.conll]
    eval_files: [en=experiments/data/toy-ner/test.conll]
    train_lang: en                 # hub tasks: the training language, or "all"
    eval_langs: [all]              # hub tasks: zero-shot rows, one per language
    hyperparameters: {learning_rate: 5e-5, epochs: 3, batch_size: 16}
    runs:
      - {name: Base}
      - {name: 40% SG, method: sg, budget: 40%}
      - {name: ASG (k=256, m=96), method: asg, k: 256, m: 96}
      - {name: ASG small batch, method: asg, k: 256, m: 96, hyperparameters: {batch_size: 4, epochs: 5}}
    output: results/minilm-toy-ner

A run's own `hyperparameters` override the experiment's for that run. With `seeds: [0, 1, 2]`, every run is
fine-tuned once per seed (in runs/NAME/seed-N) and the table shows each score as mean ± standard deviation:
scores that differ in the last digits between machines (floating-point rounding) are then compared by
their spread, not one draw.

Finished runs are reused when the experiment runs again (pass overwrite to redo them).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

from .tasks.metrics import percent_of_base
from .tasks.runner import FinetuneRuntime, FinetuneSettings, finetune

KEYS = {"name", "task", "model", "train_files", "eval_files", "train_lang", "eval_langs", "hyperparameters",
        "seeds", "runs", "output"}
HYPERPARAMETERS = {"learning_rate", "epochs", "batch_size", "weight_decay", "max_length", "max_steps", "save_steps",
                   "seed", "max_train_examples", "max_eval_examples"}


def load_experiment(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an experiment YAML; ValueError naming the file and the problem."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ValueError(f"experiment file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with at least 'task' and 'runs'")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known keys are {sorted(KEYS)}")
    for key in ("task", "runs"):
        if key not in spec:
            raise ValueError(f"{path}: missing '{key}'")
    if not isinstance(spec["runs"], list) or not all(isinstance(r, dict) and r.get("name") for r in spec["runs"]):
        raise ValueError(f"{path}: 'runs' must be a list of mappings, each with a 'name'")
    names = [r["name"] for r in spec["runs"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names must be unique, got {names}")
    for where in [spec, *spec["runs"]]:
        given = where.get("hyperparameters") or {}
        bad = sorted(set(given) - HYPERPARAMETERS) if isinstance(given, dict) else ["(not a mapping)"]
        if bad:
            raise ValueError(f"{path}: unknown hyperparameter(s) {bad}"
                             + (f" in run {where['name']!r}" if where is not spec else "")
                             + f"; known ones are {sorted(HYPERPARAMETERS)}")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ValueError(f"{path}: 'seeds' must be a list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    spec.setdefault("name", path.stem)
    spec.setdefault("output", str(Path("results") / spec["name"]))
    return spec


def run_experiment(path: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune every run of the experiment (reusing finished ones) and write table.md, results.json, plot.png."""
    spec = load_experiment(path)
    out = Path(spec["output"])
    rows = []
    seeds = spec.get("seeds")
    for run in spec["runs"]:
        runs = []
        for seed in seeds or [None]:
            folder = out / "runs" / slug(run["name"]) / ("" if seed is None else f"seed-{seed}")
            if (folder / "metrics.json").exists() and not overwrite:
                metrics = json.loads((folder / "metrics.json").read_text())
            else:
                settings = run_settings(spec, run, folder, seed)
                metrics = finetune(settings, FinetuneRuntime(overwrite=True, progress=progress))
            runs.append(metrics)
        rows.append(result_row(run["name"], *runs))
    add_percent_of_base(rows)
    title = f"{spec['name']}: {spec['task']} with {spec.get('model') or 'default'}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"# {title}\n\n{markdown_table(rows)}\n")
    (out / "results.json").write_text(json.dumps({"experiment": spec, "rows": rows}, indent=2, default=str))
    plot_percent_of_base(rows, out / "plot.png", title)
    return {"rows": rows, "table": out / "table.md", "plot": out / "plot.png", "results": out / "results.json"}


def run_settings(spec: dict[str, Any], run: dict[str, Any], folder: Path, seed: int | None = None) -> FinetuneSettings:
    """The fine-tuning settings of one run of an experiment: the experiment's, then the run's own hyper-parameters
    and its compression (the run's keys besides name and hyperparameters); `seed`, one of the experiment's seeds,
    is the fine-tuning seed (data order, new heads; the compression keeps its own)."""
    compression = {k: v for k, v in run.items() if k not in ("name", "hyperparameters")} or None
    hyperparameters = {**(spec.get("hyperparameters") or {}), **(run.get("hyperparameters") or {})}
    if seed is not None:
        hyperparameters["seed"] = seed
    model = spec.get("model")
    return FinetuneSettings(
        task=spec["task"], output=str(folder), model=None if model in (None, "default") else model,
        train_files=list(spec.get("train_files") or []), eval_files=list(spec.get("eval_files") or []),
        train_lang=spec.get("train_lang", "en"), eval_langs=spec.get("eval_langs"),
        compression=compression, **hyperparameters)


def result_row(name: str, *runs: dict[str, Any]) -> dict[str, Any]:
    """One row of the experiment's table from the metrics.json of a run (or of its seeds: means, with the
    standard deviation of the main metric as `spread`)."""
    first = runs[0]
    report = first.get("compression") or {}
    main = first["main_metric"]
    mean = statistics.fmean
    scores = [m["average"][main] for m in runs]
    return {
        "name": name,
        "embedding_percent": 100 * report.get("embedding_ratio", 1.0),
        "model_percent": 100 * report.get("model_ratio", 1.0),
        "metric": main,
        "score": mean(scores),
        "spread": statistics.stdev(scores) if len(runs) > 1 else None,
        "seeds": [m.get("settings", {}).get("seed") for m in runs],
        "by_language": {lang: mean([m["results"][lang][main] for m in runs]) for lang in first["results"]},
        "all_metrics": {key: mean([m["average"][key] for m in runs]) for key in first["average"]},
        "reported": {key: mean([m["average"][key] for m in runs]) for key in first.get("reported_metrics", [main])},
    }


def add_percent_of_base(rows: list[dict[str, Any]]) -> None:
    """%Base of every row against the first uncompressed one (none: the column stays empty)."""
    base = next((row for row in rows if row["embedding_percent"] == 100.0), None)
    for row in rows:
        row["percent_of_base"] = percent_of_base(row["score"], base["score"]) if base and base["score"] else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The paper-shaped table: parameters kept, the task's metrics (mean over languages: accuracy and macro-F1,
    EM and F1, or F1), %Base of the main one; then the main metric by evaluation language where there are several."""
    metric = rows[0]["metric"] if rows else "score"
    shown = list(rows[0].get("reported") or {metric: None}) if rows else [metric]
    lines = [f"| model | embedding params % | model params % | {' | '.join(shown)} | %Base |",
             "|---|---:|---:|" + "---:|" * len(shown) + "---:|"]
    for row in rows:
        base = "" if row["percent_of_base"] is None else f"{row['percent_of_base']:.2f}"
        values = row.get("reported") or {metric: row["score"]}
        cells = " | ".join("" if values.get(name) is None else f"{values[name]:.2f}"
                           + (f" ± {row['spread']:.2f}" if name == metric and row.get("spread") is not None else "")
                           for name in shown)
        lines.append(f"| {row['name']} | {row['embedding_percent']:.2f} | {row['model_percent']:.2f} | {cells} | {base} |")
    seeded = next((row["seeds"] for row in rows if row.get("spread") is not None), None)
    if seeded:
        lines += ["", f"({metric}: mean ± standard deviation over fine-tuning seeds {', '.join(map(str, seeded))})"]
    languages = sorted({lang for row in rows for lang in row["by_language"]})
    if len(languages) > 1:
        lines += ["", f"{metric} by evaluation language (or set):", "",
                  "| language | " + " | ".join(row["name"] for row in rows) + " |",
                  "|---|" + "---:|" * len(rows)]
        for lang in languages + ["average"]:
            cells = [row["score"] if lang == "average" else row["by_language"].get(lang) for row in rows]
            lines.append(f"| {lang} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def plot_percent_of_base(rows: list[dict[str, Any]], path: str | os.PathLike, title: str) -> None:
    """%Base against the embedding parameters kept (log scale), one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row["percent_of_base"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in shown:
        ax.scatter(row["embedding_percent"], row["percent_of_base"], s=40)
        ax.annotate(row["name"], (row["embedding_percent"], row["percent_of_base"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    if shown:
        ax.set_xscale("log")
        low = min(row["embedding_percent"] for row in shown)
        ax.set_xlim(10 ** math.floor(math.log10(low)), 200)
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("embedding parameters kept (%, log scale)")
    ax.set_ylabel("%Base (task score relative to the uncompressed model)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slug(name: str) -> str:
    """A run's folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "run"
