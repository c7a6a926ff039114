"""Kept rows (`ASGConfig(keep=N)`): the N most frequent tokens keep int8 rows of their own. The forward and the
logits are the dense ones on the reconstructed table, save -> load is bit-exact, damaged kept state is
refused, the bytes and parameters are counted, and the ranking puts special tokens and frequent tokens first."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

import asg
from asg.frequency import frequent_tokens
from asg.modules import ASGEmbedding
from tiny_models import HIDDEN, SPECIALS, VOCAB, build, dense_twin, outputs, sample_inputs, write_bert_folder

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", ".", ","]
COUNTS = "the\t1000\ncat\t300\nsat\t200\ndog\t100\nmat\t50\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(write_bert_folder(tmp_path_factory.mktemp("tok") / "bert", WORDS))


@pytest.fixture
def counts(tmp_path):
    path = tmp_path / "counts.tsv"
    path.write_text(COUNTS)
    return str(path)


def kept_model(arch, tokenizer, counts, keep=8, **options):
    model = build(arch)
    report = asg.compress(model, asg.ASGConfig(k=16, m=8, keep=keep, keep_by=counts, **options),
                          tokenizer=tokenizer, progress=False)
    return model, report


def test_ranking_puts_special_tokens_first_then_the_counted_ones(tokenizer, counts):
    vocab = tokenizer.get_vocab()
    ids = frequent_tokens(counts, tokenizer, VOCAB, 8)
    specials = sorted(vocab[t] for t in SPECIALS)
    assert list(ids) == sorted(specials + [vocab["the"], vocab["cat"], vocab["sat"]])
    assert ids.dtype.kind == "i"
    assert len(frequent_tokens(counts, tokenizer, VOCAB, 0)) == 0
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        frequent_tokens(counts, None, VOCAB, 8)
    with pytest.raises(ValueError, match="must lie in 0..211"):
        frequent_tokens(counts, tokenizer, VOCAB, 212)


def test_reserved_special_tokens_rank_by_frequency_and_chat_turn_markers_first(counts):
    """Some vocabularies list hundreds of reserved or control tokens as special; only the ones texts are made
    with (beginning, end, unknown, ..., and a chat template's turn markers) rank first, the rest by frequency."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    reserved = [f"<|reserved_{i}|>" for i in range(300)]
    words = ["<unk>", "<s>", "</s>"] + reserved + ["the", "cat", "sat", "dog", "mat"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     additional_special_tokens=reserved)
    assert len(tok.all_special_ids) == 303
    vocab = tok.get_vocab()
    ids = frequent_tokens(counts, tok, len(words), 6)
    assert list(ids) == sorted([0, 1, 2, vocab["the"], vocab["cat"], vocab["sat"]])
    # a chat template's turn markers are written into every conversation: they rank with the named ones
    tok.chat_template = ("{% for m in messages %}<|reserved_7|> {{ m['content'] }} <|reserved_8|> {% endfor %}"
                         "{% if add_generation_prompt %}<|reserved_7|>{% endif %}")
    ids = frequent_tokens(counts, tok, len(words), 6)
    assert list(ids) == sorted([0, 1, 2, vocab["<|reserved_7|>"], vocab["<|reserved_8|>"], vocab["the"]])
    tok.chat_template = "{{ raise_exception('a system turn is required') }}"  # a template that refuses: named only
    assert list(frequent_tokens(counts, tok, len(words), 6)) == sorted([0, 1, 2, vocab["the"], vocab["cat"], vocab["sat"]])


def test_chat_turn_markers_rank_first_where_they_are_special_added_tokens_only(counts):
    """A tokenizer read from a GGUF file (Qwen2.5-Coder's) marks <|im_start|> special as an added token without
    naming it in `all_special_ids`; the template writes it into every conversation, so it ranks first."""
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>", "the", "cat", "sat", "dog", "mat"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(w, special=True) for w in ("<|im_start|>", "<|im_end|>", "<|fim_pad|>")])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert 3 not in tok.all_special_ids  # the shape of the GGUF tokenizer
    tok.chat_template = "{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"
    ids = frequent_tokens(counts, tok, len(words), 6)
    assert list(ids) == sorted([0, 1, 2, 3, 4, words.index("the")])  # <|fim_pad|> is special but not written


def test_wordfreq_ranking_counts_words_as_they_occur_in_text(tokenizer):
    pytest.importorskip("wordfreq")
    vocab = tokenizer.get_vocab()
    ids = set(frequent_tokens("wordfreq", tokenizer, VOCAB, 12).tolist())
    # 5 specials, then the common words and punctuation marks that the vocabulary has; never a filler
    assert {vocab[t] for t in SPECIALS + ["the", "a", ".", ","]} <= ids
    assert not {vocab[f"w{i}"] for i in range(100, 150)} & ids


def test_wordfreq_ranks_and_weighs_chinese_and_japanese_without_their_segmenters(tmp_path):
    """wordfreq needs jieba or MeCab to look a word up in Chinese or Japanese; the ranking reads its word lists
    directly (words as they stand in unspaced text), and the weights fall back to them where a segmenter is missing."""
    pytest.importorskip("wordfreq")
    from asg.frequency import token_weights

    words = ["的", "是", "猫", "椅", "の", "は", "ネ", "the", "cat"]
    tok = AutoTokenizer.from_pretrained(write_bert_folder(tmp_path / "cjk", words))
    vocab = tok.get_vocab()
    for source, common, rare in (("wordfreq:zh", ["的", "是"], ["猫", "椅"]), ("wordfreq:ja", ["の", "は"], ["ネ", "椅"])):
        ids = set(frequent_tokens(source, tok, VOCAB, len(SPECIALS) + 2).tolist())
        assert {vocab[w] for w in common} <= ids and not {vocab[w] for w in rare} & ids
        weights = token_weights(source, tok, VOCAB)
        assert min(weights[vocab[w]] for w in common) > 100 * max(weights[vocab[w]] for w in rare)
    with pytest.raises(ValueError, match="wordfreq has no word list for 'xx'; give languages from: ar, bg"):
        frequent_tokens("wordfreq:en,xx", tok, VOCAB, 4)
    with pytest.raises(ValueError, match="no word list for 'klingon'"):
        token_weights("wordfreq:klingon", tok, VOCAB)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "mt5"])
@pytest.mark.parametrize("norms", [None, "scalar", "row"])
def test_kept_rows_are_int8_and_the_model_is_the_dense_model_on_the_rebuilt_table(arch, norms, tokenizer, counts):
    original = build(arch)
    model, report = kept_model(arch, tokenizer, counts, norms=norms)
    table = model.get_input_embeddings()
    ids = frequent_tokens(counts, tokenizer, VOCAB, 8)
    assert table.kept_count == 8 and torch.equal(table.kept_ids.long(), torch.from_numpy(ids))
    dense = original.get_input_embeddings().weight.detach()[ids]
    rebuilt = table.weight.detach()[ids]
    step = dense.abs().amax(1, keepdim=True) / 127  # every kept value within half a step of the original
    assert bool(((rebuilt - dense).abs() <= step / 2 + 1e-7).all())
    assert float((rebuilt - dense).abs().max()) > 0  # stored in int8, not exactly
    twin = dense_twin(original, model, lambda module: module.weight.detach())
    inputs = sample_inputs(arch)
    torch.testing.assert_close(outputs(model, inputs), outputs(twin, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norms", [None, "row"])
def test_every_logits_path_scores_kept_tokens_on_their_rows(norms):
    torch.manual_seed(0)
    weight = torch.randn(300, 32)
    config = asg.ASGConfig(k=16, m=8, norms=norms)
    module, _ = asg.modules.fit_asg(config, weight, "input", False, kept_ids=torch.tensor([299, 5, 0, 77]))
    hidden = torch.randn(3, 32)
    want = hidden @ module.weight.detach().T
    head = asg.ASGHead(module)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.lookup_logits(hidden), want, rtol=1e-5, atol=1e-5)
        head.approximate = True  # kept rows turn the 8-bit path off: still exact
        torch.testing.assert_close(head(hidden[:1]), want[:1], rtol=1e-5, atol=1e-5)
    assert module.fast.rescored == 0
    kept = module.kept_weight()
    torch.testing.assert_close(want[:, [0, 5, 77, 299]], hidden @ kept.T, rtol=1e-5, atol=1e-5)
    # gradients reach the concepts through the other rows, and the kept rows stay fixed buffers
    loss = head(hidden).square().sum()
    loss.backward()
    assert module.codebooks.grad is not None and float(module.codebooks.grad.abs().sum()) > 0
    assert "kept_rows" not in dict(module.named_parameters())


@pytest.mark.parametrize("arch", ["bert", "mt5"])
def test_kept_rows_save_and_load_bit_exactly(arch, tokenizer, counts, tmp_path):
    import transformers as tf

    model, _ = kept_model(arch, tokenizer, counts, dtype="bfloat16")
    asg.save_pretrained(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["asg"]["format_version"] == 3
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        types = {n.rsplit(".", 1)[1]: handle.get_slice(n).get_dtype() for n in handle.keys() if ".kept_" in n}
    assert types == {"kept_ids": "I32", "kept_rows": "I8", "kept_scales": "BF16"}
    auto = {"bert": tf.AutoModelForMaskedLM, "mt5": tf.AutoModelForSeq2SeqLM}[arch]
    for loaded in (asg.from_pretrained(tmp_path / "ckpt"), auto.from_pretrained(tmp_path / "ckpt")):
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
        inputs = sample_inputs(arch)
        assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.__setitem__("kept_ids", torch.tensor([0, 1, 2, 3, 4, 5, 6, 211], dtype=torch.int32)),
     r"kept_ids.*0\.\.210"),
    (lambda t: t.__setitem__("kept_ids", torch.tensor([0, 1, 2, 3, 4, 5, 5, 6], dtype=torch.int32)),
     "strictly increasing"),
    (lambda t: t.__setitem__("kept_scales", -t["kept_scales"]), "must not be negative"),
    (lambda t: t.__setitem__("kept_rows", t["kept_rows"][:4].clone()), "kept_rows"),
    (lambda t: t.__setitem__("kept_rows", t["kept_rows"].to(torch.int16)), "kept_rows"),
])
def test_damaged_kept_rows_are_refused(damage, message, tokenizer, counts, tmp_path):
    model, _ = kept_model("bert", tokenizer, counts)
    asg.save_pretrained(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(weights))
    prefix = "bert.embeddings.word_embeddings."
    part = {name.removeprefix(prefix): tensors.pop(name) for name in list(tensors) if name.startswith(prefix + "kept_")}
    damage(part)
    tensors.update({prefix + name: value for name, value in part.items()})
    for key in ("asg_sha256", "asg_plan_sha256"):  # as transformers' writer leaves it: no checksums anywhere
        metadata.pop(key)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["asg"].pop("weights_sha256")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match=message):
        asg.from_pretrained(tmp_path / "ckpt")


def test_kept_rows_are_counted_in_bytes_parameters_and_budgets(tokenizer, counts):
    plain = build("bert")
    base = asg.compress(plain, asg.ASGConfig(k=16, m=8, dtype="bfloat16"), progress=False)
    model, report = kept_model("bert", tokenizer, counts, dtype="bfloat16")
    assert report.embedding_bytes_on_disk == base.embedding_bytes_on_disk + 8 * (HIDDEN + 2 + 4)
    table = model.get_input_embeddings()
    assert table.value_count() == plain.get_input_embeddings().value_count() + 8 * (HIDDEN + 1)
    assert report.settings["keep"] == 8
    V, D = 30522, 384
    free = asg.baselines.config_for_budget("asg", V, D, 0.065, by="bytes", m=96, dtype="bfloat16")
    kept = asg.baselines.config_for_budget("asg", V, D, 0.065, by="bytes", m=96, dtype="bfloat16", keep=2000)
    cost = lambda k, keep: k * D * 2 + V * 96 * math.ceil(math.log2(k)) / 8 + keep * (D + 2 + 4)
    assert kept.keep == 2000 and kept.k < free.k
    assert cost(kept.k, 2000) <= 0.065 * V * D * 4 < cost(kept.k + 1, 2000)


def test_resizing_drops_kept_tokens_past_the_new_vocabulary(tokenizer, counts):
    model, _ = kept_model("bert", tokenizer, counts)
    table = model.get_input_embeddings()
    ids = table.kept_ids.tolist()
    table.resize_(8)
    assert table.kept_ids.tolist() == [i for i in ids if i < 8] and len(table.kept_rows) == len(table.kept_ids)
    table.validate()
    assert table.weight.shape == (8, HIDDEN)


def test_bad_keep_settings_say_what_to_do(tokenizer):
    with pytest.raises(ValueError, match="keep=-1 must be 0 or more"):
        asg.ASGConfig(k=16, m=8, keep=-1)
    with pytest.raises(ValueError, match="keep_by=''"):
        asg.ASGConfig(k=16, m=8, keep=4, keep_by="")
    with pytest.raises(ValueError, match="keep=300 is more than the 211 rows"):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=8, keep=300), tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=8, keep=4), progress=False)


def test_cli_compress_keeps_rows_and_info_shows_them(tmp_path, counts):
    from asg.cli import app

    folder = write_bert_folder(tmp_path / "bert", WORDS)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(folder), "--k", "16", "--m", "8", "--keep", "8", "--keep-by",
                                      counts, "--no-fidelity", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "config.json").read_text())["asg"]
    assert plan["config"]["keep"] == 8 and plan["tables"]["input"]["keep"] == 8
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "keep=8" in info.output
    kept_bytes = 8 * (HIDDEN + 4 + 4)  # int8 values, a float32 scale and an int32 id per row
    assert f"8 kept rows of frequent tokens (int8, one scale each): {kept_bytes:,} bytes" in info.output
    table = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).output)["tables"][0]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        stored = sum(math.prod(handle.get_slice(n).get_shape()) * {"I32": 4, "I8": 1, "F32": 4}[handle.get_slice(n).get_dtype()]
                     for n in handle.keys() if ".kept_" in n)
    assert table["kept_rows"] == 8 and table["kept_bytes"] == stored == kept_bytes
    assert ASGEmbedding.empty(plan["tables"]["input"]).kept_count == 8
