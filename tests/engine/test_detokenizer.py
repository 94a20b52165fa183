"""IncrementalDetokenizer over SmolLM2's byte-level BPE tokenizer, and find_stop."""
from __future__ import annotations

import pytest

from tandem.tokenizer import IncrementalDetokenizer, find_stop, load_tokenizer

TEXTS = [
    "Hello 👋 world! 🌍🚀 done.",
    "日本語のテキストと中文测试，还有한국어.",
    "Café naïve résumé — façade, jalapeño; Ærøskøbing.",
    "mixed\n\n  😀 emoji\tand 中文 text \n end ",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 1️⃣ keycap",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫√ and ① ② ③",
    " leading space, trailing newline\n",
    "Ελληνικά και Русский текст, עברית",
]


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return load_tokenizer(smollm_dir)


def _stream(tok, ids, prompt=(), **kw):
    detok = IncrementalDetokenizer(tok, list(prompt), **kw)
    deltas = [detok.add(t) for t in ids]
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_without_replacement_chars(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([t]) for t in ids]
    prompt = tok.encode("Question: say something.\nAnswer:", add_special_tokens=False)
    for p in ((), prompt):
        detok, deltas = _stream(tok, ids, p)
        assert not any("\ufffd" in d for d in deltas), deltas
        assert "".join(deltas) == tok.decode(ids) == text
        assert detok.text == text
    if "👋" in text or "日本" in text:  # the test is only meaningful if characters are split
        assert any("\ufffd" in p for p in pieces)


def test_long_text_crosses_the_window_trim(tok):
    text = " ".join(TEXTS) * 4  # several hundred tokens: the decode window is trimmed many times
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 300
    detok, deltas = _stream(tok, ids, tok.encode("prompt", add_special_tokens=False))
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text
    assert len(detok.ids) < 100  # the window stays small


def test_split_character_is_withheld_until_complete(tok):
    ids = tok.encode("a🌍", add_special_tokens=False)
    assert len(ids) >= 3  # "a" + the emoji's 4 bytes split over tokens
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[0]) == "a"
    for t in ids[1:-1]:
        assert detok.add(t) == ""
    assert detok.add(ids[-1]) == "🌍"


def test_skip_special_tokens(tok):
    text = "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\nYo<|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    special = set(tok.all_special_ids)
    assert sum(t in special for t in ids) == 4
    _, skipped = _stream(tok, ids, skip_special_tokens=True)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True) == "user\nHi 😀\nassistant\nYo"
    assert all(d == "" for t, d in zip(ids, skipped) if t in special)
    _, kept = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(kept) == tok.decode(ids, skip_special_tokens=False) == text
    assert not any("\ufffd" in d for d in kept + skipped)


def test_prompt_is_not_part_of_the_text(tok):
    prompt = tok.encode("The prompt text 中文", add_special_tokens=False)
    ids = tok.encode(" and the answer", add_special_tokens=False)
    detok, deltas = _stream(tok, ids, prompt)
    assert detok.text == " and the answer" and deltas[0] == " and"


# ---- find_stop ----------------------------------------------------------------------------------


def test_find_stop_spanning_two_deltas():
    # "Hello wor" was checked last step; the new delta "ld" completes "world"
    assert find_stop("Hello world", 2, ["world"]) == (6, "world")
    assert find_stop("Hello wor", 3, ["world"]) is None


def test_find_stop_only_reports_stops_ending_in_the_new_delta():
    assert find_stop("world. Hello", 6, ["world"]) is None  # reported on an earlier step
    assert find_stop("abcd", 1, ["bc"]) is None  # ends right before the delta
    assert find_stop("abcX", 1, ["bcX"]) == (1, "bcX")  # ends on the delta's first char
    assert find_stop("abcdef", 3, ["cd"]) == (2, "cd")  # starts before, ends inside
    assert find_stop("", 0, ["x"]) is None


def test_find_stop_earliest_occurrence_wins():
    assert find_stop("xx STOP and END", 15, ["END", "STOP"]) == (3, "STOP")
    assert find_stop("a.b.c.", 6, ["."]) == (1, ".")
    assert find_stop("abcdef", 3, ["de", "cdef"]) == (2, "cdef")
    assert find_stop("one two", 4, ["three", "four"]) is None


def test_find_stop_multibyte():
    text = "answer: 日本語です🌍!"
    i = text.index("語")
    assert find_stop(text, 4, ["語です🌍"]) == (i, "語です🌍")
    assert find_stop(text, 1, ["🌍!"]) == (text.index("🌍"), "🌍!")
