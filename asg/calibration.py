"""Label-free calibration: train only the compressed tables so that the model reproduces its uncompressed
reference on plain text (the adaptation the paper's Limitations section leaves open).

Encoders learn to match the reference's last hidden states (relative squared error); generative
models its next-token distributions (KL divergence), input and output tables together. Codes and
every other weight stay fixed. The reference runs once per text: its targets are kept (`ReferenceTargets`;
a generative model's as the top_k most likely next tokens and the total of the rest) and reused on every
later pass over that text. Held-out text decides when to stop, and the best state is kept.
An optional `anchor` adds the tables' relative distance to the original dense tables, which keeps
tokens that the calibration text never shows close to where they were.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .fidelity import (_last_hidden, is_generative, next_token_kl, next_token_logits, next_token_positions,
                       padding, padding_token, token_limit)
from .surgery import compressed_tables

MIN_GAIN = 1e-3  # a held-out loss must fall by this fraction to count as an improvement


@dataclass
class CalibrationResult:
    """What calibration did: steps run, the best step, and the held-out loss before, at best, and over time."""

    steps: int
    best_step: int
    heldout_before: float
    heldout_after: float
    history: list[dict[str, Any]] = field(default_factory=list)


def default_corpus() -> list[str]:
    """Real English prose that ships with Python: the paragraphs of the language reference in `pydoc_data`."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if not lines or any(line.startswith(" ") for line in lines):  # grammar and code examples
                continue
            paragraph = " ".join(line.strip() for line in lines)
            if len(paragraph.split()) >= 8 and not set(paragraph) <= set("*=-~ "):
                paragraphs.append(paragraph)
    return paragraphs


@dataclass
class CalibrationConfig:
    """How to calibrate: Adam at `lr` on batches of `batch_size` texts of up to `max_length` tokens, for at
    most `steps` steps; every `eval_every` steps the held-out loss is measured, and training stops after
    `patience` measurements without improvement. `heldout_fraction` of the texts is held out when no
    held-out text is given; `seed` orders the texts; `anchor` > 0 also pulls every table towards the
    reference's dense one. A generative reference's next-token distributions are kept, per text, as their
    `top_k` most likely tokens and the rest's total, and the loss is the KL divergence between those
    coarsened distributions; `top_k=0` compares whole distributions, running the reference at every step."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    heldout_fraction: float = 0.1
    eval_every: int = 25
    patience: int = 4
    seed: int = 0
    anchor: float = 0.0
    top_k: int = 64

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("steps, eval_every and patience must be at least 1")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be zero (whole distributions) or positive, e.g. 64")
        if self.anchor < 0:
            raise ValueError(f"anchor={self.anchor} must be zero or positive")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in (0, 1), e.g. 0.1")


def split_heldout(texts: list[str], fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the non-empty `texts` shuffled with `seed`, a `fraction` (at least one)
    held out. A single text is both, as there is nothing to hold out."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to calibrate on: give one or more non-empty texts")
    if len(texts) == 1:
        return texts, texts
    shuffled = random.Random(seed).sample(texts, len(texts))
    cut = max(1, int(len(shuffled) * fraction))
    return shuffled[cut:], shuffled[:cut]


def calibrate(model, reference, texts: list[str], *, tokenizer, config: CalibrationConfig | None = None,
              heldout: list[str] | None = None, progress: bool = True, **settings) -> CalibrationResult:
    """Train the compressed tables of `model` (in place) towards `reference` on unlabelled `texts`, as
    `config` (or the `CalibrationConfig` fields given as keywords, e.g. steps=100) says.

    The held-out loss, on `heldout` or on a part of `texts` (`split_heldout`), decides when to stop; the
    tables return to their best state, and `model.config.asg["calibration"]` records what was done.
    """
    config = config or CalibrationConfig(**settings)
    tables = compressed_tables(model)
    if not tables:
        raise ValueError("this model has no compressed tables to calibrate; compress it first")
    texts = [t for t in texts if t.strip()]
    if heldout is None:
        texts, heldout = split_heldout(texts, config.heldout_fraction, config.seed)
    elif not texts:
        raise ValueError("no text to calibrate on: give one or more non-empty texts")
    generative = is_generative(reference)
    batch_size = config.batch_size if padding_token(tokenizer) is not None else 1  # none: one text at a time
    max_length = min(token_limit(model, config.max_length), token_limit(reference, config.max_length))
    device = next(model.parameters()).device

    targets = ReferenceTargets(reference, generative, config.top_k)

    def loss_of(batch) -> torch.Tensor:
        with padding(tokenizer):  # a text's tokens sit at the same positions in every batch
            enc = tokenizer(batch, return_tensors="pt", padding=len(batch) > 1, truncation=True, max_length=max_length)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return targets.loss(model, enc, batch)

    def heldout_loss() -> float:
        starts = range(0, len(heldout), batch_size)
        with torch.no_grad():
            losses = [loss_of(heldout[i:i + batch_size]).item()
                      for i in tqdm(starts, desc="held-out loss", unit="batch", leave=False, disable=not progress)]
        return sum(losses) / len(losses)

    model.eval()
    reference.eval()
    anchors = _dense_counterparts(model, reference) if config.anchor else []
    with _only_tables_train(model, tables) as trainable:
        optimizer = torch.optim.Adam(trainable, lr=config.lr)
        stopper = _EarlyStopping(trainable, heldout_loss(), config.patience)
        bar = tqdm(_batches(texts, batch_size, config.steps, config.seed), total=config.steps, desc="calibrate",
                   unit="step", disable=not progress)
        try:
            for step, batch in enumerate(bar, start=1):
                loss = loss_of(batch)
                optimizer.zero_grad()
                (loss + config.anchor * sum(_distance(table, dense) for table, dense in anchors)).backward()
                optimizer.step()
                if step % config.eval_every == 0 or step == config.steps:
                    current = heldout_loss()
                    bar.set_postfix(loss=f"{loss.item():.4g}", heldout=f"{current:.4g}")
                    if stopper.measured(step, loss.item(), current):
                        break
        finally:
            stopper.restore()
    for table in tables:  # tables stored in a lower precision keep values their files hold exactly
        table.round_to_storage_(table.storage_dtype)
    result = CalibrationResult(steps=stopper.history[-1]["step"], best_step=stopper.best_step,
                               heldout_before=stopper.history[0]["heldout"], heldout_after=stopper.best,
                               history=stopper.history)
    plan = getattr(model.config, "asg", None)
    if isinstance(plan, dict):
        plan["calibration"] = {"steps": result.steps, "best_step": result.best_step, "texts": len(texts),
                               "heldout_texts": len(heldout), "heldout_loss_before": result.heldout_before,
                               "heldout_loss_after": result.heldout_after, **asdict(config)}
    return result


class ReferenceTargets:
    """What the model learns to reproduce, per text: the reference's last hidden states (encoders), or its
    next-token distributions kept as the `top_k` most likely tokens' log-probabilities and the log of the
    rest's total (generative models). The reference runs on a text the first time a batch holds it; later
    batches reuse what it gave, as long as all of it fits in `max_bytes` (beyond that it runs again). Batches
    should pad on the right, as `calibrate`'s do, so that a text sits at the same positions in every batch.
    A generative model with `top_k=0` keeps nothing: the reference runs on every batch, and the loss compares
    whole distributions (`distillation_loss`)."""

    def __init__(self, reference, generative: bool, top_k: int = 64, max_bytes: int = 2 << 30) -> None:
        self.reference, self.generative, self.top_k, self.max_bytes = reference, generative, top_k, max_bytes
        self.encoder_decoder = bool(getattr(reference.config, "is_encoder_decoder", False))
        self._kept: dict[str, tuple[torch.Tensor, ...]] = {}
        self._size = 0

    def loss(self, model, enc, texts: list[str]) -> torch.Tensor:
        """The distillation loss of `model` on the batch `enc` of `texts` (in that order)."""
        if self.generative and not self.top_k:
            return distillation_loss(model, self.reference, enc, True)
        scored = self._scored(enc)
        counts = scored.sum(1).tolist()
        kept = [self._kept.get(text) for text in texts]
        if any(found is None or len(found[0]) != count for found, count in zip(kept, counts)):
            kept = self._compute(enc, scored, counts)
            for text, found in zip(texts, kept):
                size = sum(t.numel() * t.element_size() for t in found)
                if text not in self._kept and self._size + size <= self.max_bytes:
                    self._kept[text], self._size = found, self._size + size
        parts = [torch.cat(part) for part in zip(*kept)]
        if not self.generative:
            return _relative_error(_last_hidden(model, enc).float()[scored], parts[0])
        logits = next_token_logits(model, enc, self.encoder_decoder)[scored]
        return coarse_kl(logits, *parts).mean() if len(logits) else logits.sum() * 0

    def clear(self) -> None:
        """Forget every kept target: the reference runs again on each text."""
        self._kept, self._size = {}, 0

    def _scored(self, enc) -> torch.Tensor:
        if self.generative:
            return next_token_positions(enc, self.encoder_decoder)[0]
        return enc["attention_mask"].bool()

    @torch.no_grad()
    def _compute(self, enc, scored: torch.Tensor, counts: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """Each text's targets at its `counts` scored positions, from one run of the reference on the batch."""
        if not self.generative:
            return [(rows,) for rows in _last_hidden(self.reference, enc).float()[scored].split(counts)]
        logits = next_token_logits(self.reference, enc, self.encoder_decoder)[scored]
        top, index = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
        top -= logits.logsumexp(-1, keepdim=True)
        # in float64, 1 - (the top tokens' total) is accurate to far below what the KL can notice
        rest = torch.log1p(-top.double().exp().sum(-1).clamp_max(1)).float()
        if top.shape[-1] == logits.shape[-1]:
            rest.fill_(float("-inf"))  # no other token: what rounding leaves over is no probability
        return list(zip(top.split(counts), index.int().split(counts), rest.split(counts)))


def coarse_kl(logits: torch.Tensor, top: torch.Tensor, index: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per row between next-token distributions coarsened to the reference's most likely
    tokens (`index`, their log-probabilities `top`) and one outcome for all others (log-probability `rest`),
    from the model's `logits`. No larger than the KL of the whole distributions; equal when `index` holds
    every token."""
    log_p = logits - logits.logsumexp(-1, keepdim=True)
    index = index.long()
    # the finite fill keeps the gradient finite where no other token remains (-inf there would give 0 * nan)
    log_p_rest = log_p.scatter(-1, index, -1e30).logsumexp(-1)
    kl_top = (top.exp() * (top - log_p.gather(-1, index))).sum(-1)
    # clamped so that an empty rest (probability 0 on either side) adds 0
    return kl_top + rest.exp() * (rest.clamp_min(-1e4) - log_p_rest.clamp_min(-1e4))


@contextmanager
def _only_tables_train(model, tables):
    """Every weight frozen but the compressed tables' (yielded as a list); the flags restored afterwards."""
    trainable = [p for table in tables for p in table.parameters()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield trainable
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def _batches(texts: list[str], batch_size: int, steps: int, seed: int):
    """`steps` batches of `batch_size` texts, going through `texts` in a new shuffled order each pass."""
    rng = random.Random(seed)
    order: list[str] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(texts, len(texts))
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


class _EarlyStopping:
    """Keeps the best held-out loss and the trainable tensors at it; says when `patience` measurements in a
    row brought no improvement of at least MIN_GAIN."""

    def __init__(self, trainable: list[torch.Tensor], before: float, patience: int) -> None:
        self.trainable, self.patience = trainable, patience
        self.best, self.best_step, self.waited = before, 0, 0
        self.best_state = [p.detach().clone() for p in trainable]
        self.history: list[dict[str, Any]] = [{"step": 0, "heldout": before}]

    def measured(self, step: int, train: float, heldout: float) -> bool:
        """Record one measurement; True when training should stop."""
        self.history.append({"step": step, "train": train, "heldout": heldout})
        if heldout < self.best * (1 - MIN_GAIN):
            self.best, self.best_step, self.waited = heldout, step, 0
            self.best_state = [p.detach().clone() for p in self.trainable]
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.trainable, self.best_state):
                p.copy_(saved)


def _dense_counterparts(model, reference) -> list[tuple[Any, torch.Tensor]]:
    """Each compressed table of `model` with the dense table it replaced, taken from `reference`."""
    pairs = [(model.get_input_embeddings(), reference.get_input_embeddings().weight.detach())]
    head, dense_head = model.get_output_embeddings(), reference.get_output_embeddings()
    if head is not None and dense_head is not None and hasattr(head, "embedding") and head.embedding is not pairs[0][0]:
        pairs.append((head.embedding, dense_head.weight.detach()))
    return [(table, dense) for table, dense in pairs if table in compressed_tables(model)]


def _distance(table, dense: torch.Tensor) -> torch.Tensor:
    return (table.weight - dense).square().sum() / dense.square().sum()


def _relative_error(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||hidden - target||² / ||target||² over the real tokens' last hidden states (n, D)."""
    return (hidden - target).square().sum() / target.square().sum().clamp_min(1e-12)


def distillation_loss(model, reference, enc, generative: bool) -> torch.Tensor:
    """The distillation loss of one batch: relative squared error of the last hidden states (encoders), or
    KL(reference || model) of the next-token distributions (generative models)."""
    if not generative:
        real = enc["attention_mask"].bool()
        with torch.no_grad():
            target = _last_hidden(reference, enc).float()[real]
        return _relative_error(_last_hidden(model, enc).float()[real], target)
    encoder_decoder = bool(getattr(reference.config, "is_encoder_decoder", False))
    valid, _ = next_token_positions(enc, encoder_decoder)
    with torch.no_grad():
        target = next_token_logits(reference, enc, encoder_decoder)
    logits = next_token_logits(model, enc, encoder_decoder)
    kl = next_token_kl(torch.log_softmax(logits, -1), torch.log_softmax(target, -1))
    return kl[valid].mean() if valid.any() else kl.sum() * 0
