"""Fine-tuning and evaluation on the paper's tasks (XNLI, WikiANN, TyDiQA-GoldP, BC5CDR), SST-2, or the user's files."""

from .data import DataError, read_classify, read_nli, read_ner, read_qa
from .registry import TASKS, get_task
from .runner import FinetuneRuntime, FinetuneSettings, evaluate, finetune, load_model

__all__ = ["DataError", "FinetuneRuntime", "FinetuneSettings", "TASKS", "evaluate", "finetune", "get_task", "load_model",
           "read_classify", "read_nli", "read_ner", "read_qa"]
