"""Save and load ASG-compressed models: a transformers config with an `asg` section plus safetensors weights.

The weights file holds the codebooks and codes, never a dense (V, D) table for a replaced part, and
every tensor once: tied tensors are stored under one name and re-tied on load (the aliases are in the
file's metadata). Writes go to a temporary folder that is renamed into place, so a crash or a bad
input never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic, format as fmt, sentence
from .card import CARD_NAME, model_card
from .format import CONFIG_NAME, FORMAT_VERSION, INDEX_NAME, WEIGHTS_NAME, adapt_plan, renamer, write_notice_index
from .loading import TOKENIZER_FILES, architecture_class
from .modules import CompressedEmbedding
from .surgery import is_compressed, rebuild

logger = logging.getLogger(__name__)

#: What a folder of this package held before folders carried a manifest of their files (see asg.atomic).
PACKAGE_FILES = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, "generation_config.json", *TOKENIZER_FILES)


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = True,
                    fidelity: dict[str, Any] | None = None) -> Path:
    """Write a compressed model (and optionally its tokenizer) to the folder `path`, atomically, with a
    model card (README.md; `fidelity`, an `asg.fidelity.fidelity` row, goes into it).

    A bare encoder (no task head) loaded from a sentence-transformers folder or hub repository keeps its
    pipeline: modules.json, the pooling, dense and normalisation modules and the prompts are copied from
    there (`model.config.name_or_path`), so that `SentenceTransformer(path)` works after `import asg`.

    An existing ASG folder at `path` is replaced (`overwrite=False` refuses instead, also when another
    process creates the folder meanwhile); files in it that asg did not write are kept, a README.md of
    the user's included (no card is written over it). Same model, same files: every file's bytes depend
    only on what is saved.
    """
    user_card = (Path(path) / CARD_NAME).exists() and CARD_NAME not in atomic.files_written(Path(path), set(PACKAGE_FILES))
    plan = getattr(getattr(model, "config", None), "asg", None)
    if not plan or not is_compressed(model):
        raise ValueError("this model is not ASG-compressed; call asg.compress(model, asg.ASGConfig(...)) first")
    pipeline = _sentence_pipeline(model)

    def fill(tmp: Path) -> None:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        if plan["tables"].get("output", {}).get("tied"):
            config.tie_word_embeddings = True  # the head reads the input table (peft's merge may have said otherwise)
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        tensors, aliases = _unique_tensors(model)
        tensors.update(_in_storage_dtype(model, tensors))
        digests = fmt.digest_table(tensors)
        written_plan = _point_transformers_at_the_notice(tmp / CONFIG_NAME, fmt.text_digest(digests))
        metadata = {"format": "pt", "asg_format_version": str(FORMAT_VERSION),
                    "asg_aliases": json.dumps(aliases, sort_keys=True)}
        fmt.write_weights(tmp / WEIGHTS_NAME, tensors, metadata, plan=written_plan, digests=digests,
                          packed=_index_bits(model, tensors))
        write_notice_index(tmp, sorted(tensors))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if pipeline is not None:
            sentence.carry(pipeline, tmp)
        if not user_card:
            card = model_card(written_plan, type(model).__name__, fidelity, sentence_transformers=pipeline is not None)
            (tmp / CARD_NAME).write_text(card, encoding="utf-8")

    return atomic.write_folder(path, fill, overwrite=overwrite, check_replaceable=check_replaceable,
                               legacy_names=PACKAGE_FILES)


def _sentence_pipeline(model: nn.Module) -> Path | None:
    """The folder whose sentence-transformers pipeline a saved model carries: its source's, for a bare encoder."""
    if getattr(model, "base_model", None) is not model:
        return None  # a task model (classifier, tagger, LM): not what a sentence-transformers pipeline wraps
    source = getattr(model.config, "name_or_path", None)
    try:
        folder = sentence.local_folder(source)
        if folder is not None:
            sentence.read_modules(folder)
        return folder
    except ValueError as err:
        logger.warning("not carrying the sentence-transformers files of %s: %s", source, err)
        return None


def from_pretrained(path: str | os.PathLike, model_class=None, **config_overrides) -> nn.Module:
    """Load a folder written by `save_pretrained`; needs only that folder. Returns the model in eval mode.

    `model_class` defaults to the architecture recorded in the folder (a transformers class name).
    Another class of the same family takes the shared weights, as transformers does: a compressed
    `BertModel` loads into `AutoModelForTokenClassification` with a new, initialised head
    (`config_overrides` such as `num_labels=5` go to its config), and a head the new class lacks is dropped.
    """
    import transformers

    path = Path(path)
    plan = read_plan(path)
    state, aliases = _read_weights(path, plan)
    try:
        config = transformers.AutoConfig.from_pretrained(path, **config_overrides)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{path / CONFIG_NAME} cannot be read by transformers ({err}); the checkpoint is damaged") from None
    # transformers 5 reads some configs (T5) back tied although they were saved untied: restore what was saved.
    if plan.get("tie_word_embeddings") is not None:
        config.tie_word_embeddings = plan["tie_word_embeddings"]
    saved_class = _architecture_class(config, path)
    dtype = _model_dtype(state)
    # First on the meta device, where nothing is allocated: a config that disagrees with the weights (a
    # damaged vocabulary size, say) is refused before it can ask for memory.
    target = model_class or saved_class
    with torch.device("meta"):
        skeleton, stored, stored_aliases = _assemble(path, target, saved_class, config, dtype, plan, state, aliases)
    _check_stored(skeleton, stored, stored_aliases, path)
    model, state, aliases = _assemble(path, target, saved_class, config, dtype, plan, state, aliases)
    _load_state(model, state, aliases, path, new_head=type(model) is not saved_class)
    validate_tables(model, path / WEIGHTS_NAME)
    _check_finite(model, state, path / WEIGHTS_NAME)
    if (path / "generation_config.json").exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.eval()
    return model


def validate_tables(model: nn.Module, where) -> None:
    """ValueError naming `where` and the tensor when a compressed table's loaded state is unusable (codes
    outside 0..k-1, NaN or infinite values): checked once after loading, so lookups never read out of bounds."""
    seen = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedEmbedding) and id(module) not in seen:
            seen.add(id(module))
            try:
                module.validate()
            except ValueError as err:
                raise ValueError(f"{where}: table {name}: {err}; the checkpoint is damaged, save it again") from None


def _check_finite(model: nn.Module, state: dict[str, torch.Tensor], where) -> None:
    """ValueError naming the tensor when a stored parameter holds NaN or infinity (buffers such as attention
    masks may hold -inf on purpose; parameters never do in a usable model)."""
    for name, parameter in model.named_parameters():
        if name in state and parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
            raise ValueError(f"{where}: tensor {name!r} holds NaN or infinite values; the checkpoint is damaged, "
                             "save it again")


def check_loaded_from(model: nn.Module, path: str | os.PathLike) -> None:
    """For a model that transformers loaded from the ASG folder `path` (which casts what it reads): the
    config's `asg` section is the one the weights were written with, and every integer table (codes,
    groups) was stored as its own integer type, not cast from floats or wider integers."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return  # sharded or remote: transformers has read it; the tables' values are still validated
    plan = read_plan(path)
    metadata = fmt.read_metadata(weights)
    fmt.check_plan_digest(metadata, plan, path)
    stored = fmt.stored_types(weights, packed_layout(plan))
    for prefix, empty in _stored_tables(plan):  # the types the recorded tables hold
        for name, tensor in empty.state_dict().items():
            kind = stored.get(prefix + name)
            if kind is not None and not tensor.is_floating_point() and kind != fmt.type_name(tensor.dtype):
                raise ValueError(f"{weights}: tensor {prefix + name!r} is stored as {kind}, but it must be "
                                 f"{fmt.type_name(tensor.dtype)}; the checkpoint is damaged, save it again")
    _check_unpacked(model, weights, metadata)


def _check_unpacked(model: nn.Module, weights: Path, metadata: dict[str, str]) -> None:
    """Each index table that transformers unpacked (asg.hf) has the digest recorded when it was written."""
    packed = fmt.packed_layout(metadata, weights)  # recorded by our writer, which records digests too
    digests = fmt.recorded_digests(metadata, weights)
    if not packed or digests is None:
        return
    saved = architecture_class(model.config)
    rename = renamer(model, saved, dict.fromkeys(packed)) if saved is not None and type(model) is not saved else str
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for name in packed:
        table = buffers.get(rename(name))
        if table is not None and fmt.tensor_digest(table) != digests.get(name):
            raise ValueError(f"{weights}: tensor {name!r} does not match the checksum recorded when it was written; "
                             "the file is damaged, save the checkpoint again")


def _assemble(path: Path, model_class, saved_class, config, dtype, plan, state, aliases):
    """The model of `model_class` with empty compressed tables where the plan says, and the stored tensors
    and aliases renamed for it when it is another class of the family."""
    try:
        with _no_init_weights():
            model = _build(model_class, config, dtype)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError) as err:
        raise ValueError(f"{path}: cannot build {getattr(model_class, '__name__', model_class)} from this "
                         f"checkpoint's {type(config).__name__} ({err}); use a class of the same family") from None
    same_class = type(model) is saved_class
    if not same_class:  # a new head's weights are not in the file: build again, initialised
        model = _build(model_class, config, dtype)
        plan = adapt_plan(plan, model, saved_class, state, path)
    model.tie_weights()  # skipped with the initialisation: the dense ties the config asks for
    try:
        rebuild(model, fmt.in_memory(plan))
    except (AttributeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: the recorded ASG tables do not fit {type(model).__name__} ({err}); "
                         f"load it with the architecture it was saved from, {config.architectures}") from None
    if not same_class:
        state, aliases = _adapt_state(state, aliases, model, saved_class, path)
    return model, state, aliases


def _check_stored(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], path: Path) -> None:
    """ValueError naming the file and tensor when a stored tensor's shape or type disagrees with the model
    the config describes (integer tables must be stored as the very integer type, never as floats)."""
    weights = path / WEIGHTS_NAME
    expected = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            continue  # reported by the loader as not belonging to the model
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{weights}: tensor {name!r} has shape {list(tensor.shape)}, but the config describes "
                             f"{list(want.shape)}; the checkpoint is damaged, save it again")
        if want.is_floating_point() != tensor.is_floating_point() or (not want.is_floating_point()
                                                                       and want.dtype != tensor.dtype):
            raise ValueError(f"{weights}: tensor {name!r} is stored as {tensor.dtype}, but it must be "
                             f"{want.dtype if not want.is_floating_point() else 'floating point'}; "
                             "the checkpoint is damaged, save it again")
    for alias, name in aliases.items():
        if alias not in expected or name not in state:
            raise ValueError(f"{weights}: the asg_aliases metadata ties {alias!r} to {name!r}, which "
                             f"{type(model).__name__} or the file does not have; the checkpoint is damaged")
        if tuple(expected[alias].shape) != tuple(state[name].shape):
            raise ValueError(f"{weights}: the asg_aliases metadata ties {alias!r} to {name!r} of another shape; "
                             "the checkpoint is damaged")


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """The `asg` section of a checkpoint's config.json, checked; ValueError if `path` is not an ASG checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist; give the folder written by asg.save_pretrained or `asg compress`")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a checkpoint folder; give the folder written by `asg compress`")
    plan = fmt.read_config(path).get("asg")
    if plan is None:
        raise ValueError(f"{path} is a plain transformers checkpoint, not an ASG one; load it with transformers, "
                         "or compress it first with asg.compress or `asg compress`")
    return fmt.validate_plan(plan, str(path / CONFIG_NAME))


# --- helpers -------------------------------------------------------------------------------------


def check_replaceable(path: Path) -> None:
    """ValueError unless `path` is free, an empty folder, or an ASG checkpoint that may be replaced."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path} is a file; choose a folder path for the checkpoint")
    if any(path.iterdir()):
        try:
            read_plan(path)
        except ValueError:
            raise ValueError(f"{path} exists and is not an ASG checkpoint; refusing to replace it. "
                             "Choose a new folder or remove it first") from None


def _point_transformers_at_the_notice(config_file: Path, weights_digest: str) -> dict[str, Any]:
    """Name the notice index as this folder's weights for plain transformers (which drops the field when it
    saves), and record the weights' digest table; returns the `asg` section as written, which the weights
    file records a digest of in turn."""
    config = json.loads(config_file.read_text())
    config["transformers_weights"] = INDEX_NAME
    config["asg"]["format_version"] = FORMAT_VERSION  # a model loaded from an older folder is written anew
    config["asg"][fmt.WEIGHTS_DIGEST] = weights_digest
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config["asg"]


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor once, and {alias name: stored name} for the tied rest."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device)
        if key in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        storage = tensor.untyped_storage().data_ptr()
        # A view into storage that another tensor already uses must be copied: safetensors refuses shared memory.
        tensors[name] = tensor.clone() if storage in storages else tensor.contiguous()
        storages.add(storage)
    return tensors, aliases


def packed_layout(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The layout of every index table a folder with this (checked) `asg` section stores packed, by the
    name it is stored under at each place of its table (see `asg.format.packed_layout`)."""
    layout = {}
    for prefix, empty in _stored_tables(plan):
        for name, bits in empty.index_bits().items():
            buffer = getattr(empty, name)
            layout[prefix + name] = {"shape": list(buffer.shape), "bits": bits, "dtype": fmt.type_name(buffer.dtype)}
    return layout


def _stored_tables(plan: dict[str, Any]):
    """(state-dict prefix, empty module on the meta device) for every place where a (checked) `asg` section
    puts a compressed table: what a weights file may store there."""
    for table, entry in plan["tables"].items():
        try:
            empty = CompressedEmbedding.from_spec(entry, device="meta")
        except (TypeError, ValueError, KeyError, RuntimeError, OverflowError, ZeroDivisionError) as err:
            raise ValueError(f"the asg section's tables.{table} does not describe a table ({err}); the checkpoint "
                             "is damaged, save it again") from None
        for location in entry["locations"]:
            yield (f"{location}.embedding." if table == "output" else f"{location}."), empty


def _in_storage_dtype(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored floating-point tensors of compressed tables that keep their values in another precision,
    cast to it (exact for values rounded by `round_to_storage_`; fine-tuned values are rounded here)."""
    cast = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedEmbedding) and module.storage_dtype is not None:
            for key, tensor in module.state_dict(prefix=f"{name}." if name else "").items():
                if key in tensors and tensor.is_floating_point():
                    cast[key] = tensors[key].to(module.storage_dtype)
    return cast


def _index_bits(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{stored name: bits per entry} of every index table (ASG codes, SG groups) in `tensors`."""
    bits = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedEmbedding):
            for buffer, width in module.index_bits().items():
                key = f"{name}.{buffer}" if name else buffer
                if key in tensors:
                    bits[key] = width
    return bits


def _read_weights(path: Path, plan: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors (each checked against its recorded digest) and aliases; the plan checked against
    the digest the weights file recorded of it."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{path} has no {WEIGHTS_NAME}; the checkpoint is incomplete, save it again")
    state, metadata = fmt.read_weights(weights, expected=plan.get(fmt.WEIGHTS_DIGEST), derived=packed_layout(plan))
    fmt.check_plan_digest(metadata, plan, path)
    return state, fmt.aliases_of(metadata, weights)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], path: Path,
                new_head: bool = False) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: {len(result.unexpected_keys)} stored tensors do not belong to "
                         f"{type(model).__name__} (e.g. {result.unexpected_keys[:3]}); was it saved from another architecture?")
    for alias, name in aliases.items():
        _tie(model, alias, name)
    # A key may also be missing because the model holds it as the very tensor of a stored key (a table
    # shared by several modules, in a file written by transformers' own save_pretrained).
    tensors = model.state_dict(keep_vars=True)
    stored = {id(tensors[key]) for key in state if key in tensors}
    missing = [key for key in result.missing_keys if key not in aliases and id(tensors[key]) not in stored]
    if new_head:  # as transformers does for a new head: what the file lacks keeps its initialisation
        tables = {name for name, mod in model.named_modules(remove_duplicate=False) if isinstance(mod, CompressedEmbedding)}
        fresh = [key for key in missing if key.rpartition(".")[0] not in tables]
        if fresh:
            logger.warning("%s: %s weights are newly initialised (not in the checkpoint): %s",
                           path, type(model).__name__, fresh)
        missing = [key for key in missing if key not in fresh]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors are missing from {WEIGHTS_NAME} (e.g. {missing[:3]}); "
                         "the checkpoint is incomplete, save it again")


def _adapt_state(state, aliases, model: nn.Module, saved_class, path: Path):
    """The stored tensors renamed for `model` (already holding its compressed tables); the rest is left out."""
    rename = renamer(model, saved_class, state)
    present = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    present |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    renamed = {name: rename(name) for name in state}
    dropped = sorted(name for name, new in renamed.items() if new not in present)
    if dropped:
        logger.info("%s: %d stored tensors have no place in %s and are left out (e.g. %s)",
                    path, len(dropped), type(model).__name__, dropped[:3])
    kept = {new: state[name] for name, new in renamed.items() if new in present}
    aliases = {rename(a): rename(n) for a, n in aliases.items() if rename(a) in present and rename(n) in present}
    return kept, aliases


def _model_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point type that holds most of the stored values (compressed tables may be stored in a
    lower precision than the rest of the model)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _build(model_class, config, dtype):
    import transformers

    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        return model_class._from_config(config, dtype=dtype)
    return model_class.from_config(config, dtype=dtype)


def _tie(model: nn.Module, alias: str, name: str) -> None:
    """Make the tensor at `alias` the very tensor at `name`, as it was when saved."""
    source = model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
    parent_path, _, attr = alias.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(source, nn.Parameter):
        setattr(parent, attr, source)
    else:
        parent._buffers[attr] = source


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _architecture_class(config, path: Path):
    cls = architecture_class(config)
    if cls is not None:
        return cls
    raise ValueError(f"{path}: config.json names no architecture known to transformers "
                     f"({getattr(config, 'architectures', None)}); pass model_class=, e.g. transformers.AutoModel")


def _no_init_weights():
    """Skip random initialisation of a model whose weights are loaded right after (semi-internal API)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older or newer transformers: initialise, slower but correct
        return contextlib.nullcontext()
    return no_init_weights()
