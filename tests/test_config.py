"""ASGConfig validation: every mistake a user can make raises ValueError that says how to fix it."""

import pytest

import asg
from tiny_models import HIDDEN, VOCAB, build


def test_defaults_and_round_trip():
    config = asg.ASGConfig(k=1024, m=48)
    assert (config.codebook, config.targets, config.niter, config.seed, config.backend) == (
        "separate", ("input", "output"), 25, 0, "faiss")
    assert asg.ASGConfig.from_dict(config.to_dict()) == config
    assert asg.ASGConfig(k=4, m=2, targets="input, output").targets == ("input", "output")


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=1, m=8), "k=1 is too small"),
    (dict(k=16, m=0), "m=0 must be at least 1"),
    (dict(k=16, m=8, codebook="pooled"), "unknown codebook 'pooled'"),
    (dict(k=16, m=8, targets=("input", "decoder")), r"unknown target\(s\) \['decoder'\]"),
    (dict(k=16, m=8, targets=()), "targets is empty"),
    (dict(k=16, m=8, targets=("input", "input")), "names a table twice"),
    (dict(k=16, m=8, backend="sklearn"), "unknown backend 'sklearn'"),
    (dict(k=16, m=8, niter=0), "niter=0 must be at least 1"),
    (dict(k=16.0, m=8), "k must be an integer"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        asg.ASGConfig(**kwargs)


def test_unknown_field_in_a_saved_config():
    with pytest.raises(ValueError, match=r"unknown ASGConfig field\(s\) \['kk'\]"):
        asg.ASGConfig.from_dict({"k": 4, "m": 2, "kk": 3})


def test_m_must_divide_d_and_the_message_lists_choices():
    with pytest.raises(ValueError, match=r"m=5 does not divide the input embedding dimension D=32.*\[8, 16, 32\]"):
        asg.compress(build("bert"), asg.ASGConfig(k=16, m=5))


def test_k_larger_than_the_vocabulary():
    with pytest.raises(ValueError, match=rf"k=256 is larger than the number of points.*{VOCAB} vocabulary rows.*k <= {VOCAB}"):
        asg.compress(build("bert"), asg.ASGConfig(k=256, m=8))
    # a shared codebook pools V·m segments, so the same k is fine there
    report = asg.compress(build("bert"), asg.ASGConfig(k=256, m=8, codebook="shared"), progress=False)
    assert report.embedding_params_after == 256 * HIDDEN // 8


def test_output_only_on_a_model_without_head():
    with pytest.raises(ValueError, match=r"no output embedding .* targets=\('input',\)"):
        asg.compress(build("bert-base"), asg.ASGConfig(k=16, m=8, targets="output"))


def test_not_a_config():
    with pytest.raises(ValueError, match="must be an asg.ASGConfig or a baseline config"):
        asg.compress(build("bert"), {"k": 16, "m": 8})


def test_a_model_that_is_not_a_transformers_model():
    import torch

    with pytest.raises(ValueError, match="does not expose get_input_embeddings"):
        asg.compress(torch.nn.Linear(4, 4), asg.ASGConfig(k=2, m=2))
