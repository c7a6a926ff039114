"""Output side: an ASG head against the dense nn.Linear head it replaces, at several batch sizes.

mT5-sized by default (V=250,112, D=512, m=32, k=1024). Both heads score the same reconstructed
matrix, so the logits must agree (to 1e-4 relative); times are medians, measured in the same run.
At batch 1 and 2 the head's approximate path (8-bit lookup tables, `ASGHead.approximate`) is timed
too, where the CPU has AVX-512 VBMI, with its error, its top-1 agreement and how many tokens it
scored again exactly, over `--agreement-rows` hidden states.

    python benchmarks/bench_head.py [--vocab 250112 --dim 512 --m 32 --k 1024 --batches 1,4,16,64,256,1024]
"""

from __future__ import annotations

import argparse

import torch

import asg
from _common import machine, paired_median_ms, random_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=250112)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--batches", default="1,2,4,16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--agreement-rows", type=int, default=200)
    args = parser.parse_args()

    table = random_table(args.vocab, args.dim, args.k, args.m)
    head = asg.ASGHead(table)
    dense = torch.nn.Linear(args.dim, args.vocab, bias=False)
    with torch.no_grad():
        dense.weight.copy_(table.weight)

    print(f"# ASG head vs dense head: V={args.vocab:,}, D={args.dim}, m={args.m}, k={args.k}; {machine()}")
    print("| rows | dense ms | ASG ms | ASG / dense | max rel. error |")
    print("|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for rows in [int(b) for b in args.batches.split(",")]:
            hidden = torch.randn(rows, args.dim)
            want, got = dense(hidden), head(hidden)
            error = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
            repeats = max(3, args.repeats if rows <= 64 else args.repeats // 2)
            # warmup 3: the head tries both of its paths on the first two calls of a new size
            t_dense, t_asg = paired_median_ms(lambda: dense(hidden), lambda: head(hidden), repeats, warmup=3)
            print(f"| {rows} | {t_dense:.1f} | {t_asg:.1f} | {t_asg / t_dense:.2f} | {error:.1e} |")
        if head.embedding.fast.approximates(head.embedding):
            approximate(head, dense, args)


def approximate(head, dense, args) -> None:
    """The 8-bit path against the dense head and the exact ASG head: time, error, top-1, tokens rescored."""
    fast = head.embedding.fast
    print("\n| rows | dense ms | ASG exact ms | ASG 8-bit ms | dense / 8-bit | exact / 8-bit |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in (1, 2):
        hidden = torch.randn(rows, args.dim)
        fast.approximate = False
        t_dense, t_exact = paired_median_ms(lambda: dense(hidden), lambda: head(hidden), args.repeats, warmup=3)
        fast.approximate = True
        _, t_bytes = paired_median_ms(lambda: dense(hidden), lambda: head(hidden), args.repeats, warmup=3)
        print(f"| {rows} | {t_dense:.1f} | {t_exact:.2f} | {t_bytes:.2f} | {t_dense / t_bytes:.1f}x | "
              f"{t_exact / t_bytes:.2f}x |")
    errors, agree, rescored = [], 0, 0
    for _ in range(args.agreement_rows):
        hidden = torch.randn(1, args.dim)
        fast.approximate = False
        exact = head(hidden)[0]
        fast.approximate = True
        got = head(hidden)[0]
        errors.append(((got - exact).abs().max() / exact.abs().max()).item())
        agree += int(got.argmax() == exact.argmax())
        rescored += fast.rescored
    fast.approximate = False
    print(f"\nover {args.agreement_rows} hidden states: top-1 agreement {agree / args.agreement_rows:.3f}; largest "
          f"error {max(errors):.1e} of the largest |logit| (median {sorted(errors)[len(errors) // 2]:.1e}); "
          f"{rescored / args.agreement_rows:.0f} tokens a state scored exactly (the ones that could be the top)")


if __name__ == "__main__":
    main()
