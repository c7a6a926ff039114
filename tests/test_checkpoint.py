"""save_pretrained -> from_pretrained is bit-exact, stores no dense table, writes atomically, and refuses bad folders."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

import asg
from asg import checkpoint
from tiny_models import ARCHITECTURES, HIDDEN, TIED, VOCAB, build, outputs, sample_inputs

K, M = 16, 8


def compressed(arch: str, **config):
    model = build(arch)
    asg.compress(model, asg.ASGConfig(k=K, m=M, **config), progress=False)
    return model


@pytest.mark.parametrize("codebook", ["separate", "shared"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip_is_bit_exact(arch, codebook, tmp_path):
    model = compressed(arch, codebook=codebook)
    asg.save_pretrained(model, tmp_path / "ckpt")
    loaded = asg.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    assert not loaded.training
    inputs = sample_inputs(arch)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype, name
        assert torch.equal(want[name], got[name]), name
    if arch in TIED:
        assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()
    if arch in ("t5", "mt5"):
        assert loaded.encoder.embed_tokens is loaded.shared is loaded.decoder.embed_tokens
    if arch == "mt5":
        assert loaded.lm_head.embedding is not loaded.shared


@pytest.mark.parametrize("arch", ["bert", "mt5", "gemma3"])
def test_files_hold_no_dense_table_and_each_tensor_once(arch, tmp_path):
    model = compressed(arch)
    asg.save_pretrained(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    assert [name for name, shape in shapes.items() if shape == [VOCAB, HIDDEN]] == []
    codebooks = [name for name in shapes if name.endswith("codebooks")]
    assert len(codebooks) == (1 if arch in TIED else 2)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["asg"]["config"] == {"k": K, "m": M, "codebook": "separate", "targets": ["input", "output"],
                                       "niter": 25, "seed": 0, "backend": "faiss", "kmeans": "auto", "weights": None,
                                       "norms": None, "dtype": None, "keep": 0, "keep_by": "wordfreq"}
    assert config["asg"]["format_version"] == asg.format.FORMAT_VERSION
    # format 2: codes packed at log2(k) = 4 bits, V·m/2 bytes, under their name + "_packed"
    packed = [name for name in shapes if name.endswith("codes_packed")]
    assert len(packed) == (1 if arch in TIED else 2) and not any(name.endswith(".codes") for name in shapes)
    assert all(shapes[name] == [VOCAB * M * 4 // 8] for name in packed)


def test_untied_t5_config_comes_back_untied(tmp_path):
    model = compressed("mt5")
    assert model.config.tie_word_embeddings is False
    asg.save_pretrained(model, tmp_path / "ckpt")
    assert asg.from_pretrained(tmp_path / "ckpt").config.tie_word_embeddings is False


def test_tying_survives_training_saving_and_loading(tmp_path):
    model = compressed("gpt2")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = sample_inputs("gpt2")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert model.lm_head.embedding is model.transformer.wte
    asg.save_pretrained(model, tmp_path / "ckpt")
    loaded = asg.from_pretrained(tmp_path / "ckpt")
    assert loaded.lm_head.embedding is loaded.transformer.wte
    assert torch.equal(loaded.transformer.wte.codebooks, model.transformer.wte.codebooks)


def test_model_class_can_be_given(tmp_path):
    import transformers

    model = compressed("bert")
    asg.save_pretrained(model, tmp_path / "ckpt")
    loaded = asg.from_pretrained(tmp_path / "ckpt", model_class=transformers.AutoModelForMaskedLM)
    inputs = sample_inputs("bert")
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


def test_tokenizer_is_saved_alongside(tmp_path):
    from transformers import AutoTokenizer, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "father", "mother"]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(words)})
    asg.save_pretrained(compressed("bert"), tmp_path / "ckpt", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt").tokenize("mother father") == ["mother", "father"]


def test_overwrites_an_asg_checkpoint_but_not_another_folder(tmp_path):
    target = tmp_path / "ckpt"
    asg.save_pretrained(compressed("bert"), target)
    second = compressed("bert", codebook="shared")
    asg.save_pretrained(second, target)
    assert asg.read_plan(target)["config"]["codebook"] == "shared"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or backup folder left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an ASG checkpoint; refusing to replace it"):
        asg.save_pretrained(second, other)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_crash_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.fmt, "write_weights", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        asg.save_pretrained(compressed("bert"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_saving_an_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not ASG-compressed; call asg.compress"):
        asg.save_pretrained(build("bert"), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_loading_bad_folders_says_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        asg.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not an ASG checkpoint"):
        asg.from_pretrained(empty)
    plain = tmp_path / "plain"
    build("bert").save_pretrained(plain)
    with pytest.raises(ValueError, match="plain transformers checkpoint"):
        asg.from_pretrained(plain)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        asg.from_pretrained(tmp_path / "file.txt")


def test_truncated_or_missing_weights_are_reported(tmp_path):
    target = tmp_path / "ckpt"
    asg.save_pretrained(compressed("bert"), target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        asg.from_pretrained(target)
    weights.unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        asg.from_pretrained(target)


def test_a_newer_format_is_refused(tmp_path):
    target = tmp_path / "ckpt"
    asg.save_pretrained(compressed("bert"), target)
    config = json.loads((target / "config.json").read_text())
    config["asg"]["format_version"] = 99
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade asg"):
        asg.from_pretrained(target)


def test_compressing_twice_is_refused():
    model = compressed("bert")
    with pytest.raises(ValueError, match="already compressed"):
        asg.compress(model, asg.ASGConfig(k=K, m=M))


def test_loaded_model_keeps_training(tmp_path):
    model = compressed("bert")
    asg.save_pretrained(model, tmp_path / "ckpt")
    loaded = asg.from_pretrained(tmp_path / "ckpt")
    before = copy.deepcopy(loaded.state_dict())
    loaded.train()
    inputs = sample_inputs("bert")
    loaded(**inputs, labels=inputs["input_ids"]).loss.backward()
    torch.optim.SGD(loaded.parameters(), lr=0.1).step()
    after = loaded.state_dict()
    name = "bert.embeddings.word_embeddings"
    assert not torch.equal(after[f"{name}.codebooks"], before[f"{name}.codebooks"])
    assert torch.equal(after[f"{name}.codes"], before[f"{name}.codes"])


@pytest.mark.parametrize("arch", ["bert", "t5", "mt5", "gpt2"])
def test_transformers_save_pretrained_works_and_asg_loads_it(arch, tmp_path):
    model = compressed(arch)
    model.save_pretrained(tmp_path / "hf")  # transformers' own writer: refuses shared tensors it was not told of
    loaded = asg.from_pretrained(tmp_path / "hf")
    inputs = sample_inputs(arch)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    if arch in TIED:
        assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()


@pytest.mark.parametrize("source", ["bert", "bert-base"])
@pytest.mark.parametrize("target", ["AutoModelForTokenClassification", "AutoModelForSequenceClassification",
                                    "AutoModel"])
def test_a_compressed_base_loads_into_a_task_head(source, target, tmp_path):
    import transformers

    model = compressed(source)
    asg.save_pretrained(model, tmp_path / "ckpt")
    task = asg.from_pretrained(tmp_path / "ckpt", model_class=getattr(transformers, target), num_labels=5)
    base = task.bert if hasattr(task, "bert") else task
    original = model.bert if hasattr(model, "bert") else model
    inputs = sample_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, original(**inputs).last_hidden_state)
    assert isinstance(base.embeddings.word_embeddings, asg.ASGEmbedding)
    if target != "AutoModel":
        assert task.config.num_labels == 5
        assert torch.isfinite(task(**inputs).logits).all()  # the new head is initialised, not garbage
        assert task.classifier.weight.std() > 0
    assert task.get_output_embeddings() is None or isinstance(task.get_output_embeddings(), torch.nn.Linear)


def test_a_class_that_cannot_hold_the_table_is_refused(tmp_path):
    import transformers

    asg.save_pretrained(compressed("bert"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="cannot build GPT2LMHeadModel from this checkpoint's BertConfig"):
        asg.from_pretrained(tmp_path / "ckpt", model_class=transformers.GPT2LMHeadModel)
