"""Byte sizes as people and Kubernetes write them: `4GiB`, `16Gi`, `512M`, `1.5T`, `1048576`.

Binary suffixes (Ki, Mi, Gi, Ti, Pi, Ei) are powers of 1024, decimal ones (K or k, M, G, T, P, E)
powers of 1000, an optional trailing `B` is ignored. Kubernetes' milli suffix (`m`) is refused:
a fraction of a byte is never what a capacity means.
"""
from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[kKMGTPE]i?)?B?")


def parse_bytes(text: str | int) -> int:
    """The number of bytes `text` names; ValueError naming the text when it is not a size."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text.strip())
    if not match or match["unit"] == "ki":
        raise ValueError(f"not a byte size: {text!r} (e.g. 1073741824, 512Mi, 4GiB, 16G)")
    number, scale = match["number"], _UNITS[match["unit"] or ""]
    # integers stay exact (a float would round sizes over 2**53); fractions round down to a byte
    return int(number) * scale if "." not in number else int(float(number) * scale)


def positive_bytes(text: str) -> int:
    """argparse type: a byte size over zero."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be over 0 bytes: {text!r}")
    return value


def format_bytes(n: int) -> str:
    """`n` in the largest binary unit that keeps one decimal place meaningful (for messages)."""
    for unit in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[:2]]
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"
