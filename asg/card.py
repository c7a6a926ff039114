"""The model card (README.md, in the Hugging Face convention) of a folder asg writes: what was compressed,
with which settings, its size in parameters and bytes, the fidelity measured, and how to load it.

It imports nothing from asg but `_version` and `methods`: the card is built from the config's `asg` section alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._version import __version__
from .methods import config_from_plan

CARD_NAME = "README.md"


def model_card(plan: dict[str, Any], architecture: str | None, fidelity: dict[str, Any] | None = None,
               sentence_transformers: bool = False) -> str:
    """The card's Markdown for a folder whose config holds `plan` (its `asg` section); `sentence_transformers`:
    the folder carries a sentence-transformers pipeline."""
    source = plan.get("source_model")
    report = plan.get("report") or {}
    settings = ", ".join(f"{key}={value}" for key, value in config_from_plan(plan).settings().items())
    front = {"library_name": "transformers", "tags": ["asg", "embedding-compression", "product-quantization"]}
    if sentence_transformers:
        front["tags"].append("sentence-transformers")
    if _hub_name(source):
        front["base_model"] = source
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in front.items()), "---", "",
             f"# {source or 'A model'}, token embeddings compressed with ASG", "",
             f"Compressed by [asg](https://pypi.org/project/asg/) {plan.get('asg_version') or __version__} "
             f"with {plan.get('method', 'asg').upper()} ({settings}): each token is a sequence of shared concept "
             "vectors (Aggregate Semantic Grouping). Only the token embeddings"
             + (" and the LM head" if "output" in plan.get("tables", {}) else "") + " are compressed.", ""]
    lines += _size_table(plan, report)
    if fidelity:
        lines += ["", "## Fidelity to the original (measured at compression, no fine-tuning)", ""]
        if fidelity.get("generative"):
            lines += [f"On {fidelity.get('texts')} texts ({fidelity.get('tokens')} tokens): next-token KL "
                      f"{fidelity['kl']:.4f}, top-1 agreement {fidelity['top1_agreement']:.3f}, perplexity "
                      f"{fidelity['perplexity']:.2f} (original {fidelity['reference_perplexity']:.2f})."]
        else:
            made = fidelity.get("sentence_embedding", "mean pooling")
            lines += [f"On {fidelity.get('texts')} texts: mean cosine {fidelity['mean_cosine']:.4f} "
                      f"(min {fidelity['min_cosine']:.4f}) between the compressed and the original model's "
                      f"sentence embeddings ({made})."]
    calibration = plan.get("calibration")
    if calibration:
        lines += ["", f"Calibrated (`asg calibrate`) for {calibration.get('steps')} steps on "
                      f"{calibration.get('texts')} texts: held-out distillation loss "
                      f"{calibration.get('heldout_loss_before', float('nan')):.4g} -> "
                      f"{calibration.get('heldout_loss_after', float('nan')):.4g}."]
    auto = f"transformers.{architecture}" if architecture else "transformers.AutoModel"
    lines += ["", "## How to load", "", "```python", "import asg  # pip install asg: registers the ASG format "
              "with transformers", "import transformers", "", f'model = {auto}.from_pretrained("path/to/this/folder")',
              "```", "", "Without `import asg`, transformers stops with a message that says so instead of "
              "loading random embeddings.", ""]
    if sentence_transformers:
        lines += ["With sentence-transformers, which uses the original's pooling and normalisation carried here:", "",
                  "```python", "import asg", "from sentence_transformers import SentenceTransformer", "",
                  'model = SentenceTransformer("path/to/this/folder")', "```", ""]
    return "\n".join(lines)


def _size_table(plan: dict[str, Any], report: dict[str, Any]) -> list[str]:
    lines = ["## Size", "", "| table | V x D | parameters (% of dense) | bytes on disk (% of float32) |",
             "|---|---|---|---|"]
    for name, entry in plan.get("tables", {}).items():
        if entry.get("tied"):
            continue
        vocab, dim = entry["num_embeddings"], entry["embedding_dim"]
        disk = entry.get("disk_bytes", entry["storage_bytes"])
        label = name + (" + tied head" if name == "input" and plan["tables"].get("output", {}).get("tied") else "")
        lines.append(f"| {label} | {vocab:,} x {dim} | {entry['value_count']:,} ({100 * entry['value_count'] / (vocab * dim):.2f}%) "
                     f"| {disk:,} ({100 * disk / (vocab * dim * 4):.2f}%) |")
    if report.get("model_params_before"):
        lines += ["", f"Model parameters: {report['model_params_before']:,} -> {report['model_params_after']:,} "
                      f"({100 * report['model_params_after'] / report['model_params_before']:.2f}%)."]
    return lines


def _hub_name(source: str | None) -> bool:
    """True for a hub model name ("owner/name"), not a local path or file."""
    return bool(source) and source.count("/") == 1 and not source.startswith((".", "/", "~")) and \
        not Path(source).exists() and not source.endswith(".gguf")
