"""The tasks `asg finetune --task` knows, with the paper's hyper-parameters (appendix A) as defaults (and, for
single-text classification, which the paper does not run, the usual 2e-5 of BERT on SST-2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import hub
from .families import NER, NLI, QA, Classify

SEQ2SEQ_LEARNING_RATE = 1e-3  # mT5 in the paper
BATCH_SIZE = 128
WEIGHT_DECAY = 0.01
EPOCHS = 2
CROSS_LINGUAL_EPOCHS = 5


@dataclass(frozen=True)
class Task:
    """A task: its family, its hub loader and languages (none for local-files-only tasks), its learning rate."""

    name: str
    family: type
    learning_rate: float
    loader: Callable | None = None
    languages: tuple[str, ...] = ()
    eval_split: str = "test"


TASKS = {
    "xnli": Task("xnli", NLI, 5e-6, hub.xnli, hub.XNLI_LANGS),
    "wikiann": Task("wikiann", NER, 5e-5, hub.wikiann, hub.PANX_LANGS),
    "tydiqa": Task("tydiqa", QA, 3e-5, hub.tydiqa, tuple(hub.TYDIQA_LANGS), eval_split="validation"),
    "bc5cdr": Task("bc5cdr", NER, 5e-5, hub.bc5cdr, ("en",)),
    "sst2": Task("sst2", Classify, 2e-5, hub.sst2, ("en",), eval_split="validation"),
    # the same families on the user's own files
    "classify": Task("classify", Classify, 2e-5),
    "nli": Task("nli", NLI, 5e-6),
    "ner": Task("ner", NER, 5e-5),
    "qa": Task("qa", QA, 3e-5),
}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError listing the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
