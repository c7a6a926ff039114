"""Fine-tune and evaluate a model (dense, or an ASG folder) on a task with `transformers.Trainer`.

A run folder holds everything: `settings.json` (the hyper-parameters used), `checkpoints/` (resumed
from after an interruption), `model/` (the fine-tuned model and tokenizer), `predictions/<lang>.jsonl`
and `metrics.json` (one row per evaluation language, and their average). Because it is plain
Trainer, `torchrun` and `accelerate launch` run it on several devices unchanged; only the main
process writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..methods import Compression
from . import registry
from .data import DEFAULT_LANG

_LANG_SEP = "="
RUN_MARK = "asg-finetune-run"  # settings.json["written_by"]: this folder is a run of this package
RUN_FILES = ("settings.json", "metrics.json", "checkpoints", "model", "predictions")  # what a run writes
logger = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    """What one fine-tuning run is, as `settings.json` records it. Unset hyper-parameters take the paper's
    values for the task and model kind; how this process runs it is `FinetuneRuntime`'s."""

    task: str
    output: str
    model: str | None = None
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)  # "PATH" or "LANG=PATH"
    train_lang: str = "en"
    eval_langs: list[str] | None = None  # None: the training language; ["all"]: every language of the task
    learning_rate: float | None = None
    epochs: float | None = None
    batch_size: int = registry.BATCH_SIZE
    weight_decay: float = registry.WEIGHT_DECAY
    max_length: int = 128
    max_steps: int | None = None
    save_steps: int = 500
    seed: int = 0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # compress before training: an `asg.methods.Compression` (or its dict form, {"method": "asg", "k": 256,
    # "m": 96}), or a method config such as `asg.ASGConfig(k=256, m=96)`
    compression: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.compression, dict):
            self.compression = Compression.from_dict(self.compression)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (the compression as the dict it is made from)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        compression = self.compression
        if compression is not None:
            data["compression"] = (compression.to_dict() if isinstance(compression, Compression)
                                   else {"method": compression.method, **compression.to_dict()})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class FinetuneRuntime:
    """How this process runs a fine-tuning (never saved): replace a finished run in the output folder, show
    progress bars, and transformers `TrainerCallback`s to pass to the Trainer."""

    overwrite: bool = False
    progress: bool = True
    callbacks: list = field(default_factory=list)


def finetune(settings: FinetuneSettings, runtime: FinetuneRuntime | None = None) -> dict[str, Any]:
    """Fine-tune, save the model, evaluate on every evaluation language; returns what metrics.json holds."""
    from transformers.trainer_utils import get_last_checkpoint

    runtime = runtime or FinetuneRuntime()
    task = registry.get_task(settings.task)
    run = Path(settings.output)
    _check_run_folder(run, runtime.overwrite)
    train = _limit(_load_train(task, settings), settings.max_train_examples)
    evals = {lang: _limit(rows, settings.max_eval_examples) for lang, rows in _load_evals(task, settings).items()}
    train, evals = _answerable(train, evals)
    labels = _labels(task.family, train, evals)
    model, tokenizer, source = load_model(settings.model, task.family, labels)
    _clear_finished_run(run)  # only now that every input has been read and checked
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    report = _compress(model, settings.compression) if settings.compression else _recorded_report(model)
    resolved = resolve(task, settings, seq2seq, evals)
    trainer = _trainer(model, tokenizer, task.family, seq2seq, resolved, run / "checkpoints",
                       _encode(task.family, tokenizer, train, labels, settings.max_length, seq2seq, True), runtime)
    checkpoint = get_last_checkpoint(str(run / "checkpoints")) if (run / "checkpoints").is_dir() else None
    if trainer.is_world_process_zero():
        _announce_steps(len(train), resolved, trainer.args.world_size)
    recorded = {"settings": resolved.to_dict(), "seq2seq": seq2seq,
                "cross_lingual": _cross_lingual(settings, evals)}
    if trainer.is_world_process_zero():
        _write_json(run / "settings.json", {"written_by": RUN_MARK, "task": task.name, "model": source,
                                            "labels": labels, **recorded, "compression": report})
    start = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_info = {"examples": len(train), "lang": settings.train_lang, "seconds": round(time.time() - start, 1),
                  "loss": result.training_loss, "steps": result.global_step, "resumed_from": checkpoint}
    if trainer.is_world_process_zero():
        _save_model(model, tokenizer, run / "model")
    summary = _evaluate(trainer, task, tokenizer, labels, evals, seq2seq, settings.max_length, run)
    summary.update(task=task.name, model=source, compression=report, **recorded, train=train_info)
    if trainer.is_world_process_zero():
        _write_json(run / "metrics.json", summary)
    return summary


def evaluate(run_dir: str | os.PathLike, eval_files: list[str] | None = None, eval_langs: list[str] | None = None,
             max_eval_examples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a finished run's model again, on its own or other evaluation data; rewrites metrics.json."""
    run = Path(run_dir)
    if not (run / "settings.json").exists() or not (run / "model").is_dir():
        raise ValueError(f"{run} is not a finished fine-tuning run (it needs settings.json and model/); "
                         "create one with `asg finetune`")
    saved = json.loads((run / "settings.json").read_text())
    task = registry.get_task(saved["task"])
    recorded = saved.get("settings") or _older_settings(saved)
    settings = FinetuneSettings.from_dict({**recorded, "task": task.name, "output": str(run), "compression": None})
    settings.eval_files = list(eval_files or settings.eval_files)
    settings.eval_langs = eval_langs or settings.eval_langs
    evals = {lang: _limit(rows, max_eval_examples) for lang, rows in _load_evals(task, settings).items()}
    model, tokenizer, _ = load_model(str(run / "model"), task.family, saved["labels"])
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    trainer = _trainer(model, tokenizer, task.family, seq2seq, settings, run / "checkpoints", None,
                       FinetuneRuntime(progress=progress))
    summary = _evaluate(trainer, task, tokenizer, saved["labels"], evals, seq2seq, settings.max_length, run)
    previous = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    summary = {**previous, **summary, "task": task.name}
    _write_json(run / "metrics.json", summary)
    return summary


def _older_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run written before settings.json held them: its "hyperparameters" entry."""
    return saved["hyperparameters"]


def load_model(source: str | None, family, labels: list[str]):
    """The model for a task family (a task head on an encoder; the model itself for an encoder–decoder),
    from a dense model folder or hub name, or an ASG folder; with its tokenizer and a description of the source."""
    import transformers

    from ..checkpoint import from_pretrained
    from ..loading import default_model_path, load_tokenizer, source_and_options
    from ..loading import load_model as load_dense
    from ..fidelity import padding_token

    source = source or str(default_model_path())
    is_asg = _is_asg_folder(source)
    folder, gguf = source_and_options(source) if not is_asg else (source, {})  # a GGUF file: its folder and name
    config = transformers.AutoConfig.from_pretrained(folder, **gguf)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    options = {} if seq2seq or not labels else {
        "num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
    model_class = transformers.AutoModelForSeq2SeqLM if seq2seq else family.encoder_class()
    try:
        if is_asg:
            model = from_pretrained(source, model_class=model_class, **options)
        else:
            model = load_dense(source, model_class, ignore_mismatched_sizes=bool(options), **options)
    except (OSError, KeyError) as err:
        raise ValueError(f"could not load {source} as {model_class.__name__}: {err}") from None
    tokenizer = load_tokenizer(source, required=True)
    if tokenizer.pad_token is None and (filler := padding_token(tokenizer)) is not None:
        tokenizer.pad_token = filler
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a sequence classifier finds each text's last token by it
    return model, tokenizer, source


# --- data ----------------------------------------------------------------------------------------


def _load_train(task, settings: FinetuneSettings) -> list[dict]:
    if settings.train_files:
        return [ex for path in settings.train_files for ex in task.family.read(path, settings.train_lang)]
    if task.loader is None:
        raise ValueError(f"task {task.name!r} reads local files only: give --train-file")
    langs = list(task.languages) if settings.train_lang == "all" else [settings.train_lang]
    return [ex for lang in langs for ex in task.loader("train", lang)]


def _load_evals(task, settings: FinetuneSettings) -> dict[str, list[dict]]:
    """Evaluation examples by language: from files ("LANG=PATH", or the records' own "lang"), or from the hub."""
    if settings.eval_files:
        groups: dict[str, list[dict]] = {}
        for spec in settings.eval_files:
            lang, path = _split_eval_spec(spec)
            for ex in task.family.read(path, lang):
                if lang:  # LANG=PATH: the whole file is that language, whatever its records say
                    ex["lang"] = lang
                name = ex["lang"] if ex["lang"] != DEFAULT_LANG else Path(path).stem
                groups.setdefault(name, []).append(ex)
        return groups
    if task.loader is None:
        raise ValueError(f"task {task.name!r} reads local files only: give --eval-file")
    langs = settings.eval_langs or [settings.train_lang]
    if langs == ["all"]:
        langs = list(task.languages)
    unknown = [lang for lang in langs if lang not in task.languages]
    if unknown:
        raise ValueError(f"task {task.name} has no language(s) {unknown}; it has {', '.join(task.languages)}")
    return {lang: task.loader(task.eval_split, lang) for lang in langs}


def _split_eval_spec(spec: str) -> tuple[str | None, str]:
    """"de=path/test.conll" -> ("de", "path/test.conll"); a plain path (even one holding "=") -> (None, path)."""
    lang, sep, path = spec.partition(_LANG_SEP)
    if sep and lang and "/" not in lang and not Path(spec).exists():
        return lang, path
    return None, spec


def _limit(rows: list, count: int | None) -> list:
    return rows if count is None else rows[:count]


def _encode(family, tokenizer, examples, labels, max_length, seq2seq: bool, train: bool, lang: str = ""):
    """The model inputs of `examples` (training ones, or evaluation ones of `lang`), saying on stderr how many
    were cut to `max_length` tokens."""
    if seq2seq:
        from .families import Features, tokenize

        sources, targets = zip(*(family.text_pair(ex) for ex in examples))
        enc, truncated = tokenize(tokenizer, list(sources), text_target=list(targets), max_length=max_length)
        features = Features([{key: enc[key][i] for key in enc.keys()} for i in range(len(examples))],
                            truncated=truncated)
    else:
        features = family.encode(tokenizer, examples, labels, max_length, train)
    if features.truncated:
        which = "training" if train else f"evaluation ({lang})"
        print(f"asg: {features.truncated} of {len(examples)} {which} examples are longer "
              f"than {max_length} tokens and were cut (raise --max-length to keep more)", file=sys.stderr)
    return features


# --- training ------------------------------------------------------------------------------------


def resolve(task, settings: FinetuneSettings, seq2seq: bool, evals: dict) -> FinetuneSettings:
    """The settings with every default filled in: the paper's learning rate and epochs for the task and
    model kind, and the evaluation languages found."""
    cross_lingual = _cross_lingual(settings, evals)
    lr = settings.learning_rate or (registry.SEQ2SEQ_LEARNING_RATE if seq2seq else task.learning_rate)
    epochs = settings.epochs or (registry.CROSS_LINGUAL_EPOCHS if cross_lingual else registry.EPOCHS)
    return replace(settings, learning_rate=lr, epochs=epochs, eval_langs=sorted(evals))


def _cross_lingual(settings: FinetuneSettings, evals: dict) -> bool:
    """True when the run is tested on a language it was not trained on (zero-shot transfer); a run trained on
    every language of the task ("all", the in-language setting) is not."""
    return settings.train_lang != "all" and any(lang != settings.train_lang for lang in evals)


#: fewer optimizer steps than this rarely move a pretrained model far enough to learn a task
MIN_STEPS = 100


def optimizer_steps(examples: int, settings: FinetuneSettings, world_size: int = 1) -> int:
    """The optimizer steps a run takes: `max_steps`, or ⌈examples / (batch size × processes)⌉ per epoch."""
    if settings.max_steps:
        return settings.max_steps
    per_epoch = math.ceil(examples / (settings.batch_size * max(1, world_size)))
    return math.ceil(per_epoch * settings.epochs)


def _announce_steps(examples: int, settings: FinetuneSettings, world_size: int) -> None:
    """Say before training how many optimizer steps the run takes, and warn when they are too few to learn."""
    steps = optimizer_steps(examples, settings, world_size)
    print(f"asg: training on {examples} examples, batch {settings.batch_size} x {world_size} process(es), "
          f"{settings.epochs:g} epochs: {steps} optimizer steps (no warmup)", file=sys.stderr)
    if steps < MIN_STEPS and not settings.max_steps:
        batch = max(1, 2 ** int(math.log2(max(1, examples * settings.epochs / (MIN_STEPS * max(1, world_size))))))
        epochs = math.ceil(MIN_STEPS / max(1, math.ceil(examples / (settings.batch_size * max(1, world_size)))))
        message = (f"only {steps} optimizer steps: usually too few to learn the task. Use a smaller batch "
                   f"(--batch-size {batch} gives {optimizer_steps(examples, replace(settings, batch_size=batch), world_size)}"
                   f" steps) or more epochs (--epochs {epochs}), or more training data")
        logger.warning(message)
        print(f"asg: warning: {message}", file=sys.stderr)


def _trainer(model, tokenizer, family, seq2seq: bool, settings: FinetuneSettings, checkpoints: Path, train_features,
             runtime: FinetuneRuntime):
    import transformers

    common = dict(output_dir=str(checkpoints), per_device_train_batch_size=settings.batch_size,
                  per_device_eval_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                  weight_decay=settings.weight_decay, num_train_epochs=settings.epochs,
                  max_steps=settings.max_steps or -1, save_strategy="steps", save_steps=settings.save_steps,
                  save_total_limit=1, logging_steps=max(1, settings.save_steps // 10), report_to=[], seed=settings.seed,
                  disable_tqdm=not runtime.progress, remove_unused_columns=False, eval_strategy="no",
                  dataloader_pin_memory=_has_accelerator(),
                  use_cpu=not _has_accelerator())  # on CPU, this is what makes torchrun runs distributed (gloo)
    if seq2seq:
        args = transformers.Seq2SeqTrainingArguments(predict_with_generate=True, generation_max_length=64, **common)
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=model)
        return transformers.Seq2SeqTrainer(model=model, args=args, train_dataset=train_features, data_collator=collator,
                                           processing_class=tokenizer, callbacks=runtime.callbacks)
    collator = (transformers.DataCollatorForTokenClassification(tokenizer) if family.name == "ner"
                else transformers.DataCollatorWithPadding(tokenizer))
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**common), train_dataset=train_features,
                                data_collator=collator, processing_class=tokenizer, callbacks=runtime.callbacks)


def _evaluate(trainer, task, tokenizer, labels, evals: dict, seq2seq: bool, max_length: int, run: Path) -> dict:
    results, family = {}, task.family
    for lang, examples in sorted(evals.items()):
        features = _encode(family, tokenizer, examples, labels, max_length, seq2seq, False, lang)
        output = trainer.predict(features)
        if seq2seq:
            ids = output.predictions
            ids = ids.clip(min=0) if hasattr(ids, "clip") else ids
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            predictions = [family.parse_generated(text, ex) for text, ex in zip(texts, examples)]
            scores = family.score_generated(examples, predictions)
        else:
            predictions = family.decode(output, features, examples, labels)
            scores = family.score(examples, predictions)
        results[lang] = {**scores, "examples": len(examples)}
        if trainer.is_world_process_zero():
            _write_jsonl(run / "predictions" / f"{lang}.jsonl", [family.record(ex, p) for ex, p in zip(examples, predictions)])
    metric_names = [key for key in next(iter(results.values())) if key != "examples"]
    average = {key: statistics.fmean(row[key] for row in results.values()) for key in metric_names}
    return {"main_metric": family.main_metric, "reported_metrics": list(family.reported), "results": results,
            "average": average}


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


# --- compression and files -----------------------------------------------------------------------


def _compress(model, compression) -> dict[str, Any]:
    """Compress the task model in place with `compression` (a `Compression` or a method config); an encoder
    task model has no output table, so only its input table is compressed. Returns the report as a dict."""
    from ..surgery import compress

    only_input = {"targets": ("input",)} if model.get_output_embeddings() is None else {}
    if isinstance(compression, Compression):
        config = compression.config_for(tuple(model.get_input_embeddings().weight.shape), **only_input)
    else:
        config = replace(compression, **only_input)
    return compress(model, config, progress=False).to_dict()


def _recorded_report(model) -> dict[str, Any] | None:
    plan = getattr(model.config, "asg", None)
    return plan.get("report") if isinstance(plan, dict) else None


def _is_asg_folder(source: str) -> bool:
    config = Path(source) / "config.json"
    return config.exists() and "asg" in json.loads(config.read_text())


def _check_run_folder(run: Path, overwrite: bool) -> None:
    """ValueError unless `run` is free, empty, an unfinished run to resume, or (with `overwrite`) a finished run."""
    if not run.exists():
        return
    if not run.is_dir():
        raise ValueError(f"{run} is a file; choose a folder for the run")
    if (run / "metrics.json").exists():
        if not overwrite:
            raise ValueError(f"{run} holds a finished run; evaluate it with `asg evaluate {run}`, choose another "
                             "folder, or pass --overwrite")
        if not _is_run(run):
            raise ValueError(f"{run} holds a metrics.json but its settings.json does not mark it as a run of "
                             "`asg finetune`; refusing to replace it. Choose another folder")
    elif any(run.iterdir()) and not ((run / "checkpoints").is_dir() and _is_run(run, unfinished=True)):
        raise ValueError(f"{run} exists and is not a run folder; choose another folder")


def _is_run(run: Path, unfinished: bool = False) -> bool:
    """True when settings.json marks `run` as written by `asg finetune` (or has the shape older versions wrote)."""
    try:
        settings = json.loads((run / "settings.json").read_text())
    except FileNotFoundError:
        return unfinished  # a run interrupted before its settings were written holds only checkpoints/
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and (settings.get("written_by") == RUN_MARK
                                           or {"task", "labels", "hyperparameters"} <= set(settings))


def _clear_finished_run(run: Path) -> None:
    """Remove what an earlier finished run wrote into `run` (checked by `_check_run_folder`); other files stay."""
    if not (run / "metrics.json").exists():
        return
    for name in RUN_FILES:
        item = run / name
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        elif item.exists() or item.is_symlink():
            item.unlink()


def _answerable(train: list[dict], evals: dict[str, list[dict]]) -> tuple[list[dict], dict[str, list[dict]]]:
    """QA without an answer (SQuAD 2.0's unanswerable questions): left out of training with a count, refused in
    evaluation, since an extractive head always predicts a span and cannot be scored on them."""
    def unanswerable(ex) -> bool:
        return isinstance(ex.get("answers"), dict) and not ex["answers"].get("text")

    dropped = sum(map(unanswerable, train))
    if dropped:
        logger.warning("left out %d training questions without an answer (unanswerable questions)", dropped)
        print(f"asg: left out {dropped} of {len(train)} training questions that have no answer", file=sys.stderr)
        train = [ex for ex in train if not unanswerable(ex)]
    for lang, rows in evals.items():
        count = sum(map(unanswerable, rows))
        if count:
            raise ValueError(f"{count} evaluation questions ({lang}) have no answer (\"answers\": []); this task scores "
                             "extractive answers as SQuAD 1.1 and TyDiQA-GoldP do: remove unanswerable questions")
    if not train and dropped:
        raise ValueError("no training question has an answer; give answered questions to train on")
    return train, evals


def _labels(family, train: list[dict], evals: dict[str, list[dict]]) -> list[str]:
    """The label list of the run. Evaluation labels that training never shows are an error for classification
    (the head could not learn them) and a warning for tagging (a rare tag may be missing from a small set)."""
    evaluation = [ex for rows in evals.values() for ex in rows]
    seen, wanted = set(family.labels(train)), set(family.labels(evaluation))
    unseen = sorted(wanted - seen)
    if unseen and seen:
        message = (f"the evaluation data has labels {unseen} that the training data never shows "
                   f"(training labels: {sorted(seen)})")
        if family.closed_labels:
            raise ValueError(message + "; use the same label names in both files")
        logger.warning(message)
        print(f"asg: warning: {message}; the model cannot learn to predict them", file=sys.stderr)
    return family.labels(train + evaluation)


def _save_model(model, tokenizer, target: Path) -> None:
    from ..checkpoint import save_pretrained
    from ..surgery import compressed_tables, is_compressed

    if is_compressed(model):
        for table in compressed_tables(model):  # as calibration does: the saved values are the model's
            table.round_to_storage_(table.storage_dtype)
        save_pretrained(model, target, tokenizer=tokenizer)
        return
    from ..atomic import write_folder

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_folder(target, fill, overwrite=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    os.replace(tmp, path)

