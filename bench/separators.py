"""What TabPy's JSON separators would cost: the 1M-row zip-sum's result, encoded three ways.

TabPy writes results with the standard library (`[42, 3.1415926]`); tabserve writes compact
JSON with orjson (`[42,3.1415926]`). This times, in this process, the worker's own
`encode_result` against the two ways of producing TabPy's separators, on the result of w4
(`bench.workloads.columns(1_000_000)` summed row by row). CPU time (`process_time`), best
of N, so that other load on a shared machine distorts it less than wall time would.

Usage: python -m bench.separators [--runs 9]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from bench.workloads import columns
from tabserve.worker.bodies import encode_result


def best_cpu_ms(encode: Callable[[], bytes], runs: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(runs):
        start = time.process_time()
        size = len(encode())
        times.append(time.process_time() - start)
    return min(times) * 1000, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    a, b = columns(1_000_000)
    result = [x + y for x, y in zip(a, b, strict=True)]

    def rewritten() -> bytes:
        # Safe only without strings in the result (a string may hold ',' or ':'), and still
        # not TabPy's bytes everywhere: orjson writes 1e-7 where json writes 1e-07.
        out = encode_result(result)
        assert b'"' not in out
        return out.replace(b",", b", ").replace(b":", b": ")

    cases: list[tuple[str, Callable[[], bytes]]] = [
        ("orjson, compact (tabserve today)", lambda: encode_result(result)),
        ("orjson, then `, ` and `: ` rewritten in (no strings only)", rewritten),
        ("stdlib `json.dumps` (TabPy's bytes)", lambda: json.dumps(result).encode()),
    ]
    print(f"| encoder | CPU ms (best of {runs}) | MB |")
    print("|---|---|---|")
    for name, encode in cases:
        ms, size = best_cpu_ms(encode, runs)
        print(f"| {name} | {ms:.0f} | {size / 1e6:.2f} |")


if __name__ == "__main__":
    main()
