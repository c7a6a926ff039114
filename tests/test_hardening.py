"""Bad input never reaches memory it should not: token ids and codes are checked on every path, damaged
checkpoints are refused with the file and tensor named, the kernel cache loads only what asg built, and
no write loses a user's files or another writer's output."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import asg
from asg import atomic, kernels
from asg.baselines import LowRankConfig, SGConfig, ScalarConfig
from asg.cli import app
from tiny_models import VOCAB, build, sample_inputs, write_bert_folder

K, M = 16, 8
BAD_IDS = [VOCAB, 300, -1, 10**8]


def compressed(arch="bert", config=None):
    model = build(arch)
    asg.compress(model, config or asg.ASGConfig(k=K, m=M), progress=False)
    return model


def saved(tmp_path, arch="bert", config=None, name="ckpt"):
    model = compressed(arch, config)
    return model, asg.save_pretrained(model, tmp_path / name)


def rewrite(folder, change, keep_digests=False, unpack=True):
    """Rewrite a folder's weights file with `change(state)` applied: as damage would (`keep_digests`), or as
    another tool writes a folder (transformers' own save_pretrained), with no checksums to catch it. Packed
    index tables are handed to `change` unpacked and written back unpacked (as format 1 stored them),
    unless `unpack=False`."""
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    if unpack:
        for name, entry in json.loads(metadata.pop("asg_packed", "{}")).items():
            state[name] = asg.bitpack.unpack(state.pop(name + "_packed"), tuple(entry["shape"]), entry["bits"],
                                             {"U8": torch.uint8, "I16": torch.int16, "U16": torch.uint16}[entry["dtype"]])
    change(state)
    if not keep_digests:
        drop_checksums(folder, metadata)
    save_file(state, str(path), metadata=metadata)


def drop_checksums(folder, metadata):
    metadata.pop("asg_sha256")
    metadata.pop("asg_plan_sha256")
    edit_config(folder, lambda config: config["asg"].pop("weights_sha256"))


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# --- token ids and codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "mt5", "gemma3"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_token_id_outside_the_vocabulary_raises_index_error_like_the_dense_model(arch, bad, tmp_path):
    model, folder = saved(tmp_path, arch)
    inputs = sample_inputs(arch)
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, 1] = bad
    with pytest.raises(IndexError):
        build(arch)(**inputs)  # what the dense model does
    for loaded in (asg.from_pretrained(folder), tf.AutoModel.from_pretrained(folder) if arch == "bert" else model):
        with pytest.raises(IndexError, match=f"token id {bad} is outside the vocabulary of {VOCAB} tokens"):
            loaded(**inputs)


def test_every_lookup_path_checks_ids():
    table = compressed().get_input_embeddings()
    for ids in (torch.tensor([VOCAB]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="resize_token_embeddings"):
            table(ids)
        with pytest.raises(IndexError):
            table.lookup(ids)
        with pytest.raises(IndexError):
            table.row_scale(ids) if table.norms is not None else table.rows(ids)
        if kernels.available():
            with pytest.raises(IndexError):
                kernels.gather(table.codebooks.detach(), table.codes, K, ids)
    with kernels.disabled():  # the torch fallback
        with pytest.raises(IndexError, match="outside the vocabulary"):
            table(torch.tensor([-1]))
        with pytest.raises(TypeError, match="token ids must be integers"):
            table(torch.tensor([1.0]))


@pytest.mark.parametrize("config", [SGConfig(ratio=0.2), LowRankConfig(rank=4), ScalarConfig(bits=8),
                                    ScalarConfig(bits=4), asg.ASGConfig(k=K, m=M, norms="row")],
                         ids=["sg", "lowrank", "int8", "int4", "asg-norms"])
def test_baseline_tables_refuse_negative_ids_instead_of_wrapping(config):
    table = compressed(config=config).get_input_embeddings()
    assert table(torch.tensor([VOCAB - 1])).shape[-1] == table.embedding_dim
    for bad in (-1, VOCAB):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            table(torch.tensor([bad]))


def test_kernels_refuse_codes_outside_the_codebooks():
    if not kernels.available():
        pytest.skip("no C compiler")
    table = compressed().get_input_embeddings()
    codes = table.codes.clone()
    codes[3, 2] = K
    with pytest.raises(ValueError, match="codes must lie in 0..15"):
        kernels.gather(table.codebooks.detach(), codes, K)
    with pytest.raises(ValueError, match="codes must lie in 0..15"):
        kernels.lut_logits(torch.zeros(1, M, K), codes)
    with pytest.raises(ValueError, match="codes must be one of"):
        kernels.lut_logits(torch.zeros(1, M, K), codes.float())


def test_codes_changed_in_memory_are_checked_again_before_use():
    model = compressed("gpt2")
    table = model.get_input_embeddings()
    inputs = sample_inputs("gpt2")
    model(**inputs)
    with torch.no_grad():
        table.codes[5, 0] = 200  # in place: the buffer's version changes
    with pytest.raises(ValueError, match="codes must lie in 0..15"):
        model(**inputs)


# --- damaged checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, dtype, message", [
    (K, None, "codes must lie in 0..15"),
    (-1, torch.int16, "is stored as torch.int16, but it must be torch.uint8"),
    (32767, torch.int16, "is stored as torch.int16"),
    (3, torch.float32, "is stored as torch.float32, but it must be torch.uint8"),
])
def test_codes_outside_the_codebooks_in_a_file_are_refused(value, dtype, message, tmp_path):
    _, folder = saved(tmp_path)

    def damage(state):
        name = "bert.embeddings.word_embeddings.codes"
        codes = state[name].to(dtype) if dtype is not None else state[name]
        codes[7, 3] = value
        state[name] = codes

    rewrite(folder, damage)  # written without digests, as transformers' own writer does
    with pytest.raises(ValueError, match=message):
        asg.from_pretrained(folder)
    # transformers reads the file itself: whichever check meets the damage first refuses it
    stored_as = message.replace("torch.int16", "I16").replace("torch.float32", "F32").replace("torch.uint8", "U8")
    with pytest.raises(ValueError, match=f"{stored_as}|codes must lie in 0..15"):
        tf.AutoModelForMaskedLM.from_pretrained(folder)


@pytest.mark.parametrize("keep_digests, message", [(True, "does not match the checksum"),
                                                    (False, "codes must lie in 0..9")])
def test_packed_codes_that_decode_outside_the_codebooks_are_refused(keep_digests, message, tmp_path):
    _, folder = saved(tmp_path, config=asg.ASGConfig(k=10, m=M))  # 4-bit codes: 10..15 are representable

    def damage(state):
        state["bert.embeddings.word_embeddings.codes_packed"][5] = 0xFF  # two codes of 15

    rewrite(folder, damage, keep_digests=keep_digests, unpack=False)
    with pytest.raises(ValueError, match=message):
        asg.from_pretrained(folder)
    with pytest.raises(ValueError, match=message if not keep_digests else "checksum|codes must lie in 0..9"):
        tf.AutoModelForMaskedLM.from_pretrained(folder)


def test_transformers_loading_checks_codes_too(tmp_path):
    _, folder = saved(tmp_path)
    rewrite(folder, lambda state: state["bert.embeddings.word_embeddings.codes"].__setitem__((7, 3), 200))
    with pytest.raises(ValueError, match="codes must lie in 0..15"):
        tf.AutoModelForMaskedLM.from_pretrained(folder)


def test_changed_values_are_caught_by_the_recorded_digests(tmp_path):
    _, folder = saved(tmp_path)
    rewrite(folder, lambda state: state["bert.embeddings.word_embeddings.codebooks"].mul_(1.5), keep_digests=True)
    with pytest.raises(ValueError, match="does not match the checksum recorded"):
        asg.from_pretrained(folder)


def test_an_edited_asg_section_is_refused(tmp_path):
    _, folder = saved(tmp_path)
    edit_config(folder, lambda c: c["asg"]["tables"]["input"].__setitem__("embed_scale", 3.0))
    with pytest.raises(ValueError, match="'asg' section differs from the one model.safetensors was written with"):
        asg.from_pretrained(folder)
    assert CliRunner().invoke(app, ["info", str(folder)]).exit_code == 2


@pytest.mark.parametrize("change, message", [
    (lambda c: c.clear() or c.update(x=1), "plain transformers checkpoint"),
    (lambda c: c["asg"].pop("tables"), "tables must be an object"),
    (lambda c: c["asg"]["tables"]["input"].__setitem__("k", "16"), "tables.input.k must be a positive integer"),
    (lambda c: c["asg"]["tables"]["input"].__setitem__("m", 7), "tables.input.m (7) must divide embedding_dim"),
    (lambda c: c["asg"]["tables"]["input"].__setitem__("locations", []), "locations must be a non-empty list"),
    (lambda c: c["asg"]["tables"]["output"].__setitem__("tied", "yes"), "tables.output.tied must be true or false"),
    (lambda c: c["asg"].__setitem__("format_version", "1"), "format_version must be a positive integer"),
])
def test_a_damaged_asg_section_names_the_field(change, message, tmp_path):
    _, folder = saved(tmp_path)
    edit_config(folder, change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        asg.from_pretrained(folder)


@pytest.mark.parametrize("config, field, value, message", [
    (asg.baselines.SGConfig(ratio=0.2), "num_groups", "x", "tables.input.num_groups must be a positive integer"),
    (asg.baselines.ScalarConfig(bits=4, group_size=8), "group_size", 0, "tables.input.group_size must be null or a"),
    (asg.baselines.ScalarConfig(bits=4, group_size=8), "group_size", 5, "tables.input.group_size must be null or a"),
])
def test_a_damaged_baseline_table_names_the_field(config, field, value, message, tmp_path):
    _, folder = saved(tmp_path, config=config)
    edit_config(folder, lambda c: c["asg"]["tables"]["input"].__setitem__(field, value))
    with pytest.raises(ValueError, match=message):
        asg.from_pretrained(folder)


def test_a_config_that_is_not_an_object_is_a_clear_error(tmp_path):
    _, folder = saved(tmp_path)
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        asg.from_pretrained(folder)
    result = CliRunner().invoke(app, ["info", str(folder)])
    assert result.exit_code == 2 and "not an object" in result.stderr


def test_shapes_that_disagree_with_k_and_m_name_the_file_and_tensor(tmp_path):
    _, folder = saved(tmp_path)
    name = "bert.embeddings.word_embeddings.codebooks"
    rewrite(folder, lambda state: state.__setitem__(name, state[name][:64].clone()))
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{name}' has shape \\[64, 4\\], but the config "
                                         "describes \\[128, 4\\]"):
        asg.from_pretrained(folder)
    folder2 = tmp_path / "tok"
    write_bert_folder(tmp_path / "src", ["father", "mother"])
    assert CliRunner().invoke(app, ["compress", str(tmp_path / "src"), "--k", "16", "--m", "8", "-o", str(folder2),
                                    "--no-fidelity"]).exit_code == 0
    base = "embeddings.word_embeddings.codebooks"  # a BertModel: no "bert." prefix
    rewrite(folder2, lambda state: state.__setitem__(base, state[base][:64].clone()))
    result = CliRunner().invoke(app, ["inspect", str(folder2), "--token", "father"])
    assert result.exit_code == 2 and "has shape [64, 4], but the config describes [128, 4]" in result.stderr


def test_a_vocabulary_size_that_disagrees_with_the_tables_is_refused_before_allocating(tmp_path):
    _, folder = saved(tmp_path)
    edit_config(folder, lambda c: c.__setitem__("vocab_size", 10**9))  # a dense table of 128 GB, never built
    with pytest.raises(ValueError, match="builds a \\[1000000000, 32\\] table"):
        asg.from_pretrained(folder)


@pytest.mark.parametrize("aliases", ["not json", "[1, 2]", '{"a.b": 3}', '{"cls.predictions.decoder.bias": "nowhere"}'])
def test_bad_alias_metadata_is_a_clear_error(aliases, tmp_path):
    _, folder = saved(tmp_path)
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = {**handle.metadata(), "asg_aliases": aliases}
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    drop_checksums(folder, metadata)
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="asg_aliases"):
        asg.from_pretrained(folder)


# --- the kernel cache ------------------------------------------------------------------------------


PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("MARKER", "w"); if (f) fclose(f); }
"""


@pytest.mark.skipif(not kernels.available(), reason="no C compiler")
def test_a_library_planted_in_the_cache_is_never_loaded(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, ASG_CACHE_DIR=str(cache))
    probe = "import asg.kernels as k; assert k.available(); print(k._build().name)"
    name = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.strip()
    marker = tmp_path / "marker"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED.replace("MARKER", str(marker)))
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(cache / name)], check=True)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()  # the planted library's constructor never ran: it was replaced by a fresh build
    cache.chmod(0o777)  # our own cache opened to others (an older asg, a umask of 002): closed again, then used
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and oct(cache.stat().st_mode & 0o777) == "0o700"
    shared = tmp_path / "shared"  # a folder another user owns: not used at all
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    os.chown(shared, 12345, 12345) if os.geteuid() == 0 else pytest.skip("needs root to make another user's folder")
    done = subprocess.run([sys.executable, "-c", "import asg.kernels as k; print(k.available())"],
                          env=dict(env, ASG_CACHE_DIR=str(shared)), capture_output=True, text=True)
    assert done.stdout.strip() == "False" and "writable by other users" in done.stderr


# --- user data -------------------------------------------------------------------------------------


def test_saving_over_an_asg_folder_keeps_the_users_files(tmp_path):
    _, folder = saved(tmp_path)
    (folder / "notes.txt").write_text("mine")
    (folder / "plots").mkdir()
    (folder / "plots" / "a.png").write_bytes(b"png")
    asg.save_pretrained(compressed(config=asg.ASGConfig(k=K, m=M, codebook="shared")), folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "plots" / "a.png").read_bytes() == b"png"
    assert asg.read_plan(folder)["config"]["codebook"] == "shared"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_without_overwrite_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    target = tmp_path / "out"
    real = asg.checkpoint.fmt.write_weights

    def other_writer_finishes_first(path, *args, **kwargs):
        target.mkdir()
        (target / "theirs.txt").write_text("the other run")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(asg.checkpoint.fmt, "write_weights", other_writer_finishes_first)
    with pytest.raises(ValueError, match="already exists"):
        asg.save_pretrained(compressed(), target, overwrite=False)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_two_concurrent_compress_commands_do_not_both_succeed(tmp_path):
    source = write_bert_folder(tmp_path / "src", ["father"])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "asg", "compress", str(source), "--k", "16", "--m", "8", "-o", str(out),
               "--no-fidelity"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], results
    assert any("already exists" in err for _, err, _ in results)
    assert asg.from_pretrained(out) is not None


@pytest.mark.parametrize("exchange", [True, False])
def test_a_crash_between_the_two_renames_is_repaired_on_the_next_write(exchange, tmp_path, monkeypatch):
    _, folder = saved(tmp_path, name="out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    # What an interrupted swap leaves: the old output renamed aside, and a temporary folder.
    os.rename(folder, tmp_path / f".out.asg-old-{dead}-abc")
    (tmp_path / f".out.asg-tmp-{dead}-xyz").mkdir()
    (tmp_path / ".out.k2j4h5.tmp").mkdir()  # left by an older asg, long ago
    os.utime(tmp_path / ".out.k2j4h5.tmp", (0, 0))
    if not exchange:
        monkeypatch.setattr(atomic, "_LIBC", [None])  # no renameat2: the portable path
    atomic.recover(folder)
    assert asg.read_plan(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    asg.save_pretrained(compressed(config=asg.ASGConfig(k=K, m=M, codebook="shared")), folder)
    assert asg.read_plan(folder)["config"]["codebook"] == "shared"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_after_the_output_was_written_says_so(tmp_path, monkeypatch):
    source = write_bert_folder(tmp_path / "src", ["father"])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("asg.cli._print_fidelity", interrupt)  # after the folder, whose card holds the fidelity
    result = CliRunner().invoke(app, ["compress", str(source), "--k", "16", "--m", "8", "-o", str(tmp_path / "out")])
    assert result.exit_code == 130
    assert f"interrupted; {tmp_path / 'out'} was written completely before that" in result.stderr
    assert asg.read_plan(tmp_path / "out")
    monkeypatch.setattr("asg.fidelity.fidelity", interrupt)  # before it: nothing is written
    result = CliRunner().invoke(app, ["compress", str(source), "--k", "16", "--m", "8", "-o", str(tmp_path / "b")])
    assert result.exit_code == 130 and not (tmp_path / "b").exists()


def test_ctrl_c_while_torch_is_importing_exits_130_without_a_traceback(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    done = subprocess.run([sys.executable, "-m", "asg", "info", "x"], env=env, capture_output=True, text=True)
    assert done.returncode == 130
    assert "asg: interrupted while starting" in done.stderr and "Traceback" not in done.stderr


# --- fine-tuning runs ------------------------------------------------------------------------------


def nli_file(path, labels=("yes", "no"), n=40):
    rows = [{"premise": "the cat sat", "hypothesis": f"the dog {i}", "label": labels[i % len(labels)]} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_settings(bert, run, train, test):
    from asg.tasks import FinetuneSettings

    return FinetuneSettings(task="nli", output=str(run), model=bert, train_files=[train], eval_files=[test],
                            max_steps=2, batch_size=8, max_length=16)


def quiet(overwrite=False):
    from asg.tasks import FinetuneRuntime

    return FinetuneRuntime(overwrite=overwrite, progress=False)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(write_bert_folder(tmp_path_factory.mktemp("bert"), ["the", "cat", "sat", "dog", "yes", "no"]))


def test_overwrite_of_a_run_validates_inputs_first_and_keeps_other_files(bert, tmp_path):
    from asg.tasks import finetune

    run = tmp_path / "run"
    train, test = nli_file(tmp_path / "train.jsonl"), nli_file(tmp_path / "test.jsonl")
    finetune(run_settings(bert, run, train, test), quiet())
    (run / "notes.md").write_text("mine")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl"):
        finetune(run_settings(bert, run, str(bad), test), quiet(overwrite=True))
    assert (run / "metrics.json").exists() and (run / "model").is_dir()  # nothing was deleted
    finetune(run_settings(bert, run, train, test), quiet(overwrite=True))
    assert (run / "notes.md").read_text() == "mine" and (run / "metrics.json").exists()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(bert, tmp_path):
    from asg.tasks import finetune

    other = tmp_path / "results"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    (other / "settings.json").write_text('{"mine": true}')
    train, test = nli_file(tmp_path / "train.jsonl"), nli_file(tmp_path / "test.jsonl")
    with pytest.raises(ValueError, match="does not mark it as a run"):
        finetune(run_settings(bert, other, train, test), quiet(overwrite=True))
    assert sorted(p.name for p in other.iterdir()) == ["metrics.json", "settings.json"]


def test_a_failed_run_leaves_no_empty_folder(bert, tmp_path):
    from asg.tasks import finetune

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a"}\n')
    with pytest.raises(ValueError):
        finetune(run_settings(bert, tmp_path / "run", str(bad), str(bad)), quiet())
    assert not (tmp_path / "run").exists()


def test_train_and_eval_labels_that_differ_are_an_error(bert, tmp_path):
    from asg.tasks import finetune

    train = nli_file(tmp_path / "train.jsonl", ("yes", "no"))
    test = nli_file(tmp_path / "test.jsonl", ("entailment", "contradiction", "neutral"))
    with pytest.raises(ValueError, match=r"labels \['contradiction', 'entailment', 'neutral'\] that the training "
                                         r"data never shows \(training labels: \['no', 'yes'\]\)"):
        finetune(run_settings(bert, tmp_path / "run", train, test), quiet())
    assert not (tmp_path / "run").exists()


def test_unanswerable_questions_are_left_out_of_training_and_refused_in_evaluation(bert, tmp_path, capsys):
    from asg.tasks import FinetuneSettings, finetune

    rows = [{"id": str(i), "context": "the cat sat", "question": "who", "answers":
             {"text": ["cat"], "answer_start": [4]} if i % 3 else {"text": [], "answer_start": []}} for i in range(12)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answered = tmp_path / "answered.jsonl"
    answered.write_text("".join(json.dumps(r) + "\n" for r in rows if r["answers"]["text"]))
    settings = dict(task="qa", model=bert, max_steps=1, batch_size=4, max_length=16)
    summary = finetune(FinetuneSettings(output=str(tmp_path / "a"), train_files=[str(path)],
                                        eval_files=[str(answered)], **settings), quiet())
    assert summary["train"]["examples"] == 8
    assert "left out 4 of 12 training questions that have no answer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="4 evaluation questions \\(qa\\) have no answer"):
        finetune(FinetuneSettings(output=str(tmp_path / "b"), train_files=[str(path)], eval_files=[str(path)],
                                  **settings), quiet())


# --- commands --------------------------------------------------------------------------------------


def test_m_zero_is_an_error_not_the_default(tmp_path):
    source = write_bert_folder(tmp_path / "src", ["father"])
    result = CliRunner().invoke(app, ["compress", str(source), "--m", "0", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "m=0 must be at least 1" in result.stderr
    result = CliRunner().invoke(app, ["compress", str(source), "--k", "0", "--m", "8", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "k=0 is too small" in result.stderr


def test_texts_longer_than_the_position_table_are_clamped(tmp_path):
    source = write_bert_folder(tmp_path / "src", ["father", "mother"])  # max_position_embeddings=64
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["compress", str(source), "--k", "16", "--m", "8", "-o", str(out),
                                    "--no-fidelity"]).exit_code == 0
    text = tmp_path / "long.txt"
    text.write_text(" ".join(["father mother"] * 300) + "\nfather\n")
    result = CliRunner().invoke(app, ["fidelity", str(out), "--text", str(text)])
    assert result.exit_code == 0, result.output
    row = [line for line in result.stdout.splitlines() if str(out) in line][-1]
    assert 0.0 < float(row.split()[-2]) <= 1.0


# --- determinism -----------------------------------------------------------------------------------


def test_the_same_model_gives_the_same_bytes_in_every_file(tmp_path):
    model = compressed("gpt2")
    first, second = asg.save_pretrained(model, tmp_path / "a"), asg.save_pretrained(model, tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    again = compressed("gpt2")  # the same seed, fitted again
    third = asg.save_pretrained(again, tmp_path / "c")
    assert (third / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def test_the_same_compress_command_twice_gives_identical_files(tmp_path):
    source = write_bert_folder(tmp_path / "src", ["father", "mother"])
    code = textwrap.dedent("""
        import sys
        from asg.cli import main
        sys.argv = ["asg", "compress", sys.argv[1], "--k", "16", "--m", "8", "-o", sys.argv[2], "--no-fidelity"]
        main()
    """)
    for out in ("a", "b"):  # separate processes: hash seeds and allocation differ
        subprocess.run([sys.executable, "-c", code, str(source), str(tmp_path / out)], check=True, capture_output=True)
    for item in sorted((tmp_path / "a").iterdir()):
        assert item.read_bytes() == (tmp_path / "b" / item.name).read_bytes(), item.name
