"""The benchmark harness runs end to end in smoke mode against tabserve.

No timing is asserted: the smoke run only proves every workload can be driven and
reported with numbers (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parent.parent

# Every workload of issue 5, both sweeps and the cache pair (issue 12), and the figures each
# must carry.
EXPECTED = {
    "w1_c8": ("rps", "p50_ms", "p99_ms"),
    "w1_c64": ("rps", "p50_ms", "p99_ms"),
    "w2": ("rps", "p50_ms", "p99_ms"),
    "w3": ("p50_ms", "p99_ms", "us_per_row"),
    "w4": ("p50_ms", "p99_ms", "us_per_row"),
    "w5": ("p50_ms", "p99_ms"),
    "w6": ("rps", "p50_ms", "p99_ms"),
    "w7": ("rps", "p50_ms", "p99_ms"),
    "w8": ("p50_ms", "p99_ms"),
    "w9": ("peak_pss_mb", "peak_rss_mb", "idle_rss_mb"),
    "flight_json": ("p50_ms", "us_per_row"),
    "flight_arrow": ("p50_ms", "us_per_row", "put_ms", "evaluate_ms", "get_ms"),
    "rows_10": ("p50_ms", "us_per_row"),
    "rows_1k": ("p50_ms", "us_per_row"),
    "rows_10k": ("p50_ms", "us_per_row"),
    "workers_1": ("rps",),
    "workers_2": ("rps",),
    "workers_4": ("rps",),
    "cache_fresh": ("rps", "p50_ms", "p99_ms"),
    "cache_hit": ("rps", "p50_ms", "p99_ms"),
    "cache_hit_scalar": ("rps", "p50_ms", "p99_ms"),
    "info_c8": ("rps", "p50_ms", "p99_ms"),
}


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_smoke_run_reports_every_workload(tmp_path: Path) -> None:
    proc = run_bench("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["meta"]["smoke"] is True
    assert results["meta"]["machine"]["cpu_count"] >= 1
    workloads = results["workloads"]
    assert set(EXPECTED) <= set(workloads)
    problems = []
    for wid, metrics in EXPECTED.items():
        servers = workloads[wid]["servers"]
        assert "tabpy" not in servers, "smoke mode must not run TabPy"
        figures = servers["tabserve"]
        for metric in metrics:
            value = figures.get(metric)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                problems.append(f"{wid}.{metric} = {value!r} ({figures.get('error', '')})")
    assert not problems, "\n".join(problems)
    # The bare Tornado ceiling runs beside the small calls, and tabserve is a share of it.
    for wid in ("w1_c8", "w1_c64", "w6"):
        ceiling = workloads[wid]["servers"]["ceiling"]
        assert ceiling["rps"] > 0, ceiling
        share = workloads[wid]["ratios"]["ceiling_share"]
        assert share == round(workloads[wid]["servers"]["tabserve"]["rps"] / ceiling["rps"], 3)
    assert "ceiling" not in workloads["w2"]["servers"]


def test_smoke_run_never_writes_into_docs(tmp_path: Path) -> None:
    committed = REPO / "docs" / "benchmarks" / "results.json"
    before = committed.read_bytes() if committed.exists() else None
    # TMPDIR keeps the harness's default temp output inside pytest's own temp dir.
    proc = run_bench("--smoke", "--only", "rows_10", env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [line for line in proc.stderr.splitlines() if "wrote" in line]
    assert written and all(str(tmp_path) in line for line in written)
    after = committed.read_bytes() if committed.exists() else None
    assert before == after
