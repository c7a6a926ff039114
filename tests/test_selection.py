"""Choosing ASG settings by measurement: candidates within the budget, the shared fit of the norm modes,
the winner with and without a target, and `asg compress --auto`."""

import copy
import dataclasses
import json

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

import asg
from asg import selection
from asg.cli import app
from asg.fidelity import fidelity
from tiny_models import build, write_bert_folder

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", "house", "big", "small", "red", "tree"]


def sentences(n=30):
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 5)) for i in range(n)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_bert_folder(tmp_path_factory.mktemp("gpt2"), WORDS, model_class=tf.GPT2LMHeadModel)


def test_candidates_are_the_largest_power_of_two_k_within_the_budget():
    every = selection.candidates(262_144, 640, budget=0.01)
    trials = [t for t in every if not t.config.keep]
    assert {(t.config.k, t.config.m) for t in trials} == {(2048, 320), (2048, 160), (2048, 80), (2048, 40)}
    assert {t.config.norms for t in trials} == {None, "row", "scalar"}
    for trial in trials:  # k·D values (and V lengths for norms="row") within 1%; twice k would not be
        assert trial.params_percent <= 1.0
        bigger = selection.candidates(262_144, 640, budget=1.0, widths=(640 // trial.config.m,),
                                      norm_modes=(trial.config.norms,), fill_keep=False)
        assert any(t.config.k > trial.config.k for t in bigger)
    capped = selection.candidates(262_144, 640, budget=0.01, max_bytes=0.10)
    assert max(t.bytes_percent for t in capped) <= 10
    # 6-bit codes of 320 segments: 9.4%; 7 bits: 10.9%
    assert {t.config.k for t in capped if t.config.m == 320 and not t.config.keep} == {64}


def test_kept_rows_fill_what_k_leaves_of_the_budget():
    every = selection.candidates(262_144, 640, budget=0.01, max_bytes=0.10, norm_modes=(None,))
    assert [bool(t.config.keep) for t in every] == [False, True] * 4  # each (k, m), then with kept rows
    for plain, kept in zip(every[::2], every[1::2]):
        assert (kept.config.k, kept.config.m) == (plain.config.k, plain.config.m)
        assert kept.params_percent <= 1.0 and kept.bytes_percent <= 10.0
        params, size = selection._cost(dataclasses.replace(kept.config, keep=kept.config.keep + 1), 262_144, 640)
        assert params > 0.01 or size > 0.10  # one more kept row would not fit
    # k=64, m=320: 40,960 codebook values leave 1,636,761 of the 1% for rows of 641 parameters (640 int8
    # values and a scale); the bytes (10% less 9.4%) would hold 6,219 rows of 648 bytes (and a 4-byte id)
    assert [t.config.keep for t in every if t.config.m == 320] == [0, 2553]
    assert [t for t in selection.candidates(262_144, 640, budget=0.01, fill_keep=False) if t.config.keep] == []


def test_the_norm_modes_share_one_fit_and_measure_what_compressing_with_them_gives(gpt2_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = tokenizer.pad_token or "[PAD]"
    texts = sentences()
    lines = []
    result = selection.select(model, tokenizer, texts, budget=0.4, widths=(4,), report=lines.append)
    # the count and the time left cover the weighted stage from the first line on
    assert [line.split("]")[0] for line in lines] == [f"[{n}/12" for n in range(1, 13)]
    assert lines[-1].endswith("(about 0 min left)")
    # each norm mode, without and with kept rows; then the same six on the frequency-weighted fit
    assert [t.config.norms for t in result.trials] == [None, None, "row", "row", "scalar", "scalar"] * 2
    assert [bool(t.config.keep) for t in result.trials] == [False, True] * 6
    assert [t.config.weights for t in result.trials] == [None] * 6 + ["wordfreq"] * 6
    assert "weights=wordfreq" in result.trials[-1].label and "weights" not in result.trials[0].label
    fits = [t.fit_seconds for t in result.trials]
    assert len(set(fits[:6])) == 1 and len(set(fits[6:])) == 1 and fits[0] != fits[6]  # two fits, one each
    for trial in result.trials:
        direct = copy.deepcopy(model)
        asg.compress(direct, trial.config, tokenizer=tokenizer, progress=False)
        # rel 1e-4, as the other KL comparisons: a KL near 6e-4 is a difference of float32 log-probabilities near
        # -10, and CI once saw the two paths differ by 1.6e-5 of it
        assert fidelity(direct, model, tokenizer, texts)["kl"] == pytest.approx(trial.scores["kl"], rel=1e-4)
    assert result.best is min(result.trials, key=lambda t: t.scores["kl"])
    assert result.met_target and "best KL" in result.reason
    assert [n for n, p in model.named_parameters() if "codebooks" in n] == []  # the model itself is untouched


def test_kept_rows_are_not_tried_when_the_tokens_cannot_be_ranked(gpt2_dir, tmp_path):
    model = tf.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = tokenizer.pad_token or "[PAD]"
    lines = []
    result = selection.select(model, tokenizer, sentences(), budget=0.4, widths=(4,), norm_modes=(None,),
                              keep_by=str(tmp_path / "missing.tsv"), report=lines.append)
    assert [t.config.keep for t in result.trials] == [0]
    assert lines[0].startswith("not trying kept rows:") and "missing.tsv does not exist" in lines[0]
    assert [line for line in lines if line.startswith("not trying frequency-weighted k-means:")]
    assert [t.config.weights for t in result.trials] == [None]


def test_a_target_picks_the_smallest_setting_that_reaches_it_or_says_none_does(gpt2_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = tokenizer.pad_token or "[PAD]"
    texts = sentences()
    loose = selection.select(model, tokenizer, texts, budget=0.4, max_kl=1.0)
    assert loose.best.bytes_percent == min(t.bytes_percent for t in loose.trials)  # every trial passes
    impossible = selection.select(model, tokenizer, texts, budget=0.4, max_kl=1e-12)  # every table loses a little
    assert not impossible.met_target and "no setting within the budget reaches the target" in impossible.reason
    assert impossible.best is min(impossible.trials, key=lambda t: t.scores["kl"])


def test_an_encoder_is_scored_by_sentence_cosine():
    model = build("bert")
    tokenizer = tf.AutoTokenizer.from_pretrained(write_bert_folder(__import__("tempfile").mkdtemp(), WORDS))
    result = selection.select(model, tokenizer, sentences(), budget=0.4, widths=(4, 8), norm_modes=(None,),
                              min_cosine=0.0)
    assert all("mean_cosine" in t.scores for t in result.trials)
    assert result.best.bytes_percent == min(t.bytes_percent for t in result.trials)
    assert "| **chosen** |" in selection.markdown_table(result, generative=False)


def test_compress_measures_its_way_to_settings_for_a_generative_model(gpt2_dir, tmp_path):
    result = CliRunner().invoke(app, ["compress", str(gpt2_dir), "--budget", "40%", "--max-kl", "1", "-o",
                                      str(tmp_path / "out"), "--no-fidelity"])
    assert result.exit_code == 0, result.output
    assert "choosing k, m and the norm mode within 40.00% of the embedding parameters" in result.output
    assert "| **chosen** |" in result.output and "the smallest setting (bytes on disk) that reaches the target" in result.output
    chosen = [line for line in result.output.splitlines() if line.startswith("chose ")][0]
    plan = asg.read_plan(tmp_path / "out")["config"]
    assert chosen.startswith(f"chose k={plan['k']}, m={plan['m']}, norms={plan['norms'] or 'none'}")
    manual = CliRunner().invoke(app, ["compress", str(gpt2_dir), "--k", "16", "--m", "8", "-o", str(tmp_path / "m"),
                                      "--no-fidelity"])
    assert manual.exit_code == 0 and "choosing" not in manual.output  # given k and m, nothing is searched


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_the_reference_outputs_are_computed_once_and_give_the_same_scores(arch, gpt2_dir):
    from asg.fidelity import ReferenceOutputs

    reference = build(arch)
    tokenizer = tf.AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = tokenizer.pad_token or "[PAD]"
    cache, texts = ReferenceOutputs(), sentences(20)
    models = [copy.deepcopy(reference) for _ in range(3)]
    calls = []
    reference.register_forward_hook(lambda *args: calls.append(1))
    for k, model in zip((8, 16, 32), models):
        asg.compress(model, asg.ASGConfig(k=k, m=8), progress=False)
    plain = [fidelity(model, reference, tokenizer, texts) for model in models]
    calls.clear()
    cached = [fidelity(model, reference, tokenizer, texts, cache=cache) for model in models]
    for got, want in zip(cached, plain):  # equal up to the head's path choice (lookups or matmul) between calls
        assert got.keys() == want.keys()
        assert all(got[k] == (pytest.approx(want[k], rel=1e-5) if isinstance(want[k], float) else want[k]) for k in got)
    assert len(calls) == 3  # one batch of 8, 8 and 4 texts: the reference ran once per batch, for all three models
    fidelity(models[0], reference, tokenizer, texts[:5], cache=cache)  # other texts: computed afresh
    assert len(calls) == 4
