"""The stream's stop-string hold-back: exactly the longest suffix that could start a stop string."""
from __future__ import annotations

import random

import pytest

from tandem.server.serving_common import stop_holdback


def _reference(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@pytest.mark.parametrize("text, stops, held", [
    ("hello wor", ["world"], 3), ("hello world", ["world"], 0), ("abab", ["ababc"], 4), ("xab", ["abab"], 2),
    ("aaaa", ["aaa"], 2), ("end.", ["\n\n"], 0), ("end.\n", ["\n\n"], 1), ("", ["x"], 0), ("abc", [], 0),
    ("one two", ["two three", "o"], 3), ("one tw", ["two three", "w!"], 2), ("\U0001F600x", ["x\U0001F600y"], 1)])
def test_cases(text, stops, held):
    assert stop_holdback(text, stops) == held == _reference(text, stops)


def test_matches_brute_force_on_random_strings():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        assert stop_holdback(text, stops) == _reference(text, stops), (text, stops)
