"""Task metrics: accuracy, macro-F1, entity-level F1 (seqeval, and its counting for generated mentions),
SQuAD exact match and F1, and %Base."""

from __future__ import annotations

import collections
import re
import string


def accuracy(predictions: list, references: list) -> float:
    """Fraction of predictions equal to their reference."""
    if len(predictions) != len(references) or not references:
        raise ValueError("accuracy needs as many predictions as references, and at least one")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: list, references: list) -> float:
    """The unweighted mean of each label's F1 over every label that is predicted or in the references (one never
    predicted, or predicted but never right, scores 0), as scikit-learn's f1_score(average="macro")."""
    if len(predictions) != len(references) or not references:
        raise ValueError("macro_f1 needs as many predictions as references, and at least one")
    scores = []
    for label in set(references) | set(predictions):
        hit = sum(p == r == label for p, r in zip(predictions, references))
        made, gold = sum(p == label for p in predictions), sum(r == label for r in references)
        scores.append(2 * hit / (made + gold))
    return sum(scores) / len(scores)


def entity_f1(references: list[list[str]], predictions: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 of BIO tag sequences, as seqeval computes them (CoNLL style)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"f1": f1_score(references, predictions, zero_division=0),
            "precision": precision_score(references, predictions, zero_division=0),
            "recall": recall_score(references, predictions, zero_division=0)}


def mention_f1(references: list[list], predictions: list[list]) -> dict[str, float]:
    """Precision, recall and F1 over the (type, text) mentions of each sentence, for generated NER output.
    Mentions are counted as seqeval counts entities: a mention that occurs three times counts three times,
    so a prediction that names it once finds one of the three."""
    hit = sum(sum((collections.Counter(r) & collections.Counter(p)).values()) for r, p in zip(references, predictions))
    gold = sum(len(r) for r in references)
    made = sum(len(p) for p in predictions)
    precision = hit / made if made else 0.0
    recall = hit / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match and token F1 in percent, each the best over the gold answers of a question (SQuAD v1.1)."""
    if len(predictions) != len(references) or not references:
        raise ValueError("squad_scores needs one prediction per question, and at least one")
    em = f1 = 0.0
    for prediction, golds in zip(predictions, references):
        golds = golds or [""]
        em += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        f1 += max(_token_f1(prediction, g) for g in golds)
    return {"exact_match": 100 * em / len(references), "f1": 100 * f1 / len(references)}


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def percent_of_base(score: float, base: float) -> float:
    """A score relative to the uncompressed model's, in percent (the paper's %Base)."""
    if base == 0:
        raise ValueError("%Base is undefined when the base model scores 0")
    return 100.0 * score / base
