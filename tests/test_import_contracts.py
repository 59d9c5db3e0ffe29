"""The process boundaries hold: the server never loads worker code, numpy, pandas or pyarrow;
a worker never loads server code; the Flight process never loads numpy, pandas or server code;
the client imports only ``errors``; and docs/architecture.md's module table is the layout.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter reads every import
statement of tabserve, those inside functions included. It cannot see inside other packages,
so a second test imports the server's modules for real and looks at what got loaded.
"""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli there
    import tomli as tomllib

import tabserve

ROOT = Path(__file__).parent.parent


def contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_import_linter_contracts_are_kept() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout, done.stdout[-4000:]


def test_the_client_contract_names_every_other_tabserve_module() -> None:
    """A module added at the top of tabserve is forbidden to the client until said otherwise."""
    forbidden = set(contracts()["client"]["forbidden_modules"])  # type: ignore[arg-type]
    modules = {f"tabserve.{m.name}" for m in pkgutil.iter_modules(tabserve.__path__)}
    allowed = {"tabserve.errors", "tabserve.client", "tabserve.__main__"}
    assert modules - allowed <= forbidden, sorted(modules - allowed - forbidden)


def test_loading_the_whole_server_loads_no_worker_code_numpy_or_pandas() -> None:
    """What import-linter cannot see: a third-party package that imports numpy for us."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import tabserve.server
        for module in pkgutil.walk_packages(tabserve.server.__path__, "tabserve.server."):
            importlib.import_module(module.name)
        for name in ("cli", "commands.doctor", "commands.user", "commands.check"):
            importlib.import_module("tabserve." + name)
        loaded = [m for m in ("numpy", "pandas", "pyarrow", "tabserve.worker",
                              "tabserve.client", "tabserve.flight") if m in sys.modules]
        print(loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_both_clients_load_no_server_module_tornado_numpy_or_pandas() -> None:
    """Every module of tabserve.client, both entry points built and their options used: none
    of it loads the server, the store, tornado, numpy, pandas or orjson (the client's only
    tabserve import is ``errors``; import-linter checks the statements, this the result)."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import tabserve.client
        for module in pkgutil.walk_packages(tabserve.client.__path__, "tabserve.client."):
            importlib.import_module(module.name)
        from tabserve import (APIKeyAuth, Client, Field, Filter, Operator, Pager,
                              RequestOptions, Server)
        server = Server("http://127.0.0.1:9004")
        server.auth, server.endpoints, server.jobs, server.results, server.keys, server.users
        options = RequestOptions(pagesize=5)
        options.filter.add(Filter(Field.Name, Operator.In, ["a,b", "c"]))
        options.parameters(), server.endpoints.filter(type="model").order_by("-name")
        Pager(server.endpoints, options), APIKeyAuth("k").header()
        Client("http://127.0.0.1:9004")
        heavy = ("tornado", "numpy", "pandas", "pyarrow", "orjson", "prometheus_client", "jwt",
                 "tabserve.server", "tabserve.worker", "tabserve.store", "tabserve.config",
                 "tabserve.flight", "tabserve.protocol", "tabserve.logs", "tabserve.commands")
        print(sorted(m for m in heavy if m in sys.modules))
        print(sorted(m for m in sys.modules if m.startswith("tabserve.")
                     and not m.startswith("tabserve.client")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[:2] == ["[]", "['tabserve.errors']"], done.stdout


def test_only_the_transport_talks_http_and_maps_errors() -> None:
    """Both clients send through client/transport.py, the one place an answer becomes a
    TabserveError: no other client module imports requests at run time or builds errors from
    a status."""
    import ast

    client_dir = ROOT / "tabserve" / "client"
    for path in sorted(client_dir.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import) and id(node) not in typing_only
            for alias in node.names
        }
        called = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        if path.name == "transport.py":
            assert "requests" in imported and "from_wire" in called
            continue
        assert "requests" not in imported, path.name
        assert not called & {"from_wire", "request", "urlopen"}, path.name


def test_the_architecture_module_table_names_every_module() -> None:
    """docs/architecture.md's module table has one row per module of the package, and no row
    for a module that is gone, so the layout it describes is the code's."""
    table = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.MULTILINE)
    package = Path(tabserve.__file__).parent
    modules = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert len(rows) == len(set(rows)), "a module has two rows"
    assert sorted(modules - set(rows)) == [], "modules without a row in docs/architecture.md"
    assert sorted(set(rows) - modules) == [], "rows for modules that do not exist"


def test_a_plain_server_loads_neither_pyjwt_nor_cryptography() -> None:
    """Idle memory: PyJWT and cryptography cost the front end about 9 MB, and only OAuth
    (PyJWT) and TLS or doctor (cryptography) need them; they are imported on first use."""
    code = textwrap.dedent(
        """
        import sys
        import tabserve.cli, tabserve.server.app, tabserve.server.handlers
        import tabserve.server.oauth, tabserve.server.tls
        print([m for m in ("jwt", "cryptography") if m in sys.modules])
        from tabserve.server.oauth import parse_key_set
        parse_key_set({"keys": []})
        print("jwt" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
