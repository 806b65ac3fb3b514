"""Argument checks, in one place: the CLI's parser and the library's entry points (which notebooks call directly)
both use these, so a bad count or choice is refused with the same words wherever it comes in. A name is the
option as the CLI spells it (`--batch-size`); the API's keyword is the same word with underscores."""
from __future__ import annotations

from collections.abc import Iterable

from compute.errors import AtlasError


def below(value: int, low: int) -> str | None:
    """Why `value` is refused as a count of at least `low`, or None."""
    return f"must be at least {low}, got {value}" if value < low else None


def at_least(low: int, **values: int | None) -> None:
    """Each keyword's value (None: not given) is a whole number no smaller than `low`; else AtlasError naming it."""
    for name, value in values.items():
        why = None if value is None else below(value, low)
        if why:
            raise AtlasError(f"--{name.replace('_', '-')} {why}")


def one_of(name: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise AtlasError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def not_negative(**values: int | None) -> None:
    """An API count (k, limit): 0 or more; the message names the keyword as the notebook wrote it."""
    for name, value in values.items():
        if value is not None and value < 0:
            raise AtlasError(f"{name} must be 0 or more, got {value}")
