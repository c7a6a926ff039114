"""Choose ASG settings for one model by measuring them, instead of a recipe tuned to another model.

Candidates are the largest k (a power of two) that fits the budget at each concept width D/m, each
with every norm mode; each is fitted on a copy of the model and scored on text against the original:
next-token KL for generative models (lower is better), mean cosine of sentence embeddings for
encoders (higher is better). Where k leaves room in the budget, each also runs with kept rows
(`ASGConfig.keep`): the most frequent tokens' rows in int8, as many as the room holds. The fit is
shared by the norm modes and kept-row variants of one (k, m). The best (k, m) is then fitted once more
with k-means weighted by token frequency (`ASGConfig.weights`, from the kept rows' source) and its
variants scored again: weighting costs no bytes, and whether it helps is measured. With a target
(`max_kl`, `target_ppl_ratio` or `min_cosine`) the smallest candidate that meets it wins; without
one, the best score within the budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import ASGConfig
from .fidelity import ReferenceOutputs, fidelity, is_generative
from .format import NORM_MODES, STORAGE_DTYPES
from .frequency import token_ranking
from .methods import largest
from .modules import ASGEmbedding
from .surgery import compress, copy_with_own_tables

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
        keep = f", keep={self.config.keep}" if self.config.keep else ""
        weights = f", weights={self.config.weights}" if isinstance(self.config.weights, str) else ""
        return f"k={self.config.k}, m={self.config.m}, norms={self.config.norms or 'none'}{keep}{weights}"


@dataclass
class Selection:
    """The trials, the winner (the best trial when none meets the target) and why it won."""

    trials: list[Trial]
    best: Trial
    reason: str
    met_target: bool


def candidates(vocab_size: int, dim: int, *, budget: float, by: str = "params", max_bytes: float | None = None,
               widths=WIDTHS, norm_modes=NORM_MODES, fill_keep: bool = True, **fit_options) -> list[Trial]:
    """At each width D/m that divides D, the largest power-of-two k within `budget` (a fraction of the
    dense table's parameters, or with `by="bytes"` of its float32 bytes) and `max_bytes` (a fraction of
    the float32 bytes, codes packed), once per norm mode, and with `fill_keep` once more with as many
    kept rows as the rest of the budget holds; `fit_options` (niter, seed, dtype, ...) go to every config."""
    def fits(config: ASGConfig) -> tuple[bool, float, float]:
        params, size = _cost(config, vocab_size, dim)
        inside = (params if by == "params" else size) <= budget and (max_bytes is None or size <= max_bytes)
        return inside, params, size

    trials = []
    for width in widths:
        if dim % width or width > dim:
            continue
        m = dim // width
        for mode in norm_modes:
            best = None
            for bits in range(1, int(math.log2(vocab_size)) + 1):
                config = ASGConfig(k=2 ** bits, m=m, norms=mode, **fit_options)
                inside, params, size = fits(config)
                if not inside:
                    break
                best = Trial(config, 100 * params, 100 * size)
            if best is None:
                continue
            trials.append(best)
            # a step cost (0 while the kept rows fit, 1 beyond) is non-decreasing in their number
            keep = largest(lambda n: 0 if fits(dataclasses.replace(best.config, keep=n))[0] else 1, 0, vocab_size,
                           0) if fill_keep else 0
            if keep:
                config = dataclasses.replace(best.config, keep=keep)
                _, params, size = fits(config)
                trials.append(Trial(config, 100 * params, 100 * size))
    return trials


def _cost(config: ASGConfig, vocab_size: int, dim: int) -> tuple[float, float]:
    """(parameters, bytes on disk) as fractions of the dense table's parameters and float32 bytes."""
    table = ASGEmbedding(vocab_size, dim, config.k, config.m, norms=config.norms, keep=config.keep, device="meta")
    table.storage_dtype = STORAGE_DTYPES.get(config.dtype)
    return table.value_count() / (vocab_size * dim), table.disk_bytes() / (vocab_size * dim * 4)


def select(model, tokenizer, texts: list[str], *, budget: float = 0.01, by: str = "params",
           max_bytes: float | None = None, widths=WIDTHS, norm_modes=NORM_MODES, max_kl: float | None = None,
           target_ppl_ratio: float | None = None, min_cosine: float | None = None,
           report: Callable[[str], None] | None = None, progress: bool = False, weigh: bool = True,
           **fit_options) -> Selection:
    """Fit and score every candidate on a copy of `model` (left unchanged) and choose one; `report`
    receives a line per trial as it finishes, with the time left; `progress` shows each fit and
    measurement as it runs; `weigh` tries the leading (k, m) with frequency-weighted k-means too (unless
    `fit_options` set weights)."""
    dim = model.get_input_embeddings().weight.shape[1]
    vocab_size = model.get_input_embeddings().weight.shape[0]
    base_keep = fit_options.get("keep", 0)  # the user's own kept rows, in every candidate
    ranking = None
    if not base_keep:
        try:
            ranking = token_ranking(fit_options.get("keep_by", "wordfreq"), tokenizer, vocab_size)
        except ValueError as err:
            if report is not None:
                report(f"not trying kept rows: {err}")
    trials = candidates(vocab_size, dim, budget=budget, by=by, max_bytes=max_bytes, widths=widths,
                        norm_modes=norm_modes, fill_keep=ranking is not None, **fit_options)
    if not trials:
        cap = "" if max_bytes is None else f" and {max_bytes:.2%} of its bytes"
        raise ValueError(f"no ASG setting fits {budget:.2%} of the table's {by}{cap} at concept widths "
                         f"{list(widths)}; raise --budget")
    generative = is_generative(model)
    weigh = weigh and fit_options.get("weights") is None
    # the weighted stage repeats one (k, m)'s variants: counted from the start, so the time left covers it
    later = max(Counter((trial.config.k, trial.config.m) for trial in trials).values()) if weigh else 0
    measure = _Measure(model, tokenizer, texts, ranking, base_keep, generative, report, progress,
                       total=len(trials) + later)
    measure(trials)
    if weigh:
        # the leader's (k, m) with frequency-weighted k-means, in each of its variants (the same bytes)
        lead = _choose(trials, generative, max_kl, target_ppl_ratio, min_cosine).best.config
        source = fit_options.get("keep_by", "wordfreq")
        weighted = [dataclasses.replace(trial, config=dataclasses.replace(trial.config, weights=source), scores={})
                    for trial in trials if (trial.config.k, trial.config.m) == (lead.k, lead.m)]
        measure.total = measure.done + len(weighted)
        try:
            measure(weighted)
            trials = trials + weighted
        except ValueError as err:
            if report is not None:
                report(f"not trying frequency-weighted k-means: {err}")
    return _choose(trials, generative, max_kl, target_ppl_ratio, min_cosine)


class _Measure:
    """Fits and scores trials against the original model: one fit per (k, m, weights), shared by the norm modes
    and kept-row variants that follow it; the original's outputs computed once for all."""

    def __init__(self, model, tokenizer, texts, ranking, base_keep, generative, report, progress, total) -> None:
        self.model, self.tokenizer, self.texts, self.ranking = model, tokenizer, texts, ranking
        self.base_keep, self.generative, self.report, self.progress = base_keep, generative, report, progress
        self.cache = ReferenceOutputs()
        self.total = total  # trials in all stages, for the count and the time left in each report line
        self.done = 0
        self.start = time.perf_counter()

    def __call__(self, trials: list[Trial]) -> None:
        fitted: tuple[tuple, Any, float] | None = None  # the last (k, m, weights), fitted without norms; seconds
        for trial in trials:
            weights = trial.config.weights  # a source's name, or an array (compared by identity)
            key = (trial.config.k, trial.config.m, weights if weights is None or isinstance(weights, str) else id(weights))
            if fitted is None or fitted[0] != key:  # the variants of one fit follow each other
                fitted = None  # one compressed copy at a time
                candidate = copy_with_own_tables(self.model)
                began = time.perf_counter()
                compress(candidate, dataclasses.replace(trial.config, norms=None, keep=self.base_keep),
                         tokenizer=self.tokenizer, progress=self.progress)
                fitted = (key, candidate, time.perf_counter() - began)
            trial.fit_seconds = fitted[2]
            kept = self.ranking[:trial.config.keep] if trial.config.keep != self.base_keep else None
            scored = _variant(fitted[1], self.model, trial.config.norms, kept)
            trial.scores = fidelity(scored, self.model, self.tokenizer, self.texts, progress=self.progress,
                                    cache=self.cache)
            self.done += 1
            if self.report is not None:
                left = (time.perf_counter() - self.start) / self.done * max(self.total - self.done, 0)
                self.report(f"[{self.done}/{self.total}] {trial.label}: {_score_text(trial, self.generative)} "
                            f"(about {left / 60:.0f} min left)")


def _variant(compressed, reference, mode, kept):
    """A copy of `compressed` whose ASG tables use norm mode `mode`, lengths taken from `reference`, and
    keep the rows of the token ids `kept` (None: as fitted)."""
    if mode is None and kept is None:
        return compressed
    variant = copy_with_own_tables(compressed)
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
            if mode is not None:
                table.set_norms_(mode, torch.linalg.vector_norm(dense[side].detach().float(), dim=1))
            if kept is not None:
                ids = torch.from_numpy(kept[kept < table.num_embeddings])
                table.keep_rows_(ids, dense[side].detach()[ids])
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
