"""Token weights for frequency-aware fitting: how often each vocabulary row's token occurs in text.

Sources: `"wordfreq"` or `"wordfreq:en,de"` (the `wordfreq` package's frequency lists, for the given
languages; sub-word markers such as "##", "▁" and "Ġ" are stripped before the look-up), or the path of
a counts file (`token<TAB>count` per line, or a JSON object {token: count}). Every token also gets a
small floor, so that no row is ignored outright.

`token_ranking` orders the vocabulary by how often each token occurs in running text, for the rows an
ASG table keeps apart (`ASGConfig(keep=N)`, `frequent_tokens`): wordfreq's most common words are
tokenized as they occur in text (after a space, at the start, capitalised), so that sub-word pieces count
too; punctuation and numbers get a share; the special tokens texts are made with (the named ones: beginning
and end of text, separator, padding, ...; and those the tokenizer's chat template writes) come first.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FLOOR = 1e-7  # the weight of a token never seen: about one occurrence in ten million words
_MARKERS = ("##", "▁", "Ġ", "Ċ")
WORDS = 50_000  # the most common words of each language that `token_ranking` tokenizes
#: how a word occurs in text: after a space, at the start of a text, capitalised after a space; and shares
_FORMS = ((" {}", 0.8), ("{}", 0.1), (" {}", 0.1))
UNSPACED = ("zh", "ja")  #: languages written without spaces between words: a word occurs as it is
#: the special tokens that texts are made with, ranked first with those a chat template writes; a tokenizer's
#: other special tokens (reserved and control tokens, hundreds in some vocabularies) rank by frequency like any
_TEXT_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PUNCTUATION_SHARE = 0.05  # of the most frequent word's frequency, for each ASCII punctuation mark
NUMBER_SHARE = 0.001  # for each of the numbers 0..99


def token_weights(source: str, tokenizer, vocab_size: int, *, floor: float = FLOOR) -> np.ndarray:
    """Weights (V,) for the tokenizer's vocabulary, from a frequency source (see the module docstring)."""
    if tokenizer is None:
        raise ValueError(f"weights={source!r} needs the model's tokenizer: asg.compress(model, config, tokenizer=tok)")
    if _is_wordfreq(source):
        freqs = _wordfreq(tokenizer, vocab_size, _langs(source))
    else:
        freqs = _counts_file(Path(source), tokenizer, vocab_size)
    return freqs + floor


def _is_wordfreq(source: str) -> bool:
    return source == "wordfreq" or source.startswith("wordfreq:")


def _langs(source: str) -> list[str]:
    """The languages of "wordfreq:LANG[,LANG]" (English for plain "wordfreq"); ValueError for one wordfreq lacks."""
    langs = [lang.strip() for lang in source.partition(":")[2].split(",") if lang.strip()] or ["en"]
    try:
        import wordfreq
    except ImportError:
        raise ValueError(f"{source!r} needs the wordfreq package: pip install wordfreq (or pip install 'asg[freq]')") from None
    known = wordfreq.available_languages("best")
    unknown = [lang for lang in langs if lang not in known]
    if unknown:
        raise ValueError(f"{source!r}: wordfreq has no word list for {', '.join(map(repr, unknown))}; "
                         f"give languages from: {', '.join(sorted(known))}")
    return langs


def _frequency_of(lang: str):
    """word -> its frequency in `lang`: wordfreq.word_frequency, or where that needs a segmenter that is not
    installed (jieba for Chinese, MeCab for Japanese and Korean), the word list's own entry for the word."""
    import wordfreq

    try:
        wordfreq.word_frequency("a", lang)
    except ImportError:
        table = wordfreq.get_frequency_dict(lang)
        return lambda word: table.get(word.casefold(), 0.0)
    return lambda word: wordfreq.word_frequency(word, lang)


def _rounded(frequency: float) -> float:
    """To three significant digits, as wordfreq.word_frequency gives it."""
    return round(frequency, math.floor(-math.log(frequency, 10)) + 3) if frequency > 0 else 0.0


def _vocabulary(tokenizer, vocab_size: int) -> list[str | None]:
    tokens: list[str | None] = [None] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if 0 <= index < vocab_size:
            tokens[index] = token
    return tokens


def _wordfreq(tokenizer, vocab_size: int, langs: list[str]) -> np.ndarray:
    special = set(getattr(tokenizer, "all_special_tokens", []))
    lookups = [_frequency_of(lang) for lang in langs]
    freqs = np.zeros(vocab_size)
    for index, token in enumerate(_vocabulary(tokenizer, vocab_size)):
        if token is None or token in special:
            continue
        word = token
        for marker in _MARKERS:
            word = word.replace(marker, "")
        if word:
            freqs[index] = sum(frequency(word) for frequency in lookups) / len(langs)
    return freqs


def _counts_file(path: Path, tokenizer, vocab_size: int) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"weights: {path} does not exist; give 'wordfreq', 'wordfreq:LANG' or a counts file "
                         "(token<TAB>count per line, or a JSON object)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            counts = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    else:
        counts = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            token, sep, count = line.rstrip("\n").rpartition("\t")
            try:
                counts[token] = float(count)
            except ValueError:
                raise ValueError(f"{path}, line {number}: expected TOKEN<TAB>COUNT, got {line!r}") from None
            if not sep:
                raise ValueError(f"{path}, line {number}: expected TOKEN<TAB>COUNT, got {line!r}")
    index = tokenizer.get_vocab()
    freqs = np.zeros(vocab_size)
    for token, count in counts.items():
        if not isinstance(count, (int, float)) or count < 0:
            raise ValueError(f"{path}: the count of {token!r} must be a non-negative number, got {count!r}")
        if token in index and index[token] < vocab_size:
            freqs[index[token]] += count
    total = freqs.sum()
    if total <= 0:
        raise ValueError(f"{path}: none of its tokens is in the model's vocabulary")
    return freqs / total


def frequent_tokens(source: str, tokenizer, vocab_size: int, count: int) -> np.ndarray:
    """The ids (sorted, int64) of the `count` tokens that occur most often in text (see `token_ranking`)."""
    if not 0 <= count <= vocab_size:
        raise ValueError(f"keep={count} must lie in 0..{vocab_size}, the vocabulary size")
    return np.sort(token_ranking(source, tokenizer, vocab_size)[:count])


def token_ranking(source: str, tokenizer, vocab_size: int) -> np.ndarray:
    """Every token id (int64), most frequent in text first: special tokens, then by frequency from
    `source` ("wordfreq", "wordfreq:LANG[,LANG]" or a counts file), then the unseen ones in id order."""
    if tokenizer is None:
        raise ValueError("keep needs the model's tokenizer to rank its tokens by frequency: "
                         "asg.compress(model, config, tokenizer=tok)")
    if _is_wordfreq(source):
        freqs = _running_text(tokenizer, vocab_size, _langs(source))
    else:
        freqs = _counts_file(Path(source), tokenizer, vocab_size)
    special = [i for i in _text_specials(tokenizer) if 0 <= i < vocab_size]
    freqs[special] = freqs.max() * 10 + 1
    return np.argsort(-freqs, kind="stable").astype(np.int64)  # ties in id order: the choice is repeatable


def _text_specials(tokenizer) -> set[int]:
    """Ids of the special tokens texts are made with: the named ones (`_TEXT_SPECIALS`), and those the tokenizer's
    chat template writes around the turns of a conversation (such as <|im_start|>)."""
    ids = {i for name in _TEXT_SPECIALS if isinstance(i := getattr(tokenizer, f"{name}_id", None), int)}
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
        try:
            written = tokenizer.apply_chat_template(turns, tokenize=True)
        except Exception:  # noqa: BLE001 - a template may need other roles or arguments: the named ones only
            return ids
        written = written["input_ids"] if isinstance(written, Mapping) else written
        ids |= set(written) & _special_ids(tokenizer)
    return ids


def _special_ids(tokenizer) -> set[int]:
    """Every special token's id: those the tokenizer names, and the added tokens marked special. A tokenizer read
    from a GGUF file (Qwen2.5's) marks its turn markers special without naming them in `all_special_ids`."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(getattr(tokenizer, "all_special_ids", [])) | {i for i, t in added.items() if getattr(t, "special", False)}


def _running_text(tokenizer, vocab_size: int, langs: list[str]) -> np.ndarray:
    """Token frequencies (V,) from wordfreq's common words as the tokenizer splits them in text."""
    import wordfreq  # there: _langs has checked

    freqs = np.zeros(vocab_size)

    def add(texts: list[str], weights: list[float]) -> None:  # one batched tokenizer call for all the texts
        for ids, weight in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], weights):
            np.add.at(freqs, [i for i in ids if 0 <= i < vocab_size], weight)

    texts, weights = [], []
    for lang in langs:
        # the word list's own frequencies (no segmenter needed), rounded as earlier versions read them
        table = wordfreq.get_frequency_dict(lang)
        for word in wordfreq.top_n_list(lang, WORDS):
            frequency = _rounded(table[word]) / len(langs)
            forms = zip(_FORMS, (word, word, word.capitalize())) if lang not in UNSPACED else [(("{}", 1.0), word)]
            for (form, share), text in forms:
                texts.append(form.format(text))
                weights.append(frequency * share)
    add(texts, weights)
    top = freqs.max() if freqs.max() > 0 else 1.0
    marks = [text for mark in string.punctuation for text in (mark, " " + mark)]
    add(marks, [top * PUNCTUATION_SHARE / 2] * len(marks))
    add([f" {number}" for number in range(100)], [top * NUMBER_SHARE] * 100)
    return freqs
