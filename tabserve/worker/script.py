"""User scripts: wrap a SCRIPT_* body into a function, compile it once, and explain failures.

A script is the body of a function taking ``tabpy`` and ``_arg1``…``_argN``, so ``return``
works. Line numbers in errors are the user's own: the wrapper line is numbered 0.
This module runs inside workers; it knows nothing of HTTP or of the pool.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
import traceback
from collections.abc import Callable
from functools import lru_cache
from types import CodeType
from typing import Any

SCRIPT_FILENAME = "<script>"
FUNCTION_NAME = "_tabserve_script"

# str.splitlines also splits on \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029, which can sit
# inside string literals; only real line breaks may end a line of the script.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class ScriptSyntaxError(Exception):
    """The script does not compile; ``str()`` is the one-line summary for the caller."""


@lru_cache(maxsize=256)
def compile_script(script: str, arg_names: tuple[str, ...]) -> CodeType:
    """Compile ``script`` as the body of ``def _tabserve_script(tabpy, *arg_names)``.

    Cached because Tableau sends the same script text for every partition and every refresh.
    """
    # A common indent (scripts pasted from an indented block) is not an error.
    body = textwrap.dedent("\n".join(_LINE_BREAK.split(script)))
    if not body.strip():
        body = "pass"
    params = ", ".join(("tabpy", *arg_names))
    # Not textwrap.indent: it would break lines at \u2028 and friends inside literals.
    indented = "\n".join(" " + line for line in body.split("\n"))
    source = f"def {FUNCTION_NAME}({params}):\n{indented}"
    try:
        if sys.version_info < (3, 11):
            # Python 3.10 turns a parse tree into ast objects without a depth guard, so a
            # 200,000-term sum crashes the worker in ast.parse. Compiling the text first
            # meets the compiler's own depth check (a RecursionError) long before that.
            compile(source, SCRIPT_FILENAME, "exec")
        tree = ast.parse(source, SCRIPT_FILENAME)
        ast.increment_lineno(tree, -1)  # user line 1 is source line 2
        return compile(tree, SCRIPT_FILENAME, "exec")
    except SyntaxError as exc:
        raise ScriptSyntaxError(_describe_syntax_error(exc)) from None
    except RecursionError:
        # The parser and compiler recurse per nesting level: a 100,000-term expression.
        raise ScriptSyntaxError(
            "RecursionError : the script is nested too deeply to compile"
        ) from None


def _describe_syntax_error(exc: SyntaxError) -> str:
    line = (exc.lineno or 1) - 1
    return f"{type(exc).__name__} : {exc.msg} (line {max(line, 1)})"


def load_function(code: CodeType, namespace: dict[str, Any]) -> Callable[..., Any]:
    """Define the script function in ``namespace`` (a fresh dict per call) and return it."""
    exec(code, namespace)
    function: Callable[..., Any] = namespace.pop(FUNCTION_NAME)
    return function


def script_line(exc: BaseException) -> int | None:
    """The deepest line of the user's script on the traceback of ``exc``, if any."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == SCRIPT_FILENAME:
            line = frame.lineno
    return line


def describe_exception(exc: BaseException) -> str:
    """TabPy's ``<ExceptionClass> : <message>``, plus the user's line when known."""
    text = f"{type(exc).__name__} : {exc}"
    line = script_line(exc)
    if line is not None and line > 0:
        text += f" (line {line})"
    return text
