"""Wire formats: request bodies in, JSON results out. Runs inside workers, off the event loop.

Results are encoded with orjson, which understands numpy and datetimes natively; the
fallback below covers pandas objects, Decimal and sets. NaN and ±Inf become ``null``.
The output is compact JSON (``[1,2]``), where TabPy writes ``[1, 2]``: both parse the same,
and compact encoding is what makes large results fast.
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
from pandas.api.extensions import ExtensionArray

from ..errors import BadRequest, PayloadTooLarge, ScriptError, UnsupportedEncoding

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_ARG_NAME = re.compile(r"_arg([1-9][0-9]*)")


def decode_body(payload: bytes, encoding: str | None, limit: int, gzip_enabled: bool) -> bytes:
    """Undo ``Content-Encoding``; a decompressed body over ``limit`` is a 413 (gzip bomb)."""
    if not encoding or encoding == "identity":
        return payload
    if encoding != "gzip":
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; use gzip")
    if not gzip_enabled:
        raise UnsupportedEncoding(
            "gzip request bodies are disabled on this server (TABPY_GZIP_ENABLE = false)"
        )
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise BadRequest("Request body is not valid gzip data", str(exc)) from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge.for_size("over the limit after decompression", limit)
    return body


def parse_json(body: bytes) -> Any:
    # isspace() stops at the first other byte, where strip() would copy a large body.
    if not body or body.isspace():
        raise BadRequest("Request body is empty: expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        error = str(exc)
    try:
        # Python clients (TabPy's among them) send NaN and Infinity as bare tokens, which
        # TabPy accepted; only the slower parser knows them, and only failures reach it.
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("Request body is not valid JSON", error) from None


@dataclass(frozen=True)
class EvaluateRequest:
    """A parsed ``POST /evaluate`` body."""

    script: str
    data: dict[str, Any]

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(f"_arg{i}" for i in range(1, len(self.data) + 1))

    @classmethod
    def parse(cls, body: Any) -> EvaluateRequest:
        if not isinstance(body, dict):
            raise BadRequest(
                "Request body must be a JSON object with 'script' and 'data'",
                f"got a JSON {_json_type(body)}",
            )
        if "script" not in body:
            raise BadRequest("Script is empty.")
        script = body["script"]
        if not isinstance(script, str):
            raise BadRequest("'script' must be a string", f"got a JSON {_json_type(script)}")
        if "data" not in body or body["data"] is None:
            raise BadRequest(
                "'data' is required: an object with keys _arg1, _arg2, ... _argN (or {})"
            )
        data = body["data"]
        if not isinstance(data, dict):
            raise BadRequest("Script parameters need to be provided as a dictionary.")
        numbers = sorted(int(m.group(1)) for k in data if (m := _ARG_NAME.fullmatch(k)))
        if len(numbers) != len(data) or numbers != list(range(1, len(data) + 1)):
            raise BadRequest("Variables names should follow the format _arg1, _arg2, _argN")
        return cls(script, data)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def check_result_length(data: Mapping[str, Any], result: Any) -> None:
    """Tableau wants 1 value or one per row; say so before Tableau fails obscurely."""
    if not data or not isinstance(result, list | tuple | np.ndarray | pd.Series | ExtensionArray):
        return
    if isinstance(result, np.ndarray) and result.ndim != 1:
        return
    columns = list(data.values())
    if not all(isinstance(column, list) for column in columns):
        return
    rows = len(columns[0])
    if any(len(column) != rows for column in columns):
        return
    if len(result) not in (1, rows):
        raise ScriptError(
            info=f"The script returned {len(result)} values, but the arguments have {rows} rows:"
            f" Tableau expects either 1 value or {rows}."
        )


def count_rows(value: Any) -> int | None:
    """Rows in a result, for metrics: its length when it has one, 1 for a scalar.

    None when counting would cost more than a ``len`` (a dict or an arbitrary object).
    """
    if isinstance(value, list | tuple | pd.Series | pd.DataFrame | ExtensionArray):
        return len(value)
    if isinstance(value, np.ndarray):
        return int(value.shape[0]) if value.ndim else 1
    if value is None:
        return 0
    if isinstance(value, str | bytes | int | float | bool | np.generic):
        return 1
    return None


def _fallback(value: Any) -> Any:
    """Turn what orjson cannot encode natively into something it can."""
    if isinstance(value, pd.DataFrame):
        return {str(name): value[name] for name in value.columns}
    if isinstance(value, pd.Series | pd.Index | ExtensionArray):
        if isinstance(value.dtype, np.dtype):
            array = value.to_numpy()  # orjson writes numeric numpy arrays without a Python loop
            return array if array.dtype != object else array.tolist()
        # Nullable extension types (Int64, string, boolean): NA becomes None, ints stay ints.
        return value.to_numpy(dtype=object, na_value=None).tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_result(value: Any) -> bytes:
    """JSON for a script or model result; unencodable values are a script error."""
    try:
        return orjson.dumps(value, default=_fallback, option=_JSON_OPTIONS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ScriptError(info=f"TypeError : {exc}") from None
