"""Input side: ASGEmbedding.forward against nn.Embedding on the dense table, same ids, same run.

XLM-R-sized by default (V=250,002, D=768, m=48, k=1024), batch 32 x 128 tokens.

    python benchmarks/bench_embedding.py [--vocab 250002 --dim 768 --m 48 --k 1024 --batch 32 --length 128]
"""

from __future__ import annotations

import argparse

import torch

from _common import machine, paired_median_ms, random_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=250002)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--m", type=int, default=48)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    table = random_table(args.vocab, args.dim, args.k, args.m)
    dense = torch.nn.Embedding(args.vocab, args.dim)
    with torch.no_grad():
        dense.weight.copy_(table.weight)
    ids = torch.randint(0, args.vocab, (args.batch, args.length))
    assert torch.equal(table(ids), dense(ids))

    print(f"# ASGEmbedding vs nn.Embedding: V={args.vocab:,}, D={args.dim}, m={args.m}, k={args.k}, "
          f"batch {args.batch} x {args.length}; {machine()}")
    print("| pass | nn.Embedding ms | ASGEmbedding ms | ASG / dense |")
    print("|---|---:|---:|---:|")
    with torch.no_grad():
        t_dense, t_asg = paired_median_ms(lambda: dense(ids), lambda: table(ids), args.repeats)
    print(f"| forward | {t_dense:.2f} | {t_asg:.2f} | {t_asg / t_dense:.2f} |")
    t_dense, t_asg = paired_median_ms(lambda: dense(ids).sum().backward(), lambda: table(ids).sum().backward(),
                                      max(3, args.repeats // 10))
    print(f"| forward + backward | {t_dense:.2f} | {t_asg:.2f} | {t_asg / t_dense:.2f} |")


if __name__ == "__main__":
    main()
