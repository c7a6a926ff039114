"""Tasks: metrics on hand-made predictions, file readers and their errors, real learning on a tiny
model, zero-shot rows, resuming, %Base, and the finetune / evaluate / experiment commands."""

import json
import random
import statistics
from pathlib import Path

import pytest
from transformers import TrainerCallback
from typer.testing import CliRunner

import asg
from asg.cli import app
from asg.experiment import add_percent_of_base, markdown_table, run_experiment
from asg.tasks import (DataError, FinetuneRuntime, FinetuneSettings, evaluate, finetune, read_classify, read_ner, read_nli,
                       read_qa)
from asg.tasks.families import entities
from asg.tasks.fixtures import PANX_TAGS, class_label, write_dataset
from asg.tasks.metrics import accuracy, entity_f1, macro_f1, mention_f1, percent_of_base, squad_scores
from tiny_models import write_bert_folder, write_t5_folder

KEYS = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}
FILL = ["the", "cat", "dog", "sat", "ran", "here", "there", "house", "went", "to", "saw", "today"]
PEOPLE, PLACES = ["alice", "bob", "carol"], ["paris", "rome", "oslo"]
WORDS = list(KEYS) + FILL + PEOPLE + PLACES + ["who", "where", "per", "loc", ":", ";", "none", "entailment",
                                               "contradiction", "neutral", "premise", "hypothesis", "PER:", "LOC:"]
QUIET = FinetuneRuntime(progress=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def nli_rows(n, lang, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(list(KEYS))
        hypothesis = rng.choices(FILL, k=2) + [key] + rng.choices(FILL, k=2)
        rows.append({"premise": " ".join(rng.choices(FILL, k=5)), "hypothesis": " ".join(hypothesis),
                     "label": KEYS[key], "lang": lang})
    return rows


def conll(n, seed):
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(3, 7)):
            r = rng.random()
            word, tag = ((rng.choice(PEOPLE), "B-PER") if r < 0.25 else (rng.choice(PLACES), "B-LOC") if r < 0.45
                         else (rng.choice(FILL), "O"))
            lines.append(f"{word}\t{tag}")
        sentences.append("\n".join(lines))
    return "\n\n".join(sentences) + "\n"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return str(write_bert_folder(tmp_path_factory.mktemp("bert"), WORDS))


@pytest.fixture(scope="module")
def nli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nli")
    return (write_jsonl(folder / "train.jsonl", nli_rows(300, "en", 0)),
            write_jsonl(folder / "test.jsonl", nli_rows(60, "en", 1) + nli_rows(40, "de", 2) + nli_rows(30, "fr", 3)))


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_on_hand_made_predictions():
    assert accuracy(["a", "b", "a", "c"], ["a", "b", "c", "c"]) == 0.75
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"]]  # 2 of 3 entities found, none wrong
    scores = entity_f1(gold, pred)
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(0.8)
    squad = squad_scores(["The cat", "a big dog", "nothing"], [["cat"], ["the dog", "big dog"], ["something"]])
    assert squad["exact_match"] == pytest.approx(200 / 3)  # "The cat" = "cat"; "a big dog" = "big dog" after normalisation
    assert squad["f1"] == pytest.approx(200 / 3)
    partial = squad_scores(["big red dog"], [["red dog"]])  # 2 common tokens: p = 2/3, r = 1
    assert partial["exact_match"] == 0 and partial["f1"] == pytest.approx(80.0)
    assert mention_f1([[("PER", "alice")]], [[("PER", "alice"), ("LOC", "rome")]]) == {
        "f1": pytest.approx(2 / 3), "precision": 0.5, "recall": 1.0}
    # three gold mentions, two of them the same: naming each once finds 2 of 3 (F1 80), as seqeval counts
    tags = ["B-PER", "O", "B-PER", "O", "B-LOC"]
    gold = entities(["alice", "and", "alice", "in", "rome"], tags)
    assert gold == [("PER", "alice"), ("PER", "alice"), ("LOC", "rome")]
    assert mention_f1([gold], [[("PER", "alice"), ("LOC", "rome")]])["f1"] == pytest.approx(0.8)
    assert entity_f1([tags], [["B-PER", "O", "O", "O", "B-LOC"]])["f1"] == pytest.approx(0.8)  # the encoders' count
    assert entities(["alice", "smith", "went", "to", "rome"], ["B-PER", "I-PER", "O", "O", "B-LOC"]) == [
        ("PER", "alice smith"), ("LOC", "rome")]
    # per-label F1: a = 1/2 (1 hit, 2 made, 2 gold), b = 2/3 (1 hit, 2 made, 1 gold), c = 0 (never predicted)
    assert macro_f1(["a", "b", "b", "a"], ["a", "a", "b", "c"]) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert macro_f1(["a", "d"], ["a", "a"]) == pytest.approx((2 / 3 + 0) / 2)  # a predicted-only label counts, as 0
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0
    assert percent_of_base(72.84, 74.79) == pytest.approx(97.39, abs=0.01)
    with pytest.raises(ValueError, match="undefined"):
        percent_of_base(1.0, 0.0)


# --- readers -----------------------------------------------------------------------------------------


def test_readers_accept_every_documented_format(tmp_path):
    nli = read_nli(write_jsonl(tmp_path / "nli.jsonl", [{"premise": "a", "hypothesis": "b", "label": 2}]))
    assert nli == [{"premise": "a", "hypothesis": "b", "label": "2", "lang": "und"}]
    (tmp_path / "ner.conll").write_text("-DOCSTART-\tO\n\nalice\tB-PER\nwent\tO\n\nrome B-LOC\n")
    assert [s["tags"] for s in read_ner(tmp_path / "ner.conll", "en")] == [["B-PER", "O"], ["B-LOC"]]
    ner = read_ner(write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O", "B-X"], "lang": "de"}]))
    assert ner == [{"tokens": ["a", "b"], "tags": ["O", "B-X"], "lang": "de"}]
    squad = {"data": [{"paragraphs": [{"context": "alice went to rome", "qas": [
        {"id": "q1", "question": "where", "answers": [{"text": "rome", "answer_start": 14}]}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (qa,) = read_qa(tmp_path / "squad.json")
    assert qa["answers"] == {"text": ["rome"], "answer_start": [14]} and qa["id"] == "q1"
    flat = read_qa(write_jsonl(tmp_path / "qa.jsonl", [
        {"context": "alice went", "question": "who", "answers": {"text": "alice", "answer_start": 0}}]))
    assert flat[0]["answers"] == {"text": ["alice"], "answer_start": [0]}


def test_classification_files_in_jsonl_csv_and_tsv(tmp_path):
    rows = read_classify(write_jsonl(tmp_path / "a.jsonl", [{"text": "good film", "label": "pos", "lang": "en"},
                                                             {"text": "schlecht", "label": 0}]), lang="de")
    assert rows == [{"text": "good film", "label": "pos", "lang": "en"}, {"text": "schlecht", "label": "0", "lang": "de"}]
    (tmp_path / "b.csv").write_text('label,text,lang\npos,"good, really",en\nneg,"a ""bad"" one",\n')
    assert read_classify(tmp_path / "b.csv") == [{"text": "good, really", "label": "pos", "lang": "en"},
                                                 {"text": 'a "bad" one', "label": "neg", "lang": "und"}]
    (tmp_path / "c.tsv").write_text("text\tlabel\nok, fine\tpos\n")
    assert read_classify(tmp_path / "c.tsv", "fr") == [{"text": "ok, fine", "label": "pos", "lang": "fr"}]


@pytest.mark.parametrize("reader, name, content, message", [
    (read_classify, "a.csv", "sentence,label\nx,1\n", r"a.csv, line 1: expected a header row with the columns text and label"),
    (read_classify, "b.tsv", "text\tlabel\nx\t1\ty\n", r"b.tsv, line 2: expected 2 fields as in the header"),
    (read_classify, "c.csv", "text,label\nx,\n", r'c.csv, line 2: expected a field "label"'),
    (read_classify, "d.jsonl", '{"text": ["x"], "label": "a"}\n', r'd.jsonl, line 1: expected a string field "text"'),
    (read_nli, "a.jsonl", '{"premise": "a", "hypothesis": "b", "label": "x"}\nnot json\n', r"a.jsonl, line 2: expected one JSON object"),
    (read_nli, "b.jsonl", '{"premise": "a", "label": "x"}\n', r'b.jsonl, line 1: expected a string field "hypothesis"'),
    (read_ner, "c.conll", "alice\tB-PER\nwent\n", r"c.conll, line 2: expected TOKEN<TAB>TAG"),
    (read_ner, "d.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n', r"d.jsonl, line 1: expected one tag per token"),
    (read_ner, "e.jsonl", '{"tokens": ["a"], "ner_tags": [3]}\n', r"e.jsonl, line 1: expected \"ner_tags\", a list of tag strings"),
    (read_qa, "f.jsonl", '{"context": "abc", "question": "q", "answers": {"text": ["zz"], "answer_start": [0]}}\n',
     r"f.jsonl, line 1: answer 'zz' is not found at answer_start 0"),
    (read_qa, "g.json", '{"data": [{"paragraphs": [{"qas": []}]}]}', r"g.json, data\[0\].paragraphs\[0\]: expected a paragraph"),
    (read_nli, "h.jsonl", "\n\n", r"h.jsonl, the whole file: expected at least one record"),
])
def test_malformed_files_name_the_file_the_line_and_what_was_expected(tmp_path, reader, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        reader(tmp_path / name)


# --- fine-tuning -------------------------------------------------------------------------------------


def test_finetuning_learns_and_reports_one_row_per_language(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    run = tmp_path / "run"
    summary = finetune(FinetuneSettings(task="nli", output=str(run), model=bert_dir, train_files=[train],
                                        eval_files=[test], learning_rate=2e-3, epochs=15, batch_size=16,
                                        max_length=32), QUIET)
    assert set(summary["results"]) == {"en", "de", "fr"}  # one row per language, from the records' "lang"
    assert all(row["accuracy"] > 90 for row in summary["results"].values())  # chance is 33%
    assert summary["average"]["accuracy"] == pytest.approx(
        sum(row["accuracy"] for row in summary["results"].values()) / 3)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["settings"]["learning_rate"] == 2e-3 and saved["settings"]["weight_decay"] == 0.01
    assert saved["cross_lingual"] is True
    recorded = json.loads((run / "settings.json").read_text())["settings"]
    assert recorded == {**FinetuneSettings(task="nli", output=str(run), model=bert_dir, train_files=[train],
                                           eval_files=[test], learning_rate=2e-3, epochs=15, batch_size=16,
                                           max_length=32).to_dict(), "eval_langs": ["de", "en", "fr"]}
    predictions = [json.loads(line) for line in (run / "predictions" / "de.jsonl").read_text().splitlines()]
    assert len(predictions) == 40 and {"prediction", "label"} <= set(predictions[0])
    again = evaluate(run, progress=False)
    assert again["results"]["en"]["accuracy"] == summary["results"]["en"]["accuracy"]
    older = json.loads((run / "settings.json").read_text())  # as runs before settings.json held "settings"
    older["hyperparameters"] = {**older.pop("settings"), "seq2seq": False, "cross_lingual": True}
    (run / "settings.json").write_text(json.dumps(older))
    assert evaluate(run, progress=False)["results"] == again["results"]


def classify_rows(n, lang, seed, words=4):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(list(KEYS))
        text = rng.choices(FILL, k=words) + [key] + rng.choices(FILL, k=2)
        rows.append({"text": " ".join(text), "label": KEYS[key], "lang": lang})
    return rows


def test_single_text_classification_from_local_files_and_the_hub(bert_dir, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", classify_rows(300, "en", 0))
    test = tmp_path / "test.csv"
    test.write_text("text,label,lang\n" + "".join(f"{r['text']},{r['label']},{r['lang']}\n" for r in
                                                   classify_rows(40, "en", 1) + classify_rows(30, "de", 2)))
    long = write_jsonl(tmp_path / "long.jsonl", classify_rows(20, "fr", 3, words=40))
    summary = finetune(FinetuneSettings(task="classify", output=str(tmp_path / "run"), model=bert_dir,
                                        train_files=[train], eval_files=[str(test), long], learning_rate=2e-3,
                                        epochs=10, batch_size=16, max_length=24), QUIET)
    assert set(summary["results"]) == {"en", "de", "fr"}  # per-language rows from the records' "lang"
    assert summary["main_metric"] == "accuracy"
    for lang in ("en", "de"):
        assert summary["results"][lang]["accuracy"] > 90 and summary["results"][lang]["macro_f1"] > 90  # chance: 33
    err = capsys.readouterr().err
    assert "20 of 20 evaluation (fr) examples are longer than 24 tokens and were cut" in err
    assert "evaluation (de)" not in err and "training examples are longer" not in err
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "de.jsonl").read_text().splitlines()]
    assert macro_f1([p["prediction"] for p in predictions], [p["label"] for p in predictions]) * 100 == pytest.approx(
        summary["results"]["de"]["macro_f1"])

    # the SST-2 loader, on a copy of stanfordnlp/sst2 laid out as the hub stores it
    def split(rows):
        return {"idx": list(range(len(rows))), "sentence": [r["text"] for r in rows],
                "label": [int(r["label"] == "entailment") for r in rows]}

    rows = [r for r in classify_rows(400, "en", 4) if r["label"] != "neutral"]
    write_dataset(tmp_path / "mirror", "stanfordnlp/sst2",
                  [{"name": "idx", "dtype": "int32"}, {"name": "sentence", "dtype": "string"},
                   {"name": "label", "dtype": class_label("negative", "positive")}],
                  {"default": {"train": split(rows[:200]), "validation": split(rows[200:]),
                               "test": {**split(rows[:5]), "label": [-1] * 5}}})
    monkeypatch.setenv("ASG_DATASETS_MIRROR", str(tmp_path / "mirror"))
    hub = finetune(FinetuneSettings(task="sst2", output=str(tmp_path / "sst2"), model=bert_dir, learning_rate=2e-3,
                                    epochs=6, batch_size=16, max_length=24), QUIET)
    assert hub["results"]["en"]["examples"] == len(rows) - 200  # evaluated on 'validation', whose labels are public
    assert hub["results"]["en"]["accuracy"] > 90
    assert json.loads((tmp_path / "sst2" / "settings.json").read_text())["labels"] == ["negative", "positive"]
    monkeypatch.setenv("ASG_DATASETS_MIRROR", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="has no copy of stanfordnlp/sst2"):
        finetune(FinetuneSettings(task="sst2", output=str(tmp_path / "none")), QUIET)


def test_hub_loaders_read_copies_laid_out_as_the_hub_stores_them(tmp_path, monkeypatch):
    from asg.tasks import hub

    mirror = tmp_path / "mirror"
    pair = {"premise": ["a cat", "ein hund"], "hypothesis": ["an animal", "eine katze"], "label": [0, 2]}
    write_dataset(mirror, "facebook/xnli", [{"name": "premise", "dtype": "string"}, {"name": "hypothesis", "dtype": "string"},
                                            {"name": "label", "dtype": class_label("entailment", "neutral", "contradiction")}],
                  {lang: {"train": pair, "validation": pair, "test": pair} for lang in ("de", "en")})
    words = {"tokens": [["alice", "in", "new", "york"]], "ner_tags": [[1, 0, 5, 6]], "langs": [["de"] * 4]}
    write_dataset(mirror, "google/xtreme", [{"name": "tokens", "sequence": "string"},
                                            {"name": "ner_tags", "sequence": class_label(*PANX_TAGS)},
                                            {"name": "langs", "sequence": "string"}],
                  {"PAN-X.de": {"train": words, "validation": words, "test": words}})
    context = "Rome is the capital of Italy."
    qa = {"id": ["english-1", "finnish-2"], "title": ["Rome", "Rooma"], "context": [context, context],
          "question": ["What is the capital of Italy?", "Mikä?"],
          "answers": [{"text": ["Rome"], "answer_start": [0]}, {"text": ["Italy"], "answer_start": [23]}]}
    write_dataset(mirror, "google-research-datasets/tydiqa",
                  [{"name": "id", "dtype": "string"}, {"name": "title", "dtype": "string"},
                   {"name": "context", "dtype": "string"}, {"name": "question", "dtype": "string"},
                   {"name": "answers", "sequence": [{"name": "text", "dtype": "string"},
                                                    {"name": "answer_start", "dtype": "int32"}]}],
                  {"secondary_task": {"train": qa, "validation": qa}})
    bc5cdr = mirror / "tner" / "bc5cdr"  # JSON lines with integer tags, beside a loading script datasets refuses
    (bc5cdr / "dataset").mkdir(parents=True)
    (bc5cdr / "bc5cdr.py").write_text("raise RuntimeError('a loading script must not run')\n")
    sentence = {"tokens": ["aspirin", "caused", "renal", "failure"], "tags": [1, 0, 2, 3]}
    for name in ("train", "valid", "test"):
        write_jsonl(bc5cdr / "dataset" / f"{name}.json", [sentence, {"tokens": ["ok"], "tags": [0]}])
    monkeypatch.setenv("ASG_DATASETS_MIRROR", str(mirror))
    for split in ("train", "validation", "test"):
        assert hub.bc5cdr(split, "en")[0] == {"tokens": ["aspirin", "caused", "renal", "failure"],
                                              "tags": ["B-Chemical", "O", "B-Disease", "I-Disease"], "lang": "en"}
    write_jsonl(bc5cdr / "dataset" / "test.json", [{"tokens": ["x"], "tags": [7]}])
    with pytest.raises(ValueError, match="a tag outside 0..4"):
        hub.bc5cdr("test", "en")
    assert hub.xnli("test", "de") == [
        {"premise": "a cat", "hypothesis": "an animal", "label": "entailment", "lang": "de"},
        {"premise": "ein hund", "hypothesis": "eine katze", "label": "contradiction", "lang": "de"}]
    assert hub.wikiann("train", "de") == [{"tokens": ["alice", "in", "new", "york"],
                                           "tags": ["B-PER", "O", "B-LOC", "I-LOC"], "lang": "de"}]
    # a TyDiQA example's language is the prefix of its id: the English name of the language ("finnish-…")
    assert hub.tydiqa("test", "fi") == [{"id": "finnish-2", "context": context, "question": "Mikä?",
                                         "answers": {"text": ["Italy"], "answer_start": [23]}, "lang": "fi"}]
    assert [row["id"] for row in hub.tydiqa("train", "en")] == ["english-1"]
    other = tmp_path / "other"  # another copy of the same repository, with other content: read, not a cached one
    write_dataset(other, "google-research-datasets/tydiqa", [{"name": "id", "dtype": "string"}, {"name": "title", "dtype": "string"},
                  {"name": "context", "dtype": "string"}, {"name": "question", "dtype": "string"},
                  {"name": "answers", "sequence": [{"name": "text", "dtype": "string"},
                                                   {"name": "answer_start", "dtype": "int32"}]}],
                  {"secondary_task": {split: {**{key: value[:1] for key, value in qa.items()}, "id": ["english-9"]}
                                      for split in ("train", "validation")}})  # the same card: the same cache key
    monkeypatch.setenv("ASG_DATASETS_MIRROR", str(other))
    assert [row["id"] for row in hub.tydiqa("train", "en")] == ["english-9"]
    monkeypatch.setenv("ASG_DATASETS_MIRROR", str(mirror))
    with pytest.raises(ValueError, match=r"could not load google/xtreme \(PAN-X.fr\) split 'test' from .*mirror"):
        hub.wikiann("test", "fr")


def test_a_run_with_too_few_optimizer_steps_says_so_before_training(bert_dir, nli_files, tmp_path, capsys):
    train, test = nli_files  # 300 training examples: the paper's batch of 128 for 2 epochs is 6 steps
    finetune(FinetuneSettings(task="nli", output=str(tmp_path / "run"), model=bert_dir, train_files=[train],
                              eval_files=[f"en={test}"], max_length=16), QUIET)
    err = capsys.readouterr().err
    assert "training on 300 examples, batch 128 x 1 process(es), 2 epochs: 6 optimizer steps" in err
    assert ("warning: only 6 optimizer steps: usually too few to learn the task. Use a smaller batch "
            "(--batch-size 4 gives 150 steps) or more epochs (--epochs 34)") in err
    finetune(FinetuneSettings(task="nli", output=str(tmp_path / "ok"), model=bert_dir, train_files=[train],
                              eval_files=[test], max_length=16, batch_size=4, max_steps=2), QUIET)
    assert "warning" not in capsys.readouterr().err


def test_paper_hyperparameters_are_the_defaults(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    summary = finetune(FinetuneSettings(task="nli", output=str(tmp_path / "run"), model=bert_dir, train_files=[train],
                                        eval_files=[f"en={test}"], max_steps=1), QUIET)
    hp = summary["settings"]
    assert (hp["learning_rate"], hp["batch_size"], hp["weight_decay"], hp["epochs"]) == (5e-6, 128, 0.01, 2)
    assert set(summary["results"]) == {"en"}


def test_a_compressed_encoder_finetunes_and_its_codes_never_change(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    compressed = tmp_path / "asg"
    result = CliRunner().invoke(app, ["compress", bert_dir, "--k", "16", "--m", "8", "-o", str(compressed)])
    assert result.exit_code == 0, result.output
    codes = asg.from_pretrained(compressed).get_input_embeddings().codes.clone()
    run = tmp_path / "run"
    summary = finetune(FinetuneSettings(task="nli", output=str(run), model=str(compressed), train_files=[train],
                                        eval_files=[test], learning_rate=2e-3, epochs=15, batch_size=16,
                                        max_length=32), QUIET)
    assert summary["average"]["accuracy"] > 80
    assert summary["compression"]["embedding_ratio"] == pytest.approx(16 * 32 / (211 * 32))
    tuned = asg.from_pretrained(run / "model")
    assert isinstance(tuned.bert.embeddings.word_embeddings, asg.ASGEmbedding)
    assert (tuned.bert.embeddings.word_embeddings.codes == codes).all()


def test_ner_and_qa_and_text_to_text_runs(bert_dir, tmp_path):
    (tmp_path / "train.conll").write_text(conll(200, 0))
    (tmp_path / "test.conll").write_text(conll(40, 1))
    ner = finetune(FinetuneSettings(task="ner", output=str(tmp_path / "ner"), model=bert_dir,
                                    train_files=[str(tmp_path / "train.conll")], eval_files=[str(tmp_path / "test.conll")],
                                    learning_rate=3e-3, epochs=4, batch_size=16, max_length=32,
                                    compression={"method": "asg", "k": 16, "m": 8}), QUIET)
    assert ner["results"]["test"]["f1"] > 90  # entities are the word itself: learnable
    rng = random.Random(0)
    rows = []
    for i in range(200):
        person, place, question = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(["who", "where"])
        context = f"{person} went to {place} today"
        answer = person if question == "who" else place
        rows.append({"id": str(i), "context": context, "question": question,
                     "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
    write_jsonl(tmp_path / "qa.jsonl", rows)
    qa = finetune(FinetuneSettings(task="qa", output=str(tmp_path / "qa"), model=bert_dir,
                                   train_files=[str(tmp_path / "qa.jsonl")], eval_files=[str(tmp_path / "qa.jsonl")],
                                   learning_rate=3e-3, epochs=3, batch_size=16, max_length=32), QUIET)
    assert set(qa["results"]["qa"]) == {"exact_match", "f1", "examples"}
    assert qa["results"]["qa"]["f1"] > 34  # above always answering the first word of the context
    mt5 = str(write_t5_folder(tmp_path / "mt5", WORDS, mt5=True))  # untied head: both tables compressed
    text = finetune(FinetuneSettings(task="ner", output=str(tmp_path / "mt5-run"), model=mt5,
                                     train_files=[str(tmp_path / "train.conll")], eval_files=[str(tmp_path / "test.conll")],
                                     learning_rate=3e-3, epochs=30, batch_size=16, max_length=32,
                                     compression=asg.ASGConfig(k=16, m=8)), QUIET)
    assert text["seq2seq"] is True
    tables = text["compression"]["tables"]
    assert set(tables) == {"input", "output"} and tables["output"]["tied"] is False  # both sides, as in section 2.4
    # generates "PER: alice ; LOC: rome ; PER: alice", every mention in order: the entities are learnable (about 85)
    assert text["results"]["test"]["f1"] > 75
    predictions = [json.loads(line) for line in (tmp_path / "mt5-run" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert any(row["prediction"] for row in predictions)


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_from_its_last_checkpoint(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    settings = dict(task="nli", output=str(tmp_path / "run"), model=bert_dir, train_files=[train], eval_files=[test],
                    max_steps=10, save_steps=5, batch_size=16, max_length=32)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneSettings(**settings), FinetuneRuntime(progress=False, callbacks=[Interrupt()]))
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-5").is_dir()
    assert not (tmp_path / "run" / "metrics.json").exists()
    summary = finetune(FinetuneSettings(**settings), QUIET)
    assert summary["train"]["resumed_from"].endswith("checkpoint-5")
    assert summary["train"]["steps"] == 10
    with pytest.raises(ValueError, match="holds a finished run"):
        finetune(FinetuneSettings(**settings), QUIET)


def test_bad_task_settings(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sentiment'"):
        finetune(FinetuneSettings(task="sentiment", output=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="reads local files only: give --train-file"):
        finetune(FinetuneSettings(task="ner", output=str(tmp_path / "b"), model=bert_dir))
    with pytest.raises(ValueError, match="not a finished fine-tuning run"):
        evaluate(tmp_path)


# --- experiments -------------------------------------------------------------------------------------


def test_percent_of_base_rows_and_table():
    rows = [{"name": "Base", "embedding_percent": 100.0, "model_percent": 100.0, "metric": "f1", "score": 80.0,
             "by_language": {"en": 90.0, "de": 70.0}},
            {"name": "ASG", "embedding_percent": 0.5, "model_percent": 48.0, "metric": "f1", "score": 76.0,
             "by_language": {"en": 88.0, "de": 64.0}}]
    add_percent_of_base(rows)
    assert [row["percent_of_base"] for row in rows] == [100.0, 95.0]
    table = markdown_table(rows)
    assert "| ASG | 0.50 | 48.00 | 76.00 | 95.00 |" in table
    assert "| de | 70.00 | 64.00 |" in table and "| average | 80.00 | 76.00 |" in table


def test_experiment_command_writes_table_and_plot(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    spec = tmp_path / "exp.yaml"
    spec.write_text(f"""
name: tiny
task: nli
model: {bert_dir}
train_files: [{train}]
eval_files: [{test}]
hyperparameters: {{learning_rate: 3.0e-3, epochs: 4, batch_size: 16, max_length: 32}}
runs:
  - {{name: Base}}
  - {{name: ASG (k=16 m=8), method: asg, k: 16, m: 8}}
  - {{name: SG, method: sg, budget: 40%}}
  - {{name: SG small batch, method: sg, budget: 40%, hyperparameters: {{batch_size: 8, max_steps: 3}}}}
output: {tmp_path / "out"}
""")
    result = CliRunner().invoke(app, ["experiment", str(spec)])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Base | 100.00 | 100.00 |" in table and "| accuracy | macro_f1 | %Base |" in table  # Table 1's XNLI columns
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert rows[0]["percent_of_base"] == 100.0
    assert rows[1]["embedding_percent"] == pytest.approx(100 * 16 * 32 / (211 * 32))
    assert rows[1]["percent_of_base"] == pytest.approx(100 * rows[1]["score"] / rows[0]["score"])
    assert (tmp_path / "out" / "plot.png").read_bytes()[:4] == b"\x89PNG"
    own = json.loads((tmp_path / "out" / "runs" / "sg-small-batch" / "settings.json").read_text())["settings"]
    assert (own["batch_size"], own["max_steps"], own["learning_rate"]) == (8, 3, 3.0e-3)  # the run's own, then the experiment's
    mtime = (tmp_path / "out" / "runs" / "base" / "metrics.json").stat().st_mtime
    run_experiment(spec, progress=False)  # finished runs are reused
    assert (tmp_path / "out" / "runs" / "base" / "metrics.json").stat().st_mtime == mtime


def test_an_experiment_over_seeds_reports_mean_and_spread(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    spec = tmp_path / "seeds.yaml"
    spec.write_text(f"""
task: nli
model: {bert_dir}
train_files: [{train}]
eval_files: [en={test}]
seeds: [0, 1, 2]
hyperparameters: {{learning_rate: 3.0e-3, max_steps: 6, batch_size: 16, max_length: 32}}
runs:
  - {{name: Base}}
  - {{name: ASG, method: asg, k: 16, m: 8}}
output: {tmp_path / "out"}
""")
    rows = run_experiment(spec, progress=False)["rows"]
    per_seed = [json.loads((tmp_path / "out" / "runs" / "base" / f"seed-{seed}" / "metrics.json").read_text())
                for seed in (0, 1, 2)]
    assert [m["settings"]["seed"] for m in per_seed] == [0, 1, 2]
    scores = [m["average"]["accuracy"] for m in per_seed]
    assert rows[0]["score"] == pytest.approx(sum(scores) / 3) and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["spread"] == pytest.approx(statistics.stdev(scores))
    table = (tmp_path / "out" / "table.md").read_text()
    assert f"| Base | 100.00 | 100.00 | {rows[0]['score']:.2f} ± {rows[0]['spread']:.2f} |" in table
    assert "mean ± standard deviation over fine-tuning seeds 0, 1, 2" in table
    assert rows[1]["percent_of_base"] == pytest.approx(100 * rows[1]["score"] / rows[0]["score"])
    (tmp_path / "bad.yaml").write_text("task: ner\nseeds: [1, 1]\nruns: [{name: x}]\n")
    assert "'seeds' must be a list of distinct integers" in CliRunner().invoke(
        app, ["experiment", str(tmp_path / "bad.yaml")]).stderr


def test_bad_experiment_files(tmp_path):
    (tmp_path / "a.yaml").write_text("task: ner\nruns: [{name: x}]\nmodle: y\n")
    result = CliRunner().invoke(app, ["experiment", str(tmp_path / "a.yaml")])
    assert result.exit_code == 2 and "unknown key(s) ['modle']" in result.stderr
    (tmp_path / "b.yaml").write_text("task: ner\nruns: [{name: x}, {name: x}]\n")
    assert "run names must be unique" in CliRunner().invoke(app, ["experiment", str(tmp_path / "b.yaml")]).stderr
    (tmp_path / "c.yaml").write_text("task: ner\nruns: [{name: x, hyperparameters: {batch: 4}}]\n")
    assert "unknown hyperparameter(s) ['batch'] in run 'x'" in CliRunner().invoke(
        app, ["experiment", str(tmp_path / "c.yaml")]).stderr


def test_finetune_and_evaluate_commands(bert_dir, nli_files, tmp_path):
    train, test = nli_files
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", bert_dir, "--task", "nli", "--train-file", train, "--eval-file",
                                 f"en={test}", "--lr", "3e-3", "--epochs", "4", "--batch-size", "16",
                                 "--max-length", "32", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "nli: accuracy by evaluation language" in result.stdout and "average" in result.stdout
    again = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert again.exit_code == 0 and "(130 examples)" in again.stdout
    missing = runner.invoke(app, ["finetune", bert_dir, "--task", "nli", "--train-file", str(tmp_path / "no.jsonl"),
                                  "-o", str(tmp_path / "run2")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


# --- dry runs ----------------------------------------------------------------------------------------

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_yaml_passes_its_dry_run(path, monkeypatch):
    from asg.dryrun import dry_run
    from asg.tasks import TASKS

    monkeypatch.chdir(path.parent.parent)  # the YAMLs name their local files from the repository root
    lines = []
    result = dry_run(path.relative_to(path.parent.parent), echo=lines.append)
    assert lines[-1].startswith("dry run passed")
    spec = asg.experiment.load_experiment(path)
    task = TASKS[spec["task"]]
    for entry in result["plan"]:
        if spec.get("train_lang") == "all":  # the in-language columns: every language trains, every one is tested
            assert entry["train"] == list(task.languages) and entry["eval"] == list(task.languages)
        elif spec.get("eval_langs") == ["all"]:  # zero-shot: English only, tested on all
            assert entry["train"] == ["en"] and entry["eval"] == list(task.languages) and entry["epochs"] == 5
    assert result["table"].count("\n|") >= len(spec["runs"])


def test_a_dry_run_prints_the_plan_and_catches_what_would_fail(tmp_path, monkeypatch):
    from asg.dryrun import dry_run

    spec = tmp_path / "exp.yaml"
    spec.write_text(f"""
task: xnli
model: default
train_lang: all
eval_langs: [all]
hyperparameters: {{epochs: 2}}
runs:
  - {{name: Base}}
  - {{name: ASG, method: asg, k: 64, m: 48}}
output: {tmp_path / "out"}
""")
    lines = []
    result = dry_run(spec, echo=lines.append)
    base, compressed = result["plan"]
    assert len(base["train"]) == len(base["eval"]) == 15 and base["learning_rate"] == 5e-6 and base["epochs"] == 2
    assert compressed["compression_for_real_table"].startswith("asg {'k': 64, 'm': 48")
    assert compressed["compression_for_real_table"].endswith("on a 30,522 x 384 table")  # the real MiniLM's shape
    assert any("the xnli loader read copies laid out as the hub stores them for 15 training" in line for line in lines)
    assert "| accuracy | macro_f1 |" in result["table"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing where the real run would
    spec.write_text(spec.read_text().replace("m: 48", "m: 7"))  # 7 does not divide the real table's 384
    with pytest.raises(ValueError, match="384"):
        dry_run(spec, echo=lines.append)
    (tmp_path / "files.yaml").write_text("task: ner\ntrain_files: [missing.conll]\neval_files: [missing.conll]\n"
                                         f"runs: [{{name: Base}}]\noutput: {tmp_path / 'out2'}\n")
    with pytest.raises(ValueError, match="missing.conll does not exist"):
        dry_run(tmp_path / "files.yaml", echo=lines.append)
    result = CliRunner().invoke(app, ["experiment", str(tmp_path / "files.yaml"), "--dry-run"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_tokenize_cuts_as_the_tokenizer_does_and_counts_the_cut(tmp_path):
    from transformers import AutoTokenizer

    from asg.tasks.families import tokenize

    tokenizer = AutoTokenizer.from_pretrained(write_t5_folder(tmp_path / "t5", WORDS))
    short, long = ["the cat sat", "alice went to rome"], ["the cat sat " * 6, "alice went to rome"]
    cases = [(short, short, 0), (long, short, 1), (short, long, 0)]  # the last: only a target is too long
    for sources, targets, cut in cases:
        enc, truncated = tokenize(tokenizer, sources, text_target=targets, max_length=8)
        expected = tokenizer(sources, text_target=targets, truncation=True, max_length=8)
        assert truncated == cut and dict(enc) == dict(expected)
