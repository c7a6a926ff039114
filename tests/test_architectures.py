"""Exactness on every architecture: a compressed model computes what the dense model computes on the
reconstructed tables, and the parameter accounting matches appendices B and C."""

import copy

import pytest
import torch
from torch import nn

import asg
import tiny_models
from asg import pq
from tiny_models import (ARCHITECTURES, GENERATIVE, HIDDEN, TIED, VOCAB, build, make_bert_classifier,
                         make_untied_t5_from_config, outputs,
                         sample_inputs)

K, M = 16, 8
SETTINGS = [("separate", K), ("shared", K)]


def decoded(module: asg.ASGEmbedding) -> torch.Tensor:
    """The module's table through pq.decode, independently of the module's own `weight`."""
    codebooks = module.codebooks.detach()
    if not module.shared:
        codebooks = codebooks.view(module.m, module.k, module.segment_dim)
    return pq.decode(codebooks, module.codes)


def dense_twin(original: nn.Module, compressed: nn.Module) -> nn.Module:
    """The original model with each replaced dense table overwritten by the decoded ASG table."""
    return tiny_models.dense_twin(original, compressed, decoded)


@pytest.fixture(params=[(arch, cb) for arch in ARCHITECTURES for cb, _ in SETTINGS], ids=lambda p: f"{p[0]}-{p[1]}")
def compressed_pair(request):
    arch, codebook = request.param
    original = build(arch)
    model = copy.deepcopy(original)
    report = asg.compress(model, asg.ASGConfig(k=K, m=M, codebook=codebook), progress=False)
    return arch, codebook, original, model, report


def test_forward_equals_dense_forward_on_reconstructed_tables(compressed_pair):
    arch, _, original, model, _ = compressed_pair
    twin = dense_twin(original, model)
    inputs = sample_inputs(arch)
    got, want = outputs(model, inputs), outputs(twin, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the compression really changed the model: the twin differs from the original
    assert not torch.allclose(outputs(original, inputs), want, atol=1e-3)


def test_input_modules_replaced_everywhere(compressed_pair):
    arch, _, _, model, _ = compressed_pair
    dense_tables = [name for name, mod in model.named_modules()
                    if isinstance(mod, nn.Embedding) and mod.num_embeddings == VOCAB]
    assert dense_tables == []
    assert isinstance(model.get_input_embeddings(), asg.ASGEmbedding)
    if arch in ("t5", "mt5"):
        assert model.encoder.embed_tokens is model.shared is model.decoder.embed_tokens


def test_tied_heads_share_the_input_module_and_untied_have_their_own(compressed_pair):
    arch, _, _, model, report = compressed_pair
    head = model.get_output_embeddings()
    if arch == "bert-base":
        assert head is None and set(report.tables) == {"input"}
        return
    assert isinstance(head, asg.ASGHead)
    assert (head.embedding is model.get_input_embeddings()) == (arch in TIED)
    assert report.tables["output"]["tied"] == (arch in TIED)


def test_head_logits_equal_dense_logits_of_reconstructed_head(compressed_pair):
    arch, _, _, model, _ = compressed_pair
    head = model.get_output_embeddings()
    if head is None:
        pytest.skip("no output head")
    hidden = torch.randn(3, 4, HIDDEN, generator=torch.Generator().manual_seed(3))
    table = decoded(head.embedding)
    want = hidden @ table.T + (head.bias if head.bias is not None else 0)
    # The head sums m per-segment lookups (eq. 2) where the dense product sums D terms in the matmul's own
    # order; in float32 the two orders differ by a few ulps of the partial sums, and how much depends on the
    # CPU's SIMD path (2.2e-6 seen with ATEN_CPU_CAPABILITY=default). A misread concept differs by ~1e-1.
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.lookup_logits(hidden), want, rtol=1e-5, atol=1e-5)


def test_parameter_accounting_matches_appendix_b_and_c(compressed_pair):
    arch, codebook, original, model, report = compressed_pair
    per_table = K * HIDDEN if codebook == "separate" else K * HIDDEN // M  # k·D or k·D/m
    tables = 1 if arch in TIED or arch == "bert-base" else 2
    assert report.embedding_params_before == tables * VOCAB * HIDDEN
    assert report.embedding_params_after == tables * per_table
    assert report.embedding_ratio == pytest.approx(per_table / (VOCAB * HIDDEN))
    assert report.code_bytes == tables * VOCAB * M * 1  # k=16 codes fit in uint8
    assert report.model_params_before == sum(p.numel() for p in original.parameters())
    assert report.model_params_after == report.model_params_before - tables * (VOCAB * HIDDEN - per_table)
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert all(0 < err < 1 for err in report.reconstruction_error.values())


@pytest.mark.parametrize("arch", sorted(GENERATIVE))
def test_generate_matches_dense_twin(arch):
    original = build(arch)
    model = copy.deepcopy(original)
    asg.compress(model, asg.ASGConfig(k=K, m=M), progress=False)
    twin = dense_twin(original, model)
    inputs = sample_inputs(arch)
    inputs.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = model.generate(**inputs, **kwargs)
    want = twin.generate(**inputs, **kwargs)
    assert got.shape[1] > inputs["input_ids"].shape[1] or ARCHITECTURES[arch][1] == "seq2seq"
    assert torch.equal(got, want)


def test_gemma_scaled_embedding_keeps_its_scale():
    original = build("gemma3")
    model = copy.deepcopy(original)
    asg.compress(model, asg.ASGConfig(k=K, m=M), progress=False)
    embedding = model.get_input_embeddings()
    ids = torch.tensor([[3, 4, 5]])
    scale = original.get_input_embeddings().embed_scale
    assert float(scale) == pytest.approx(HIDDEN ** 0.5)
    torch.testing.assert_close(embedding(ids), decoded(embedding)[ids] * scale.to(torch.float32))


def test_input_only_on_a_tied_model_keeps_the_dense_head():
    original = build("gpt2")
    model = copy.deepcopy(original)
    report = asg.compress(model, asg.ASGConfig(k=K, m=M, targets=("input",)), progress=False)
    assert isinstance(model.lm_head, nn.Linear)
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight, rtol=0, atol=0)
    assert report.embedding_params_before == VOCAB * HIDDEN
    twin = dense_twin(original, model)
    twin.lm_head.weight = nn.Parameter(original.lm_head.weight.detach().clone())  # untie in the twin too
    with torch.no_grad():
        twin.transformer.wte.weight.copy_(decoded(model.transformer.wte))
    inputs = sample_inputs("gpt2")
    torch.testing.assert_close(outputs(model, inputs), outputs(twin, inputs), rtol=1e-5, atol=1e-6)


def test_output_only_leaves_the_input_dense():
    original = build("llama")
    model = copy.deepcopy(original)
    report = asg.compress(model, asg.ASGConfig(k=K, m=M, targets="output"), progress=False)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert isinstance(model.lm_head, asg.ASGHead)
    assert set(report.tables) == {"output"}
    inputs = sample_inputs("llama")
    torch.testing.assert_close(outputs(model, inputs), outputs(dense_twin(original, model), inputs), rtol=1e-5, atol=1e-6)


def test_classifier_model_compresses_its_input_only():
    torch.manual_seed(0)
    original = make_bert_classifier().eval()
    model = copy.deepcopy(original)
    report = asg.compress(model, asg.ASGConfig(k=K, m=M), progress=False)
    assert set(report.tables) == {"input"}
    assert isinstance(model.bert.embeddings.word_embeddings, asg.ASGEmbedding)
    inputs = sample_inputs("bert")
    torch.testing.assert_close(outputs(model, inputs), outputs(dense_twin(original, model), inputs), rtol=1e-5, atol=1e-6)


def test_untied_t5_built_from_config_gets_one_input_module(caplog):
    torch.manual_seed(0)
    original = make_untied_t5_from_config().eval()
    assert original.encoder.embed_tokens is not original.shared  # the transformers 5 trap this guards against
    model = copy.deepcopy(original)
    report = asg.compress(model, asg.ASGConfig(k=K, m=M), progress=False)
    assert "different values" in caplog.text
    assert model.encoder.embed_tokens is model.shared is model.decoder.embed_tokens
    assert report.embedding_params_before == 4 * VOCAB * HIDDEN  # three input tables and the head
    inputs = sample_inputs("t5")
    torch.testing.assert_close(outputs(model, inputs), outputs(dense_twin(original, model), inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_copy_with_own_tables_shares_the_rest_and_compresses_alone(arch):
    """The copy that --auto, compare and compress's fidelity reference use: its tables are its own (compressing
    it, then changing its ASG tables, leaves the original's outputs bit-identical), every other tensor is the
    original's (no second copy of the layers), and it computes what a full copy computes."""
    original = build(arch)
    inputs = sample_inputs(arch)
    before = outputs(original, inputs)
    tables = {id(t) for table in (original.get_input_embeddings(), original.get_output_embeddings())
              if table is not None for t in table.parameters()}
    copied = asg.surgery.copy_with_own_tables(original)
    ours = {id(t): t for t in original.parameters()}
    theirs = {id(t) for t in copied.parameters()}
    assert {i for i in ours if i not in tables} <= theirs  # the layers are shared
    assert not tables & theirs  # the tables are not
    full = copy.deepcopy(original)
    asg.compress(copied, asg.ASGConfig(k=K, m=M), progress=False)
    asg.compress(full, asg.ASGConfig(k=K, m=M), progress=False)
    assert torch.equal(outputs(copied, inputs), outputs(full, inputs))
    asg.surgery.copy_with_own_tables(copied).get_input_embeddings().set_norms_(
        "scalar", torch.ones(VOCAB))  # a variant of the compressed copy, as --auto makes
    assert torch.equal(outputs(copied, inputs), outputs(full, inputs))
    assert torch.equal(outputs(original, inputs), before)
