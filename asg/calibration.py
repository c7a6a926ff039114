"""Label-free calibration: train only the compressed tables so that the model reproduces its uncompressed
reference on plain text (the adaptation the paper's Limitations section leaves open).

Encoders learn to match the reference's last hidden states (relative squared error); generative
models its next-token distributions (KL divergence), input and output tables together. Codes and
every other weight stay fixed. Held-out text decides when to stop, and the best state is kept.
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
                       token_limit)
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
    reference's dense one."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    heldout_fraction: float = 0.1
    eval_every: int = 25
    patience: int = 4
    seed: int = 0
    anchor: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("steps, eval_every and patience must be at least 1")
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
    batch_size = config.batch_size if tokenizer.pad_token is not None else 1  # no padding token: one at a time
    max_length = min(token_limit(model, config.max_length), token_limit(reference, config.max_length))
    device = next(model.parameters()).device

    def encode(batch):
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def heldout_loss() -> float:
        with torch.no_grad():
            losses = [distillation_loss(model, reference, encode(heldout[i:i + batch_size]), generative).item()
                      for i in range(0, len(heldout), batch_size)]
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
                loss = distillation_loss(model, reference, encode(batch), generative)
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


def distillation_loss(model, reference, enc, generative: bool) -> torch.Tensor:
    """The distillation loss of one batch: relative squared error of the last hidden states (encoders), or
    KL(reference || model) of the next-token distributions (generative models)."""
    mask = enc["attention_mask"]
    if not generative:
        with torch.no_grad():
            target = _last_hidden(reference, enc).float()
        hidden = _last_hidden(model, enc).float()
        weight = mask[..., None].float()
        return ((hidden - target).square() * weight).sum() / (target.square() * weight).sum().clamp_min(1e-12)
    encoder_decoder = bool(getattr(reference.config, "is_encoder_decoder", False))
    valid, _ = next_token_positions(enc, encoder_decoder)
    with torch.no_grad():
        target = next_token_logits(reference, enc, encoder_decoder)
    logits = next_token_logits(model, enc, encoder_decoder)
    kl = next_token_kl(torch.log_softmax(logits, -1), torch.log_softmax(target, -1))
    return kl[valid].mean() if valid.any() else kl.sum() * 0
