"""How closely a compressed model reproduces its uncompressed reference on text, with no labels.

Encoders: mean cosine similarity of sentence embeddings, made as the reference's own sentence-transformers
pipeline makes them (pooling, dense layers, normalisation; see asg.sentence) or by mean pooling of the
last hidden states. Generative models (causal LMs, encoder–decoders): KL divergence of the next-token
distributions, top-1 agreement, and perplexity.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

BUILTIN_SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


def read_texts(path: str | os.PathLike | None = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file; the built-in ordinary English sentences when `path` is None."""
    path = Path(path) if path is not None else BUILTIN_SENTENCES
    if not path.exists():
        raise ValueError(f"text file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a text file")
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from None
    if not texts:
        raise ValueError(f"{path} holds no text: give a file with one or more non-empty lines")
    return texts


_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "mpnet")


def token_limit(model, requested: int) -> int:
    """`requested`, or fewer: the most tokens per text the model's position table takes. RoBERTa-style
    models start positions after the padding index, so their limit is that much below the table's size."""
    config = getattr(model, "config", None)
    limit = next((value for name in ("max_position_embeddings", "n_positions")
                  if isinstance(value := getattr(config, name, None), int) and value > 0), None)
    if limit is None:
        return requested
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS and isinstance(getattr(config, "pad_token_id", None), int):
        limit -= config.pad_token_id + 1
    return max(1, min(requested, limit))


def padding_token(tokenizer) -> str | None:
    """The token batches are padded with: the tokenizer's padding token, else its end-of-text token (decoder-only
    models such as GPT-2, Llama and Gemma often have no padding token), else its unknown token; None if none."""
    return next((token for name in ("pad_token", "eos_token", "unk_token")
                 if (token := getattr(tokenizer, name, None)) is not None), None)


@contextmanager
def padding(tokenizer):
    """While in this block the tokenizer pads on the right, so that a text's tokens sit at the same positions
    in every batch, and one without a padding token pads with `padding_token`, which the attention mask hides;
    both as before afterwards."""
    side, pad = getattr(tokenizer, "padding_side", None), getattr(tokenizer, "pad_token", None)
    if side is not None:
        tokenizer.padding_side = "right"
    if pad is None and (filler := padding_token(tokenizer)) is not None:
        tokenizer.pad_token = filler
    try:
        yield
    finally:
        if side is not None:
            tokenizer.padding_side = side
        if pad is None and getattr(tokenizer, "pad_token", None) is not None:
            tokenizer.pad_token = None


def is_generative(model) -> bool:
    """True for models that generate text (causal LMs, encoder–decoders), False for encoders."""
    return bool(getattr(model, "can_generate", lambda: False)())


class ReferenceOutputs:
    """The reference's outputs on one set of texts (next-token log-probabilities, or pooled embeddings),
    computed by the first `fidelity` call that is given this object and reused by the next ones, as long as
    they fit in `max_bytes` (what does not fit is computed again each time). Calls on other texts or
    settings start it afresh."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._key: tuple | None = None
        self._outputs: dict[int, torch.Tensor] = {}
        self._size = 0

    def get(self, key: tuple, index: int, compute) -> torch.Tensor:
        if key != self._key:
            self._key, self._outputs, self._size = key, {}, 0
        if index in self._outputs:
            return self._outputs[index]
        value = compute()
        size = value.numel() * value.element_size()
        if self._size + size <= self.max_bytes:
            self._outputs[index], self._size = value, self._size + size
        return value


@torch.no_grad()
def fidelity(model, reference, tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 128,
             progress: bool = False, cache: ReferenceOutputs | None = None, embed=None) -> dict[str, Any]:
    """Compare `model` with `reference` on `texts`; the metrics depend on whether the reference generates text.
    Given `cache`, the reference's outputs are computed once for several models compared on the same texts.
    `embed` (an `asg.sentence.Pipeline`) makes an encoder's sentence embeddings; by default, the pipeline
    of the folder the reference was loaded from, where it has one, else mean pooling."""
    if not texts:
        raise ValueError("no texts to measure fidelity on")
    generative = is_generative(reference)
    if embed is None and not generative:
        from . import sentence

        embed = sentence.pipeline(sentence.local_folder(getattr(reference.config, "name_or_path", None)))
    model.eval()
    reference.eval()
    batch_size = batch_size if padding_token(tokenizer) is not None else 1  # none: one text at a time, unpadded
    with padding(tokenizer):
        sums, cosines = _compare(model, reference, tokenizer, texts, batch_size, max_length, progress, cache, embed)
    if generative:
        count = sums["tokens"]
        if not count:
            raise ValueError("the texts are too short: next-token fidelity needs texts of at least two tokens")
        return {"generative": True, "kl": sums["kl"] / count, "top1_agreement": sums["agree"] / count,
                "perplexity": math.exp(sums["nll"] / count), "reference_perplexity": math.exp(sums["ref_nll"] / count),
                "tokens": int(count), "texts": len(texts)}
    cosine = torch.cat(cosines)
    return {"generative": False, "mean_cosine": cosine.mean().item(), "min_cosine": cosine.min().item(),
            "texts": len(texts), "sentence_embedding": embed.describe()}


def _compare(model, reference, tokenizer, texts, batch_size, max_length, progress, cache, embed):
    """Sums of the next-token measures (generative reference), or each text's sentence-embedding cosine."""
    generative = is_generative(reference)
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    max_length = min(token_limit(model, max_length), token_limit(reference, max_length))
    sums = dict.fromkeys(("kl", "agree", "nll", "ref_nll", "tokens"), 0.0)
    cosines = []
    cache_key = (id(reference), tuple(texts), batch_size, max_length, None if generative else tuple(embed.steps))
    for index, batch in enumerate(tqdm(batches, desc="fidelity", unit="batch", disable=not progress)):
        enc = tokenizer(batch, return_tensors="pt", padding=len(batch) > 1, truncation=True, max_length=max_length)
        enc = {key: value.to(_device(model)) for key, value in enc.items() if key in ("input_ids", "attention_mask")}
        compute = (lambda: _reference_log_probs(reference, enc)) if generative else (lambda: _embedded(reference, enc, embed))
        outputs = compute() if cache is None else cache.get(cache_key, index, compute)
        if generative:
            for name, value in _generative_sums(model, outputs, enc, reference).items():
                sums[name] += value
        else:
            cosines.append(F.cosine_similarity(_embedded(model, enc, embed), outputs, dim=-1))
    return sums, cosines


def _embedded(model, enc, embed) -> torch.Tensor:
    """The model's sentence embeddings, text by text."""
    return embed.embed(_last_hidden(model, enc), enc["attention_mask"])


def _last_hidden(model, enc) -> torch.Tensor:
    out = model(**enc, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out.hidden_states[-1]


def _scored_log_probs(model, enc, encoder_decoder: bool) -> torch.Tensor:
    """The model's next-token log-probabilities (N, V) at the N positions `next_token_positions` scores (padding
    left out, which the reference's cached outputs need not hold)."""
    valid, _ = next_token_positions(enc, encoder_decoder)
    return torch.log_softmax(next_token_logits(model, enc, encoder_decoder)[valid], -1)


def _reference_log_probs(reference, enc) -> torch.Tensor:
    return _scored_log_probs(reference, enc, bool(getattr(reference.config, "is_encoder_decoder", False)))


def _generative_sums(model, log_q: torch.Tensor, enc, reference) -> dict[str, float]:
    """Sums over the scored positions of KL(reference || model), top-1 agreement and both models' NLL, from
    the reference's next-token log-probabilities `log_q` at those positions."""
    encoder_decoder = bool(getattr(reference.config, "is_encoder_decoder", False))
    valid, targets = next_token_positions(enc, encoder_decoder)
    targets = targets[valid][:, None]
    log_p = _scored_log_probs(model, enc, encoder_decoder)
    kl = next_token_kl(log_p, log_q)
    nll = -log_p.gather(-1, targets)[:, 0]
    ref_nll = -log_q.gather(-1, targets)[:, 0]
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).float()
    return {"kl": kl.sum().item(), "agree": agree.sum().item(), "tokens": len(kl), "nll": nll.sum().item(),
            "ref_nll": ref_nll.sum().item()}


def next_token_positions(enc, encoder_decoder: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(which positions are scored, the token each predicts) for the logits of `next_token_logits`: every
    real target token of an encoder–decoder, every real token after the first of a causal LM."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if encoder_decoder:
        return mask.bool(), ids
    return (mask[:, 1:] * mask[:, :-1]).bool(), ids[:, 1:]


def next_token_logits(model, enc, encoder_decoder: bool) -> torch.Tensor:
    """Float32 logits at the positions `next_token_positions` scores (an encoder–decoder reads the text as its
    own target)."""
    if encoder_decoder:
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return model(**enc, labels=labels).logits.float()
    return model(**enc).logits.float()[:, :-1]


def next_token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) at each position, from the model's (`log_p`) and reference's (`log_q`) log-softmax."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _device(model) -> torch.device:
    return next(model.parameters()).device
