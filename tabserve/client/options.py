"""Narrowing a list, as Tableau Server Client does: ``RequestOptions`` with ``Filter`` and
``Sort``, the keyword form ``resource.filter(**kw)`` (a ``QuerySet``), and ``Pager``.

They become the list routes' query parameters (``page_number``, ``page_size``, ``filter``,
``sort``; docs/api.md). A filter value may hold any character: ``,`` and ``|`` (which separate
clauses and ``in`` values) and ``\\`` are sent escaped with a backslash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from .items import PaginationItem

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Field(str, Enum):
    """Fields a list can be filtered and sorted on (each list route says which it has)."""

    Name = "name"
    Type = "type"
    Version = "version"
    Description = "description"
    Target = "target"
    IsPublic = "is_public"
    CreatedAt = "creation_time"
    LastModified = "last_modified_time"
    UpdatedAt = "last_modified_time"  # noqa: PIE796 - TSC's other name for it
    Permissions = "permissions"
    Status = "status"
    User = "user"
    Endpoint = "endpoint"


class Operator(str, Enum):
    Equals = "eq"
    NotEquals = "ne"
    GreaterThan = "gt"
    GreaterThanOrEqual = "gte"
    LessThan = "lt"
    LessThanOrEqual = "lte"
    In = "in"
    Has = "has"


class Direction(str, Enum):
    Asc = "asc"
    Desc = "desc"


def escape(text: str) -> str:
    """A value the server's filter parser reads back unchanged (``server.paging``)."""
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return str(int(value.timestamp()))  # the server keeps epoch seconds
    if isinstance(value, Enum):
        value = value.value
    return escape(str(value))


def _name(field: Field | str) -> str:
    return field.value if isinstance(field, Field) else str(field)


@dataclass(frozen=True)
class Filter:
    """``Filter(Field.Name, Operator.Equals, "add")``; with ``Operator.In``, a list of values."""

    field: Field | str
    operator: Operator | str
    value: Any

    def clause(self) -> str:
        operator = Operator(self.operator)
        if operator is Operator.In:
            values = [self.value] if isinstance(self.value, str) else list(self.value)
            text = "|".join(_value(v) for v in values)
        else:
            text = _value(self.value)
        return f"{_name(self.field)}:{operator.value}:{text}"


@dataclass(frozen=True)
class Sort:
    """``Sort(Field.LastModified, Direction.Desc)``."""

    field: Field | str
    direction: Direction | str = Direction.Asc

    def clause(self) -> str:
        return f"{_name(self.field)}:{Direction(self.direction).value}"


class Clauses(list[T]):
    """A list with TSC's ``add``: ``options.filter.add(Filter(...))``."""

    def add(self, clause: T) -> None:
        self.append(clause)


class RequestOptions:
    """One page of a list, narrowed: ``RequestOptions(pagenumber=1, pagesize=100)``."""

    Field = Field
    Operator = Operator
    Direction = Direction

    def __init__(self, pagenumber: int = 1, pagesize: int = 100) -> None:
        self.pagenumber = pagenumber
        self.pagesize = pagesize
        self.filter: Clauses[Filter] = Clauses()
        self.sort: Clauses[Sort] = Clauses()

    def page_number(self, number: int) -> RequestOptions:
        self.pagenumber = number
        return self

    def page_size(self, size: int) -> RequestOptions:
        self.pagesize = size
        return self

    def copy(self, pagenumber: int | None = None) -> RequestOptions:
        other = RequestOptions(self.pagenumber if pagenumber is None else pagenumber, self.pagesize)
        other.filter.extend(self.filter)
        other.sort.extend(self.sort)
        return other

    def parameters(self) -> dict[str, str]:
        """The query parameters of this page."""
        params = {"page_number": str(self.pagenumber), "page_size": str(self.pagesize)}
        if self.filter:
            params["filter"] = ",".join(f.clause() for f in self.filter)
        if self.sort:
            params["sort"] = ",".join(s.clause() for s in self.sort)
        return params

    def __repr__(self) -> str:
        return f"RequestOptions({self.parameters()})"


class Listable(Protocol[T_co]):
    """A resource with TSC's ``get(req_options) -> (items, pagination)``."""

    def get(
        self, req_options: RequestOptions | None = None
    ) -> tuple[list[T_co], PaginationItem]: ...


class Pager(Generic[T]):
    """Every item of a list, fetched one page at a time as iteration reaches it:
    ``for endpoint in Pager(server.endpoints): ...``. ``req_options`` gives the page size,
    filters and sorts; paging starts at its page number."""

    def __init__(
        self,
        resource: Listable[T] | Callable[[RequestOptions], tuple[list[T], PaginationItem]],
        req_options: RequestOptions | None = None,
    ) -> None:
        self._get = resource if callable(resource) else resource.get
        self._options = req_options or RequestOptions()

    def __iter__(self) -> Iterator[T]:
        number = self._options.pagenumber
        seen = (number - 1) * self._options.pagesize
        while True:
            items, pagination = self._get(self._options.copy(pagenumber=number))
            yield from items
            seen += len(items)
            # An empty page ends it too, should the list shrink while it is being read.
            if not items or seen >= pagination.total_available:
                return
            number += 1


_SUFFIXES = {operator.value: operator for operator in Operator}
# Keyword names for fields: TSC's (snake case of the Field member) or the server's own.
_KEYWORDS = {
    **{"".join("_" + c.lower() if c.isupper() else c for c in m).lstrip("_"): f.value
       for m, f in Field.__members__.items()},
    **{f.value: f.value for f in Field},
}  # fmt: skip


class QuerySet(Generic[T]):
    """The keyword form: ``server.endpoints.filter(type="model", name__has="add")``, ordered
    with ``.order_by("-last_modified")``; iterating it pages through every match."""

    def __init__(self, resource: Listable[T], options: RequestOptions | None = None) -> None:
        self._resource = resource
        self._options = options or RequestOptions()

    def filter(self, **conditions: Any) -> QuerySet[T]:
        """``field=value`` (equals) or ``field__op=value``, op one of eq, ne, gt, gte, lt,
        lte, in, has."""
        options = self._options.copy()
        for key, value in conditions.items():
            name, _, suffix = key.partition("__")
            operator = _SUFFIXES.get(suffix or "eq")
            if operator is None:
                raise ValueError(f"{key}: unknown operator {suffix!r} (one of {list(_SUFFIXES)})")
            options.filter.add(Filter(_KEYWORDS.get(name, name), operator, value))
        return QuerySet(self._resource, options)

    def order_by(self, *fields: str) -> QuerySet[T]:
        """``"name"`` ascending, ``"-name"`` descending; the first is the main key."""
        options = self._options.copy()
        for text in fields:
            name = text.lstrip("-")
            direction = Direction.Desc if text.startswith("-") else Direction.Asc
            options.sort.add(Sort(_KEYWORDS.get(name, name), direction))
        return QuerySet(self._resource, options)

    def page_size(self, size: int) -> QuerySet[T]:
        return QuerySet(self._resource, self._options.copy().page_size(size))

    def __iter__(self) -> Iterator[T]:
        return iter(Pager(self._resource, self._options))

    def __len__(self) -> int:
        _, pagination = self._resource.get(self._options.copy(pagenumber=1).page_size(1))
        return pagination.total_available

    def __getitem__(self, index: int) -> T:
        if not isinstance(index, int) or index < 0:
            raise TypeError("a QuerySet takes a non-negative int index")
        items, _ = self._resource.get(self._options.copy(pagenumber=index + 1).page_size(1))
        if not items:
            raise IndexError(index)
        return items[0]

    def __repr__(self) -> str:
        return f"QuerySet({self._options.parameters()})"
