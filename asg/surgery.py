"""Find a model's token tables, replace them with ASG modules in place, and account for the parameters.

The input table is found through `get_input_embeddings()` of the model and of every sub-model (an
encoder–decoder such as T5 holds it at `shared`, `encoder.embed_tokens` and `decoder.embed_tokens`);
the output table through `get_output_embeddings()`. A head whose weight *is* the input weight (tied)
shares the one input `ASGEmbedding`; an untied head (mT5, Llama) gets codebooks fitted on its own matrix.
What was replaced, and where, is recorded in `model.config.asg` so that a checkpoint can be rebuilt.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

import torch
from torch import nn

from . import methods, pq
from ._version import __version__
from .format import FORMAT_VERSION, ASGQuantizationConfig
from .modules import ASGEmbedding, ASGHead, CompressedEmbedding
from .report import CompressionReport

logger = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "output"


def compress(model: nn.Module, config, *, tokenizer=None, progress: bool = True) -> CompressionReport:
    """Replace the model's input embedding (and output head, if targeted) by compressed tables, in place.

    `config` is an `ASGConfig`, or the config of a baseline (`asg.baselines`): the method follows from it.
    `tokenizer` is needed only to resolve frequency weights given by name (`ASGConfig(weights="wordfreq")`).
    """
    fitter = methods.fitter_for(config)
    if is_compressed(model):
        raise ValueError("this model is already compressed; load the original model to compress it again")
    embedding = _input_embedding(model)
    head = _output_embedding(model)
    if INPUT not in config.targets and head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) to compress; use targets=('input',)")
    if INPUT in config.targets:
        config.validate_for(*embedding.weight.shape, "input embedding")
    if head is not None and OUTPUT in config.targets:
        config.validate_for(*head.weight.shape, "output head")
    params_before = count_parameters(model)
    with torch.no_grad():
        fitted, tables, dense, errors = _fit_tables(model, config, fitter, embedding, head, tokenizer, progress)
    _place(model, tables, fitted.get(INPUT), fitted.get(OUTPUT))
    report = _report(model, config, tables, dense, errors, params_before)
    model.config.asg = {
        "format_version": FORMAT_VERSION,
        "asg_version": __version__,
        "method": config.method,
        "config": config.to_dict(),
        "source_model": str(getattr(model, "name_or_path", "") or "") or None,
        "tie_word_embeddings": getattr(model.config, "tie_word_embeddings", None),
        "tables": tables,
        "report": {key: value for key, value in report.to_dict().items() if key not in ("tables", "settings", "method")},
    }
    return report


def rebuild(model: nn.Module, plan: dict[str, Any]) -> None:
    """Put empty compressed tables of the recorded kinds and shapes where `plan` (a `config.asg` section) says."""
    tables = plan["tables"]
    new_input = _empty_like(tables[INPUT], model.get_submodule(tables[INPUT]["locations"][0])) if INPUT in tables else None
    new_output = None
    if OUTPUT in tables:
        entry = tables[OUTPUT]
        new_output = new_input if entry["tied"] else _empty_like(entry, model.get_submodule(entry["locations"][0]))
    _place(model, tables, new_input, new_output)
    model.config.asg = plan


def _fit_tables(model: nn.Module, config, fitter, embedding: nn.Embedding, head: nn.Linear | None, tokenizer,
                progress: bool):
    """Fit the targeted tables without touching the model: ({table: module}, {table: plan entry}, the dense
    weights they replace (each once), {table: relative error}). A head tied to the input shares its module."""
    options = {}
    if getattr(config, "weights", None) is not None:
        options["weights"] = _token_weights(config.weights, tokenizer, embedding.weight.shape[0])
    if getattr(config, "keep", 0):
        from .frequency import frequent_tokens

        options["kept_ids"] = frequent_tokens(config.keep_by, tokenizer, embedding.weight.shape[0], config.keep)
    fitted: dict[str, CompressedEmbedding] = {}
    tables: dict[str, dict[str, Any]] = {}
    errors: dict[str, float] = {}
    dense: dict[int, torch.Tensor] = {}
    if INPUT in config.targets:
        locations = _input_locations(model, embedding)
        fitted[INPUT], errors[INPUT] = fitter(config, embedding.weight, INPUT, progress, padding_idx=embedding.padding_idx,
                                              embed_scale=getattr(embedding, "embed_scale", None), **options)
        for path in locations:
            weight = model.get_submodule(path).weight
            dense.setdefault(weight.data_ptr(), weight)
        tables[INPUT] = {"locations": locations, **fitted[INPUT].spec(),
                         "dense_element_size": embedding.weight.element_size()}
    if head is not None and OUTPUT in config.targets:
        if INPUT in fitted and _same_tensor(head.weight, embedding.weight):
            fitted[OUTPUT] = fitted[INPUT]
        else:
            fitted[OUTPUT], errors[OUTPUT] = fitter(config, head.weight, OUTPUT, progress, **options)
            dense.setdefault(head.weight.data_ptr(), head.weight)
        tables[OUTPUT] = {"locations": _locations(model, head), **fitted[OUTPUT].spec(),
                          "tied": fitted[OUTPUT] is fitted.get(INPUT), "bias": head.bias is not None,
                          "dense_element_size": head.weight.element_size()}
    return fitted, tables, dense, errors


def _place(model: nn.Module, tables: dict[str, dict[str, Any]], new_input: CompressedEmbedding | None,
           new_output: CompressedEmbedding | None) -> None:
    """Put the input table at every input place, and a head over the output table (keeping the dense head's
    bias) at every output place, as `tables` records; then the ties and what transformers needs."""
    if new_input is not None:
        for path in tables[INPUT]["locations"]:
            _set_submodule(model, path, new_input)
    if new_output is not None:
        entry = tables[OUTPUT]
        bias = model.get_submodule(entry["locations"][0]).bias if entry["bias"] else None
        new_head = ASGHead(new_output, bias)
        for path in entry["locations"]:
            _set_submodule(model, path, new_head)
    _declare_ties(model, tables)
    _mark_for_transformers(model)


def _report(model: nn.Module, config, tables, dense: dict[int, torch.Tensor], errors: dict[str, float],
            params_before: int) -> CompressionReport:
    modules = compressed_tables(model)
    return CompressionReport(
        method=config.method,
        settings=config.settings(),
        embedding_params_before=sum(w.numel() for w in dense.values()),
        embedding_params_after=sum(mod.value_count() for mod in modules),
        model_params_before=params_before,
        model_params_after=count_parameters(model),
        code_bytes=sum(mod.index_bytes() for mod in modules),
        dense_bytes=sum(_nbytes(w) for w in dense.values()),
        embedding_bytes_after=sum(mod.storage_bytes() for mod in modules),
        reconstruction_error=errors,
        tables=tables,
        code_bytes_on_disk=sum(mod.index_bytes_on_disk() for mod in modules),
        embedding_bytes_on_disk=sum(mod.disk_bytes() for mod in modules),
    )


def copy_with_own_tables(model: nn.Module) -> nn.Module:
    """A copy of `model` with its own token tables (the input embedding and the output head, compressed or not)
    and every other parameter and buffer `model`'s, shared: compressing the copy, or changing its tables, leaves
    `model` as it was, and the copy costs the tables' memory, not the whole model's. Neither model may then be
    trained or changed in place outside its tables."""
    tables = [model.get_input_embeddings()]
    try:
        tables.append(model.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        pass
    own = {id(t) for table in tables if table is not None for t in itertools.chain(table.parameters(), table.buffers())}
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in own}
    return copy.deepcopy(model, shared)  # deepcopy's memo: the shared tensors map to themselves


def is_compressed(model: nn.Module) -> bool:
    """True when the model holds at least one compressed table or head."""
    return any(isinstance(mod, (CompressedEmbedding, ASGHead)) for mod in model.modules())


def compressed_tables(model: nn.Module) -> list[CompressedEmbedding]:
    """The distinct compressed tables of a model (a tied head's is the input's, listed once)."""
    return list({id(mod): mod for mod in model.modules() if isinstance(mod, CompressedEmbedding)}.values())


def asg_modules(model: nn.Module) -> list[ASGEmbedding]:
    """The distinct `ASGEmbedding` modules of a model (a tied head's is the input's, listed once)."""
    return [mod for mod in compressed_tables(model) if isinstance(mod, ASGEmbedding)]


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied tensors count once)."""
    return sum(p.numel() for p in model.parameters())


# --- finding the tables --------------------------------------------------------------------------


def _input_embedding(model: nn.Module) -> nn.Embedding:
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        raise ValueError(f"{type(model).__name__} does not expose get_input_embeddings(); asg.compress needs a "
                         "Hugging Face transformers model with a token embedding") from None
    if isinstance(embedding, (CompressedEmbedding, ASGHead)):
        raise ValueError("this model is already compressed; load the original model to compress it again")
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"the input embedding of {type(model).__name__} is a {type(embedding).__name__}, "
                         "not an nn.Embedding token table; ASG compresses token tables only")
    return embedding


def _output_embedding(model: nn.Module) -> nn.Linear | None:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None:
        return None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output embedding of {type(model).__name__} is a {type(head).__name__}, not an "
                         "nn.Linear head; compress the input side only with targets=('input',)")
    return head


def _input_locations(model: nn.Module, embedding: nn.Embedding) -> list[str]:
    """Every module path that holds the input table: the top model's and each sub-model's input embedding."""
    holders = {id(embedding): embedding}
    for mod in model.modules():
        if mod is model or not hasattr(mod, "get_input_embeddings"):
            continue
        try:
            other = mod.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(other, nn.Embedding) and other.weight.shape == embedding.weight.shape:
            if not _same_tensor(other.weight, embedding.weight) and not torch.equal(other.weight, embedding.weight):
                logger.warning(
                    "%s holds an input table of the same shape as get_input_embeddings() but different values "
                    "(an untied encoder-decoder built from a config?); it is replaced by the same ASG module",
                    type(mod).__name__,
                )
            holders.setdefault(id(other), other)
    for mod in model.modules():  # any other nn.Embedding that shares the weight tensor itself
        if isinstance(mod, nn.Embedding) and _same_tensor(mod.weight, embedding.weight):
            holders.setdefault(id(mod), mod)
    return _locations(model, *holders.values())


def _locations(model: nn.Module, *modules: nn.Module) -> list[str]:
    ids = {id(mod) for mod in modules}
    return [name for name, mod in model.named_modules(remove_duplicate=False) if id(mod) in ids and name]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.device == b.device)


# --- building and placing modules ----------------------------------------------------------------


def _token_weights(weights, tokenizer, vocab_size: int):
    if isinstance(weights, dict):  # a checkpoint's record of an array: the values were not stored
        raise ValueError(f"this config records k-means weighted by an array ({weights.get('array')}), which a "
                         "checkpoint does not store; pass the array itself as weights= to compress again")
    if isinstance(weights, str):
        from .frequency import token_weights

        return token_weights(weights, tokenizer, vocab_size)
    return pq.check_weights(weights, vocab_size)


def _empty_like(entry: dict[str, Any], dense: nn.Module) -> CompressedEmbedding:
    shape = (entry["num_embeddings"], entry["embedding_dim"])
    if tuple(dense.weight.shape) != shape:
        raise ValueError(f"the model's config builds a {list(dense.weight.shape)} table at {entry['locations'][0]}, "
                         f"but the asg section records {list(shape)}; the config or the asg section is damaged")
    return CompressedEmbedding.from_spec(entry, dtype=dense.weight.dtype, device=dense.weight.device,
                                         embed_scale=entry.get("embed_scale"))


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _mark_for_transformers(model: nn.Module) -> None:
    """Record in the config what transformers needs to load the saved folder again (see asg.hf), and give
    the model a `resize_token_embeddings` that understands its compressed tables."""
    import types

    model.config.quantization_config = ASGQuantizationConfig()
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)


def resize_token_embeddings(model: nn.Module, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                            mean_resizing: bool = True) -> nn.Module:
    """Resize a compressed model's vocabulary, as transformers' method of the same name does for dense tables
    (see `ASGEmbedding.resize_`). Returns the input table."""
    if new_num_tokens is None:
        return model.get_input_embeddings()
    if pad_to_multiple_of:
        new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
    if new_num_tokens < 1:
        raise ValueError(f"new_num_tokens={new_num_tokens} must be at least 1")
    tables = model.config.asg["tables"]
    places = {name: model.get_submodule(entry["locations"][0]) for name, entry in tables.items()}
    compressed = {name: place if name == INPUT else place.embedding for name, place in places.items()}
    for table in {id(t): t for t in compressed.values()}.values():
        table.resize_(new_num_tokens, mean_resizing)
    if OUTPUT in places:
        places[OUTPUT].resize_(new_num_tokens)
    for name, table in compressed.items():
        tables[name].update(table.spec())
    model.config.vocab_size = new_num_tokens
    return model.get_input_embeddings()


def _declare_ties(model: nn.Module, tables: dict[str, dict[str, Any]]) -> None:
    """Drop transformers' tie declarations that name a replaced dense weight (a tied head's "lm_head.weight"):
    ASG ties by placing one table module at several places, whose tensors the state dict holds once.
    Declarations that still hold (BERT's decoder bias) stay."""
    present = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    present |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for prefix, sub in model.named_modules():
        for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
            mapping = getattr(sub, attr, None)
            if not isinstance(mapping, dict):
                continue
            full = (lambda key: f"{prefix}.{key}" if prefix else key)
            kept = {t: s for t, s in mapping.items() if full(t) in present and full(s) in present}
            if kept != mapping:
                setattr(sub, attr, kept)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
