"""Memory freed by large requests goes back to the system (``server.heap``)."""

from __future__ import annotations

import asyncio
import json
import time

import psutil
import requests

from helpers import ServerFactory
from tabserve.server.heap import TRIM_AFTER, HeapTrimmer


def test_one_trim_after_a_burst_of_large_requests_and_none_for_small_ones() -> None:
    async def main() -> list[int]:
        calls: list[int] = []
        trimmer = HeapTrimmer(lambda pad: calls.append(pad) or 1, delay=0.05)
        trimmer.after(100)  # small: nothing to give back
        await asyncio.sleep(0.2)
        assert calls == []
        for _ in range(3):
            trimmer.after(TRIM_AFTER)
            await asyncio.sleep(0.01)
        for _ in range(50):  # at most 2.5 s
            await asyncio.sleep(0.05)
            if trimmer.trims:
                break
        await asyncio.sleep(0.2)
        return calls

    assert asyncio.run(main()) == [0]


def test_the_front_end_gives_back_a_large_call_s_memory(server_factory: ServerFactory) -> None:
    server = server_factory(TABSERVE_WORKERS="1")
    front_end = psutil.Process(server.process.pid)
    assert server.evaluate("return 1").text == "1"
    before = front_end.memory_info().rss
    text = "ab" * 15_000_000
    body = json.dumps({"script": "return _arg1[0]", "data": {"_arg1": [text]}})
    for _ in range(3):
        answer = requests.post(f"{server.url}/evaluate", data=body, timeout=60)
        assert answer.status_code == 200 and len(answer.content) == len(text) + 2
    grown = front_end.memory_info().rss - before
    deadline = time.monotonic() + 10
    while grown >= 45_000_000 and time.monotonic() < deadline:
        time.sleep(0.2)
        grown = front_end.memory_info().rss - before
    assert grown < 45_000_000, f"the front end kept {grown / 1e6:.0f} MB"
