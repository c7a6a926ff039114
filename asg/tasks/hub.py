"""The paper's datasets (and SST-2 for single-text classification) from the Hugging Face hub, in the same
records as the local-file readers.

This is the real code path for users with a network; where the hub cannot be reached, each loader
raises a ValueError that says to give local files instead. With `ASG_DATASETS_MIRROR` set to a folder
that holds dataset repositories as `OWNER/NAME/` (as `huggingface-cli download --repo-type dataset
OWNER/NAME --local-dir MIRROR/OWNER/NAME` lays them out), the loaders read those copies instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MIRROR_ENV = "ASG_DATASETS_MIRROR"

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


def sst2(split: str, lang: str) -> list[dict[str, Any]]:
    """SST-2 (stanfordnlp/sst2): one sentence and its sentiment; its test labels are hidden, so evaluation
    uses 'validation'."""
    ds = _load("stanfordnlp/sst2", None, split)
    names = ds.features["label"].names
    return [{"text": r["sentence"], "label": names[r["label"]], "lang": "en"} for r in ds]


def _load(name: str, config: str | None, split: str):
    mirror = os.environ.get(MIRROR_ENV)
    source = Path(mirror) / name if mirror else None
    if source is not None and not source.is_dir():
        raise ValueError(f"{MIRROR_ENV} is set to {mirror}, which has no copy of {name} (expected the folder "
                         f"{source}); download it there or unset {MIRROR_ENV} to read the hub")
    try:
        from datasets import load_dataset

        return load_dataset(str(source) if source else name, config, split=split)
    except Exception as err:  # no network, unknown config, hub errors: all mean "use local files"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = source or "the Hugging Face hub"
        raise ValueError(f"could not load {name}{f' ({config})' if config else ''} split {split!r} from {where}: "
                         f"{first}. Without a network, give local files with --train-file and --eval-file") from None
