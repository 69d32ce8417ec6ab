"""How errors quote what a user typed: never the whole of a 30,000-character input."""

from __future__ import annotations


def quoted(value, limit: int = 60) -> str:
    """repr(value), shortened to about `limit` characters with its full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"
