"""Local copies of hub datasets laid out as the hub stores them (a README.md whose YAML names the configs,
splits and features; one parquet file per split), for the hub loaders to read through ASG_DATASETS_MIRROR."""

from __future__ import annotations

from pathlib import Path

import yaml


def class_label(*names: str) -> dict:
    """The YAML dtype of a ClassLabel feature with these names."""
    return {"class_label": {"names": {str(i): name for i, name in enumerate(names)}}}


def write_dataset(mirror: Path, repo: str, features: list[dict], configs: dict[str, dict[str, dict[str, list]]]) -> Path:
    """Write `repo` ("owner/name") under `mirror`: `configs` maps a config name ("default" for a dataset without
    configs) to its splits, each a dict of columns; `features` is the card's feature list. Returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = mirror / repo
    card = {"dataset_info": [], "configs": []}
    for config, splits in configs.items():
        subfolder = "data" if config == "default" else config
        (folder / subfolder).mkdir(parents=True, exist_ok=True)
        files = []
        for split, columns in splits.items():
            path = f"{subfolder}/{split}-00000-of-00001.parquet"
            pq.write_table(pa.table(columns), folder / path)
            files.append({"split": split, "path": f"{subfolder}/{split}-*"})
        card["dataset_info"].append({"config_name": config, "features": features})
        card["configs"].append({"config_name": config, "data_files": files})
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n")
    return folder
