"""Greedy generation of Qwen2.5-Coder 1.5B, uncompressed and ASG-compressed, side by side, with tokens/s.

    python experiments/qwen25_generation.py qwen-auto   # a folder written by `asg compress` from the GGUF file

The GGUF file is the one `experiments/qwen25_coder_gguf.py` joins (or --gguf FILE). Each model runs a two-token
warm-up per prompt, then 24 new tokens, batch 1; tokens/s is over all three prompts.
"""

from __future__ import annotations

import argparse
import time

PROMPTS = ["def fibonacci(n):", "The capital of France is", "# Read a CSV file with pandas and print the first rows\n"]


def main() -> None:
    from qwen25_coder_gguf import DEFAULT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", help="a folder written by `asg compress`")
    parser.add_argument("--gguf", default=str(DEFAULT))
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()

    import torch

    import asg
    from asg.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.gguf)
    loaders = (("uncompressed", lambda: load_model(args.gguf)), ("asg", lambda: asg.from_pretrained(args.compressed)))
    for name, load in loaders:  # one model in memory at a time
        model = load().eval()
        seconds, count = 0.0, 0
        for prompt in PROMPTS:
            enc = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=2, do_sample=False)
                start = time.time()
                out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False)
                seconds += time.time() - start
            new = out[0, enc["input_ids"].shape[1]:]
            count += len(new)
            print(f"{name}: {prompt!r} -> {tokenizer.decode(new)!r}", flush=True)
        print(f"{name}: {count / seconds:.2f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
