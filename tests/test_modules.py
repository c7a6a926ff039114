"""ASGEmbedding and ASGHead on their own: lookups, ConceptIDs, dtypes, and what training may change."""

import numpy as np
import pytest
import torch

import asg
from asg import pq
from tiny_models import HIDDEN, build, sample_inputs


def module(k=8, m=4, vocab=50, dim=16, codebook="separate", seed=0):
    x = np.random.default_rng(seed).standard_normal((vocab, dim)).astype(np.float32)
    fit = pq.fit(x, k=k, m=m, codebook=codebook)
    return asg.ASGEmbedding.from_pq(fit.codebooks, fit.codes), fit


@pytest.mark.parametrize("codebook", ["separate", "shared"])
def test_forward_is_the_concatenation_of_concept_vectors(codebook):
    emb, fit = module(codebook=codebook)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    want = torch.from_numpy(pq.decode(fit.codebooks, fit.codes))[ids]
    assert torch.equal(emb(ids), want)
    assert torch.equal(emb.weight, torch.from_numpy(pq.decode(fit.codebooks, fit.codes)))


def test_concept_ids_are_the_papers_row_indices():
    emb, fit = module(k=8, m=4)
    ids = emb.concept_ids()
    assert ids.dtype == torch.long and ids.shape == (50, 4)
    assert torch.equal(ids, torch.from_numpy(fit.codes.astype(np.int64)) + torch.arange(4) * 8)  # i·k + s_i
    assert emb.codebooks.shape == (4 * 8, 4)  # (m·k, D/m)
    shared, fit_shared = module(k=8, m=4, codebook="shared")
    assert shared.codebooks.shape == (8, 4)
    assert torch.equal(shared.concept_ids(), torch.from_numpy(fit_shared.codes.astype(np.int64)))


@pytest.mark.parametrize("k, dtype", [(256, torch.uint8), (257, torch.int16), (40000, torch.uint16)])
def test_codes_use_the_smallest_integer_type(k, dtype):
    emb = asg.ASGEmbedding(100, 8, k=k, m=2)
    assert emb.codes.dtype == dtype
    assert not emb.codes.requires_grad
    assert [name for name, _ in emb.named_parameters()] == ["codebooks"]


def test_output_follows_the_codebooks_dtype():
    emb, _ = module()
    emb.to(torch.bfloat16)
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert emb.codes.dtype == torch.uint8  # buffers of integer type are not cast


def test_gradients_reach_only_the_codebooks_rows_in_use():
    emb, _ = module(k=8, m=4)
    ids = torch.tensor([5])
    emb(ids).sum().backward()
    touched = (emb.codebooks.grad.abs().sum(1) > 0).nonzero().flatten()
    assert torch.equal(touched, emb.concept_ids()[5].sort().values)


def test_a_training_step_changes_codebooks_and_never_codes():
    model = build("bert")
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    model.train()
    emb = model.get_input_embeddings()
    codes, codebooks = emb.codes.clone(), emb.codebooks.detach().clone()
    others = {n: p.detach().clone() for n, p in model.named_parameters() if "word_embeddings" not in n}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = sample_inputs("bert")
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    assert not torch.equal(emb.codebooks, codebooks)
    assert torch.equal(emb.codes, codes)
    assert any(not torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)


def test_head_lookup_logits_are_eq2_for_any_leading_shape():
    emb, fit = module(k=8, m=4)
    head = asg.ASGHead(emb, torch.nn.Parameter(torch.arange(50, dtype=torch.float32)))
    hidden = torch.randn(2, 3, 5, 16)
    table = torch.from_numpy(pq.decode(fit.codebooks, fit.codes))
    want = hidden @ table.T + head.bias
    with torch.no_grad():
        assert head(hidden).shape == (2, 3, 5, 50)
        torch.testing.assert_close(head(hidden), want)
        torch.testing.assert_close(head.lookup_logits(hidden), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["row", "scalar"])
def test_norm_preserving_reconstruction_is_exact_and_keeps_lengths(mode, tmp_path):
    import copy

    original = build("gemma3")
    model = copy.deepcopy(original)
    report = asg.compress(model, asg.ASGConfig(k=16, m=8, norms=mode), progress=False)
    table = model.get_input_embeddings()
    dense = original.get_input_embeddings().weight.detach()
    lengths = table.weight.detach().norm(dim=1)
    if mode == "row":
        torch.testing.assert_close(lengths, dense.norm(dim=1))  # every token keeps its own length
        assert table.norms.shape == (211,)
    else:
        torch.testing.assert_close(lengths, torch.full_like(lengths, dense.norm(dim=1).mean().item()))
        assert table.norms.shape == (1,)
    assert report.embedding_params_after == 16 * 32 + table.norms.numel()
    decoded = torch.from_numpy(pq.decode(table.codebooks.detach().view(8, 16, 4).numpy(), table.codes.numpy()))
    want = decoded * (table.norms.detach() / decoded.norm(dim=1))[:, None]
    torch.testing.assert_close(table.weight.detach(), want)
    ids = torch.tensor([[3, 7, 200]])
    torch.testing.assert_close(table(ids), want[ids] * original.get_input_embeddings().embed_scale)
    hidden = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), hidden @ want.T, rtol=1e-5, atol=1e-5)  # lookup kernel
        torch.testing.assert_close(model.lm_head.lookup_logits(hidden), hidden @ want.T, rtol=1e-5, atol=1e-5)
    asg.save_pretrained(model, tmp_path / "ckpt")
    inputs = sample_inputs("gemma3")
    loaded = asg.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert table.norms.grad is not None and table.norms.grad.abs().sum() > 0  # lengths train too
    model.resize_token_embeddings(215)
    assert table.norms.shape == ((215,) if mode == "row" else (1,))


def test_cached_row_lengths_follow_every_change_of_the_tables():
    import io

    table = asg.ASGEmbedding.from_pq(torch.randn(4, 8, 2), torch.randint(0, 8, (50, 4)), norms=torch.rand(50) + 0.5)
    hidden = torch.randn(3, 8)
    with torch.no_grad():
        first = table.logits(hidden)  # inference: the whole-vocabulary lengths are computed once and kept
        torch.testing.assert_close(first, hidden @ table.weight.T, rtol=1e-5, atol=1e-5)
        table.norms.mul_(2)  # an in-place update (an optimizer step, load_state_dict) invalidates them
        torch.testing.assert_close(table.logits(hidden), 2 * first, rtol=1e-5, atol=1e-5)
        table.codebooks.mul_(3)  # lengths are kept, so scaling the concepts changes nothing
        torch.testing.assert_close(table.logits(hidden), 2 * first, rtol=1e-5, atol=1e-5)
        table.codes = torch.flip(table.codes, [0])  # a new tensor, e.g. after resizing
        torch.testing.assert_close(table.logits(hidden), hidden @ table.weight.T, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(table, buffer)  # the cache's weak references do not travel
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False).logits(hidden), table.logits(hidden))



def test_a_head_on_a_table_without_lookup_logits_says_so():
    model = build("gpt2")
    asg.compress(model, asg.baselines.LowRankConfig(rank=4), progress=False)
    with pytest.raises(NotImplementedError, match="no lookup-table logits; use logits"):
        model.get_output_embeddings().lookup_logits(torch.randn(2, HIDDEN))
