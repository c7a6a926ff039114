"""`asg experiment FILE --dry-run`: resolve every setting of an experiment YAML — model, dataset and configs,
languages, hyper-parameters, compression — print the plan a real run follows, and run each row for a few
steps on a tiny stand-in model and tiny copies of its data, without a network.

What the dry run proves: the YAML is valid, its task's loaders read data laid out as the hub stores it
(through ASG_DATASETS_MIRROR, see asg.tasks.fixtures), local files exist and parse, the compression
settings are accepted (and fit the real table where the model's config is in the local cache), every row
trains, evaluates and lands in the table. What it cannot prove: the real model's download and scores.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .experiment import add_percent_of_base, load_experiment, markdown_table, result_row, run_settings, slug
from .methods import Compression
from .tasks import fixtures, registry
from .tasks.hub import MIRROR_ENV
from .tasks.runner import FinetuneRuntime, finetune, resolve

DRY_STEPS = 2
DRY_EVAL_LANGS = 2  # the tiny runs evaluate on this many languages; the loaders are checked on all of them
TINY_HIDDEN = 32
TINY_K = 16
TINY_M = 8


def dry_run(path: str | os.PathLike, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Print the plan of the experiment at `path` and run each row for `DRY_STEPS` steps on a tiny model and
    tiny data; returns {"plan": [...], "table": markdown}. Any setting that would fail the real run fails here."""
    import transformers

    spec = load_experiment(path)
    task = registry.get_task(spec["task"])
    source = spec.get("model")
    config, model_note = _model_config(source)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False)) if config is not None else "t5" in str(source).lower()
    echo(f"experiment {spec['name']} ({path}): task {task.name} ({task.family.name}), model {source or 'default'}: "
         f"{'text-to-text' if seq2seq else 'encoder with a task head'}; {model_note}")
    plan, rows = [], []
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the stand-in's freshly made heads are expected, not news
    with tempfile.TemporaryDirectory(prefix="asg-dry-run-") as tmp:
        tmp = Path(tmp)
        tiny = _tiny_model(tmp / "model", seq2seq)
        previous = os.environ.get(MIRROR_ENV)
        try:
            settings = [run_settings(spec, run, Path(spec["output"]) / "runs" / slug(run["name"])) for run in spec["runs"]]
            langs = [_languages(task, s) for s in settings]
            if task.loader is not None and not all(s.train_files and s.eval_files for s in settings):
                _check_loaders(task, langs, tmp / "mirror", echo)
            for run, run_set, run_langs in zip(spec["runs"], settings, langs):
                evals = {} if run_set.eval_files else {lang: [] for lang in run_langs["eval"]}  # files: langs unknown yet
                resolved = resolve(task, run_set, seq2seq, evals)
                entry = _plan_entry(run["name"], task, run_set, resolved, run_langs, config, seq2seq)
                entry["seeds"] = spec.get("seeds") or [run_set.seed]
                plan.append(entry)
                _echo_entry(entry, echo)
                small = replace(run_set, model=str(tiny), output=str(tmp / "runs" / slug(run["name"])),
                                max_steps=DRY_STEPS, batch_size=4, max_train_examples=16, max_eval_examples=4,
                                save_steps=DRY_STEPS, compression=_tiny_compression(run_set.compression))
                if not run_set.eval_files and len(run_langs["eval"]) > DRY_EVAL_LANGS:
                    small.eval_langs = run_langs["eval"][:DRY_EVAL_LANGS]  # every language was read above
                if not run_set.train_files and len(run_langs["train"]) > 1:
                    small.train_lang = run_langs["train"][0]
                rows.append(result_row(run["name"], finetune(small, FinetuneRuntime(overwrite=True, progress=False))))
        finally:
            transformers.logging.set_verbosity(verbosity)
            if previous is None:
                os.environ.pop(MIRROR_ENV, None)
            else:
                os.environ[MIRROR_ENV] = previous
    add_percent_of_base(rows)
    table = markdown_table(rows)
    echo(f"dry run passed: {len(rows)} runs trained {DRY_STEPS} steps each on a tiny stand-in model and tiny data, "
         f"evaluated, and made the table ({len(table.splitlines())} lines); the real run writes {spec['output']}")
    return {"plan": plan, "table": table}


def _check_loaders(task, langs: list[dict[str, list[str]]], mirror: Path, echo) -> None:
    """Write tiny copies of the task's hub data for every language any run uses, and read each with the task's
    loader, as the real runs would (training split, and the evaluation split)."""
    train = sorted({lang for entry in langs for lang in entry["train"] if not lang.startswith("files:")})
    evals = sorted({lang for entry in langs for lang in entry["eval"] if not lang.startswith("files:")})
    fixtures.write_mirror(mirror, task.name, sorted(set(train) | set(evals)))
    os.environ[MIRROR_ENV] = str(mirror)
    for split, wanted in (("train", train), (task.eval_split, evals)):
        for lang in wanted:
            if not task.loader(split, lang):
                raise ValueError(f"the {task.name} loader read no {split} examples for {lang}")
    echo(f"  data: the {task.name} loader read copies laid out as the hub stores them for {len(train)} training "
         f"and {len(evals)} evaluation language(s)")


def _model_config(source: str | None):
    """The model's transformers config from a local folder or the local hub cache (never the network), and a note."""
    import transformers

    from .loading import default_model_path

    name = str(default_model_path()) if source in (None, "default") else source
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True), "config read from " + (
            "the local folder" if Path(name).is_dir() else "the local hub cache")
    except Exception:  # not cached: the dry run goes on without the real table's shape
        return None, ("its config is not in the local cache, so the kind is taken from the name and the compression "
                      "is checked on the stand-in only")


def _languages(task, settings) -> dict[str, list[str]]:
    """The training and evaluation languages (or file sets) the run uses."""
    if settings.train_files:
        train = [f"files: {', '.join(settings.train_files)}"]
    else:
        train = list(task.languages) if settings.train_lang == "all" else [settings.train_lang]
    if settings.eval_files:
        return {"train": train, "eval": [f"files: {', '.join(settings.eval_files)}"]}
    wanted = settings.eval_langs or [settings.train_lang]
    return {"train": train, "eval": list(task.languages) if "all" in wanted else wanted}


def _plan_entry(name: str, task, settings, resolved, langs, config, seq2seq: bool) -> dict[str, Any]:
    entry = {"run": name, "task": task.name, "model": settings.model or "default", "train": langs["train"],
             "eval": langs["eval"], "learning_rate": resolved.learning_rate, "epochs": resolved.epochs,
             "batch_size": resolved.batch_size, "weight_decay": resolved.weight_decay,
             "max_length": resolved.max_length, "compression": None}
    compression = settings.compression  # an experiment's runs give dicts, made into a Compression
    if isinstance(compression, Compression):
        entry["compression"] = compression.to_dict()
        if config is not None:
            shape = (config.vocab_size, _hidden(config))
            targets = {} if seq2seq else {"targets": ("input",)}
            made = compression.config_for(shape, **targets)
            made.validate_for(*shape)  # raises, saying what to change, where the settings do not fit the real table
            entry["compression_for_real_table"] = f"{made.method} {made.settings()} on a {shape[0]:,} x {shape[1]} table"
    return entry


def _echo_entry(entry: dict[str, Any], echo) -> None:
    def short(items: list[str]) -> str:
        return ", ".join(items) if len(items) <= 8 else f"{', '.join(items[:8])}, ... ({len(items)} in all)"

    echo(f"- {entry['run']}: train on {short(entry['train'])}; evaluate on {short(entry['eval'])}; "
         f"lr {entry['learning_rate']:g}, {entry['epochs']:g} epochs, batch {entry['batch_size']}, weight decay "
         f"{entry['weight_decay']:g}, max length {entry['max_length']}, seed(s) "
         f"{', '.join(map(str, entry['seeds']))}; compression: "
         + (entry.get("compression_for_real_table") or str(entry["compression"] or "none (the base model)")))


def _hidden(config) -> int:
    return next(getattr(config, key) for key in ("hidden_size", "d_model", "n_embd") if hasattr(config, key))


def _tiny_compression(compression):
    """The run's compression made to fit the stand-in's 32-wide table: ASG's k and m capped."""
    if not isinstance(compression, Compression) or compression.method != "asg":
        return compression
    options = dict(compression.options)
    if "k" in options:
        options["k"] = min(int(options["k"]), TINY_K)
    if "m" in options:
        options["m"] = TINY_M
    return replace(compression, options=options)


def _tiny_model(folder: Path, seq2seq: bool) -> Path:
    """A tiny random model of the run's kind (a BERT, or an untied mT5 for text-to-text) with a word-level
    tokenizer over the fixtures' words and the task's label words."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = [*fixtures.WORDS, *fixtures.XNLI_LABELS, *fixtures.SST2_LABELS, ";", "none",
             *(f"{kind}:" for kind in ("PER", "ORG", "LOC", "Chemical", "Disease"))]  # what text-to-text targets hold
    torch.manual_seed(0)
    if seq2seq:
        vocab = ["<pad>", "</s>", "<unk>", *words]
        core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
        config = tf.MT5Config(vocab_size=len(vocab), d_model=TINY_HIDDEN, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        config.tie_word_embeddings = False
        model = tf.MT5ForConditionalGeneration(config)
        model.set_input_embeddings(model.shared)  # one input table for encoder and decoder, as real mT5 checkpoints
    else:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
        tokenizer = tf.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False)
        model = tf.BertModel(tf.BertConfig(vocab_size=len(vocab), hidden_size=TINY_HIDDEN, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=512))
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
