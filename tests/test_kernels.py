"""The C kernels against plain torch, for every code type, and the fallback when they cannot be built."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import asg
from asg import kernels, pq

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the kernels are not built here")

CODE_TYPES = [(200, torch.uint8), (300, torch.int16), (40000, torch.uint16), (70000, torch.int32)]


def random_module(vocab=1000, dim=32, k=200, m=8, shared=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    module = asg.ASGEmbedding(vocab, dim, k, m, shared=shared)
    with torch.no_grad():
        module.codebooks.copy_(torch.randn(module.codebooks.shape, generator=gen))
        module.codes.copy_(torch.randint(0, k, (vocab, m), generator=gen).to(module.codes.dtype))
    return module


@pytest.mark.parametrize("k, dtype", CODE_TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 40])
def test_lookup_logits_equal_the_dense_product(k, dtype, rows):
    module = random_module(k=k)
    assert module.codes.dtype == dtype
    hidden = torch.randn(rows, 32, generator=torch.Generator().manual_seed(1))
    tables = module.segment_scores(hidden)
    got = kernels.lut_logits(tables, module.codes)
    want = hidden @ module.weight.detach().T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the same sums as the torch reference of eq. 2, to float rounding
    torch.testing.assert_close(got, module.lookup_logits(hidden).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, dtype", CODE_TYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_gather_rebuilds_exactly_the_rows_asked_for(k, dtype, shared):
    module = random_module(k=k, shared=shared)
    step = 0 if shared else k
    assert torch.equal(kernels.gather(module.codebooks.detach(), module.codes, step), module.weight.detach())
    ids = torch.tensor([[5, 999], [0, 5]])
    assert torch.equal(kernels.gather(module.codebooks.detach(), module.codes, step, ids),
                       module.weight.detach()[ids.flatten()])


def test_argmin_rows_finds_the_first_minimum():
    scores = torch.randn(100, 37, generator=torch.Generator().manual_seed(2))  # k not a multiple of the lanes
    scores[3, [4, 20]] = -100.0  # a tie: the first index wins, as torch.min does
    scores[7, 36] = -100.0  # the minimum in the remainder after the last full vector
    out = torch.empty(100, dtype=torch.long)
    kernels.argmin_rows(scores, out)
    assert torch.equal(out, scores.min(-1).indices)
    assert out[3] == 4 and out[7] == 36


@pytest.mark.parametrize("shared", [False, True])
def test_head_fast_path_matches_the_differentiable_path(shared):
    module = random_module(vocab=3000, k=64, shared=shared)
    head = asg.ASGHead(module, torch.nn.Parameter(torch.randn(3000)))
    hidden = torch.randn(2, 5, 32)
    slow = head(hidden)  # autograd on: the matmul path
    assert slow.requires_grad
    with torch.no_grad():
        fast = head(hidden)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


def test_large_batches_try_both_paths_then_keep_the_faster():
    module = random_module(vocab=5000, k=64)
    hidden = torch.randn(200, 32)
    want = hidden @ module.weight.detach().T
    with torch.no_grad():
        outs = [module.logits(hidden) for _ in range(3)]
    times = module.fast.path_times[(200).bit_length()]
    assert set(times) == {"lookup", "rebuild"} and all(t > 0 for t in times.values())
    for out in outs:  # lookup, rebuild, then the faster: all the same logits
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_gather_backward_equals_embedding_backward():
    module = random_module(vocab=300, k=16)
    ids = torch.tensor([[1, 2, 2], [299, 0, 1]])
    module(ids).pow(2).sum().backward()
    fast = module.codebooks.grad.clone()
    module.codebooks.grad = None
    reference = torch.nn.functional.embedding(module.concept_ids()[ids], module.codebooks).flatten(-2)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(fast, module.codebooks.grad)
    module.codebooks.grad = None
    (module.weight * torch.arange(32.0)).sum().backward()  # every row at once
    assert module.codebooks.grad.abs().sum() > 0


def test_assignment_with_the_argmin_kernel_finds_the_nearest_concepts():
    x = torch.randn(700, 3, 4, generator=torch.Generator().manual_seed(3))  # 700 rows, m=3 segments of 4
    centroids = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(4))
    fast = torch.from_numpy(pq.encode(centroids, x.reshape(700, 12)).astype(np.int64))
    want = torch.cdist(x.transpose(0, 1), centroids).argmin(-1).T
    assert (fast == want).float().mean() > 0.999  # equal up to float ties


def test_without_kernels_everything_still_computes_the_same():
    module = random_module(vocab=800, k=64)
    head = asg.ASGHead(module)
    hidden = torch.randn(3, 32)
    ids = torch.tensor([[3, 799], [0, 5]])
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = (head(hidden), module(ids), module.weight)
    fit = pq.fit(x, k=8, m=4, backend="torch")  # its assignment step uses the argmin kernel
    with kernels.disabled(), torch.no_grad():
        assert not kernels.available()
        torch.testing.assert_close(head(hidden), fast[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(module(ids), fast[1]) and torch.equal(module.weight, fast[2])  # gathers are copies
        again = pq.fit(x, k=8, m=4, backend="torch")
    assert kernels.available()
    assert np.array_equal(again.codes, fit.codes) and np.array_equal(again.codebooks, fit.codebooks)


def test_a_failing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ASG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_state", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.library() is None
        assert kernels.library() is None
    assert len([w for w in caught if "could not build its C kernels" in str(w.message)]) == 1


def test_copies_and_pickles_start_with_fresh_caches_and_give_the_same_logits():
    module = random_module(vocab=5000, k=64)
    module.norm_mode, module.norms = "row", torch.nn.Parameter(torch.rand(5000) + 0.5)
    hidden = torch.randn(300, 32)
    with torch.no_grad():
        want = [module.logits(hidden) for _ in range(3)]  # explores both paths and caches the row scale
    assert module.fast.path_times
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert twin.fast.path_times == {}
        with torch.no_grad():
            twin.norms.mul_(2)  # the copy's own lengths: its row scale must not come from the original's cache
            torch.testing.assert_close(twin.logits(hidden), 2 * want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(module.logits(hidden).detach(), want[0], rtol=1e-4, atol=1e-4)



needs_bytes = pytest.mark.skipif(not kernels.byte_lookups(), reason="the 8-bit lookup kernel needs AVX-512 VBMI")


@needs_bytes
@pytest.mark.parametrize("vocab, m, k", [(1, 1, 2), (63, 3, 100), (64, 2, 128), (200, 5, 129), (130, 4, 256),
                                         (777, 300, 512), (1000, 3, 1024)])
def test_byte_lookups_sum_exactly_the_bytes_each_code_picks(vocab, m, k):
    gen = torch.Generator().manual_seed(vocab)
    codes = torch.randint(0, k, (vocab, m), generator=gen).to(torch.uint8 if k <= 256 else torch.int16)
    layout = kernels.byte_codes(codes, k)
    tables = torch.randint(0, 256, (m, 128 << layout.levels), dtype=torch.uint8, generator=gen)
    want = tables.long()[torch.arange(m), codes.long()].sum(1).double()
    got = kernels.lut_bytes(tables, layout, 0.5, -3.0)  # m = 300: more than 256 byte sums, carried to floats
    torch.testing.assert_close(got.double(), 0.5 * want - 3.0, rtol=0, atol=1e-6 * float(want.abs().max() + 3))


@needs_bytes
def test_byte_lookups_check_what_reaches_the_kernel():
    layout = kernels.byte_codes(torch.randint(0, 300, (100, 4)), 300)
    with pytest.raises(ValueError, match="uint8"):
        kernels.lut_bytes(torch.zeros(4, 512), layout)
    with pytest.raises(ValueError, match=r"\(4, 512\)"):
        kernels.lut_bytes(torch.zeros(4, 256, dtype=torch.uint8), layout)
    with pytest.raises(ValueError, match="k <= 1024"):
        kernels.byte_codes(torch.zeros(10, 2, dtype=torch.int16), 2048)
    with pytest.raises(ValueError, match=r"0\.\.299"):  # a code the scores do not have never reaches C
        kernels.byte_codes(torch.tensor([[0, 300]]), 300)
    with pytest.raises(ValueError, match=r"\(4, 300\)"):
        kernels.lut_bytes_top(torch.zeros(4, 512), layout)
    with pytest.raises(ValueError, match="float32"):
        kernels.lut_bytes_top(torch.zeros(4, 300, dtype=torch.float64), layout)
    with pytest.raises(ValueError, match=r"\(100,\)"):
        kernels.lut_bytes_top(torch.zeros(4, 300), layout, torch.ones(99))
    with pytest.raises(ValueError, match="layout"):  # more tokens than its blocks hold: the kernels would overrun
        kernels.lut_bytes_top(torch.zeros(4, 300), layout._replace(vocab=10_000))
    # a layout made by hand whose codes pass k: rescoring reads no score outside the table
    made = kernels.byte_codes(torch.zeros(64, 2, dtype=torch.int16), 130)
    made = made._replace(low=torch.full_like(made.low, 255), high=torch.full_like(made.high, -1))
    out, rescored = kernels.lut_bytes_top(torch.arange(260, dtype=torch.float32).reshape(2, 130), made)
    assert rescored == 64 and torch.equal(out, torch.full((64,), 129.0 + 259.0))  # code 255 read as the last, 129
    books = kernels.transposed_codebooks(torch.zeros(4 * 300, 2), 4, shared=False)
    assert books.shape == (4, 2, 300)
    with pytest.raises(ValueError, match=r"\(8,\)"):
        kernels.segment_scores(torch.zeros(10), books, 4)


@needs_bytes
@pytest.mark.parametrize("where", [(1, 7), (3, 299)])
def test_byte_lookups_round_a_nan_score_to_a_byte_and_keep_the_other_tokens_within_the_bound(where):
    # A NaN never reaches a float-to-integer conversion (undefined in C): it rounds to the top byte, and the
    # tokens that do not pick it keep their bound.
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 300, (500, 4), generator=gen).to(torch.int16)
    codes[:20, where[0]] = where[1]
    scores = torch.randn(4, 300, generator=gen)
    scores[where] = float("nan")
    out, _ = kernels.lut_bytes_top(scores, kernels.byte_codes(codes, 300))
    exact = scores[torch.arange(4), codes.long()].sum(1)
    clean = codes[:, where[0]] != where[1]
    finite = scores.nan_to_num(float(scores[where[0]].nanmean()))
    step = float((finite.amax(1) - finite.amin(1)).max()) / 255
    assert int(clean.sum()) < 500 and out[clean].isfinite().all()
    assert ((out[clean] - exact[clean]).abs() <= 4 * step / 2 * (1 + 1e-3) + 1e-5).all()
    # NaN where the segment's range starts, and scores all NaN: no finite answer, but every byte stays in range
    for nan in ((0, 0), (slice(None), slice(None))):
        scores[nan] = float("nan")
        assert kernels.lut_bytes_top(scores, kernels.byte_codes(codes, 300))[0].shape == (500,)


@needs_bytes
@pytest.mark.parametrize("norms", [None, "row"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed", [3, 9, 11])
def test_approximate_head_stays_within_its_bound_and_keeps_the_top_tokens_exact(norms, shared, seed):
    module = random_module(vocab=5000, dim=64, k=1000, m=16, shared=shared, seed=seed)
    if norms:
        module.set_norms_("row", torch.rand(5000, generator=torch.Generator().manual_seed(seed)) + 0.5)
    head = asg.ASGHead(module)
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = head(hidden)
        head.approximate = True
        assert head.approximate and module.fast.approximate
        approx = head(hidden)
    books = kernels.transposed_codebooks(module.codebooks, 16, shared)
    scores = [kernels.segment_scores(hidden[row], books, 16) for row in range(2)]  # what the head rounds
    torch.testing.assert_close(torch.stack(scores), module.segment_scores(hidden), rtol=1e-5, atol=1e-5)
    scale = module.row_scale() if norms else torch.ones(5000)
    layout = kernels.byte_codes(module.codes, 1000)
    for row in range(2):
        # the 8-bit scores before any exact rescoring, rounded as the kernel rounds: one step for all segments
        # (numpy in float32, whose division is IEEE's, as C's is; the spread in float64, as the kernel takes it)
        values = scores[row].numpy()
        lows = values.min(-1, keepdims=True)
        step = np.float32((values.max(-1).astype(np.float64) - lows[:, 0]).max() / 255)
        tables = torch.from_numpy(((values - lows) / step + np.float32(0.5)).astype(np.uint8))
        tables = torch.cat([tables, tables.new_zeros(16, 24)], 1)
        rough = kernels.lut_bytes(tables, layout, float(step), float(lows.astype(np.float64).sum())) * scale
        bound = 16 * step / 2 * scale
        assert ((rough - exact[row]).abs() <= bound * (1 + 1e-3) + 1e-4).all()
        assert ((approx[row] - exact[row]).abs() <= bound * (1 + 1e-3) + 1e-4).all()
        assert (approx[row] - exact[row]).abs().max() > 1e-3  # it did approximate
        # every token that could be the top one, judged from the 8-bit scores, was scored exactly, and the others
        # kept their 8-bit scores (1% inside and outside the bound: float rounding may decide the edge either way)
        near = rough + 0.99 * bound >= (rough - 0.99 * bound).max()
        far = rough + 1.01 * bound < (rough - 1.01 * bound).max()
        assert int(near.sum()) >= 1 and int(far.sum()) > 4000
        torch.testing.assert_close(approx[row][near], exact[row][near], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(approx[row][far], rough[far], rtol=0, atol=1e-4)  # offsets summed in other orders
    assert int(near.sum()) <= module.fast.rescored <= int((~far).sum())  # the count is the last row's
    assert torch.equal(approx.argmax(-1), exact.argmax(-1))
    assert copy.deepcopy(head).approximate  # the choice travels with copies
    head.approximate = False
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), exact, rtol=0, atol=0)  # and switching back is exact again


@needs_bytes
def test_approximate_scores_every_tied_token_exactly_even_past_the_candidate_list():
    # a hidden state of zeros ties all 140,000 tokens: more candidates than a thread lists (65,536)
    module = random_module(vocab=140_000, dim=8, k=4, m=2, seed=5)
    head = asg.ASGHead(module)
    head.approximate = True
    with torch.no_grad():
        out = head(torch.zeros(1, 8))
    assert module.fast.rescored == 140_000
    assert torch.equal(out, torch.zeros(1, 140_000))


def test_approximate_needs_an_asg_table():
    from asg.baselines.lowrank import LowRankEmbedding

    head = asg.ASGHead(LowRankEmbedding(10, 8, 2))
    assert not head.approximate
    with pytest.raises(ValueError, match="ASG table"):
        head.approximate = True


@pytest.mark.parametrize("k, dtype", CODE_TYPES)
@pytest.mark.parametrize("shared, ids", [(False, None), (True, None), (False, [3, 3, 0, 999]), (True, [5, 1, 5])])
def test_scatter_is_the_gathers_backward(k, dtype, shared, ids):
    module = random_module(k=k, shared=shared)
    codes = module.codes
    step = 0 if shared else k
    ids = None if ids is None else torch.tensor(ids)
    count = len(codes) if ids is None else len(ids)
    grad = torch.randn(count, 32, generator=torch.Generator().manual_seed(2))
    selected = codes if ids is None else codes[ids]
    concept_ids = selected.long() + torch.arange(8) * step
    want = torch.zeros(module.codebooks.shape[0], 4).index_add_(0, concept_ids.reshape(-1), grad.reshape(-1, 4))
    got = kernels.scatter(grad, codes, step, module.codebooks.shape[0], ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grad must be"):
        kernels.scatter(grad[:, :30], codes, step, module.codebooks.shape[0], ids)


@pytest.mark.parametrize("shared", [False, True])
def test_kernel_gradients_of_rows_with_lengths_equal_the_torch_ones(shared):
    module = random_module(k=50, shared=shared, seed=7)
    module.set_norms_("row", torch.rand(1000, generator=torch.Generator().manual_seed(8)) + 0.5)
    upstream = torch.randn(1000, 32, generator=torch.Generator().manual_seed(9))
    (module.weight * upstream).sum().backward()
    fast = module.codebooks.grad.clone()
    module.codebooks.grad = None
    with kernels.disabled():
        (module.weight * upstream).sum().backward()
    torch.testing.assert_close(fast, module.codebooks.grad, rtol=1e-4, atol=1e-4)
