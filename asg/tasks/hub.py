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
# tner/bc5cdr stores integer tags; these are the names its label2id gives them (tner/label2id, files/bc5cdr.json).
BC5CDR_TAGS = ("O", "B-Chemical", "B-Disease", "I-Disease", "I-Chemical")
BC5CDR_FILES = {"train": "train", "validation": "valid*", "test": "test"}  # valid*: valid.json


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
    """BC5CDR chemical and disease mentions, from the JSON-lines files of tner/bc5cdr (`dataset/train.json`,
    `valid.json`, `test.json`: {"tokens", "tags"} with integer tags). They are read as plain JSON, since the
    repository's loading script is refused by the `datasets` releases that no longer run scripts; the tag
    names are those of its label2id (O, B-Chemical, B-Disease, I-Disease, I-Chemical: IOB, two types)."""
    ds = _load_json("tner/bc5cdr", f"dataset/{BC5CDR_FILES[split]}.json", split)
    out = []
    for row in ds:
        if any(not isinstance(t, int) or not 0 <= t < len(BC5CDR_TAGS) for t in row["tags"]):
            raise ValueError(f"tner/bc5cdr {split}: a tag outside 0..{len(BC5CDR_TAGS) - 1} ({BC5CDR_TAGS}); "
                             "the files no longer match the label set this loader knows")
        out.append({"tokens": row["tokens"], "tags": [BC5CDR_TAGS[t] for t in row["tags"]], "lang": "en"})
    return out


def sst2(split: str, lang: str) -> list[dict[str, Any]]:
    """SST-2 (stanfordnlp/sst2): one sentence and its sentiment; its test labels are hidden, so evaluation
    uses 'validation'."""
    ds = _load("stanfordnlp/sst2", None, split)
    names = ds.features["label"].names
    return [{"text": r["sentence"], "label": names[r["label"]], "lang": "en"} for r in ds]


def _load(name: str, config: str | None, split: str):
    source = _mirrored(name)
    what = f"{name}{f' ({config})' if config else ''} split {split!r} from {source or 'the Hugging Face hub'}"
    return _read(what, source is not None, str(source) if source else name, config, split=split)


def _load_json(name: str, pattern: str, split: str):
    """The JSON-lines files matching `pattern` in the dataset repository `name`, read without its loading script."""
    source = _mirrored(name)
    files = str(source / pattern) if source else f"hf://datasets/{name}/{pattern}"
    return _read(f"{files} (split {split!r})", source is not None, "json", data_files={split: files}, split=split)


def _read(what: str, local: bool, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`; any failure (no network, unknown config, hub errors) is a
    ValueError that names `what` and says to use local files. A `local` copy is read again every time, since
    the datasets cache keys a local folder by its card and file names, not its content, and would serve (and
    check sizes against) an earlier copy of the same name."""
    fresh = {"download_mode": "force_redownload", "verification_mode": "no_checks"} if local else {}
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs, **fresh)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"could not load {what}: {first}. Without a network, give local files with --train-file "
                         "and --eval-file") from None


def _mirrored(name: str) -> Path | None:
    """The local copy of the dataset repository `name` under ASG_DATASETS_MIRROR; None when that is not set."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return None
    source = Path(mirror) / name
    if not source.is_dir():
        raise ValueError(f"{MIRROR_ENV} is set to {mirror}, which has no copy of {name} (expected the folder "
                         f"{source}); download it there or unset {MIRROR_ENV} to read the hub")
    return source
