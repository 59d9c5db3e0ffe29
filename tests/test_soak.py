"""The bounded soak (bench/soak.py) for 60 s: it judges itself and exits 0 only on a pass.

Its pass criteria are about drift, not speed: no unexpected 5xx, no RSS growth, flat file
descriptors, no zombies, a clean shutdown. The 10-minute result is in docs/soak.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent


def test_soak_for_a_minute() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "60", "--interval", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    print(run.stderr[-3000:] + run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "**PASS**" in run.stdout
