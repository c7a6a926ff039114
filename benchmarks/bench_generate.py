"""End-to-end greedy generation: a compressed model against the uncompressed one, same run.

GPT-2-sized (V=50,257, D=768, 12 layers, tied head) and mT5-small-sized (V=250,112, d_model=512,
untied head) models with random weights built from their configs (speed does not depend on the
values); the compressed twin is fitted with asg.compress (k=1024, m=D/16, both tables). Where the CPU has
AVX-512 VBMI, the twin is timed again with its head's 8-bit path (`ASGHead.approximate`), and its greedy
tokens are compared with the exact head's.

    python benchmarks/bench_generate.py [--models gpt2,mt5 --new-tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers as tf

import asg
from _common import machine, paired_median_ms


def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config())


def mt5():
    config = tf.MT5Config(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    config.tie_word_embeddings = False
    model = tf.MT5ForConditionalGeneration(config)
    model.set_input_embeddings(model.shared)  # one input table, as in the real checkpoint
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,mt5")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"# Greedy generate(), batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; {machine()}")
    print("| model | dense tokens/s | ASG tokens/s | ASG / dense time | ASG 8-bit head tokens/s | 8-bit / dense time "
          "| same tokens | embedding params % |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = {"gpt2": gpt2, "mt5": mt5}[name]().eval()
        compressed = copy.deepcopy(dense)
        dim = dense.get_input_embeddings().embedding_dim
        report = asg.compress(compressed, asg.ASGConfig(k=1024, m=dim // 16), progress=False)
        prompt = torch.randint(2, dense.config.vocab_size, (1, args.prompt_tokens))
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=0)
        t_dense, t_asg = paired_median_ms(lambda: dense.generate(prompt, **options),
                                          lambda: compressed.generate(prompt, **options), args.repeats, warmup=1)
        head = compressed.get_output_embeddings()
        fast, same = "", ""
        if head.embedding.fast.approximates(head.embedding):
            exact_tokens = compressed.generate(prompt, **options)
            head.approximate = True
            t_dense2, t_bytes = paired_median_ms(lambda: dense.generate(prompt, **options),
                                                 lambda: compressed.generate(prompt, **options), args.repeats, warmup=1)
            same = "yes" if torch.equal(compressed.generate(prompt, **options), exact_tokens) else "no"
            head.approximate = False
            fast = f"{1000 * args.new_tokens / t_bytes:.1f} | {t_bytes / t_dense2:.2f}"
        else:
            fast = "(no VBMI) | "
        print(f"| {name} | {1000 * args.new_tokens / t_dense:.1f} | {1000 * args.new_tokens / t_asg:.1f} | "
              f"{t_asg / t_dense:.2f} | {fast} | {same} | {100 * report.embedding_ratio:.2f} |")


if __name__ == "__main__":
    main()
