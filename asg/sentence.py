"""sentence-transformers models: carry a model's pipeline files (modules.json, pooling, dense layers,
normalisation, prompts) into an ASG folder, and turn hidden states into sentence embeddings as that
pipeline does, so that fidelity is measured on what `SentenceTransformer(...).encode` returns.

A pipeline is module 0, the transformer (what asg compresses and saves), followed by modules that read
its token embeddings. This module reads the common ones itself (Pooling, Dense, Normalize), from their
JSON and safetensors files, validated before use; it imports nothing from sentence-transformers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F

MODULES_NAME = "modules.json"
#: files at the top of a sentence-transformers folder besides the transformer's own
TOP_FILES = (MODULES_NAME, "config_sentence_transformers.json", "sentence_bert_config.json")
#: sentence-transformers' pooling modes, in the order it concatenates them
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
_ACTIVATIONS = {"Tanh": torch.tanh, "Identity": lambda x: x, "ReLU": F.relu, "GELU": F.gelu, "Sigmoid": torch.sigmoid}


def local_folder(source: str | Path | None) -> Path | None:
    """The local folder that holds `source`'s sentence-transformers files: the folder itself, or a hub
    name's cached snapshot of them (downloaded where there is a network); None when there are none."""
    if not source:
        return None
    path = Path(source)
    if path.is_file():  # a .gguf file: its folder
        path = path.parent
    if path.is_dir():
        return path if (path / MODULES_NAME).is_file() else None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        modules = read_modules(Path(hf_hub_download(str(source), MODULES_NAME)).parent)
        patterns = [*TOP_FILES, *(f"{m['path']}/*" for m in modules if m["path"])]
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception:  # not a hub repository, no network, or no modules.json: no pipeline to carry
        return None


def read_modules(folder: Path) -> list[dict[str, Any]]:
    """The modules of `folder`'s modules.json, checked: each with a "type" and a relative "path" inside the folder."""
    file = folder / MODULES_NAME
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not a readable sentence-transformers modules.json ({err})") from None
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{file}: expected a non-empty list of modules")
    for module in modules:
        if not isinstance(module, dict) or not isinstance(module.get("type"), str):
            raise ValueError(f"{file}: expected each module as an object with a string \"type\", got {module!r}")
        path = module.get("path", "")
        parts = PurePosixPath(path).parts if isinstance(path, str) else (None,)
        if not isinstance(path, str) or path.startswith("/") or "\\" in path or ".." in parts:
            raise ValueError(f"{file}: module path {path!r} must be a folder inside the model folder")
        module["path"] = path
    return modules


def is_transformer(module: dict[str, Any]) -> bool:
    return module["type"].rsplit(".", 1)[-1] == "Transformer"


def carry(source: Path, target: Path) -> list[str]:
    """Copy `source`'s pipeline into the folder `target`, which holds the compressed transformer: modules.json
    (the transformer's entry pointing at the folder itself), the top-level configs with their prompts, and
    every other module's folder. Returns the names written."""
    modules = read_modules(source)
    written, moved = [], False
    for module in modules:
        if is_transformer(module):
            if module["path"]:  # an older layout with the transformer in a subfolder: its settings move to the top
                settings = source / module["path"] / "sentence_bert_config.json"
                if settings.is_file():
                    shutil.copyfile(settings, target / settings.name)
                    written.append(settings.name)
                module["path"], moved = "", True
        elif module["path"] and (source / module["path"]).is_dir():
            shutil.copytree(source / module["path"], target / module["path"], dirs_exist_ok=True)
            written.append(module["path"])
    if moved:
        (target / MODULES_NAME).write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    else:
        shutil.copyfile(source / MODULES_NAME, target / MODULES_NAME)
    for name in TOP_FILES[1:]:
        if (source / name).is_file() and name not in written:
            shutil.copyfile(source / name, target / name)
            written.append(name)
    return [MODULES_NAME, *written]


@dataclass
class Pipeline:
    """What a sentence-transformers model does after its transformer: `embed(hidden, mask)` gives the sentence
    embeddings. `steps` names each step; `skipped` names the modules it could not reproduce."""

    steps: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _ops: list = field(default_factory=list, repr=False)

    def describe(self) -> str:
        """The steps, and the modules left out, in words."""
        skipped = f" (left out, not read by asg: {', '.join(self.skipped)})" if self.skipped else ""
        return " → ".join(self.steps) + skipped

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = hidden.float()
        for op in self._ops:
            out = op(out, mask)
        return out


def mean_pooling() -> Pipeline:
    """Mean pooling over the real tokens: the pipeline of a model that has none of its own."""
    return Pipeline(["mean pooling"], [], [_pool(("mean_tokens",))])


def pipeline(folder: Path | None) -> Pipeline:
    """`folder`'s own pipeline where it has one (modules.json), mean pooling otherwise. A module this reader
    does not know ends the pipeline there, and is named in `skipped`."""
    if folder is None or not (folder / MODULES_NAME).is_file():
        return mean_pooling()
    modules = read_modules(folder)
    result = Pipeline()
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        path = folder / module["path"]
        if is_transformer(module):
            continue
        if kind == "Pooling":
            modes = _pooling_modes(path)
            result.steps.append("pooling: " + " + ".join(modes))
            result._ops.append(_pool(modes))
        elif kind == "Dense":
            result.steps.append(f"dense layer {module['path']}")
            result._ops.append(_dense(path))
        elif kind == "Normalize":
            result.steps.append("normalize")
            result._ops.append(lambda x, mask: F.normalize(x, dim=-1))
        else:
            result.skipped = [m["type"] for m in modules[modules.index(module):]]
            break
    if not any(step.startswith("pooling") for step in result.steps):
        return mean_pooling()
    return result


def _pooling_modes(path: Path) -> tuple[str, ...]:
    """The pooling modes of a Pooling module's config: the `pooling_mode_*: true` flags of older versions, or
    `pooling_mode` (a name or a list of names) of newer ones; sentence-transformers' default, mean, otherwise."""
    config = _json(path / "config.json")
    modes = tuple(mode for mode in POOLING_MODES if config.get(f"pooling_mode_{mode}") is True)
    named = config.get("pooling_mode")
    if not modes and named is not None:
        short = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "weightedmean": "weightedmean_tokens"}
        names = [named] if isinstance(named, str) else named
        if not isinstance(names, list) or not all(isinstance(n, str) and short.get(n, n) in POOLING_MODES for n in names):
            raise ValueError(f"{path / 'config.json'}: unknown pooling_mode {named!r}")
        modes = tuple(short.get(n, n) for n in names)
    return modes or ("mean_tokens",)


def _pool(modes: tuple[str, ...]):
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(hidden.dtype)
        count = m.sum(1).clamp(min=1e-9)
        parts = []
        for mode in modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
            elif mode == "mean_tokens":
                parts.append((hidden * m).sum(1) / count)
            elif mode == "mean_sqrt_len_tokens":
                parts.append((hidden * m).sum(1) / count.sqrt())
            elif mode == "weightedmean_tokens":
                weights = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)[None, :, None] * m
                parts.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))
            else:  # lasttoken: the last real token of each text, with either padding side
                positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
                last = (positions * mask).argmax(1)
                parts.append(hidden[torch.arange(hidden.shape[0]), last])
        return torch.cat(parts, dim=-1)

    return pool


def _dense(path: Path):
    config = _json(path / "config.json")
    n_in, n_out = config.get("in_features"), config.get("out_features")
    if not all(isinstance(n, int) and n > 0 for n in (n_in, n_out)):
        raise ValueError(f"{path / 'config.json'}: expected positive integers in_features and out_features")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{path / 'config.json'}: activation {activation!r} is not one of {sorted(_ACTIVATIONS)}")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: a Dense module needs model.safetensors or pytorch_model.bin")
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n_out, n_in):
        raise ValueError(f"{path}: expected linear.weight of shape ({n_out}, {n_in}) as its config.json says")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,)):
        raise ValueError(f"{path}: expected linear.bias of shape ({n_out},)")
    weight, bias = weight.float(), None if bias is None else bias.float()
    act = _ACTIVATIONS[activation]

    def dense(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != n_in:
            raise ValueError(f"{path / 'config.json'}: the dense layer reads {n_in} features, but the step before it "
                             f"gives {x.shape[-1]}; the folder's modules do not fit together")
        return act(F.linear(x, weight.to(x.device), None if bias is None else bias.to(x.device)))

    return dense


def _json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data
