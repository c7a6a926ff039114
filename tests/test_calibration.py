"""Calibration, frequency-aware fitting and fidelity: real improvements on tiny models, exact bookkeeping,
and clear errors."""

import copy
import json
import random
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import asg
from asg import pq
from asg.calibration import ReferenceTargets, calibrate, coarse_kl, distillation_loss, default_corpus
from asg.cli import app
from asg.fidelity import fidelity, next_token_kl, read_texts
from tiny_models import build, write_bert_folder

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "house", "tree", "bird"]


def texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 9))) for _ in range(n)]


class WordTokenizer:
    """Just enough of a tokenizer for tiny random models: words of WORDS map to fixed ids."""

    pad_token = "[PAD]"
    padding_side = "right"

    def __call__(self, batch, return_tensors, padding, truncation, max_length):
        ids = [[3 + WORDS.index(w) for w in text.split()][:max_length] for text in batch]
        width = max(len(row) for row in ids)
        pad = (lambda row, fill: row + [fill] * (width - len(row))) if self.padding_side == "right" else \
            (lambda row, fill: [fill] * (width - len(row)) + row)
        return {"input_ids": torch.tensor([pad(row, 0) for row in ids]),
                "attention_mask": torch.tensor([pad([1] * len(row), 0) for row in ids])}


def heldout_loss(model, reference, held, generative, batch_size=16):
    """The held-out loss as calibrate measures it: the mean of the batch losses."""
    with torch.no_grad():
        losses = [distillation_loss(model, reference, WordTokenizer()(held[i:i + batch_size], "pt", True, True, 128), generative).item()
                  for i in range(0, len(held), batch_size)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("arch, generative", [("bert-base", False), ("gpt2", True), ("mt5", True)])
def test_calibration_lowers_heldout_loss_and_touches_only_codebooks(arch, generative):
    reference = build(arch)
    model = copy.deepcopy(reference)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    before = copy.deepcopy(model.state_dict())
    train, held = texts(200, 0), texts(40, 1)
    loss_before = heldout_loss(model, reference, held, generative)
    result = calibrate(model, reference, train, tokenizer=WordTokenizer(), steps=60, lr=1e-2, batch_size=16,
                       heldout=held, eval_every=10, patience=10, progress=False, top_k=256)  # all 211 tokens: exact
    loss_after = heldout_loss(model, reference, held, generative)
    assert loss_after < 0.9 * loss_before  # real improvement on text it did not train on
    assert result.heldout_after == pytest.approx(loss_after, rel=1e-4)  # the same loss, kept targets: float rounding apart
    assert result.heldout_before == pytest.approx(loss_before, rel=1e-4)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("codebooks") for name in changed)  # codes and every other weight: identical
    if arch == "mt5":  # input and output tables are calibrated together
        assert {"shared.codebooks", "lm_head.embedding.codebooks"} <= changed
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    recorded = model.config.asg["calibration"]  # what a saved folder will say about it
    assert (recorded["steps"], recorded["lr"], recorded["texts"], recorded["heldout_texts"]) == (60, 1e-2, 200, 40)
    assert recorded["heldout_loss_after"] == result.heldout_after


@pytest.mark.parametrize("k", [1, 5, 100, 210, 211, 300])
def test_coarse_kl_is_a_lower_bound_that_becomes_exact(k):
    rng = torch.Generator().manual_seed(k)
    log_q = torch.log_softmax(3 * torch.randn(9, 211, generator=rng), -1)
    logits = (3 * torch.randn(9, 211, generator=rng)).requires_grad_()
    full = next_token_kl(torch.log_softmax(logits, -1), log_q)
    top, index = log_q.topk(min(k, 211), -1)
    rest = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
    coarse = coarse_kl(logits, top, index.int(), rest)
    coarse.sum().backward()
    assert torch.all(coarse <= full + 1e-5) and torch.all(coarse >= -1e-6)  # coarsening never adds divergence
    if k >= 210:  # one token left out is still the whole distribution
        torch.testing.assert_close(coarse, full, rtol=1e-4, atol=1e-5)
    else:
        assert coarse.sum() < (1 - 1e-4) * full.sum()  # what the coarsening hides is lost
    assert torch.isfinite(logits.grad).all()


class _Counted:
    """Counts the texts the wrapped reference's forward sees."""

    def __init__(self, model):
        self.texts = 0
        model.register_forward_pre_hook(lambda module, args, kwargs: setattr(
            self, "texts", self.texts + len(kwargs["input_ids"])), with_kwargs=True)


@pytest.mark.parametrize("arch, generative", [("bert-base", False), ("gpt2", True), ("mt5", True)])
def test_reference_targets_run_the_reference_once_per_text(arch, generative):
    reference = build(arch)
    model = copy.deepcopy(reference)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    counted = _Counted(reference)
    targets = ReferenceTargets(reference, generative, top_k=211)
    corpus = texts(12, 3)
    enc = lambda batch: WordTokenizer()(batch, "pt", True, True, 128)
    with torch.no_grad():
        for n, batch in enumerate((corpus[:6], corpus[6:], corpus[::2], corpus[1::2], corpus[::-1])):
            # the same texts in other batches, at other widths: the same loss as running the reference again
            expected = distillation_loss(model, reference, enc(batch), generative)
            before = counted.texts
            assert targets.loss(model, enc(batch), batch).item() == pytest.approx(expected.item(), rel=1e-4)
            assert counted.texts == before + (len(batch) if n < 2 else 0)  # new texts only
    assert len(targets._kept) == 12
    if generative:  # top_k=0 keeps nothing and compares whole distributions
        whole = ReferenceTargets(reference, True, top_k=0)
        with torch.no_grad():
            loss, expected = whole.loss(model, enc(corpus), corpus), distillation_loss(model, reference, enc(corpus), True)
        assert loss.item() == expected.item() and not whole._kept


def test_reference_targets_beyond_their_memory_run_the_reference_again():
    reference = build("gpt2")
    counted = _Counted(reference)
    targets = ReferenceTargets(reference, True, top_k=8, max_bytes=1000)
    corpus = texts(6, 4)
    enc = WordTokenizer()(corpus, "pt", True, True, 128)
    with torch.no_grad():
        first = targets.loss(reference, enc, corpus)
        second = targets.loss(reference, enc, corpus)
    assert first.item() == pytest.approx(second.item(), abs=1e-6) and first.item() < 1e-5  # the reference itself
    assert counted.texts == 2 * 6 * 2 and targets._size <= 1000  # model and reference each run twice


def test_calibration_with_few_top_tokens_pads_right_and_restores_the_tokenizer():
    reference = build("gpt2")
    model = copy.deepcopy(reference)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    tokenizer = WordTokenizer()
    tokenizer.padding_side = "left"
    counted = _Counted(reference)
    train, held = texts(40, 0), texts(16, 1)
    result = calibrate(model, reference, train, tokenizer=tokenizer, steps=30, lr=1e-2, batch_size=8, heldout=held,
                       eval_every=10, patience=10, progress=False, top_k=16)
    assert tokenizer.padding_side == "left"
    assert counted.texts == len(set(train)) + len(set(held))  # 30 steps of 8 texts and 4 held-out passes
    assert result.heldout_after < 0.9 * result.heldout_before  # the coarse loss it trains on falls
    with pytest.raises(ValueError, match="top_k=-1 must be zero"):
        calibrate(model, reference, train, tokenizer=tokenizer, top_k=-1)


def test_calibration_keeps_the_best_state_and_stops_early():
    reference = build("bert-base")
    model = copy.deepcopy(reference)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    result = calibrate(model, reference, texts(50, 0), tokenizer=WordTokenizer(), steps=400, lr=1.0,  # far too high
                       heldout=texts(20, 1), eval_every=5, patience=2, progress=False)
    assert result.steps < 400
    assert result.heldout_after <= result.heldout_before
    assert heldout_loss(model, reference, texts(20, 1), False) == pytest.approx(result.heldout_after, rel=1e-5)


def test_calibration_errors():
    reference = build("bert-base")
    with pytest.raises(ValueError, match="no compressed tables to calibrate"):
        calibrate(copy.deepcopy(reference), reference, ["the cat"], tokenizer=WordTokenizer())
    model = copy.deepcopy(reference)
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    with pytest.raises(ValueError, match="no text to calibrate on"):
        calibrate(model, reference, ["", "  "], tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match="heldout_fraction=1.5 must be in"):
        calibrate(model, reference, ["the cat"], tokenizer=WordTokenizer(), heldout_fraction=1.5)


def test_the_library_owns_the_heldout_split():
    from asg.calibration import split_heldout

    train, held = split_heldout([f"text {i}" for i in range(25)] + ["", " "])
    assert len(held) == 2 and len(train) == 23 and not set(train) & set(held)  # a tenth, empty lines dropped
    assert split_heldout([f"text {i}" for i in range(25)]) == (train, held)  # the same seed, the same split
    assert split_heldout(["only"]) == (["only"], ["only"])


def test_default_corpus_is_real_prose():
    corpus = default_corpus()
    assert len(corpus) > 500
    assert all(len(p.split()) >= 8 for p in corpus)
    assert any("assignment" in p.lower() for p in corpus)


# --- frequency-aware fitting ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("codebook", ["separate", "shared"])
def test_equal_weights_equal_unweighted(backend, codebook):
    x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    plain = pq.fit(x, 16, 4, codebook=codebook, backend=backend)
    weighted = pq.fit(x, 16, 4, codebook=codebook, backend=backend, weights=np.full(500, 7.0))
    assert np.array_equal(plain.codes, weighted.codes)
    np.testing.assert_allclose(plain.codebooks, weighted.codebooks, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_weights_spend_concepts_where_the_weight_is(backend):
    x = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)
    heavy = np.zeros(1000)
    heavy[:50] = 1.0
    plain = pq.fit(x, 32, 4, backend=backend)
    weighted = pq.fit(x, 32, 4, backend=backend, weights=heavy + 1e-6)
    error = lambda f: pq.relative_error(x[:50], pq.decode(f.codebooks, f.codes)[:50])  # noqa: E731
    assert error(weighted) < 0.8 * error(plain)


@pytest.mark.parametrize("weights, message", [
    (np.zeros(211), "all zero"),
    (-np.ones(211), "non-negative"),
    (np.ones(10), r"expected shape \(211,\)"),
    (np.array([np.nan] * 211), "finite"),
])
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=8, weights=weights), progress=False)


def test_weights_from_a_counts_file_and_from_wordfreq(tmp_path):
    folder = write_bert_folder(tmp_path / "bert", WORDS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    (tmp_path / "counts.tsv").write_text("the\t100\ncat\t10\nunknown-token\t5\n")
    from asg.frequency import FLOOR, token_weights

    weights = token_weights(str(tmp_path / "counts.tsv"), tokenizer, 211)
    vocab = tokenizer.get_vocab()
    assert weights[vocab["the"]] == pytest.approx(100 / 110 + FLOOR)
    assert weights[vocab["cat"]] == pytest.approx(10 / 110 + FLOOR)
    assert weights[vocab["dog"]] == pytest.approx(FLOOR)
    pytest.importorskip("wordfreq")
    freq = token_weights("wordfreq:en", tokenizer, 211)
    assert freq[vocab["the"]] > freq[vocab["cat"]] > freq[vocab["w5"]] > 0
    model = build("bert-base")
    report = asg.compress(model, asg.ASGConfig(k=16, m=8, weights="wordfreq"), tokenizer=tokenizer, progress=False)
    assert report.tables["input"]["k"] == 16
    assert model.config.asg["config"]["weights"] == "wordfreq"


def test_named_weights_need_a_tokenizer_and_a_readable_file(tmp_path):
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=8, weights="wordfreq"))
    (tmp_path / "bad.tsv").write_text("the 100\n")
    folder = write_bert_folder(tmp_path / "bert", WORDS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"bad.tsv, line 1: expected TOKEN<TAB>COUNT"):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=8, weights=str(tmp_path / "bad.tsv")), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=8, weights=str(tmp_path / "none.tsv")), tokenizer=tokenizer)


# --- the commands -----------------------------------------------------------------------------------


@pytest.fixture
def compressed_folder(tmp_path):
    source = write_bert_folder(tmp_path / "bert", WORDS)
    out = tmp_path / "asg"
    result = CliRunner().invoke(app, ["compress", str(source), "--k", "16", "--m", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "fidelity to the uncompressed model on 60 held-out texts" in result.stdout
    (tmp_path / "train.txt").write_text("\n".join(texts(200, 0)))
    (tmp_path / "held.txt").write_text("\n".join(texts(30, 1)))
    return tmp_path


def test_calibrate_and_fidelity_commands(compressed_folder):
    tmp = compressed_folder
    result = CliRunner().invoke(app, ["calibrate", str(tmp / "asg"), "--text", str(tmp / "train.txt"), "--eval-text",
                                      str(tmp / "held.txt"), "--steps", "60", "--lr", "1e-2", "-o", str(tmp / "cal")])
    assert result.exit_code == 0, result.output
    table = result.stdout.split("(" + str(tmp / "held.txt") + "):")[1]
    lines = {line.split("  ")[1].strip(): line for line in table.splitlines() if "calibration" in line}
    before = float(lines["before calibration"].split()[-2])
    after = float(lines["after calibration"].split()[-2])
    assert after > before  # held-out mean cosine to the original rises
    plan = asg.read_plan(tmp / "cal")
    assert plan["calibration"]["steps"] >= 10 and plan["source_model"] == str(tmp / "bert")
    shown = CliRunner().invoke(app, ["fidelity", str(tmp / "cal"), "--text", str(tmp / "held.txt")])
    assert shown.exit_code == 0 and f"{after:.4f}" in shown.stdout
    model = asg.from_pretrained(tmp / "cal")
    reference = asg.loading.load_model(str(tmp / "bert"))
    from transformers import AutoTokenizer

    measured = fidelity(model, reference, AutoTokenizer.from_pretrained(tmp / "bert"), read_texts(tmp / "held.txt"))
    assert measured["mean_cosine"] == pytest.approx(after, abs=1e-4)
    assert f"mean cosine {after:.4f}" in (tmp / "cal" / "README.md").read_text()  # the card holds it too
    quiet = CliRunner().invoke(app, ["calibrate", str(tmp / "asg"), "--text", str(tmp / "train.txt"), "--steps", "5",
                                     "--no-report", "-o", str(tmp / "cal-quiet")])
    assert quiet.exit_code == 0, quiet.output
    assert "before calibration" not in quiet.stdout and "calibrated on" in quiet.stdout


def test_calibrate_errors(compressed_folder):
    tmp = compressed_folder
    (tmp / "empty.txt").write_text("\n\n")
    result = CliRunner().invoke(app, ["calibrate", str(tmp / "asg"), "--text", str(tmp / "empty.txt"), "-o", str(tmp / "x")])
    assert result.exit_code == 2 and "holds no text" in result.stderr
    result = CliRunner().invoke(app, ["calibrate", str(tmp / "asg"), "--text", str(tmp / "train.txt"), "--top-k", "-1",
                                      "--no-report", "-o", str(tmp / "x")])
    assert result.exit_code == 2 and "top_k=-1 must be zero" in result.stderr
    shutil.move(tmp / "bert", tmp / "moved")
    result = CliRunner().invoke(app, ["calibrate", str(tmp / "asg"), "--text", str(tmp / "train.txt"), "-o", str(tmp / "x")])
    assert result.exit_code == 2 and "is not there any more; pass --reference MODEL" in result.stderr
    result = CliRunner().invoke(app, ["fidelity", str(tmp / "asg"), "--reference", str(tmp / "gone")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = CliRunner().invoke(app, ["fidelity", str(tmp / "asg"), "--reference", str(tmp / "moved"),
                                      "--text", str(tmp / "held.txt")])
    assert result.exit_code == 0
    assert not (tmp / "x").exists()


def test_weights_option_of_compress(compressed_folder):
    tmp = compressed_folder
    (tmp / "counts.tsv").write_text("the\t100\ncat\t10\n")
    out = tmp / "weighted"
    result = CliRunner().invoke(app, ["compress", str(tmp / "bert"), "--k", "16", "--m", "8", "--weights",
                                      str(tmp / "counts.tsv"), "--no-fidelity", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "fidelity" not in result.stdout
    assert json.loads((out / "config.json").read_text())["asg"]["config"]["weights"] == str(tmp / "counts.tsv")
    result = CliRunner().invoke(app, ["compress", str(tmp / "bert"), "--method", "sg", "--weights", "wordfreq",
                                      "-o", str(tmp / "sg")])
    assert result.exit_code == 2 and "--weights applies to ASG only" in result.stderr


def test_anchor_keeps_the_tables_nearer_the_original():
    reference = build("bert-base")
    compressed = copy.deepcopy(reference)
    asg.compress(compressed, asg.ASGConfig(k=16, m=8), progress=False)
    dense = reference.get_input_embeddings().weight.detach()
    distances = []
    for anchor in (0.0, 10.0):
        model = copy.deepcopy(compressed)
        calibrate(model, reference, texts(100, 0), tokenizer=WordTokenizer(), steps=40, lr=1e-2, heldout=texts(20, 1),
                  eval_every=40, patience=5, anchor=anchor, progress=False)
        distances.append((model.get_input_embeddings().weight - dense).norm().item())
    assert distances[1] < distances[0]
    with pytest.raises(ValueError, match="anchor=-1"):
        calibrate(compressed, reference, ["the cat"], tokenizer=WordTokenizer(), anchor=-1)
