"""Small-call throughput with one front-end process against several, side by side.

    python -m bench.processes [--processes 2] [--rounds 4] [--seconds 5] [--connections 8]

Starts tabserve twice on free ports (``TABSERVE_PROCESSES`` = 1 and = N, the same workers),
then alternates wrk runs of small ``/evaluate`` calls between them (1, N, N, 1, ...), and
prints each round's req/s and the ratio of the means. Needs wrk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import loadgen, servers
from bench import workloads as wl
from bench.servers import ServerOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    if not loadgen.wrk_available():
        print("bench.processes needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="tabserve-processes-"))
    counts = (1, args.processes)
    started = {
        n: servers.start_tabserve(
            sys.executable,
            ServerOptions(workers=args.workers, settings={"TABSERVE_PROCESSES": str(n)}),
            root,
        )
        for n in counts
    }
    rates: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for server in started.values():
            server.wait_ready()
            request = wl._scalar_add(server)
            loadgen._wrk_load(server.host, server.port, request, args.connections, 1.0, 10**9)
        for round_ in range(args.rounds):
            order = counts if round_ % 2 == 0 else counts[::-1]
            for n in order:
                server = started[n]
                request = wl._scalar_add(server)
                result = loadgen._wrk_load(
                    server.host, server.port, request, args.connections, args.seconds, 10**9
                )
                rates[n].append(result.requests / result.elapsed_s)
                print(f"round {round_ + 1}, {n} process(es): {rates[n][-1]:,.0f} req/s", flush=True)
    finally:
        for server in started.values():
            server.stop()
    one, many = (statistics.mean(rates[n]) for n in counts)
    print(f"mean: 1 process {one:,.0f} req/s, {args.processes} processes {many:,.0f} req/s, "
          f"ratio {many / one:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
