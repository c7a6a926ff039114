"""The paper's datasets from the Hugging Face hub, in the same records as the local-file readers.

This is the real code path for users with a network; where the hub cannot be reached, each loader
raises a ValueError that says to give local files instead.
"""

from __future__ import annotations

from typing import Any

XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
PANX_LANGS = ("af", "ar", "bg", "bn", "de", "el", "en", "es", "et", "eu", "fa", "fi", "fr", "he", "hi", "hu", "id",
              "it", "ja", "jv", "ka", "kk", "ko", "ml", "mr", "ms", "my", "nl", "pt", "ru", "sw", "ta", "te", "th",
              "tl", "tr", "ur", "vi", "yo", "zh")
TYDIQA_LANGS = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
                "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
# tner/bc5cdr stores integer tags; these are the names its label.json gives them.
BC5CDR_TAGS = ("O", "B-Chemical", "B-Disease", "I-Disease", "I-Chemical")


def xnli(split: str, lang: str) -> list[dict[str, Any]]:
    """XNLI (facebook/xnli): premise, hypothesis and label name."""
    ds = _load("facebook/xnli", lang, split)
    names = ds.features["label"].names
    return [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": names[r["label"]], "lang": lang} for r in ds]


def wikiann(split: str, lang: str) -> list[dict[str, Any]]:
    """WikiANN in its XTREME form (google/xtreme, PAN-X.<lang>): words and BIO tag names."""
    ds = _load("google/xtreme", f"PAN-X.{lang}", split)
    names = ds.features["ner_tags"].feature.names
    return [{"tokens": r["tokens"], "tags": [names[t] for t in r["ner_tags"]], "lang": lang} for r in ds]


def tydiqa(split: str, lang: str) -> list[dict[str, Any]]:
    """TyDiQA Gold Passage (the secondary task); its evaluation split is 'validation'."""
    ds = _load("google-research-datasets/tydiqa", "secondary_task", "train" if split == "train" else "validation")
    prefix = TYDIQA_LANGS.get(lang, lang) + "-"
    return [{"id": r["id"], "context": r["context"], "question": r["question"],
             "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])},
             "lang": lang} for r in ds if r["id"].startswith(prefix)]


def bc5cdr(split: str, lang: str) -> list[dict[str, Any]]:
    """BC5CDR chemical and disease mentions (tner/bc5cdr)."""
    ds = _load("tner/bc5cdr", None, split)
    feature = getattr(ds.features["tags"], "feature", None)
    names = getattr(feature, "names", None) or BC5CDR_TAGS
    return [{"tokens": r["tokens"], "tags": [names[t] for t in r["tags"]], "lang": "en"} for r in ds]


def _load(name: str, config: str | None, split: str):
    try:
        from datasets import load_dataset

        return load_dataset(name, config, split=split)
    except Exception as err:  # no network, unknown config, hub errors: all mean "use local files"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"could not load {name}{f' ({config})' if config else ''} split {split!r} from the Hugging "
                         f"Face hub: {first}. Without a network, give local files with --train-file and --eval-file") from None
