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
from dataclasses import dataclass, field
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


def calibrate(model, reference, texts: list[str], *, tokenizer, steps: int = 300, lr: float = 1e-3,
              batch_size: int = 16, max_length: int = 128, heldout: list[str] | None = None,
              heldout_fraction: float = 0.1, eval_every: int = 25, patience: int = 4, seed: int = 0,
              anchor: float = 0.0, progress: bool = True) -> CalibrationResult:
    """Train the compressed tables of `model` (in place) towards `reference` on unlabelled `texts`.

    Every `eval_every` steps the loss on held-out text (`heldout`, or a `heldout_fraction` of `texts`)
    is measured; training stops after `patience` measurements without improvement, and the tables
    return to their best state. `anchor` > 0 also pulls every table towards the reference's dense one.
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to calibrate on: give one or more non-empty texts")
    if steps < 1 or eval_every < 1 or patience < 1:
        raise ValueError("steps, eval_every and patience must be at least 1")
    if anchor < 0:
        raise ValueError(f"anchor={anchor} must be zero or positive")
    tables = compressed_tables(model)
    if not tables:
        raise ValueError("this model has no compressed tables to calibrate; compress it first")
    rng = random.Random(seed)
    if heldout is None:
        texts = rng.sample(texts, len(texts))
        cut = max(1, int(len(texts) * heldout_fraction)) if len(texts) > 1 else 0
        heldout, texts = (texts[:cut], texts[cut:]) if cut else (texts, texts)
    generative = is_generative(reference)
    device = next(model.parameters()).device
    if tokenizer.pad_token is None:
        batch_size = 1  # no padding token: one text at a time

    trainable = [p for table in tables for p in table.parameters()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.eval()
    reference.eval()
    optimizer = torch.optim.Adam(trainable, lr=lr)
    anchors = _dense_counterparts(model, reference) if anchor else []

    max_length = min(token_limit(model, max_length), token_limit(reference, max_length))

    def encode(batch):
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def heldout_loss() -> float:
        with torch.no_grad():
            losses = [_loss(model, reference, encode(heldout[i:i + batch_size]), generative).item()
                      for i in range(0, len(heldout), batch_size)]
        return sum(losses) / len(losses)

    best = before = heldout_loss()
    best_state = [p.detach().clone() for p in trainable]
    best_step, waited, history = 0, 0, [{"step": 0, "heldout": before}]
    order: list[str] = []
    bar = tqdm(range(1, steps + 1), desc="calibrate", unit="step", disable=not progress)
    try:
        for step in bar:
            if len(order) < batch_size:
                order += rng.sample(texts, len(texts))
            batch, order = order[:batch_size], order[batch_size:]
            loss = _loss(model, reference, encode(batch), generative)
            optimizer.zero_grad()
            (loss + anchor * sum(_distance(table, dense) for table, dense in anchors)).backward()
            optimizer.step()
            if step % eval_every == 0 or step == steps:
                current = heldout_loss()
                history.append({"step": step, "train": loss.item(), "heldout": current})
                bar.set_postfix(loss=f"{loss.item():.4g}", heldout=f"{current:.4g}")
                if current < best * (1 - MIN_GAIN):
                    best, best_step, waited = current, step, 0
                    best_state = [p.detach().clone() for p in trainable]
                else:
                    waited += 1
                    if waited >= patience:
                        break
    finally:
        with torch.no_grad():
            for p, saved in zip(trainable, best_state):
                p.copy_(saved)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return CalibrationResult(steps=history[-1]["step"], best_step=best_step, heldout_before=before,
                             heldout_after=best, history=history)


def _dense_counterparts(model, reference) -> list[tuple[Any, torch.Tensor]]:
    """Each compressed table of `model` with the dense table it replaced, taken from `reference`."""
    pairs = [(model.get_input_embeddings(), reference.get_input_embeddings().weight.detach())]
    head, dense_head = model.get_output_embeddings(), reference.get_output_embeddings()
    if head is not None and dense_head is not None and hasattr(head, "embedding") and head.embedding is not pairs[0][0]:
        pairs.append((head.embedding, dense_head.weight.detach()))
    return [(table, dense) for table, dense in pairs if table in compressed_tables(model)]


def _distance(table, dense: torch.Tensor) -> torch.Tensor:
    return (table.weight - dense).square().sum() / dense.square().sum()


def _loss(model, reference, enc, generative: bool) -> torch.Tensor:
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
