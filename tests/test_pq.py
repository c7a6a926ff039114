"""Product quantization on numbers alone: shapes, dtypes, determinism, error floors, skewed data."""

import numpy as np
import pytest
import torch

from asg import pq

BACKENDS = ["faiss", "torch"]


def clustered(rng, num_rows=600, dim=32, m=4, k=8, noise=1e-3):
    """Rows whose every segment is one of k centres plus tiny noise: PQ with this k recovers them."""
    centres = rng.standard_normal((m, k, dim // m)).astype(np.float32)
    picks = rng.integers(0, k, size=(num_rows, m))
    rows = centres[np.arange(m)[None, :], picks].reshape(num_rows, dim)
    return rows + noise * rng.standard_normal(rows.shape).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_and_dtypes(backend):
    x = np.random.default_rng(0).standard_normal((500, 24)).astype(np.float32)
    fit = pq.fit(x, k=16, m=6, backend=backend)
    assert fit.codebooks.shape == (6, 16, 4) and fit.codebooks.dtype == np.float32
    assert fit.codes.shape == (500, 6) and fit.codes.dtype == np.uint8
    assert fit.codes.max() < 16
    shared = pq.fit(x, k=16, m=6, codebook="shared", backend=backend)
    assert shared.codebooks.shape == (16, 4)
    assert pq.decode(shared.codebooks, shared.codes).shape == (500, 24)


def test_code_dtype_is_the_smallest_that_holds_k():
    assert pq.code_dtype(256) == np.uint8
    assert pq.code_dtype(257) == np.int16
    assert pq.code_dtype(32768) == np.int16
    assert pq.code_dtype(32769) == np.uint16
    assert pq.code_dtype(65536) == np.uint16
    assert pq.code_dtype(65537) == np.int32


@pytest.mark.parametrize("codebook", ["separate", "shared"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_codes(backend, codebook):
    x = np.random.default_rng(1).standard_normal((400, 16)).astype(np.float32)
    a = pq.fit(x, k=12, m=4, codebook=codebook, seed=5, backend=backend)
    b = pq.fit(x, k=12, m=4, codebook=codebook, seed=5, backend=backend)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.codebooks, b.codebooks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_clustered_data(backend):
    # 8 true concepts per segment; 64 centroids cover all of them, so only the noise is left
    x = clustered(np.random.default_rng(2))
    fit = pq.fit(x, k=64, m=4, backend=backend, niter=30)
    assert pq.relative_error(x, pq.decode(fit.codebooks, fit.codes)) < 0.01


def test_error_falls_as_k_grows_and_matches_across_backends():
    x = np.random.default_rng(3).standard_normal((2000, 32)).astype(np.float32)
    errors = {backend: [pq.relative_error(x, pq.decode(*pq.fit(x, k=k, m=8, backend=backend))) for k in (4, 16, 64)]
              for backend in BACKENDS}
    for backend, row in errors.items():
        assert row[0] > row[1] > row[2], backend
    # Gaussian data, 4-dim segments, 64 centroids: k-means leaves about 0.40 of the norm (0.4048 and 0.4046 here)
    assert 0.3 < errors["faiss"][2] < 0.5
    # two implementations of the same k-means (other initial draws, other tie-breaking): within 1% of each other
    for faiss_error, torch_error in zip(errors["faiss"], errors["torch"]):
        assert abs(faiss_error - torch_error) < 0.01 * faiss_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_skewed_data_with_half_identical_points(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    x[:500] = x[0]
    fit = pq.fit(x, k=32, m=4, backend=backend)
    assert np.isfinite(fit.codebooks).all()
    recon = pq.decode(fit.codebooks, fit.codes)
    # the 500 duplicates dominate their clusters: each centroid sits (almost) on them
    assert pq.relative_error(np.repeat(x[:1], 500, 0), recon[:500]) < 0.01
    # the duplicates take one concept per segment; the other 31 serve the rest
    assert all(len(np.unique(fit.codes[500:, i])) >= 24 for i in range(4))


def test_torch_backend_splits_empty_clusters():
    x = torch.zeros(100, 2)
    x[:90] = 1.0  # 90 identical points and 10 others: naive Lloyd leaves clusters empty
    x[90:, 0] = torch.arange(10, dtype=torch.float32)
    fit = pq.fit(x, k=8, m=1, niter=10, backend="torch")
    assert np.isfinite(fit.codebooks).all()
    assert len(np.unique(fit.codes)) >= 7


@pytest.mark.parametrize("codebook", ["separate", "shared"])
def test_encode_matches_fit_and_decode_round_trips_torch(codebook):
    x = np.random.default_rng(5).standard_normal((300, 16)).astype(np.float32)
    fit = pq.fit(x, k=8, m=4, codebook=codebook)
    assert np.array_equal(pq.encode(fit.codebooks, x), fit.codes)
    decoded_t = pq.decode(torch.from_numpy(fit.codebooks), torch.from_numpy(fit.codes.astype(np.int64)))
    assert isinstance(decoded_t, torch.Tensor)
    np.testing.assert_array_equal(decoded_t.numpy(), pq.decode(fit.codebooks, fit.codes))


def test_large_inputs_train_on_a_sample_but_encode_every_row(monkeypatch):
    monkeypatch.setattr(pq, "MAX_POINTS_PER_CENTROID", 4)
    x = np.random.default_rng(6).standard_normal((1000, 8)).astype(np.float32)
    for backend in BACKENDS:
        fit = pq.fit(x, k=8, m=2, codebook="shared", backend=backend)
        assert fit.codes.shape == (1000, 2)
        assert np.array_equal(pq.encode(fit.codebooks, x), fit.codes)


def test_accepts_torch_and_low_precision_input():
    x = torch.randn(200, 16, dtype=torch.bfloat16)
    fit = pq.fit(x, k=8, m=4)
    assert fit.codebooks.dtype == np.float32


def test_bad_arguments():
    x = np.zeros((10, 12), dtype=np.float32)
    with pytest.raises(ValueError, match="does not divide"):
        pq.fit(x, k=4, m=5)
    with pytest.raises(ValueError, match="between 2 and"):
        pq.fit(x, k=11, m=4)
    with pytest.raises(ValueError, match="unknown codebook"):
        pq.fit(x, k=4, m=4, codebook="pooled")
    with pytest.raises(ValueError, match="unknown backend"):
        pq.fit(x, k=4, m=4, backend="sklearn")


def test_faiss_fits_advance_by_iteration_and_match_one_faiss_call(capsys):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    fit = pq.fit(x, k=8, m=4, niter=3, seed=5, progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err and "iter" in err and "segment 4/4" in err  # m × niter iterations, with time left
    reference = faiss.Kmeans(4, 8, niter=3, seed=5 + 1, verbose=False, min_points_per_centroid=1)
    reference.train(np.ascontiguousarray(x[:, 4:8]))  # segment 1: one faiss call of all iterations
    assert np.array_equal(fit.codebooks[1], reference.centroids)
    pq.fit(x, k=8, m=4, codebook="shared", niter=3, progress=True)
    assert "4/4" in capsys.readouterr().err  # the iterations, then the assignment of every segment


@pytest.mark.parametrize("kmeans", ["exact", "two-level"])
def test_one_segment_codebook_is_the_fitted_centroids(kmeans):
    """m=1 (SG's groups) hands back the k-means centroids as the one codebook, and every row's code is
    its nearest centroid among them (two-level: within the cells it searches, almost always the nearest)."""
    x = np.random.default_rng(3).standard_normal((3000, 12)).astype(np.float32)
    fit = pq.fit(x, 200, 1, kmeans=kmeans, niter=6)
    assert fit.codebooks.shape == (1, 200, 12) and fit.codes.shape == (3000, 1)
    distances = ((x[:, None, :].astype(np.float64) - fit.codebooks[0][None]) ** 2).sum(-1)
    chosen = distances[np.arange(len(x)), fit.codes[:, 0].astype(np.int64)]
    nearest = (chosen <= distances.min(1) * (1 + 1e-5) + 1e-6).mean()  # a near-tie may go either way on a CPU
    assert nearest == 1.0 if kmeans == "exact" else nearest > 0.97
    assert pq.relative_error(x, pq.decode(fit.codebooks, fit.codes)) < 0.75
