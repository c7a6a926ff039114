"""Write tests/data/bert-mlm-asg-v1: a small ASG checkpoint in format 1 and the outputs it must give.

Run once, by hand, when the format changes on purpose (then bump the folder name); the test that loads
it must keep passing with every later version of asg.

    python tests/data/make_stable_checkpoint.py
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent.parent))

import asg  # noqa: E402
from tiny_models import build, sample_inputs  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    model = build("bert")
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    target = HERE / "bert-mlm-asg-v1"
    asg.save_pretrained(model, target)
    inputs = sample_inputs("bert")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "logits": logits},
              str(HERE / "bert-mlm-asg-v1.expected.safetensors"))
    (HERE / "bert-mlm-asg-v1.json").write_text(json.dumps({"asg_version": asg.__version__, "format_version": 1}))


if __name__ == "__main__":
    main()
