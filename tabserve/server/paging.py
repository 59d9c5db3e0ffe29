r"""Paging, filtering and sorting of the list routes (``/endpoints``, ``/jobs``, ``/keys``,
``/users``), from query parameters in the manner of Tableau Server's REST API.

``page_number`` (1-based), ``page_size`` (1..1000), ``filter=field:op:value`` (several joined
by ``,``) and ``sort=field:asc|desc`` (several joined by ``,``). A list route declares which
fields may be filtered and sorted, and their types; anything else is a 400 that names the
allowed fields, so a typo never silently returns the whole list.

A filter value may hold any character: a backslash makes the next character literal, so
``name:eq:a\,b`` matches the name ``a,b`` (``\|`` is a literal ``|`` in an ``in`` list, ``\\``
a backslash). The ``filter`` and ``sort`` parameters may also be repeated, each holding one or
more clauses: ``?filter=type:eq:model&filter=name:has:add``.

Pure functions on lists of dicts: the lists are small (endpoints, a caller's jobs, keys, users)
and already in memory, and keeping SQL out of it lets every store backend page the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tabserve.errors import BadRequest

PARAMETERS = ("page_number", "page_size", "filter", "sort")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# Operators as Tableau Server's REST API spells them; ``in`` takes values joined by "|".
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda have, want: have == want,
    "ne": lambda have, want: have != want,
    "gt": lambda have, want: have is not None and have > want,
    "gte": lambda have, want: have is not None and have >= want,
    "lt": lambda have, want: have is not None and have < want,
    "lte": lambda have, want: have is not None and have <= want,
    "in": lambda have, want: have in want,
    "has": lambda have, want: have is not None and str(want).lower() in str(have).lower(),
}


@dataclass(frozen=True)
class Pagination:
    page_number: int
    page_size: int
    total_available: int

    def as_json(self) -> dict[str, int]:
        return {
            "page_number": self.page_number,
            "page_size": self.page_size,
            "total_available": self.total_available,
        }


def asked(query: Mapping[str, Any]) -> bool:
    """Whether the caller asked for paging, filtering or sorting at all: without any of
    these, ``/endpoints`` keeps TabPy's answer byte for byte."""
    return any(name in query for name in PARAMETERS)


def paginate(
    items: Sequence[Mapping[str, Any]],
    query: Mapping[str, str],
    fields: Mapping[str, type],
) -> tuple[list[Mapping[str, Any]], Pagination]:
    """The page of ``items`` that ``query`` asks for, after its filters and sorts.

    ``fields`` maps each filterable and sortable field to its type (``str``, ``int``,
    ``float`` or ``bool``); filter values are converted to it, so ``version:gt:2`` compares
    numbers. Items keep their order unless a sort is given.
    """
    number = _integer(query, "page_number", 1, low=1, high=None)
    size = _integer(query, "page_size", DEFAULT_PAGE_SIZE, low=1, high=MAX_PAGE_SIZE)
    selected = list(items)
    for field, check, want in _filters(query.get("filter"), fields):
        selected = [item for item in selected if check(item.get(field), want)]
    # Stable sorts applied last key first give a multi-key sort; None sorts before values.
    for field, descending in reversed(_sorts(query.get("sort"), fields)):
        selected.sort(key=lambda item: _sort_key(item.get(field)), reverse=descending)
    start = (number - 1) * size
    return selected[start : start + size], Pagination(number, size, len(selected))


def _integer(query: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise BadRequest(f"{name} must be a whole number {bound}", {"given": raw})
    return value


def _field(name: str, fields: Mapping[str, type], parameter: str) -> type:
    if name not in fields:
        raise BadRequest(
            f"{parameter}: unknown field {name!r}", {"fields": sorted(fields), "given": name}
        )
    return fields[name]


def _convert(raw: str, kind: type, field: str) -> Any:
    if kind is bool:
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise BadRequest(f"filter: {field} takes true or false", {"given": raw})
    try:
        return kind(raw)
    except ValueError:
        raise BadRequest(f"filter: {field} takes a {kind.__name__}", {"given": raw}) from None


def _filters(
    raw: str | None, fields: Mapping[str, type]
) -> list[tuple[str, Callable[[Any, Any], bool], Any]]:
    if not raw:
        return []
    parsed = []
    for clause in split_escaped(raw, ","):
        parts = clause.split(":", 2)
        if len(parts) != 3:
            raise BadRequest("filter takes field:operator:value", {"given": unescape(clause)})
        field, operator, value = parts
        field, operator = unescape(field), unescape(operator)
        kind = _field(field, fields, "filter")
        if operator not in _OPERATORS:
            raise BadRequest(
                f"filter: unknown operator {operator!r}",
                {"operators": list(_OPERATORS), "given": operator},
            )
        if operator == "in":
            want: Any = {_convert(unescape(v), kind, field) for v in split_escaped(value, "|")}
        elif operator == "has":
            want = unescape(value)
        else:
            want = _convert(unescape(value), kind, field)
        parsed.append((field, _OPERATORS[operator], want))
    return parsed


def split_escaped(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` not preceded by a backslash; the pieces keep their
    escapes (``unescape`` removes them once a piece is cut to the end)."""
    pieces: list[str] = []
    start = index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # the escaped character is never a separator
            continue
        if char == separator:
            pieces.append(text[start:index])
            start = index + 1
        index += 1
    pieces.append(text[start:])
    return pieces


def unescape(text: str) -> str:
    """Drop each escaping backslash; a lone backslash at the end stays as it is."""
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def _sorts(raw: str | None, fields: Mapping[str, type]) -> list[tuple[str, bool]]:
    if not raw:
        return []
    parsed = []
    for clause in split_escaped(raw, ","):
        clause = unescape(clause)
        field, _, direction = clause.partition(":")
        _field(field, fields, "sort")
        if direction.lower() not in ("", "asc", "desc"):
            raise BadRequest("sort takes field:asc or field:desc", {"given": clause})
        parsed.append((field, direction.lower() == "desc"))
    return parsed


def _sort_key(value: Any) -> tuple[bool, Any]:
    return (value is not None, value if value is not None else 0)
