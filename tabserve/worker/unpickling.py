"""Loading endpoint archives: the cloudpickled objects behind deployed endpoints.

Where archives live is ``store.archives``. TabPy's client pickles a
``tabpy.tabpy_tools.custom_query_object.CustomQueryObject`` wrapping the user's function;
tabserve loads those without importing tabpy, by mapping the class to ``TabpyQueryObject``
while unpickling. tabserve's own client pickles the bare function.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class TabpyQueryObject:
    """Stands in for TabPy's ``CustomQueryObject`` (and its base ``QueryObject``).

    Their pickled state is ``{"description": str, "custom_query": <function>}``.
    """

    description: str = ""
    custom_query: Callable[..., Any]

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return self.custom_query(*args, **kwargs)

    def get_doc_string(self) -> str:
        return getattr(self.custom_query, "__doc__", None) or ""


_STAND_INS: dict[tuple[str, str], type] = {
    ("tabpy.tabpy_tools.custom_query_object", "CustomQueryObject"): TabpyQueryObject,
    ("tabpy.tabpy_tools.query_object", "QueryObject"): TabpyQueryObject,
    ("tabpy_client.custom_query_object", "CustomQueryObject"): TabpyQueryObject,
    ("tabpy_client.query_object", "QueryObject"): TabpyQueryObject,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is not None:
            return stand_in
        return super().find_class(module, name)


def load_callable(handle: IO[bytes]) -> Callable[..., Any]:
    """Unpickle an archive and return what a query calls."""
    obj = _ArchiveUnpickler(handle).load()
    query = getattr(obj, "query", None)
    if callable(query) and not isinstance(obj, type):
        return query  # type: ignore[no-any-return]
    if callable(obj):
        return obj  # type: ignore[no-any-return]
    raise TypeError(f"the archive holds a {type(obj).__name__}, which cannot be called")


def load_archive(path: Path) -> Callable[..., Any]:
    with path.open("rb") as handle:
        return load_callable(handle)


def target_function(query: Callable[..., Any]) -> Callable[..., Any]:
    """The user's own function behind ``query`` (for line numbers in error messages)."""
    owner = getattr(query, "__self__", None)
    if isinstance(owner, TabpyQueryObject):
        return owner.custom_query
    return query
