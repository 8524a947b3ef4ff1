"""Log sequence numbers, written everywhere as Postgres writes them (``16/B374D848``)."""

from __future__ import annotations

__all__ = ["format_lsn", "parse_lsn"]


def format_lsn(lsn: int) -> str:
    """64-bit LSN -> ``"X/Y"`` (upper and lower 32 bits in hex, as ``pg_lsn`` prints)."""
    if lsn < 0 or lsn >= 1 << 64:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """``"X/Y"`` -> 64-bit LSN; a clear ValueError for anything else."""
    hi, sep, lo = text.strip().partition("/")
    try:
        if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
            raise ValueError
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise ValueError(f"not an LSN: {text!r} (expected the form 16/B374D848)") from None
