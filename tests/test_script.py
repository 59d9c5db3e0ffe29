"""Script wrapping, compilation and error descriptions (worker side, no processes)."""

from __future__ import annotations

import pytest

from tabserve.worker.script import (
    ScriptSyntaxError,
    compile_script,
    describe_exception,
    load_function,
)


def run(script: str, **args: object) -> object:
    code = compile_script(script, tuple(sorted(args)))
    return load_function(code, {"__builtins__": __builtins__})(None, **args)


def test_body_is_a_function_with_tabpy_and_args() -> None:
    assert run("return _arg1 + _arg2", _arg1=1, _arg2=2) == 3
    assert run("return tabpy") is None


def test_empty_script_returns_none() -> None:
    assert run("") is None
    assert run("   \n  ") is None


def test_syntax_error_line_is_the_users() -> None:
    with pytest.raises(ScriptSyntaxError) as caught:
        compile_script("x = 1\ny = (\n", ())
    assert str(caught.value).startswith("SyntaxError : ")
    assert "(line 2)" in str(caught.value)


def test_runtime_error_line_is_the_users() -> None:
    with pytest.raises(KeyError) as caught:
        run("a = {}\n\nreturn a['missing']")
    assert describe_exception(caught.value) == "KeyError : 'missing' (line 3)"


def test_error_inside_a_library_points_at_the_calling_line() -> None:
    with pytest.raises(ValueError) as caught:
        run("x = 1\nreturn int('abc')")
    assert describe_exception(caught.value).endswith("(line 2)")


def test_compiled_code_is_cached() -> None:
    first = compile_script("return 42", ())
    assert compile_script("return 42", ()) is first
