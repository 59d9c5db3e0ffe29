"""A stored result as a downloadable file: its data as JSON, or as CSV.

The data is what the script or function returned (for /query, the ``response`` of TabPy's
answer). As CSV, a list is one column, a table (an object of columns, or a list of records)
has its columns, and a scalar is one cell; a nested value in a cell is written as JSON.
Parsing happens in a thread (``asyncio.to_thread``): results can be large.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import orjson

VALUE = "value"  # the column of a list or of a scalar
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def result_data(body: bytes, kind_is_query: bool) -> Any:
    """The data in a worker's answer: the result, unwrapped from /query's envelope."""
    document = orjson.loads(body)
    if kind_is_query and isinstance(document, dict) and "response" in document:
        return document["response"]
    return document


def to_json(data: Any) -> bytes:
    return orjson.dumps(data)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return orjson.dumps(value).decode()
    return orjson.dumps(value).decode()  # nested: as JSON text


def rows_of(data: Any) -> tuple[list[str], list[list[Any]]]:
    """The header and rows ``data`` makes as a table."""
    if isinstance(data, dict):
        if data and all(isinstance(v, list) for v in data.values()):  # an object of columns
            columns = [str(k) for k in data]
            length = max(len(v) for v in data.values())
            return columns, [
                [v[i] if i < len(v) else None for v in data.values()] for i in range(length)
            ]
        return [str(k) for k in data], [list(data.values())]  # one record
    if isinstance(data, list):
        if data and all(isinstance(item, dict) for item in data):  # a list of records
            columns: dict[str, None] = {}
            for record in data:
                columns.update(dict.fromkeys(str(k) for k in record))
            names = list(columns)
            return names, [[record.get(name) for name in names] for record in data]
        return [VALUE], [[item] for item in data]
    return [VALUE], [[data]]


def to_csv(data: Any) -> bytes:
    header, rows = rows_of(data)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(value) for value in row])
    return out.getvalue().encode("utf-8")


def filename(endpoint: str | None, result_id: str, extension: str) -> str:
    """A safe ASCII file name: the endpoint's (or ``evaluate``) and the result's id."""
    stem = _UNSAFE.sub("_", endpoint or "evaluate").strip("._") or "result"
    return f"{stem}-{result_id}.{extension}"
