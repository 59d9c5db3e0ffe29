"""POST /evaluate over HTTP: TabPy's semantics, and the deliberate fixes.

Scripts run in a real server's workers; limits, encodings and envelopes are checked against
the app in process."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess

import pytest
import requests

from helpers import AppFactory, InProcessServer, Server, ServerFactory


def test_readme_curl_example_prints_3(server: Server) -> None:
    out = subprocess.run(
        [
            "curl", "-s", "-X", "POST", f"{server.url}/evaluate",
            "-d", '{"data": {"_arg1": 1, "_arg2": 2}, "script": "return _arg1+_arg2"}',
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout == "3"


def test_zip_sum_of_lists(server: Server) -> None:
    response = server.evaluate(
        "return [x + y for x, y in zip(_arg1, _arg2)]", _arg1=[1, 2.5], _arg2=[41, 0.6415926]
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == [42, 3.1415926]


@pytest.mark.parametrize("script", ["return None", "x = 1"])
def test_none_and_missing_return_are_null(server: Server, script: str) -> None:
    response = server.evaluate(script)
    assert response.status_code == 200
    assert response.text == "null"


def test_nan_and_infinity_become_null(server: Server) -> None:
    response = server.evaluate("return [1.0, float('nan'), float('inf'), -float('inf'), 2.0]")
    assert response.json() == [1.0, None, None, None, 2.0]


def test_numpy_and_pandas_results_serialise(server: Server) -> None:
    script = (
        "import numpy as np, pandas as pd, datetime, decimal\n"
        "return {\n"
        "  'int64': np.int64(3), 'bool': np.bool_(True), 'array': np.array([1.5, np.nan]),\n"
        "  'series': pd.Series([1, 2]), 'strings': pd.Series(['a', None]),\n"
        "  'dt': datetime.datetime(2024, 1, 2, 3, 4, 5), 'date': datetime.date(2024, 1, 2),\n"
        "  'ts': pd.Timestamp('2024-01-02 03:04:05'),\n"
        "  'tz': pd.Timestamp('2024-01-02 03:04', tz='US/Eastern'),\n"
        "  'decimal': decimal.Decimal('1.25'), 'tuple': (1, 2), 'set': {7},\n"
        "  'nat': pd.NaT,\n"
        "}"
    )  # fmt: skip
    response = server.evaluate(script)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "int64": 3,
        "bool": True,
        "array": [1.5, None],
        "series": [1, 2],
        "strings": ["a", None],
        "dt": "2024-01-02T03:04:05",
        "date": "2024-01-02",
        "ts": "2024-01-02T03:04:05",
        "tz": "2024-01-02T03:04:00-05:00",  # no time-zone shift
        "decimal": 1.25,
        "tuple": [1, 2],
        "set": [7],
        "nat": None,
    }


def test_dataframe_becomes_dict_of_columns(server: Server) -> None:
    table = {"Name": ["Bob", "Alice"], "Score": [1, 2]}
    script = "df = pd.DataFrame(_arg1)\ndf['Score2'] = df['Score'] * 2\nreturn df"
    response = server.post("/evaluate", json={"script": script, "data": {"_arg1": table}})
    assert response.json() == {**table, "Score2": [2, 4]}


def test_table_extension_gets_a_dict(server: Server) -> None:
    response = server.post(
        "/evaluate",
        json={"script": "return type(_arg1).__name__", "data": {"_arg1": {"a": [1]}}},
    )
    assert response.json() == "dict"


def test_convenience_names_need_no_import(server: Server) -> None:
    script = "return [pandas.__name__, pd.__name__, np.__name__, json.dumps(1), math.floor(2.5)]"
    assert server.evaluate(script).json() == ["pandas", "pandas", "numpy", "1", 2]


def test_nothing_leaks_between_requests(server: Server) -> None:
    first = server.evaluate("global leaked\nleaked = 42\nreturn leaked")
    assert first.json() == 42
    for _ in range(4):  # every worker, whichever takes the request
        second = server.evaluate("return 'leaked' in globals()")
        assert second.json() is False


def test_script_indentation_tabs_crlf_and_common_indent(server: Server) -> None:
    assert server.evaluate("if True:\r\n\treturn 1").json() == 1
    assert server.evaluate("    x = 2\n    return x").json() == 2


def test_unicode_line_separator_inside_a_string_is_kept(server: Server) -> None:
    assert server.evaluate("return 'a\u2028b'").json() == "a\u2028b"


def test_runtime_error_names_class_message_and_user_line(server: Server) -> None:
    response = server.evaluate("x = 1\ny = 2\nreturn x / 0")
    assert response.status_code == 500
    assert response.json() == {
        "message": "Error processing script",
        "info": "ZeroDivisionError : division by zero (line 3)",
    }


def test_syntax_error_names_the_user_line(server: Server) -> None:
    response = server.evaluate("x = 1\n% ^ !! return Nothing")
    assert response.status_code == 500
    body = response.json()
    assert body["message"] == "Error processing script"
    assert body["info"].startswith("SyntaxError : ")
    assert body["info"].endswith("(line 2)")


def test_result_length_mismatch_names_both_lengths(server: Server) -> None:
    response = server.evaluate("return [1, 2]", _arg1=[1, 2, 3], _arg2=[4, 5, 6])
    assert response.status_code == 500
    info = response.json()["info"]
    assert "returned 2 values" in info and "3 rows" in info
    assert server.evaluate("return 1", _arg1=[1, 2, 3]).json() == 1
    assert server.evaluate("return [9, 9, 9]", _arg1=[1, 2, 3]).json() == [9, 9, 9]


def test_unserialisable_result_is_a_script_error(server: Server) -> None:
    response = server.evaluate("return object()")
    assert response.status_code == 500
    assert response.json()["info"].startswith("TypeError : ")


ARGS = "Variables names should follow the format _arg1, _arg2, _argN"
NOT_DICT = "Script parameters need to be provided as a dictionary."
BAD_BODIES = [
    (b"not json", "Request body is not valid JSON"),
    (b"", "Request body is empty: expected a JSON object"),
    (b"[1, 2]", "Request body must be a JSON object with 'script' and 'data'"),
    (b'{"data": {}}', "Script is empty."),
    (b'{"script": null, "data": {}}', "'script' must be a string"),
    (b'{"script": 5, "data": {}}', "'script' must be a string"),
    (b'{"script": "return 1"}', None),
    (b'{"script": "return 1", "data": null}', None),
    (b'{"script": "return 1", "data": [1]}', NOT_DICT),
    (b'{"script": "return 1", "data": {"_arg1": 1, "_arg3": 2}}', ARGS),
    (b'{"script": "return 1", "data": {"_arg0": 1}}', ARGS),
    (b'{"script": "return 1", "data": {"arg_1": 1}}', ARGS),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_input_is_a_400_that_says_what_is_wrong(
    server: Server, body: bytes, message: str | None
) -> None:
    response = server.post("/evaluate", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    envelope = response.json()
    assert set(envelope) == {"message", "info"}
    if message is None:
        assert "'data' is required" in envelope["message"]
    else:
        assert envelope["message"] == message


def test_multi_megabyte_json_sent_as_form_urlencoded(server: Server) -> None:
    column = list(range(400_000))  # a few MB and far more than 1000 '&'-free "fields"
    body = json.dumps({"script": "return sum(_arg1)", "data": {"_arg1": column}})
    assert len(body) > 2_000_000
    response = server.post(
        "/evaluate",
        data=body + "&" * 2000,  # Tornado's form parser would choke on this many fields
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400  # trailing '&'s are not JSON: parsed as JSON, not a form
    assert response.json()["message"] == "Request body is not valid JSON"
    response = server.post(
        "/evaluate", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200
    assert response.json() == sum(column)


def test_gzip_body(server: Server) -> None:
    body = gzip.compress(json.dumps({"script": "return _arg1 * 2", "data": {"_arg1": 21}}).encode())
    response = server.post(
        "/evaluate",
        data=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert response.json() == 42


def test_gzip_syntax_error(server: Server) -> None:
    body = gzip.compress(b'{"script": "% ^ !! return Nothing", "data": {}}')
    response = server.post("/evaluate", data=body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 500
    assert response.json()["info"].startswith("SyntaxError")


def test_corrupt_gzip_is_400(server: Server) -> None:
    response = server.post("/evaluate", data=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert response.json()["message"] == "Request body is not valid gzip data"


@pytest.fixture(scope="module")
def small_limit_server(app_factory: AppFactory) -> InProcessServer:
    return app_factory(TABPY_MAX_REQUEST_SIZE_MB="1", TABPY_GZIP_ENABLE="true")


def _two_megabytes() -> bytes:
    return json.dumps({"script": "return 1", "data": {"_arg1": [1] * 700_000}}).encode()


@pytest.mark.parametrize("path", ["/evaluate", "/info", "/unicorn"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_over_the_limit_is_413_on_every_route(
    small_limit_server: InProcessServer, path: str, content_type: str
) -> None:
    body = _two_megabytes()
    response = small_limit_server.post(path, data=body, headers={"Content-Type": content_type})
    assert response.status_code == 413
    assert response.json() == {
        "message": f"Request with size {len(body)} exceeded limit of 1048576 (bytes).",
        "info": "Request Entity Too Large",
    }


def test_oversized_preflight_is_413_too(small_limit_server: InProcessServer) -> None:
    body = _two_megabytes()
    response = requests.options(small_limit_server.url + "/evaluate", data=body, timeout=30)
    assert response.status_code == 413
    assert response.json()["info"] == "Request Entity Too Large"


def test_chunked_body_over_the_limit_is_413(small_limit_server: InProcessServer) -> None:
    body = _two_megabytes()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    response = small_limit_server.post("/evaluate", data=chunks)
    assert response.status_code == 413
    assert response.json()["info"] == "Request Entity Too Large"


def test_expect_continue_over_the_limit_is_413_without_upload(
    small_limit_server: InProcessServer,
) -> None:
    out = subprocess.run(
        ["curl", "-s", "-H", "Expect: 100-continue", "-w", "\n%{http_code}",
         "--data-binary", "@-", f"{small_limit_server.url}/evaluate"],
        input=_two_megabytes(), capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    body, status = out.stdout.rsplit(b"\n", 1)
    assert status == b"413"
    assert json.loads(body)["info"] == "Request Entity Too Large"


def test_gzip_bomb_is_413(small_limit_server: InProcessServer) -> None:
    bomb = gzip.compress(b'{"script": "return 1", "data": {"_arg1": "' + b"0" * 5_000_000 + b'"}}')
    assert len(bomb) < 1_048_576
    response = small_limit_server.post("/evaluate", data=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert response.json()["info"] == "Request Entity Too Large"


def test_under_the_limit_still_works(small_limit_server: InProcessServer) -> None:
    response = small_limit_server.evaluate("return len(_arg1)", _arg1=[1] * 1000)
    assert response.json() == 1000


def test_gzip_disabled_is_415(app_factory: AppFactory) -> None:
    server = app_factory(TABPY_GZIP_ENABLE="false", TABSERVE_WORKERS="1")
    body = gzip.compress(b'{"script": "return 1", "data": {}}')
    response = server.post("/evaluate", data=body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415
    assert "TABPY_GZIP_ENABLE" in response.json()["message"]
    assert server.get("/info").json()["versions"]["v1"]["features"]["gzip_enabled"] is False


def test_timeout_is_408_with_tabpys_exact_body(server_factory: ServerFactory) -> None:
    server = server_factory(TABPY_EVALUATE_TIMEOUT="2", TABSERVE_WORKERS="1")
    response = server.evaluate("import time\ntime.sleep(100)")
    assert response.status_code == 408
    assert response.content == (
        b'{"message": "User defined script timed out. Timeout is set to 2.0 s.", "info": {}}'
    )


def test_evaluate_disabled_is_404_with_tabpys_message(app_factory: AppFactory) -> None:
    server = app_factory(TABPY_EVALUATE_ENABLE="false", TABSERVE_WORKERS="1")
    response = server.evaluate("return 1")
    assert response.status_code == 404
    assert response.json() == {
        "message": "Ad-hoc scripts have been disabled on this analytics extension, "
        "please contact your administrator.",
        "info": {},
    }
    features = server.get("/info").json()["versions"]["v1"]["features"]
    assert features["evaluate_enabled"] is False


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/unicorn", 404),
        ("POST", "/nope/deeper", 404),
        ("POST", "/info", 405),
        ("GET", "/evaluate", 405),
        ("DELETE", "/evaluate", 405),
    ],
)
def test_unknown_paths_and_methods_are_json(
    app: InProcessServer, method: str, path: str, status: int
) -> None:
    response = requests.request(method, app.url + path, timeout=10)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()) == {"message", "info"}


def test_root_page_is_html(app: InProcessServer) -> None:
    response = app.get("/")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")


def test_a_body_of_many_chunks_reaches_the_worker_whole_and_in_order(server: Server) -> None:
    """40 MB arrives in 1 MiB chunks, which go on to the worker as they are, never joined
    into one copy: the worker must see them whole and in order."""
    text = os.urandom(20_000_000).hex()
    script = "import hashlib\nreturn hashlib.sha256(_arg1[0].encode()).hexdigest()"
    body = json.dumps({"script": script, "data": {"_arg1": [text]}})
    answer = requests.post(f"{server.url}/evaluate", data=body, timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json() == hashlib.sha256(text.encode()).hexdigest()


def test_a_large_answer_carries_its_length_and_is_not_chunked(server: Server) -> None:
    """Over 1 MiB, the answer is written after its headers (no copy to join them): it must
    still say its length, as a small one does."""
    answer = server.evaluate("return 'x' * 3_000_000")
    assert answer.status_code == 200
    assert answer.headers["Content-Length"] == str(len(answer.content)) == "3000002"
    assert "Transfer-Encoding" not in answer.headers
    assert answer.json() == "x" * 3_000_000
    assert server.evaluate("return 1").text == "1"  # the connection's next answer is whole
