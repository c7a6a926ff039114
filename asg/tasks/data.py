"""Read task data from local files, checking every record: text classification, NLI, NER and extractive QA.

Formats (one record a line for JSONL):
- Text classification: JSONL `{"text", "label", "lang"?}`, or CSV (`.csv`) / TSV (`.tsv`) with a header
  row naming the columns `text` and `label` (and optionally `lang`); labels are kept as strings.
- NLI: JSONL `{"premise", "hypothesis", "label", "lang"?}`; labels are strings or integers, as found.
- NER: CoNLL (token, tab, tag; a blank line between sentences; `-DOCSTART-` lines skipped) or JSONL
  `{"tokens": [...], "ner_tags": [...], "lang"?}` with tag strings such as B-PER.
- QA: SQuAD JSON (`{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}`) or JSONL
  `{"context", "question", "answers": {"text": [...], "answer_start": [...]}, "id"?, "lang"?}`.

A malformed file raises `DataError`, which names the file, the line (or JSON path) and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

DEFAULT_LANG = "und"


class DataError(ValueError):
    """A malformed data file: the message names the file, where, and what was expected."""

    def __init__(self, path, where: str, expected: str) -> None:
        super().__init__(f"{path}, {where}: {expected}")


def read_classify(path: str | os.PathLike, lang: str | None = None) -> list[dict[str, Any]]:
    """Single texts with their label (kept as a string) and language, from JSONL, CSV or TSV (chosen by content
    and extension: a first line that starts with "{" is JSONL, a `.tsv` file is tab-separated, else CSV)."""
    text = _text(path)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    records = _jsonl(path) if first.startswith("{") else _table(path, text)
    out = []
    for where, record in records:
        if not isinstance(record.get("text"), str):
            raise DataError(path, f"line {where}", 'expected a string field "text"')
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            raise DataError(path, f"line {where}", 'expected a field "label" (a string such as "positive", or an integer)')
        out.append({"text": record["text"], "label": str(label).strip(), "lang": _lang(record, lang, path, where)})
    return _nonempty(out, path)


def read_nli(path: str | os.PathLike, lang: str | None = None) -> list[dict[str, Any]]:
    """Premise/hypothesis pairs with their label (kept as a string) and language."""
    out = []
    for line, record in _jsonl(path):
        for key in ("premise", "hypothesis"):
            if not isinstance(record.get(key), str):
                raise DataError(path, f"line {line}", f'expected a string field "{key}"')
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(path, f"line {line}", 'expected a field "label" (a string such as "entailment", or an integer)')
        out.append({"premise": record["premise"], "hypothesis": record["hypothesis"], "label": str(label),
                    "lang": _lang(record, lang, path, line)})
    return _nonempty(out, path)


def read_ner(path: str | os.PathLike, lang: str | None = None) -> list[dict[str, Any]]:
    """Sentences as word lists with one tag per word, from CoNLL or JSONL (chosen by content)."""
    text = _text(path)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _nonempty(_ner_jsonl(path, lang) if first.startswith("{") else _conll(path, text, lang), path)


def read_qa(path: str | os.PathLike, lang: str | None = None) -> list[dict[str, Any]]:
    """Questions over a context with their gold answers (texts and character offsets), from SQuAD JSON or JSONL."""
    text = _text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # not one JSON document: JSONL, read line by line below
    if isinstance(whole, dict) and "data" in whole:
        return _nonempty(_squad(path, whole, lang), path)
    out = []
    for line, record in _jsonl(path):
        out.append(_qa_record(path, f"line {line}", record, lang, default_id=f"{Path(path).stem}-{line}"))
    return _nonempty(out, path)


# --- helpers ---------------------------------------------------------------------------------------


def _text(path) -> str:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"byte {err.start}", "expected UTF-8 text") from None


def _jsonl(path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"line {number}", f"expected one JSON object per line ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(path, f"line {number}", "expected a JSON object")
        yield number, record


def _table(path, text: str) -> Iterator[tuple[int, dict]]:
    """The rows of a CSV or TSV file with a header, as dicts keyed by the header's column names."""
    delimiter = "\t" if Path(path).suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [name.strip() for name in reader.fieldnames or []]
    if "text" not in columns or "label" not in columns:
        kind = "tab" if delimiter == "\t" else "comma"
        raise DataError(path, "line 1", f"expected a header row with the columns text and label ({kind}-separated), "
                                        f"got {columns}")
    reader.fieldnames = columns
    for row in reader:
        if None in row:  # more fields than the header names
            raise DataError(path, f"line {reader.line_num}", f"expected {len(columns)} fields as in the header, got more")
        if row.get("lang") == "":
            row.pop("lang")
        yield reader.line_num, row


def _lang(record: dict, default: str | None, path, where) -> str:
    lang = record.get("lang", default or DEFAULT_LANG)
    if not isinstance(lang, str) or not lang:
        raise DataError(path, f"line {where}", 'expected "lang" to be a language code such as "en"')
    return lang


def _nonempty(records: list, path) -> list:
    if not records:
        raise DataError(path, "the whole file", "expected at least one record")
    return records


def _conll(path, text: str, lang: str | None) -> list[dict[str, Any]]:
    out, tokens, tags = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if tokens:
                out.append({"tokens": tokens, "tags": tags, "lang": lang or DEFAULT_LANG})
                tokens, tags = [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        if len(columns) < 2 or not columns[0] or not columns[-1].strip():
            raise DataError(path, f"line {number}", f"expected TOKEN<TAB>TAG, got {line.strip()!r}")
        tokens.append(columns[0])
        tags.append(columns[-1].strip())
    if tokens:
        out.append({"tokens": tokens, "tags": tags, "lang": lang or DEFAULT_LANG})
    return out


def _ner_jsonl(path, lang: str | None) -> list[dict[str, Any]]:
    out = []
    for line, record in _jsonl(path):
        tokens, tags = record.get("tokens"), record.get("ner_tags")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(path, f"line {line}", 'expected "tokens", a list of strings')
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(path, f"line {line}", 'expected "ner_tags", a list of tag strings such as "B-PER" '
                                                  "(integer tags need the dataset's label names: write the names)")
        if len(tokens) != len(tags):
            raise DataError(path, f"line {line}", f"expected one tag per token, got {len(tokens)} tokens and {len(tags)} tags")
        out.append({"tokens": tokens, "tags": tags, "lang": _lang(record, lang, path, line)})
    return out


def _squad(path, squad: Any, lang: str | None) -> list[dict[str, Any]]:
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise DataError(path, "top level", 'expected {"data": [...]} as in SQuAD')
    out = []
    for i, article in enumerate(squad["data"]):
        for j, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise DataError(path, where, 'expected a paragraph with a string "context"')
            for q, qa in enumerate(paragraph.get("qas", [])):
                if not isinstance(qa, dict):
                    raise DataError(path, f"{where}.qas[{q}]", "expected a question object")
                answers = qa.get("answers")
                if isinstance(answers, list):  # SQuAD lists {"text", "answer_start"} objects
                    if not all(isinstance(a, dict) for a in answers):
                        raise DataError(path, f"{where}.qas[{q}]", 'expected "answers" as objects with "text" and "answer_start"')
                    answers = {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}
                record = {**qa, "context": paragraph["context"], "answers": answers}
                out.append(_qa_record(path, f"{where}.qas[{q}]", record, lang, default_id=f"{i}-{j}-{q}"))
    return out


def _qa_record(path, where: str, record: dict, lang: str | None, default_id: str) -> dict[str, Any]:
    context, question, answers = record.get("context"), record.get("question"), record.get("answers")
    if not isinstance(context, str) or not isinstance(question, str):
        raise DataError(path, where, 'expected string fields "context" and "question"')
    if not isinstance(answers, dict):
        raise DataError(path, where, 'expected "answers": {"text": [...], "answer_start": [...]}')
    texts, starts = answers.get("text"), answers.get("answer_start")
    texts = [texts] if isinstance(texts, str) else texts
    starts = [starts] if isinstance(starts, int) else starts
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        raise DataError(path, where, 'expected "answers" with as many "text" as "answer_start" entries')
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise DataError(path, where, "expected answer texts as strings and answer_start as integers")
        if context[start:start + len(text)] != text:
            raise DataError(path, where, f"answer {text!r} is not found at answer_start {start} of the context")
    return {"id": str(record.get("id", default_id)), "context": context, "question": question,
            "answers": {"text": texts, "answer_start": starts}, "lang": _lang(record, lang, path, where)}
