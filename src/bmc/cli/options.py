"""Option spellings more than one command shares."""

from __future__ import annotations


def name_list(text: str, flag: str) -> tuple[str, ...] | None:
    """'a,b' -> ("a", "b"); 'all' -> None (every one there is)."""
    from bmc.errors import UsageError

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise UsageError(f"{flag} expects a name, a comma-separated list or all; got {text!r}")
    if "all" in names:
        if len(names) > 1:
            raise UsageError(f"{flag} all stands alone; got {text!r}")
        return None
    return names
