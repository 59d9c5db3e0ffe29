"""Idle memory (PSS) of TabPy's and tabserve's whole process trees, side by side.

    python -m bench.memory [--rounds 2] [--workers 2]

Each server, alternately, is started, answers four small pandas calls (so that workers have
done real work), rests three seconds, and has the proportional set size of its process
tree summed (pages shared between processes are counted once in total).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import servers
from bench.servers import ServerOptions

PANDAS_CALL = {
    "script": "import pandas as pd\nreturn [int(pd.DataFrame({'a': _arg1}).a.sum())]",
    "data": {"_arg1": [1, 2, 3]},
}


def tree_pss_mb(pid: int) -> float:
    return servers.tree_pss_bytes(pid) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="tabserve-memory-"))
    results: dict[str, list[float]] = {"tabpy": [], "tabserve": []}
    for _ in range(args.rounds):
        for name in ("tabpy", "tabserve"):
            if name == "tabpy":
                server = servers.start_tabpy(servers.ensure_tabpy_venv(), ServerOptions(), root)
            else:
                options = ServerOptions(workers=args.workers)
                server = servers.start_tabserve(sys.executable, options, root)
            try:
                server.wait_ready()
                for _ in range(4):
                    answer = requests.post(server.url + "evaluate", json=PANDAS_CALL, timeout=60)
                    answer.raise_for_status()
                time.sleep(3)
                results[name].append(round(tree_pss_mb(server.proc.pid), 1))
            finally:
                server.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
