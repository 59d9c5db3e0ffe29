"""Request bodies in, JSON results out: worker/bodies.py (the worker side of HTTP bodies)."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from tabserve.errors import BadRequest, PayloadTooLarge, ScriptError, UnsupportedEncoding
from tabserve.worker.bodies import EvaluateRequest, check_result_length, decode_body, encode_result


def test_evaluate_request_arg_names_are_ordered_numerically() -> None:
    data = {f"_arg{i}": i for i in range(1, 12)}
    request = EvaluateRequest.parse({"script": "", "data": data})
    assert request.arg_names[:3] == ("_arg1", "_arg2", "_arg3")
    assert request.arg_names[-1] == "_arg11"


def test_empty_data_is_valid() -> None:
    assert EvaluateRequest.parse({"script": "return 1", "data": {}}).arg_names == ()


@pytest.mark.parametrize("data", [{"_arg2": 1}, {"_arg1": 1, "x": 2}, {"_arg01": 1}])
def test_bad_arg_names(data: dict[str, int]) -> None:
    with pytest.raises(BadRequest):
        EvaluateRequest.parse({"script": "", "data": data})


def test_decode_body_limits_decompressed_size() -> None:
    payload = gzip.compress(b"x" * 1000)
    assert decode_body(payload, "gzip", 1000, True) == b"x" * 1000
    with pytest.raises(PayloadTooLarge):
        decode_body(payload, "gzip", 999, True)
    with pytest.raises(UnsupportedEncoding):
        decode_body(payload, "gzip", 1000, False)
    with pytest.raises(UnsupportedEncoding):
        decode_body(payload, "br", 1000, True)


def test_encode_result_types() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": [0.5, np.nan], "c": ["x", None]})
    assert encode_result(frame) == b'{"a":[1,2],"b":[0.5,null],"c":["x",null]}'
    assert encode_result(pd.Series([1.0, np.inf])) == b"[1.0,null]"
    assert encode_result(np.array([[1, 2]])) == b"[[1,2]]"
    assert encode_result(pd.array([1, None], dtype="Int64")) == b"[1,null]"
    with pytest.raises(ScriptError):
        encode_result(object())


def test_result_length_rule() -> None:
    data = {"_arg1": [1, 2, 3], "_arg2": [4, 5, 6]}
    check_result_length(data, [1])
    check_result_length(data, np.array([1, 2, 3]))
    check_result_length(data, 7)
    check_result_length({"_arg1": {"col": [1, 2]}}, [1, 2, 3])  # table extension: no rule
    check_result_length({"_arg1": [1, 2], "_arg2": [1]}, [1, 2, 3])  # ragged: no rule
    with pytest.raises(ScriptError) as caught:
        check_result_length(data, pd.Series([1, 2]))
    assert "2 values" in str(caught.value.info) and "3 rows" in str(caught.value.info)
