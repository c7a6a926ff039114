"""Property-based tests: every valid config compresses to a model equal to its dense twin and saves exactly;
every invalid one is a ValueError that says why; and no damage to a checkpoint crashes, hangs, yields NaN
or loads silently as something else.

Examples are few by default so that CI stays fast; ASG_FUZZ_EXAMPLES=10000 runs the large profile.
"""

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import asg
from asg.analysis import load_table, parameter_table

EXAMPLES = int(os.environ.get("ASG_FUZZ_EXAMPLES", "40"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def tiny_gpt2(vocab: int, dim: int, tied: bool, dtype: torch.dtype) -> tf.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=vocab, n_embd=dim, n_layer=1, n_head=1, n_positions=16,
                           tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(config).to(dtype).eval()


@st.composite
def configs(draw):
    vocab = draw(st.integers(2, 70))
    dim = draw(st.sampled_from([4, 6, 8, 12, 16]))
    k = draw(st.integers(0, 3 * vocab))
    m = draw(st.integers(0, dim + 2))
    shared = draw(st.booleans())
    norms = draw(st.sampled_from([None, "row", "scalar"]))
    targets = draw(st.sampled_from([("input",), ("output",), ("input", "output")]))
    tied = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return vocab, dim, k, m, shared, norms, targets, tied, dtype


@PROFILE
@given(configs())
def test_any_config_compresses_exactly_or_says_why_not(case):
    vocab, dim, k, m, shared, norms, targets, tied, dtype = case
    original = tiny_gpt2(vocab, dim, tied, dtype)
    model = copy.deepcopy(original)
    try:
        config = asg.ASGConfig(k=k, m=m, codebook="shared" if shared else "separate", targets=targets, norms=norms,
                               niter=3)
        asg.compress(model, config, progress=False)
    except ValueError as err:
        points = vocab * max(m, 1) if shared else vocab
        assert k < 2 or m < 1 or dim % m or k > points, f"valid config refused: {err}"
        assert str(err)
        return
    assert not (k < 2 or m < 1 or dim % m), "an invalid config was accepted"
    twin = copy.deepcopy(original)
    if tied and len(targets) == 1:  # one side compressed: the other stays dense, untied from it
        twin.lm_head.weight = torch.nn.Parameter(twin.lm_head.weight.detach().clone())
    with torch.no_grad():
        for name, entry in model.config.asg["tables"].items():
            table = model.get_submodule(entry["locations"][0])
            rows = (table if name == "input" else table.embedding).weight
            for path in entry["locations"]:
                twin.get_submodule(path).weight.copy_(rows)
    ids = torch.arange(vocab).remainder(vocab)[:12].reshape(1, -1)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, twin(input_ids=ids).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 2e-2,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)
    with tempfile.TemporaryDirectory() as folder:
        asg.save_pretrained(model, Path(folder) / "c")
        loaded = asg.from_pretrained(Path(folder) / "c")
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, got)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


# --- damaged checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A saved tied GPT-2 with norms and kept rows (every kind of ASG tensor) and an untied head variant, with
    their logits."""
    out = {}
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"] + [f"w{i}" for i in range(33)]
    tokenizer = tf.BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    counts = tmp_path_factory.mktemp("counts") / "counts.tsv"
    counts.write_text("the\t10\ncat\t5\n")
    for name, tied in (("tied", True), ("untied", False)):
        model = tiny_gpt2(40, 8, tied, torch.float32)
        asg.compress(model, asg.ASGConfig(k=6, m=4, norms="row", niter=3, keep=6, keep_by=str(counts)),
                     tokenizer=tokenizer, progress=False)
        assert model.get_input_embeddings().kept_count == 6
        folder = asg.save_pretrained(model, tmp_path_factory.mktemp(name) / "ckpt")
        with torch.no_grad():
            out[name] = (folder, model(input_ids=IDS).logits)
    return out


IDS = torch.tensor([[1, 5, 7, 39, 0, 22]])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


def _set(root, path, value, delete):
    target = root
    for key in path[:-1]:
        target = target[key]
    if delete and isinstance(target, dict):
        target.pop(path[-1])
    else:
        target[path[-1]] = value


@st.composite
def damages(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "tensor", "config"]))
    return kind, draw(st.randoms(use_true_random=False)), draw(JSON_VALUES), draw(st.booleans())


def apply(folder: Path, damage) -> str:
    """Damage the checkpoint in `folder`; returns what was done, for the failure message."""
    kind, rng, value, flag = damage
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if kind == "truncate":
        weights.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(data))
    elif kind == "tensor":
        with safe_open(str(weights), "pt") as handle:
            metadata = handle.metadata()
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        name = rng.choice(sorted(state))
        tensor = state[name]
        change = rng.choice(["shape", "dtype", "value", "drop"])
        # Without digests (as another tool writes the file) only what is checkable without them counts as
        # damage: a finite float value or another float precision is then simply what the file holds.
        detectable = True
        if change == "shape":
            state[name] = tensor.reshape(-1)[: max(0, tensor.numel() - rng.randint(1, 3))].clone()
        elif change == "dtype":
            state[name] = tensor.to(rng.choice([torch.float32, torch.float16, torch.int16, torch.int32, torch.uint8,
                                                torch.int64]))
            detectable = state[name].is_floating_point() != tensor.is_floating_point() or not tensor.is_floating_point()
        elif change == "value" and tensor.numel():
            flat = tensor.reshape(-1).clone()
            if tensor.is_floating_point():
                new = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, 0.5, -2.0])
                detectable = not math.isfinite(new)
            else:
                info = torch.iinfo(tensor.dtype)
                new = rng.choice([v for v in (-1, 6, 255, 2**15 - 1, 2**31 - 1) if info.min <= v <= info.max])
            flat[rng.randrange(flat.numel())] = new
            state[name] = flat.reshape(tensor.shape)
        else:
            state.pop(name)
        if flag and detectable:  # as transformers' own save_pretrained writes a folder: no checksums anywhere
            metadata.pop("asg_sha256", None)
            metadata.pop("asg_plan_sha256", None)
            config = json.loads((folder / "config.json").read_text())
            config["asg"].pop("weights_sha256", None)
            (folder / "config.json").write_text(json.dumps(config))
        save_file(state, str(weights), metadata=metadata)
        return f"tensor {name}: {change}, checksums {'dropped' if 'asg_sha256' not in metadata else 'kept'}"
    else:
        config = json.loads((folder / "config.json").read_text())
        paths = [p for p in _paths(config["asg"]) if p]
        path = rng.choice(paths)
        _set(config["asg"], path, value, delete=flag)
        (folder / "config.json").write_text(json.dumps(config))
        return f"config asg{list(path)} {'deleted' if flag else f'= {value!r}'}"
    return kind


@PROFILE
@given(variant=st.sampled_from(["tied", "untied"]), damage=damages())
def test_a_damaged_checkpoint_is_refused_cleanly_or_loads_unchanged(good, variant, damage):
    source, want = good[variant]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(source, folder)
        done = apply(folder, damage)
        try:
            model = asg.from_pretrained(folder)
        except ValueError as err:
            assert str(err)
            event(f"{damage[0]}: refused")
        else:
            event(f"{damage[0]}: harmless, loads unchanged")
            with torch.no_grad():
                got = model(input_ids=IDS).logits
            assert torch.equal(got, want), f"a damaged checkpoint loaded silently as another model: {done}"
        for read in (parameter_table, load_table):
            try:
                read(folder)
            except ValueError:
                pass
