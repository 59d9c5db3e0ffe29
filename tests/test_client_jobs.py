"""The client's jobs and cache: query(max_age=...), submit, wait, cancel, and the deploy
option max_age, against a real server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import ServerFactory
from tabserve import Client
from tabserve.client import Job, JobStatus
from tabserve.errors import TabserveError


def test_submit_wait_cancel_and_cached_queries(server_factory: ServerFactory,
                                               tmp_path: Path) -> None:  # fmt: skip
    server = server_factory(TABSERVE_JOB_TIMEOUT="20")
    calls = tmp_path / "calls"

    def count(x: list[int]) -> list[int]:
        with open(calls, "a") as log:
            log.write(".")
        return [v + 1 for v in x]

    def fail(x: int) -> int:
        raise ValueError("no")

    def spin(x: int) -> int:
        while True:
            pass

    with Client(server.url) as client:
        client.deploy("count", count, max_age=60)
        client.deploy("fail", fail)
        client.deploy("spin", spin)
        assert client.get_endpoint("count").extra["max_age"] == 60

        job = client.submit("count", x=[1, 2])
        assert isinstance(job, Job) and job.id and job.status in (JobStatus.PENDING,
                                                                   JobStatus.STARTED)  # fmt: skip
        assert client.wait(job, timeout=30, interval=0.05) == [2, 3]
        assert client.job(job).status == JobStatus.SUCCESS
        # The deploy option's default caches synchronous calls; max_age=0 always runs.
        assert client.query("count", x=[5])["response"] == [6]
        runs = calls.read_text()
        assert client.query("count", x=[5])["response"] == [6]
        assert calls.read_text() == runs
        assert client.query("count", x=[5], max_age=0)["response"] == [6]
        assert calls.read_text() == runs + "."
        # A fresh cached result comes back as a job already done.
        cached = client.submit("count", x=[5], max_age=60)
        assert cached.done and client.wait(cached) == [6]

        with pytest.raises(TabserveError) as failed:
            client.wait(client.submit("fail", 1), timeout=30, interval=0.05)
        assert failed.value.message == "Error querying function 'fail'"

        running = client.submit("spin", 1)
        deadline = time.monotonic() + 30
        while client.job(running).status != JobStatus.STARTED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.cancel(running).status == JobStatus.CANCELLED
        with pytest.raises(TabserveError, match="cancelled"):
            client.wait(running)
        with pytest.raises(ValueError, match="max_age"):
            client.query("count", x=[1], max_age=-1)
        script = "import random\nreturn random.random()"
        drawn = client.evaluate(script, max_age=60)
        assert client.evaluate(script, max_age=60) == drawn  # the cached answer
        assert client.evaluate(script, max_age=0) != drawn  # run again
