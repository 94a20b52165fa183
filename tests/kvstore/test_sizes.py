"""Byte sizes on the command line: binary and decimal suffixes, Kubernetes quantities, refusals."""
from __future__ import annotations

import pytest

from tandem.kvstore.sizes import format_bytes, parse_bytes


@pytest.mark.parametrize("text, wanted", [
    ("1048576", 1 << 20), ("4GiB", 4 << 30), ("16Gi", 16 << 30), ("512Mi", 512 << 20), ("512M", 512 * 10**6),
    ("2KiB", 2048), ("1k", 1000), ("1.5Gi", 3 << 29), ("256Gi", 256 << 30), ("10 GB", 10**10),
    ("9007199254740993", 9007199254740993),  # over 2**53: integers stay exact
])
def test_sizes_parse(text, wanted):
    assert parse_bytes(text) == wanted


@pytest.mark.parametrize("text", ["lots", "", "4 GiBs", "500m", "-1Gi", "1e9", "1ki", "Gi"])
def test_nonsense_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="not a byte size"):
        parse_bytes(text)


def test_format_bytes_for_messages():
    assert format_bytes(3 << 29) == "1.5 GiB (1610612736 bytes)"
    assert format_bytes(100) == "100 bytes"
