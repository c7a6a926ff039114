"""Tiny copies of the hub datasets the tasks load, laid out as the hub stores them (a README.md whose YAML
names the configs, splits and features, one parquet file per split; tner/bc5cdr's JSON-lines files), so
that the real loaders read them through ASG_DATASETS_MIRROR: what `asg experiment --dry-run` and the
tests run without a network. The text is random words from `WORDS`; the labels are the datasets' own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import hub

WORDS = ("the", "cat", "dog", "sat", "ran", "here", "there", "house", "went", "to", "saw", "today", "alice", "bob",
         "carol", "paris", "rome", "oslo", "aspirin", "fever", "good", "bad", "who", "where")
XNLI_LABELS = ("entailment", "neutral", "contradiction")
PANX_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
SST2_LABELS = ("negative", "positive")


def class_label(*names: str) -> dict:
    """The YAML dtype of a ClassLabel feature with these names."""
    return {"class_label": {"names": {str(i): name for i, name in enumerate(names)}}}


def write_dataset(mirror: Path, repo: str, features: list[dict], configs: dict[str, dict[str, dict[str, list]]]) -> Path:
    """Write `repo` ("owner/name") under `mirror`: `configs` maps a config name ("default" for a dataset without
    configs) to its splits, each a dict of columns; `features` is the card's feature list. Returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    folder = Path(mirror) / repo
    card = {"dataset_info": [], "configs": []}
    for config, splits in configs.items():
        subfolder = "data" if config == "default" else config
        (folder / subfolder).mkdir(parents=True, exist_ok=True)
        files = []
        for split, columns in splits.items():
            pq.write_table(pa.table(columns), folder / subfolder / f"{split}-00000-of-00001.parquet")
            files.append({"split": split, "path": f"{subfolder}/{split}-*"})
        card["dataset_info"].append({"config_name": config, "features": features})
        card["configs"].append({"config_name": config, "data_files": files})
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n")
    return folder


def write_mirror(mirror: Path, task: str, langs: list[str], rows: int = 12, seed: int = 0) -> None:
    """Tiny copies of what `task`'s hub loader reads, for the languages `langs`, under `mirror`."""
    rng = random.Random(seed)
    writers = {"xnli": _xnli, "wikiann": _wikiann, "tydiqa": _tydiqa, "bc5cdr": _bc5cdr, "sst2": _sst2}
    if task not in writers:
        raise ValueError(f"no dataset fixture for task {task!r}; tasks with hub data: {', '.join(writers)}")
    writers[task](Path(mirror), langs, rows, rng)


def _words(rng: random.Random, count: int) -> list[str]:
    return rng.choices(WORDS, k=count)


def _xnli(mirror: Path, langs, rows: int, rng: random.Random) -> None:
    def split():
        return {"premise": [" ".join(_words(rng, 6)) for _ in range(rows)],
                "hypothesis": [" ".join(_words(rng, 4)) for _ in range(rows)],
                "label": [i % 3 for i in range(rows)]}

    write_dataset(mirror, "facebook/xnli", [{"name": "premise", "dtype": "string"}, {"name": "hypothesis", "dtype": "string"},
                                            {"name": "label", "dtype": class_label(*XNLI_LABELS)}],
                  {lang: {"train": split(), "validation": split(), "test": split()} for lang in langs})


def _tagged(rng: random.Random, rows: int, names) -> tuple[list[list[str]], list[list[int]]]:
    """Sentences with each word tagged O (most) or with a B- tag of `names`, as integer tags."""
    begins = [i for i, name in enumerate(names) if name.startswith("B-")]
    tokens = [_words(rng, rng.randint(3, 7)) for _ in range(rows)]
    return tokens, [[rng.choice([0, 0, 0, *begins]) for _ in sentence] for sentence in tokens]


def _wikiann(mirror: Path, langs, rows: int, rng: random.Random) -> None:
    def split(lang):
        tokens, tags = _tagged(rng, rows, PANX_TAGS)
        return {"tokens": tokens, "ner_tags": tags, "langs": [[lang] * len(t) for t in tokens]}

    write_dataset(mirror, "google/xtreme", [{"name": "tokens", "sequence": "string"},
                                            {"name": "ner_tags", "sequence": class_label(*PANX_TAGS)},
                                            {"name": "langs", "sequence": "string"}],
                  {f"PAN-X.{lang}": {s: split(lang) for s in ("train", "validation", "test")} for lang in langs})


def _tydiqa(mirror: Path, langs, rows: int, rng: random.Random) -> None:
    def split():
        columns = {"id": [], "title": [], "context": [], "question": [], "answers": []}
        for lang in langs:
            for i in range(rows):
                words = _words(rng, 8)
                answer = words[rng.randrange(len(words))]
                context = " ".join(words)
                columns["id"].append(f"{hub.TYDIQA_LANGS.get(lang, lang)}-{rng.getrandbits(40)}-{i}")
                columns["title"].append(words[0])
                columns["context"].append(context)
                columns["question"].append(" ".join(_words(rng, 3)))
                columns["answers"].append({"text": [answer], "answer_start": [context.index(answer)]})
        return columns

    write_dataset(mirror, "google-research-datasets/tydiqa",
                  [{"name": "id", "dtype": "string"}, {"name": "title", "dtype": "string"},
                   {"name": "context", "dtype": "string"}, {"name": "question", "dtype": "string"},
                   {"name": "answers", "sequence": [{"name": "text", "dtype": "string"},
                                                    {"name": "answer_start", "dtype": "int32"}]}],
                  {"secondary_task": {"train": split(), "validation": split()}})


def _bc5cdr(mirror: Path, langs, rows: int, rng: random.Random) -> None:
    folder = mirror / "tner" / "bc5cdr" / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        tokens, tags = _tagged(rng, rows, hub.BC5CDR_TAGS)
        (folder / f"{name}.json").write_text(
            "".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in zip(tokens, tags)))


def _sst2(mirror: Path, langs, rows: int, rng: random.Random) -> None:
    def split(hidden: bool = False):
        return {"idx": list(range(rows)), "sentence": [" ".join(_words(rng, 6)) for _ in range(rows)],
                "label": [-1 if hidden else i % 2 for i in range(rows)]}

    write_dataset(mirror, "stanfordnlp/sst2", [{"name": "idx", "dtype": "int32"}, {"name": "sentence", "dtype": "string"},
                                               {"name": "label", "dtype": class_label(*SST2_LABELS)}],
                  {"default": {"train": split(), "validation": split(), "test": split(hidden=True)}})
