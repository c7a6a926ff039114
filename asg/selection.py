"""Choose ASG settings for one model by measuring them, instead of a recipe tuned to another model.

Candidates are the largest k (a power of two) that fits the budget at each concept width D/m, each
with every norm mode; each is fitted on a copy of the model and scored on text against the original:
next-token KL for generative models (lower is better), mean cosine of sentence embeddings for
encoders (higher is better). The fit is shared by the norm modes of one (k, m). With a target
(`max_kl`, `target_ppl_ratio` or `min_cosine`) the smallest candidate that meets it wins; without
one, the best score within the budget.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import ASGConfig
from .fidelity import ReferenceOutputs, fidelity, is_generative
from .format import NORM_MODES, STORAGE_DTYPES
from .modules import ASGEmbedding
from .surgery import compress

WIDTHS = (2, 4, 8, 16)  # concept vector widths D/m tried by default


@dataclass
class Trial:
    """One candidate setting and what it measured."""

    config: ASGConfig
    params_percent: float  # of the dense table's parameters
    bytes_percent: float  # on disk (codes packed), of the float32 table
    scores: dict[str, Any] = field(default_factory=dict)  # the fidelity row
    fit_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"k={self.config.k}, m={self.config.m}, norms={self.config.norms or 'none'}"


@dataclass
class Selection:
    """The trials, the winner (the best trial when none meets the target) and why it won."""

    trials: list[Trial]
    best: Trial
    reason: str
    met_target: bool


def candidates(vocab_size: int, dim: int, *, budget: float, by: str = "params", max_bytes: float | None = None,
               widths=WIDTHS, norm_modes=NORM_MODES, **fit_options) -> list[Trial]:
    """At each width D/m that divides D, the largest power-of-two k within `budget` (a fraction of the
    dense table's parameters, or with `by="bytes"` of its float32 bytes) and `max_bytes` (a fraction of
    the float32 bytes, codes packed), once per norm mode; `fit_options` (niter, seed, dtype, ...) go to
    every config."""
    trials = []
    for width in widths:
        if dim % width or width > dim:
            continue
        m = dim // width
        for mode in norm_modes:
            best = None
            for bits in range(1, int(math.log2(vocab_size)) + 1):
                config = ASGConfig(k=2 ** bits, m=m, norms=mode, **fit_options)
                params, size = _cost(config, vocab_size, dim)
                if (params if by == "params" else size) > budget or (max_bytes is not None and size > max_bytes):
                    break
                best = Trial(config, 100 * params, 100 * size)
            if best is not None:
                trials.append(best)
    return trials


def _cost(config: ASGConfig, vocab_size: int, dim: int) -> tuple[float, float]:
    """(parameters, bytes on disk) as fractions of the dense table's parameters and float32 bytes."""
    table = ASGEmbedding(vocab_size, dim, config.k, config.m, norms=config.norms, device="meta")
    table.storage_dtype = STORAGE_DTYPES.get(config.dtype)
    return table.value_count() / (vocab_size * dim), table.disk_bytes() / (vocab_size * dim * 4)


def select(model, tokenizer, texts: list[str], *, budget: float = 0.01, by: str = "params",
           max_bytes: float | None = None, widths=WIDTHS, norm_modes=NORM_MODES, max_kl: float | None = None,
           target_ppl_ratio: float | None = None, min_cosine: float | None = None,
           report: Callable[[str], None] | None = None, progress: bool = False, **fit_options) -> Selection:
    """Fit and score every candidate on a copy of `model` (left unchanged) and choose one; `report`
    receives a line per trial as it finishes, with the time left; `progress` shows each fit and
    measurement as it runs."""
    dim = model.get_input_embeddings().weight.shape[1]
    vocab_size = model.get_input_embeddings().weight.shape[0]
    trials = candidates(vocab_size, dim, budget=budget, by=by, max_bytes=max_bytes, widths=widths,
                        norm_modes=norm_modes, **fit_options)
    if not trials:
        cap = "" if max_bytes is None else f" and {max_bytes:.2%} of its bytes"
        raise ValueError(f"no ASG setting fits {budget:.2%} of the table's {by}{cap} at concept widths "
                         f"{list(widths)}; raise --budget")
    generative = is_generative(model)
    cache = ReferenceOutputs()  # the original's outputs, computed once for all trials
    fitted: tuple[tuple[int, int], Any, float] | None = None  # the last (k, m), fitted without norms; seconds
    start = time.perf_counter()
    for done, trial in enumerate(trials, start=1):
        key = (trial.config.k, trial.config.m)
        if fitted is None or fitted[0] != key:  # the norm modes of one (k, m) follow each other
            fitted = None  # one compressed copy at a time
            candidate = copy.deepcopy(model)
            began = time.perf_counter()
            compress(candidate, dataclasses.replace(trial.config, norms=None), tokenizer=tokenizer, progress=progress)
            fitted = (key, candidate, time.perf_counter() - began)
        trial.fit_seconds = fitted[2]
        scored = _with_norms(fitted[1], model, trial.config.norms)
        trial.scores = fidelity(scored, model, tokenizer, texts, progress=progress, cache=cache)
        if report is not None:
            left = (time.perf_counter() - start) / done * (len(trials) - done)
            report(f"[{done}/{len(trials)}] {trial.label}: {_score_text(trial, generative)} "
                   f"(about {left / 60:.0f} min left)")
    return _choose(trials, generative, max_kl, target_ppl_ratio, min_cosine)


def _with_norms(compressed, reference, mode):
    """A copy of `compressed` whose ASG tables use norm mode `mode`, lengths taken from `reference`."""
    if mode is None:
        return compressed
    variant = copy.deepcopy(compressed)
    dense = {"input": reference.get_input_embeddings().weight}
    head = reference.get_output_embeddings()
    if head is not None:
        dense["output"] = head.weight
    tables = {"input": variant.get_input_embeddings()}
    output = variant.get_output_embeddings()
    if output is not None and getattr(output, "embedding", None) is not tables["input"]:  # not a tied head
        tables["output"] = getattr(output, "embedding", None)
    for side, table in tables.items():
        if isinstance(table, ASGEmbedding):
            table.set_norms_(mode, torch.linalg.vector_norm(dense[side].detach().float(), dim=1))
    return variant


def _score_text(trial: Trial, generative: bool) -> str:
    s = trial.scores
    if generative:
        return f"KL {s['kl']:.4f}, top-1 {s['top1_agreement']:.3f}, perplexity {s['perplexity']:.2f}"
    return f"mean cosine {s['mean_cosine']:.4f}"


def _choose(trials: list[Trial], generative: bool, max_kl, target_ppl_ratio, min_cosine) -> Selection:
    def meets(trial: Trial) -> bool:
        s = trial.scores
        if generative:
            return ((max_kl is None or s["kl"] <= max_kl) and
                    (target_ppl_ratio is None or s["perplexity"] <= target_ppl_ratio * s["reference_perplexity"]))
        return min_cosine is None or s["mean_cosine"] >= min_cosine

    def quality(trial: Trial) -> float:
        return trial.scores["kl"] if generative else -trial.scores["mean_cosine"]

    best_quality = min(trials, key=quality)
    target = any(value is not None for value in (max_kl, target_ppl_ratio, min_cosine))
    if not target:
        return Selection(trials, best_quality, f"the best {'KL' if generative else 'cosine'} within the budget", True)
    passing = [trial for trial in trials if meets(trial)]
    if not passing:
        return Selection(trials, best_quality, "no setting within the budget reaches the target; this is the "
                                               "closest (raise --budget, or calibrate it)", False)
    smallest = min(passing, key=lambda trial: (trial.bytes_percent, quality(trial)))
    return Selection(trials, smallest, "the smallest setting (bytes on disk) that reaches the target", True)


def markdown_table(selection: Selection, generative: bool) -> str:
    """What was tried, as a Markdown table, the winner marked."""
    head = ["setting", "emb. params %", "bytes % (disk, of fp32)"]
    head += ["next-token KL ↓", "top-1 ↑", "perplexity"] if generative else ["mean cosine ↑"]
    lines = ["| " + " | ".join(head + ["fit s", ""]) + " |", "|" + "---|" * (len(head) + 2)]
    for trial in selection.trials:
        s = trial.scores
        scores = ([f"{s['kl']:.4f}", f"{s['top1_agreement']:.3f}", f"{s['perplexity']:.2f}"] if generative
                  else [f"{s['mean_cosine']:.4f}"])
        mark = "**chosen**" if trial is selection.best else ""
        lines.append("| " + " | ".join([trial.label, f"{trial.params_percent:.2f}", f"{trial.bytes_percent:.2f}",
                                         *scores, f"{trial.fit_seconds:.0f}", mark]) + " |")
    return "\n".join(lines)
