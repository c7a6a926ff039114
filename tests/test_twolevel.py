"""Two-level k-means (asg.twolevel) and its use by pq.fit for large k."""

import io
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asg import pq, twolevel
from asg.config import ASGConfig
from asg.baselines.sg import SGConfig

faiss = pytest.importorskip("faiss")


class _Bar:
    def __init__(self):
        self.n = 0.0

    def update(self, n=1):
        self.n += n


def _clustered(num=12000, dim=8, centers=400, seed=0):
    rng = np.random.default_rng(seed)
    middles = rng.standard_normal((centers, dim)).astype(np.float32) * 3
    spread = rng.uniform(0.1, 1.0, centers).astype(np.float32)  # cells of different widths
    which = rng.integers(0, centers, num)
    return middles[which] + rng.standard_normal((num, dim)).astype(np.float32) * spread[which, None]


def _error(x, centroids, codes):
    return float(np.linalg.norm(x - centroids[codes]) / np.linalg.norm(x))


def test_two_level_error_is_close_to_exact_kmeans_and_the_bar_counts_every_step():
    x = _clustered()
    k = 256
    exact, index = pq._faiss_kmeans(faiss, x, k, 20, 0, None, _Bar())
    exact_error = _error(x, exact, index.search(x, 1)[1][:, 0])
    bar = _Bar()
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, k, 20, 0, None, bar)
    codes = twolevel.assign(faiss, fit, x)
    assert fit.centroids.shape == (k, 8) and np.isfinite(fit.centroids).all()
    assert codes.min() >= 0 and codes.max() < k
    assert fit.starts[0] == 0 and fit.starts[-1] == k and (np.diff(fit.starts) >= 0).all()
    error = _error(x, fit.centroids, codes)
    assert error <= 1.05 * exact_error, (error, exact_error)
    assert error < 0.5 * _error(x, x.mean(0, keepdims=True), np.zeros(len(x), dtype=int))  # far better than one centroid
    assert bar.n == pytest.approx(twolevel.units(20))


def test_assignment_finds_the_exact_nearest_centroid_for_almost_every_point():
    x = _clustered(seed=1)
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 256, 10, 0, None, _Bar())
    flat = faiss.IndexFlatL2(8)
    flat.add(fit.centroids)
    nearest = flat.search(x, 1)[1][:, 0]
    assert (twolevel.assign(faiss, fit, x) == nearest).mean() > 0.98
    # with every cell probed the search is exhaustive, hence exact
    assert (twolevel.assign(faiss, fit, x, nprobe=len(fit.coarse)) == nearest).all()


def test_the_pilot_keeps_the_start_that_fits_better(monkeypatch):
    x = _clustered(num=60000, seed=3)
    # the allocation alone: on these 8-dimensional points Lloyd iterations over all centroids repair much of it
    monkeypatch.setattr(twolevel, "REFINE_ITERS", 0)
    monkeypatch.setattr(twolevel, "REFINE_ITERS_FLAT", 0)
    monkeypatch.setattr(twolevel, "RELOCATE_ROUNDS", 0)
    # p=8 gives nearly every centroid to the widest cells: clearly worse, in whichever order it is tried
    monkeypatch.setitem(twolevel._POWERS, "spread8", 8.0)
    for starts in [("spread", "spread8"), ("spread8", "spread")]:
        monkeypatch.setattr(twolevel, "STARTS", starts)
        assert twolevel.choose_start(faiss, pq._faiss_kmeans, x, 512, 10, 0, None) == "spread"
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 512, 10, 0, None, _Bar())
    assert fit.start == "spread"
    worse = twolevel._kmeans(faiss, pq._faiss_kmeans, x, 512, 10, 0, None, _Bar(), "spread8")
    assert _error(x, fit.centroids, twolevel.assign(faiss, fit, x)) < \
        _error(x, worse.centroids, twolevel.assign(faiss, worse, x))
    # where the spread cannot matter (one isotropic cloud: every cell as wide as the next), the pilots differ by
    # less than the margin and the first candidate stays, whichever it is
    cloud = np.random.default_rng(4).standard_normal((20000, 8)).astype(np.float32)
    for starts in [("spread", "spread2"), ("spread2", "spread")]:
        monkeypatch.setattr(twolevel, "STARTS", starts)
        assert twolevel.choose_start(faiss, pq._faiss_kmeans, cloud, 256, 10, 0, None) == starts[0]
    # too few points for a pilot (a tenth under PILOT_MIN_POINTS): the first candidate, unmeasured
    monkeypatch.setattr(twolevel, "STARTS", ("spread8", "spread"))
    assert twolevel.choose_start(faiss, pq._faiss_kmeans, x[:9000], 512, 10, 0, None) == "spread8"


def test_sampled_points_start_where_centroids_get_few_points_each():
    """SG's regime (2.5 points a centroid, wide isotropic rows): a cluster is a few near neighbours anywhere, which
    sampled points scored across cells find and per-cell fits do not."""
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((10000, 256)).astype(np.float32)
    wide /= np.linalg.norm(wide, axis=1, keepdims=True)
    errors = {}
    for start in ("spread", "sample"):
        fit = twolevel._kmeans(faiss, pq._faiss_kmeans, wide, 4000, 10, 0, None, _Bar(), start)
        assert fit.nprobe and fit.start == start
        codes = twolevel.training_codes(faiss, fit, wide)
        errors[start] = _error(wide, fit.centroids, codes)
        assert fit.starts[-1] == 4000 and (np.diff(fit.starts) >= 0).all() and np.isfinite(fit.centroids).all()
    assert errors["sample"] < 0.99 * errors["spread"], errors  # 0.712 against 0.724 here
    # the start: k distinct points, each in the cell of its nearest coarse centroid
    coarse = fit.coarse
    drawn = twolevel._sampled(faiss, coarse, wide, 4000, 0)
    rows = {row.tobytes() for row in wide}
    assert len({row.tobytes() for row in drawn.centroids}) == 4000 and all(c.tobytes() in rows for c in drawn.centroids)
    cell_of = np.repeat(np.arange(len(coarse)), np.diff(drawn.starts))
    np.testing.assert_array_equal(cell_of, twolevel._nearest(faiss, coarse, drawn.centroids, 1)[:, 0])
    bar = _Bar()
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, wide, 4000, 10, 0, None, bar)
    assert fit.start == "sample" and bar.n == pytest.approx(twolevel.units(10))
    # beyond SAMPLE_MAX_POINTS points a centroid, per-cell fits
    assert twolevel.kmeans(faiss, pq._faiss_kmeans, wide, 900, 10, 0, None, _Bar()).start in twolevel.STARTS


def test_weights_pull_centroids_towards_heavy_points():
    x = _clustered(seed=2)
    region = x[:, 0] > np.quantile(x[:, 0], 0.9)  # one side of the space is what counts
    heavy = np.where(region, 1.0, 0.01).astype(np.float32)
    plain = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 128, 10, 0, None, _Bar())
    weighted = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 128, 10, 0, heavy, _Bar())
    part = np.ascontiguousarray(x[region])
    assert _error(part, weighted.centroids, twolevel.assign(faiss, weighted, part)) < \
        0.8 * _error(part, plain.centroids, twolevel.assign(faiss, plain, part))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=30), st.data())
def test_allocation_sums_to_k_fits_every_cell_and_leaves_none_empty(counts, data):
    counts = np.array(counts)
    if counts.sum() < 2:
        return
    k = data.draw(st.integers(max(2, int((counts > 0).sum())), int(counts.sum())))
    mass = np.array(data.draw(st.lists(st.floats(0, 100), min_size=len(counts), max_size=len(counts))))
    share = twolevel._allocate(k, mass * (counts > 0), counts)
    assert share.sum() == k
    assert (share <= counts).all()
    assert (share[counts > 0] >= 1).all()


def test_pq_fit_two_level_is_seeded_and_auto_picks_it_only_for_large_work():
    x = _clustered(num=6000, dim=16, seed=3)
    first = pq.fit(x, 512, 2, kmeans="two-level", seed=4, niter=8)
    second = pq.fit(x, 512, 2, kmeans="two-level", seed=4, niter=8)
    assert first.codes.dtype == pq.code_dtype(512) and first.codebooks.shape == (2, 512, 8)
    np.testing.assert_array_equal(first.codes, second.codes)
    np.testing.assert_array_equal(first.codebooks, second.codebooks)
    exact = pq.fit(x, 512, 2, kmeans="exact", seed=4, niter=8)
    recon = lambda f: pq.relative_error(x, pq.decode(f.codebooks, f.codes))  # noqa: E731
    assert recon(first) <= 1.05 * recon(exact)
    # auto: the small fit stays exact (bit for bit what it always was), paper-scale fits go two-level
    np.testing.assert_array_equal(pq.fit(x, 512, 2, seed=4, niter=8).codes, exact.codes)
    assert not pq.two_level(250_002, 1024, 16, 25)  # the benchmarked default fit of a 250k × 768 table
    assert pq.two_level(250_112 * 64, 32_768, 8, 25)  # mT5's shared k=32,768
    assert pq.two_level(250_002, 100_001, 768, 25)  # 40% SG
    assert pq.two_level(250_112, 8_192, 16, 25)  # separate k=8,192, m=32
    assert not pq.two_level(10**9, 256, 8, 25)  # small k is always exact
    assert pq.two_level(100, 4, 2, 1, "two-level") and not pq.two_level(10**9, 10**5, 768, 25, "exact")


def test_shared_codebook_two_level():
    x = _clustered(num=3000, dim=32, seed=5)
    fit = pq.fit(x, 1024, 4, codebook="shared", kmeans="two-level", niter=8)
    exact = pq.fit(x, 1024, 4, codebook="shared", kmeans="exact", niter=8)
    assert fit.codebooks.shape == (1024, 8) and fit.codes.shape == (3000, 4)
    error, exact_error = (pq.relative_error(x, pq.decode(f.codebooks, f.codes)) for f in (fit, exact))
    assert error <= 1.05 * exact_error


def test_kmeans_mode_is_checked_where_it_is_set():
    x = _clustered(num=500)
    with pytest.raises(ValueError, match="unknown kmeans"):
        pq.fit(x, 16, 2, kmeans="fast")
    with pytest.raises(ValueError, match="faiss backend"):
        pq.fit(x, 16, 2, kmeans="two-level", backend="torch")
    with pytest.raises(ValueError, match="unknown kmeans"):
        ASGConfig(k=16, m=2, kmeans="approximate")
    with pytest.raises(ValueError, match="faiss backend"):
        SGConfig(kmeans="two-level", backend="torch")
    assert ASGConfig(k=16, m=2).kmeans == "auto"


def test_the_cli_option_reaches_the_configs_that_run_kmeans():
    from asg.cli import _method_config

    options = dict(k=16, m=4, shared=False, targets="input,output", backend="faiss", seed=0, niter=5)
    assert _method_config("asg", 1000, 64, None, kmeans="two-level", **options).kmeans == "two-level"
    assert _method_config("sg", 1000, 64, None, kmeans="exact", **{**options, "k": None, "m": None}).kmeans == "exact"
    lowrank = _method_config("lowrank", 1000, 64, "5%", kmeans="exact", **{**options, "k": None, "m": None})
    assert not hasattr(lowrank, "kmeans")  # no k-means to set: the option is one every command passes


def test_search_gives_the_nearest_and_second_nearest_distances():
    x = _clustered(num=3000, dim=16, seed=5)
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 300, 5, 0, None, _Bar())
    squared = ((x[:, None, :] - fit.centroids[None]) ** 2).sum(-1)
    want = np.sort(squared, 1)[:, :2]
    # the searches expand ||x||² - 2 x·c + ||c||² in float32: a distance of 0 (a point that is its own centroid) comes
    # out as rounding of the lengths' size
    atol = 1e-5 * float((x ** 2).sum(1).max())
    for nprobe in (0, len(fit.coarse)):  # one flat search, and every cell probed: both exhaustive
        index, best, second = twolevel._search(faiss, fit, x, True, nprobe)
        np.testing.assert_allclose(best, want[:, 0], rtol=1e-4, atol=atol)
        np.testing.assert_allclose(second, want[:, 1], rtol=1e-4, atol=atol)
        np.testing.assert_allclose(squared[np.arange(len(x)), index], want[:, 0], rtol=1e-4, atol=atol)
    # fewer cells: the nearest among fewer centroids is never nearer than the nearest of all
    index, best, second = twolevel._search(faiss, fit, x, True, 1)
    assert (best >= want[:, 0] * (1 - 1e-4) - 1e-4).all() and (second >= best).all()
    assert (best > want[:, 0] * (1 + 1e-3) + 1e-3).any()  # and the one cell missed some nearest centroids


def test_the_search_is_flat_where_that_was_faster_on_a_sample(monkeypatch):
    x = np.random.default_rng(6).standard_normal((20000, 16)).astype(np.float32)
    fit = twolevel._kmeans(faiss, pq._faiss_kmeans, x, 1024, 5, 0, None, _Bar(), "spread")
    searched = []

    def timed(work):  # a clock on which the flat search (the first timed) takes `flat` seconds, probing 1
        searched.append(work())
        return flat if len(searched) % 2 else 1.0

    monkeypatch.setattr(twolevel, "_seconds", timed)
    edge = twolevel.FLAT_PREFERENCE  # the flat search is exact: kept unless probing was this many times faster
    for flat, want in ((0.5, 0), (edge, 0), (1.5 * edge, twolevel.NPROBE)):
        assert twolevel._nprobe(faiss, fit, x, 0) == want
    flat_index, flat_best, _ = searched[0]
    assert len(flat_index) == min(20000, twolevel._TIMING_SAMPLE)  # a sample large enough to time
    # the flat search is exact: never farther than the probed one, and nearer for some points (16 values)
    assert (flat_best <= searched[1][1] * (1 + 1e-5) + 1e-6).all() and (flat_best < searched[1][1] - 1e-4).any()
    # where a flat search of the sample would already be large work, probing is taken without timing anything
    monkeypatch.setattr(twolevel, "_TIMING_WORK", 1e6)
    searched.clear()
    assert twolevel._nprobe(faiss, fit, x, 0) == twolevel.NPROBE and not searched


def test_relocation_lowers_the_error_where_cells_are_probed(monkeypatch):
    # SG's regime (2.5 points a centroid) on clustered points of 64 values, with cells probed as on large tables
    x = _clustered(num=6000, dim=64, centers=300, seed=7)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(twolevel, "_nprobe", lambda *args: twolevel.NPROBE)  # whatever a clock says here
    errors = []
    for rounds in (0, 2):
        monkeypatch.setattr(twolevel, "RELOCATE_ROUNDS", rounds)
        bar = _Bar()
        fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 2400, 10, 0, None, bar)
        assert bar.n == pytest.approx(twolevel.units(10))
        assert fit.starts[-1] == 2400 and (np.diff(fit.starts) >= 0).all() and np.isfinite(fit.centroids).all()
        errors.append(_error(x, fit.centroids, twolevel.training_codes(faiss, fit, x)))
    assert errors[1] < 0.98 * errors[0], errors


def test_candidates_are_the_nearest_centroids_of_the_probed_cells(monkeypatch):
    x = _clustered(num=3000, dim=16, seed=5)
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 300, 5, 0, None, _Bar())
    squared = ((x[:, None, :] - fit.centroids[None]) ** 2).sum(-1)
    order = np.argsort(squared, 1)
    atol = 1e-5 * float((x ** 2).sum(1).max())  # the float32 expansion's rounding, at a distance of 0 too
    # every cell probed: the candidates are the exact nearest, nearest first, and the search among them exact
    monkeypatch.setattr(twolevel, "WIDE_NPROBE", len(fit.coarse))
    candidates = twolevel._candidates(faiss, fit, x)
    assert candidates.shape == (len(x), twolevel.CANDIDATES) and candidates.dtype == np.int32
    near = np.take_along_axis(squared, candidates.astype(np.int64), 1)
    want = np.take_along_axis(squared, order[:, :twolevel.CANDIDATES], 1)
    np.testing.assert_allclose(near, want, rtol=1e-4, atol=atol)
    index, best, second = twolevel._search_candidates(fit.centroids, x, candidates, True)
    np.testing.assert_allclose(best, want[:, 0], rtol=1e-4, atol=atol)
    np.testing.assert_allclose(second, want[:, 1], rtol=1e-4, atol=atol)
    np.testing.assert_array_equal(twolevel.training_codes(faiss, fit._replace(candidates=candidates), x), index)
    # one cell probed: the candidates lie in the point's nearest cell, and where it holds fewer centroids than
    # candidates, its nearest repeats and is not counted as a second centroid
    monkeypatch.setattr(twolevel, "WIDE_NPROBE", 1)
    candidates = twolevel._candidates(faiss, fit, x)
    cell = twolevel._cells(faiss, fit.coarse, x)
    lo, hi = fit.starts[cell], fit.starts[cell + 1]
    assert ((candidates >= lo[:, None]) & (candidates < hi[:, None])).all()
    fewer = hi - lo < twolevel.CANDIDATES
    assert fewer.any() and all(len(set(candidates[i])) == hi[i] - lo[i] for i in np.flatnonzero(fewer))
    index, best, second = twolevel._search_candidates(fit.centroids, x, candidates, True)
    assert np.isfinite(second).all()
    repeated = np.repeat(index[:, None], 3, 1).astype(np.int32)  # one centroid, three times: no second
    again, alone, none = twolevel._search_candidates(fit.centroids, x, repeated, True)
    np.testing.assert_array_equal(again, index)
    np.testing.assert_array_equal(alone, best)
    assert np.isinf(none).all()
    own = np.where(np.arange(300)[None] >= lo[:, None], squared, np.inf)
    own = np.where(np.arange(300)[None] < hi[:, None], own, np.inf)
    np.testing.assert_allclose(best, own.min(1), rtol=1e-4, atol=atol)


def test_relocation_keeps_candidates_numbered_with_their_centroids(monkeypatch):
    x = _clustered(num=6000, dim=64, centers=300, seed=7)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(twolevel, "_nprobe", lambda *args: twolevel.NPROBE)
    monkeypatch.setattr(twolevel, "RELOCATE_ROUNDS", 0)
    fit = twolevel.kmeans(faiss, pq._faiss_kmeans, x, 2400, 10, 0, None, _Bar())
    assert fit.candidates is not None
    centroids, candidates = fit.centroids.copy(), fit.candidates.copy()
    before = centroids[candidates]  # each point's candidates' vectors, whatever their numbers
    # a round whose moves are kept as they are made (no Lloyd iteration after them)
    monkeypatch.setattr(twolevel, "_lloyd", lambda faiss, fit, x, weights: fit._replace(centroids=fit.centroids))
    monkeypatch.setattr(twolevel, "_error", lambda *args: -np.inf)
    moved, did = twolevel._relocate(faiss, fit, x, None, _Bar())
    assert did and moved.starts[-1] == 2400 and (np.diff(moved.starts) >= 0).all()
    kept = {row.tobytes() for row in moved.centroids}
    left = np.array([row.tobytes() not in kept for row in centroids])  # the centroids that moved elsewhere
    assert 0 < left.sum() <= twolevel.RELOCATE_SHARE * 2400
    # renumbered with their centroids: a point's candidate changes only where it moved elsewhere, or in the one
    # place given to a centroid that moved to the point's own cluster
    changed = (moved.centroids[moved.candidates] != before).any(2)
    added = changed & ~left[candidates]
    assert added.sum(1).max() == 1 and 0 < added.any(1).sum() < len(x)
    rows = {row.tobytes() for row in x}
    assert all(row.tobytes() in rows for row in moved.centroids[moved.candidates[added]])  # placed at a point
    # a round that does not pay restores the fit it was given, centroids and candidates
    fit = fit._replace(centroids=centroids.copy(), candidates=candidates.copy())
    monkeypatch.setattr(twolevel, "_error", lambda *args: np.inf)
    same, did = twolevel._relocate(faiss, fit, x, None, _Bar())
    assert not did and same is fit
    np.testing.assert_array_equal(fit.centroids, centroids)
    np.testing.assert_array_equal(fit.candidates, candidates)


def test_the_progress_bar_shows_percentages_and_never_passes_its_total(capsys):
    x = _clustered(num=6000, dim=16, seed=3)
    pq.fit(x, 512, 2, kmeans="two-level", niter=5, progress=True)
    shown = capsys.readouterr().err.replace("\r", "\n")
    assert "100%" in shown and "segment 2/2" in shown
    assert "<-" not in shown  # a negative time left: the bar past its total
    assert not re.search(r"\d\.\d{3,}/", shown)  # no fractional counts of the shares two-level fits advance by
    bar = pq._Progress(2.5, file=io.StringIO())
    for _ in range(4):
        bar.update(1.0000001)
    assert bar.n == 2.5
