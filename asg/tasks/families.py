"""The four task families — single-text classification, sentence-pair classification, tagging, extractive
QA — for encoders and, as text-to-text, for encoder–decoders (paper section 2.4): how to encode examples,
how to turn model outputs into predictions, and how to score them."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import data, metrics

IGNORE = -100  # label id that the loss skips: special tokens, later sub-words, padding


class Features(list):
    """Model inputs, one dict per item, that a Trainer can iterate; `extra` keeps per-item bookkeeping and
    `truncated` counts the examples cut to the maximum length."""

    def __init__(self, items, extra=None, truncated: int = 0):
        super().__init__(items)
        self.extra = extra or []
        self.truncated = truncated


def tokenize(tokenizer, texts, pairs=None, *, max_length: int, **options):
    """`tokenizer(texts, pairs, **options)` cut to `max_length` tokens, and how many examples (their inputs) were
    cut. The texts are read whole first; only where some input or target is too long are they read again, cut."""
    whole = tokenizer(texts, pairs, truncation=False, verbose=False, **options)
    truncated = sum(len(ids) > max_length for ids in whole["input_ids"])
    if not truncated and not any(len(ids) > max_length for ids in whole.get("labels", [])):
        return whole, 0
    return tokenizer(texts, pairs, truncation=True, max_length=max_length, **options), truncated


class Family:
    """What every task family shares: the Auto class of its encoder head, and defaults for generated output."""

    head: str = ""  # the transformers Auto class that puts this family's head on an encoder
    reported: tuple[str, ...] = ()  # the metrics a paper-style table shows, the main one included
    closed_labels = False  # True: every evaluation label must be seen in training (a classifier cannot invent one)

    @classmethod
    def encoder_class(cls):
        import transformers

        return getattr(transformers, cls.head)

    @staticmethod
    def parse_generated(text: str, example):
        return text.strip()

    @classmethod
    def score_generated(cls, examples, predictions) -> dict[str, float]:
        """Scores of generated predictions (an encoder–decoder's), after `parse_generated`."""
        return cls.score(examples, predictions)

    @staticmethod
    def record(example, prediction) -> dict[str, Any]:
        return {**example, "prediction": prediction}


class Labelled(Family):
    """Classification into labels taken from the data; scored by accuracy and macro-F1."""

    main_metric = "accuracy"
    reported = ("accuracy", "macro_f1")
    head = "AutoModelForSequenceClassification"
    closed_labels = True

    @staticmethod
    def labels(examples) -> list[str]:
        return sorted({ex["label"] for ex in examples})

    @staticmethod
    def texts(examples) -> tuple[list[str], list[str] | None]:
        """The first texts and the second texts (None for single texts) that the tokenizer reads."""
        raise NotImplementedError

    @classmethod
    def encode(cls, tokenizer, examples, labels, max_length, train: bool) -> Features:
        index = {label: i for i, label in enumerate(labels)}
        first, second = cls.texts(examples)
        enc, truncated = tokenize(tokenizer, first, second, max_length=max_length)
        items = [{key: enc[key][i] for key in enc.keys()} | {"labels": index.get(ex["label"], IGNORE)}
                 for i, ex in enumerate(examples)]
        return Features(items, truncated=truncated)

    @staticmethod
    def decode(output, features, examples, labels) -> list[str]:
        return [labels[i] for i in np.asarray(output.predictions).argmax(-1)]

    @staticmethod
    def score(examples, predictions) -> dict[str, float]:
        gold = [ex["label"] for ex in examples]
        return {"accuracy": 100 * metrics.accuracy(predictions, gold), "macro_f1": 100 * metrics.macro_f1(predictions, gold)}


class Classify(Labelled):
    """Single-text classification (topics, sentiment, intent; SST-2)."""

    name = "classify"
    read = staticmethod(data.read_classify)

    @staticmethod
    def texts(examples):
        return [ex["text"] for ex in examples], None

    @staticmethod
    def text_pair(ex) -> tuple[str, str]:
        return ex["text"], ex["label"]


class NLI(Labelled):
    """Premise/hypothesis classification (XNLI)."""

    name = "nli"
    read = staticmethod(data.read_nli)

    @staticmethod
    def texts(examples):
        return [ex["premise"] for ex in examples], [ex["hypothesis"] for ex in examples]

    @staticmethod
    def text_pair(ex) -> tuple[str, str]:
        return f"premise: {ex['premise']} hypothesis: {ex['hypothesis']}", ex["label"]


class NER(Family):
    """Word tagging with BIO tags (WikiANN, BC5CDR); scored by entity-level F1 (seqeval)."""

    name = "ner"
    main_metric = "f1"
    reported = ("f1",)
    head = "AutoModelForTokenClassification"
    read = staticmethod(data.read_ner)

    @staticmethod
    def labels(examples) -> list[str]:
        tags = {tag for ex in examples for tag in ex["tags"]}
        return sorted(tags, key=lambda t: (t != "O", t[2:], t))  # O first, then B-/I- of each type together

    @staticmethod
    def encode(tokenizer, examples, labels, max_length, train: bool) -> Features:
        index = {label: i for i, label in enumerate(labels)}
        enc = tokenizer([ex["tokens"] for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        items, words = [], []
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            label_ids, previous = [], None
            for word in word_ids:  # the first sub-word of each word carries its tag
                label_ids.append(index.get(ex["tags"][word], IGNORE) if word is not None and word != previous else IGNORE)
                previous = word
            items.append({key: enc[key][i] for key in enc.keys()} | {"labels": label_ids})
            words.append(word_ids)
        return Features(items, words)

    @staticmethod
    def decode(output, features, examples, labels) -> list[list[str]]:
        predictions = []
        for ex, word_ids, logits in zip(examples, features.extra, output.predictions):
            tags = ["O"] * len(ex["tokens"])  # words cut off by truncation stay O
            previous = None
            for position, word in enumerate(word_ids):
                if word is not None and word != previous and position < len(logits):
                    tags[word] = labels[int(np.argmax(logits[position]))]
                previous = word
            predictions.append(tags)
        return predictions

    @staticmethod
    def score(examples, predictions) -> dict[str, float]:
        return {k: 100 * float(v) for k, v in metrics.entity_f1([ex["tags"] for ex in examples], predictions).items()}

    @staticmethod
    def score_generated(examples, predictions) -> dict[str, float]:
        golds = [entities(ex["tokens"], ex["tags"]) for ex in examples]
        return {k: 100 * float(v) for k, v in metrics.mention_f1(golds, predictions).items()}

    @staticmethod
    def text_pair(ex) -> tuple[str, str]:
        found = entities(ex["tokens"], ex["tags"])
        target = " ; ".join(f"{entity_type}: {text}" for entity_type, text in found) or "none"
        return " ".join(ex["tokens"]), target

    @staticmethod
    def parse_generated(text: str, example) -> list[tuple[str, str]]:
        found = []
        for part in text.split(";"):
            entity_type, sep, span = part.partition(":")
            if sep and entity_type.strip() and span.strip():
                found.append((entity_type.strip(), " ".join(span.split())))
        return found


def entities(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """The (type, text) entity mentions of a BIO-tagged sentence, in order, each as often as it occurs."""
    found, entity_type, words = [], None, []
    for token, tag in list(zip(tokens, tags)) + [("", "O")]:
        if tag.startswith("I-") and entity_type == tag[2:]:
            words.append(token)
            continue
        if entity_type is not None:
            found.append((entity_type, " ".join(words)))
        entity_type, words = (tag[2:], [token]) if tag[:2] in ("B-", "I-") else (None, [])
    return found


class QA(Family):
    """Extractive QA over a gold passage (TyDiQA-GoldP); scored by SQuAD exact match and F1."""

    name = "qa"
    main_metric = "f1"
    reported = ("exact_match", "f1")
    head = "AutoModelForQuestionAnswering"
    read = staticmethod(data.read_qa)
    stride = 128
    max_answer_tokens = 30

    @staticmethod
    def labels(examples) -> list[str]:
        return []

    @classmethod
    def encode(cls, tokenizer, examples, labels, max_length, train: bool) -> Features:
        pad_right = tokenizer.padding_side == "right"
        enc = tokenizer([ex["question"].lstrip() for ex in examples], [ex["context"] for ex in examples],
                        truncation="only_second" if pad_right else "only_first", max_length=max_length,
                        stride=min(cls.stride, max_length // 4), return_overflowing_tokens=True,
                        return_offsets_mapping=True)
        items, extra = [], []
        for i in range(len(enc["input_ids"])):
            source = enc["overflow_to_sample_mapping"][i]
            ex = examples[source]
            sequence = enc.sequence_ids(i)
            offsets = enc["offset_mapping"][i]
            item = {key: enc[key][i] for key in enc.keys() if key not in ("offset_mapping", "overflow_to_sample_mapping")}
            start_token = end_token = 0  # an answer outside this window points at the first token
            start = ex["answers"]["answer_start"][0]
            end = start + len(ex["answers"]["text"][0])
            context = [t for t, s in enumerate(sequence) if s == 1]
            if context and offsets[context[0]][0] <= start and offsets[context[-1]][1] >= end:
                start_token = next(t for t in context if offsets[t][1] > start)
                end_token = next(t for t in reversed(context) if offsets[t][0] < end)
            item |= {"start_positions": start_token, "end_positions": end_token}
            items.append(item)
            extra.append({"example": source, "offsets": [o if s == 1 else None for o, s in zip(offsets, sequence)]})
        return Features(items, extra)

    @classmethod
    def decode(cls, output, features, examples, labels) -> list[str]:
        starts, ends = output.predictions[:2] if isinstance(output.predictions, tuple) else output.predictions
        best: dict[int, tuple[float, str]] = {}
        for start_logits, end_logits, info in zip(starts, ends, features.extra):
            context = examples[info["example"]]["context"]
            offsets = info["offsets"]
            top_starts = np.argsort(start_logits)[::-1][:20]
            top_ends = np.argsort(end_logits)[::-1][:20]
            for s in top_starts:
                for e in top_ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > cls.max_answer_tokens:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > best.get(info["example"], (-np.inf, ""))[0]:
                        best[info["example"]] = (score, context[offsets[s][0]:offsets[e][1]])
        return [best.get(i, (0.0, ""))[1] for i in range(len(examples))]

    @staticmethod
    def score(examples, predictions) -> dict[str, float]:
        return metrics.squad_scores(predictions, [ex["answers"]["text"] for ex in examples])

    @staticmethod
    def text_pair(ex) -> tuple[str, str]:
        return f"question: {ex['question']} context: {ex['context']}", ex["answers"]["text"][0]

    @staticmethod
    def record(example, prediction) -> dict[str, Any]:
        return {"id": example["id"], "question": example["question"], "answers": example["answers"]["text"],
                "prediction": prediction, "lang": example["lang"]}

