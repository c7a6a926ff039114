"""Issue 8's measurement: plain ASG, frequency-weighted ASG, calibrated ASG, and both, on all-MiniLM-L6-v2.

Calibration texts are the paragraphs of Python's language reference (pydoc_data) except every tenth;
those held-out paragraphs, which calibration never sees, measure in-domain fidelity, and the built-in
ordinary English sentences measure fidelity on text unlike the calibration text. Fidelity is the mean
cosine between the compressed and the original model's mean-pooled sentence embeddings.

    python experiments/calibration_minilm.py [--settings 128x48,256x96 --steps 300]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="128x48,256x96", help="k x m pairs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--anchor", type=float, default=1.0, help="anchor of the extra anchored variant")
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer

    import asg
    from asg.calibration import calibrate, default_corpus
    from asg.fidelity import fidelity, read_texts
    from asg.loading import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModel.from_pretrained(path).eval()
    corpus = default_corpus()
    heldout = corpus[::10]
    train = [text for i, text in enumerate(corpus) if i % 10]
    sentences = read_texts()

    print(f"# all-MiniLM-L6-v2: calibration on {len(train)} paragraphs of Python's language reference; fidelity "
          f"(mean cosine of pooled embeddings) on {len(heldout)} held-out paragraphs and {len(sentences)} ordinary sentences")
    print("| k | m | variant | held-out prose | ordinary sentences | seconds |")
    print("|---:|---:|---|---:|---:|---:|")
    for setting in args.settings.split(","):
        k, m = (int(v) for v in setting.split("x"))
        compressed = {}
        for weighted in (False, True):
            model = copy.deepcopy(reference)
            config = asg.ASGConfig(k=k, m=m, weights="wordfreq:en" if weighted else None)
            asg.compress(model, config, tokenizer=tokenizer, progress=False)
            compressed[weighted] = model
        variants = [("plain", False, None), ("weighted", True, None), ("calibrated", False, 0.0),
                    ("weighted + calibrated", True, 0.0), (f"calibrated, anchor {args.anchor:g}", False, args.anchor)]
        for name, weighted, anchor in variants:
            start = time.time()
            model = copy.deepcopy(compressed[weighted])
            if anchor is not None:
                calibrate(model, reference, train, tokenizer=tokenizer, steps=args.steps, lr=args.lr,
                          heldout=heldout, anchor=anchor, progress=False)
            prose = fidelity(model, reference, tokenizer, heldout)["mean_cosine"]
            plain = fidelity(model, reference, tokenizer, sentences)["mean_cosine"]
            print(f"| {k} | {m} | {name} | {prose:.4f} | {plain:.4f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
