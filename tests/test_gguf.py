"""GGUF input: a tiny GGUF file written here with the gguf package, compressed from the command line and
through the Python API, gives an ordinary ASG folder."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import asg
from asg.cli import app
from asg.loading import load_model

gguf = pytest.importorskip("gguf")

WORDS = ["the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(200)]


def write_tiny_llama_gguf(path, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seed=0, byte_level=False):
    """A random Llama in GGUF (float32 tensors, llama.cpp names), with a SentencePiece-style vocabulary and an
    untied head; with `byte_level`, shaped like SmolLM's instead: a GPT-2-style byte-level BPE vocabulary with
    merges and one end-of-text token (no padding or unknown token), a tied head (no output.weight), and
    embedding rows whose lengths vary fivefold."""
    rng = np.random.default_rng(seed)
    if byte_level:
        tokens, merges = _byte_level_vocabulary()
    else:
        tokens = ["<unk>", "<s>", "</s>"] + ["▁" + w for w in WORDS]
        # every prefix and character of the words too, so that the BPE tokenizer transformers derives from
        # this vocabulary finds merges that build each word
        pieces = {word[:end] for word in tokens[3:] for end in range(1, len(word))} | {c for w in tokens[3:] for c in w}
        tokens += sorted(pieces - set(tokens))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_token_list(tokens)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_merges(merges)
        writer.add_token_types([3] + [1] * (len(tokens) - 1))
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
        writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

    def tensor(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head_dim = hidden // heads
    if byte_level:
        lengths = rng.uniform(0.5, 2.5, (len(tokens), 1)).astype(np.float32)
        writer.add_tensor("token_embd.weight", tensor(len(tokens), hidden) * lengths)
    else:
        writer.add_tensor("token_embd.weight", tensor(len(tokens), hidden))
        writer.add_tensor("output.weight", tensor(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", tensor(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", tensor(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", tensor(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", tensor(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", tensor(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", tensor(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", tensor(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_vocabulary():
    """(tokens, merges) of a byte-level BPE: "<|endoftext|>", the characters of WORDS and "Ġ" (a space), and
    the merges that build " word" for each word left to right."""
    alphabet = sorted({c for word in WORDS for c in word} | {"Ġ"})
    tokens, merges = ["<|endoftext|>"] + alphabet, []
    for word in WORDS:
        built = "Ġ"
        for char in word:
            if built + char not in tokens:
                merges.append(f"{built} {char}")
                tokens.append(built + char)
            built += char
    return tokens, merges


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_a_gguf_file_compresses_into_an_ordinary_asg_folder(gguf_file, tmp_path):
    out = tmp_path / "asg"
    result = CliRunner().invoke(app, ["compress", str(gguf_file), "--k", "16", "--m", "8", "--no-fidelity", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = asg.read_plan(out)
    assert plan["source_model"] == str(gguf_file.resolve())
    assert set(plan["tables"]) == {"input", "output"} and plan["tables"]["output"]["tied"] is False
    loaded = asg.from_pretrained(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    dense = load_model(gguf_file).eval()
    same = asg.load_model(gguf_file).eval()  # the exported loader: transformers reads the file (gguf_file=...)
    asg.compress(same, asg.ASGConfig(k=16, m=8), progress=False)  # the Python API on the same file
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, same(ids).logits)
        assert not torch.allclose(loaded(ids).logits, dense(ids).logits)
    assert torch.equal(loaded.get_input_embeddings().codes, same.get_input_embeddings().codes)


def test_a_smollm_shaped_gguf_compresses_by_measurement_with_its_head_tied(tmp_path):
    """A Llama whose GGUF has a tied head, byte-level BPE and no padding token, as SmolLM's has: `asg compress`
    chooses its settings by next-token KL, keeps the head tied, and measures fidelity and calibrates, which
    need padded batches."""
    path = write_tiny_llama_gguf(tmp_path / "smol.gguf", byte_level=True)
    tokenizer = asg.loading.load_tokenizer(path)
    assert tokenizer.pad_token is None and tokenizer("the cat", add_special_tokens=False)["input_ids"] != []
    out, texts = tmp_path / "asg", tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(WORDS[(7 * i + j) % 5] for j in range(3 + i % 4)) for i in range(12)))
    runner = CliRunner()
    result = runner.invoke(app, ["compress", str(path), "--budget", "40%", "--text", str(texts), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "by measuring next-token KL" in result.output and "| **chosen** |" in result.output
    assert "next-token KL" in result.output.split("wrote ")[-1]  # the written model's fidelity report
    plan = asg.read_plan(out)
    assert plan["tables"]["output"]["tied"] is True
    loaded = asg.from_pretrained(out)
    assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()
    shown = runner.invoke(app, ["inspect", str(out), "--token", "cat", "--segments", "0", "--json"])
    assert shown.exit_code == 0, shown.output
    piece = json.loads(shown.stdout)["pieces"]
    assert [p["piece"] for p in piece] == ["Ġcat"]  # the word as text has it, after a space (not "c", "a", "t")
    calibrated = runner.invoke(app, ["calibrate", str(out), "--text", str(texts), "--steps", "4", "--batch-size", "4",
                                     "-o", str(tmp_path / "cal")])
    assert calibrated.exit_code == 0, calibrated.output
    assert "after calibration" in calibrated.output


def test_fidelity_pads_with_end_of_text_where_a_tokenizer_has_no_padding_token(tmp_path):
    """Batches padded (on the right) with the end-of-text token give what texts one at a time give, and the
    tokenizer is left as it was."""
    from asg.fidelity import fidelity

    path = write_tiny_llama_gguf(tmp_path / "smol.gguf", byte_level=True)
    tokenizer, reference = asg.loading.load_tokenizer(path), load_model(path)
    tokenizer.padding_side = "left"
    model = load_model(path)
    asg.compress(model, asg.ASGConfig(k=8, m=8), progress=False)
    texts = ["the cat sat", "on the mat", "the cat", "sat on the mat the cat"]
    batched = fidelity(model, reference, tokenizer, texts, batch_size=4)
    single = fidelity(model, reference, tokenizer, texts, batch_size=1)
    assert batched["tokens"] == single["tokens"] > 0 and batched["kl"] > 0
    for name in ("kl", "perplexity", "reference_perplexity"):
        assert batched[name] == pytest.approx(single[name], rel=1e-4)
    # the argmax may flip at a near-tie where another CPU rounds the batched products differently: one token at most
    assert abs(batched["top1_agreement"] - single["top1_agreement"]) <= 1 / single["tokens"] + 1e-12
    assert tokenizer.pad_token is None and tokenizer.padding_side == "left"


def test_the_recorded_gguf_source_loads_as_the_reference(gguf_file, tmp_path):
    out = tmp_path / "asg"
    assert CliRunner().invoke(app, ["compress", str(gguf_file), "--k", "16", "--m", "8", "--no-fidelity",
                                    "-o", str(out)]).exit_code == 0
    model = asg.from_pretrained(out)
    reference = load_model(asg.read_plan(out)["source_model"])
    assert asg.read_plan(out)["source_model"].endswith(".gguf")
    assert model.config.vocab_size == reference.config.vocab_size


def test_a_missing_gguf_file_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not exist; give the path of a GGUF file" in result.stderr


def test_a_gguf_decoder_finetunes_as_a_classifier(gguf_file, tmp_path):
    """finetune takes a GGUF file too: transformers marks it quantized and the tokenizer has no padding
    token, and both are dealt with, so that a decoder trains as a sequence classifier."""
    from test_tasks import write_jsonl

    def rows(n, seed):  # the label is told by one word of the hypothesis, in the file's small vocabulary
        rng = np.random.default_rng(seed)
        keys = {"cat": "entailment", "mat": "contradiction", "sat": "neutral"}
        fill = [f"w{i}" for i in range(20)]
        out = []
        for _ in range(n):
            key = str(rng.choice(list(keys)))
            out.append({"premise": " ".join(rng.choice(fill, 4)), "label": keys[key],
                        "hypothesis": " ".join([*rng.choice(fill, 2), key, *rng.choice(fill, 2)])})
        return out

    train = write_jsonl(tmp_path / "train.jsonl", rows(300, 0))
    test = write_jsonl(tmp_path / "test.jsonl", rows(60, 1))
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", str(gguf_file), "--task", "nli", "--train-file", train, "--eval-file", test,
                                 "--lr", "3e-3", "--epochs", "6", "--batch-size", "16", "--max-length", "16",
                                 "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    accuracy = metrics["average"]["accuracy"]
    assert accuracy > 60  # three balanced labels: chance is 33
    again = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert again.exit_code == 0 and f"{accuracy:.2f}" in again.stdout
