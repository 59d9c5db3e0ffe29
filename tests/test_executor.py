"""The executor on its own: no HTTP, just jobs in and results or errors out."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator

import orjson
import pytest

from tabserve.errors import BadRequest, Overloaded, ScriptError, ScriptTimeout, WorkerDied
from tabserve.protocol import MAX_HEADER, JobKind
from tabserve.server.executor import (
    DIRECT_PAYLOAD,
    Executor,
    PoolConfig,
    describe_exit,
    worker_environment,
)
from tabserve.server.launcher import FRESH, ZYGOTE


@pytest.fixture(autouse=True, params=[FRESH, ZYGOTE])
def launch(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every pool test runs with each launcher: fresh interpreters, and forks of the zygote."""
    global LAUNCH
    LAUNCH = request.param
    yield request.param
    LAUNCH = FRESH


LAUNCH = FRESH


def run_with_pool(test: Callable[[Executor], Awaitable[None]], **config: object) -> None:
    async def main() -> None:
        options = {"workers": 1, "request_limit": 1 << 20, "launch": LAUNCH, **config}
        executor = Executor(PoolConfig(**options))  # type: ignore[arg-type]
        await executor.start()
        try:
            await test(executor)
        finally:
            await executor.close()

    asyncio.run(main())


def job(script: str, **data: object) -> bytes:
    return orjson.dumps({"script": script, "data": data})


def test_result_bytes_and_meta() -> None:
    async def test(executor: Executor) -> None:
        payload = job("return [x * 2 for x in _arg1]", _arg1=[1, 2])
        result = await executor.run("evaluate", payload, 5)
        assert result.body == b"[2,4]"
        assert result.meta["worker_pid"] in executor.pids
        assert result.meta["rows_in"] == 2

    run_with_pool(test)


def test_worker_errors_arrive_as_tabserve_errors() -> None:
    async def test(executor: Executor) -> None:
        with pytest.raises(BadRequest):
            await executor.run("evaluate", b"{", 5)
        with pytest.raises(ScriptError) as caught:
            await executor.run("evaluate", job("raise ValueError('nope')"), 5)
        assert caught.value.info == "ValueError : nope (line 1)"

    run_with_pool(test)


def test_timeout_kills_and_replaces_the_worker() -> None:
    async def test(executor: Executor) -> None:
        before = executor.pids
        with pytest.raises(ScriptTimeout):
            await executor.run("evaluate", job("while True: pass"), 0.5)
        assert executor.stats.timeouts == 1
        result = await executor.run("evaluate", job("return 1"), 30)
        assert result.body == b"1"
        assert executor.pids != before
        assert executor.stats.restarts == 1

    run_with_pool(test)


def test_crash_is_worker_died_and_the_pool_recovers() -> None:
    async def test(executor: Executor) -> None:
        with pytest.raises(WorkerDied) as caught:
            await executor.run("evaluate", job("import os; os._exit(7)"), 5)
        assert "exited with code 7" in str(caught.value.info)
        assert (await executor.run("evaluate", job("return 2"), 30)).body == b"2"

    run_with_pool(test)


def test_queue_bound_rejects_at_once() -> None:
    async def test(executor: Executor) -> None:
        busy = asyncio.create_task(executor.run("evaluate", job("import time; time.sleep(1)"), 5))
        await asyncio.sleep(0.2)
        with pytest.raises(Overloaded) as caught:
            await executor.run("evaluate", job("return 1"), 5)
        assert caught.value.headers() == {"Retry-After": "1"}
        assert (await busy).body == b"null"

    run_with_pool(test, queue_length=0)


def test_queueing_counts_against_the_deadline() -> None:
    async def test(executor: Executor) -> None:
        busy = asyncio.create_task(executor.run("evaluate", job("import time; time.sleep(1)"), 5))
        await asyncio.sleep(0.1)
        with pytest.raises(ScriptTimeout):
            await executor.run("evaluate", job("return 1"), 0.3)
        await busy

    run_with_pool(test)


def test_memory_cap_fails_the_job_and_recycles_the_worker() -> None:
    async def test(executor: Executor) -> None:
        pid = executor.pids[0]
        with pytest.raises(ScriptError) as caught:
            await executor.run("evaluate", job("x = bytearray(2 * 1024 ** 3)"), 10)
        assert "MemoryError" in str(caught.value.info)
        assert (await executor.run("evaluate", job("return 4"), 30)).body == b"4"
        assert executor.pids != [pid]

    run_with_pool(test, memory_mb=1024)


def test_close_leaves_no_worker_behind() -> None:
    pids: list[int] = []

    async def test(executor: Executor) -> None:
        pids.extend(executor.pids)

    run_with_pool(test, workers=2)
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_environment_is_an_allow_list() -> None:
    env = worker_environment(["PATH", "LANG"], {"PATH": "/bin", "SECRET": "x", "LANG": "C"})
    assert env["PATH"] == "/bin" and env["LANG"] == "C"
    assert "SECRET" not in env
    assert env["OPENBLAS_NUM_THREADS"] == "1"


def test_describe_exit() -> None:
    assert describe_exit(-11) == "was killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3"
    assert "out-of-memory" in describe_exit(-9)


def test_queue_timeouts_never_lose_a_worker() -> None:
    async def test(executor: Executor) -> None:
        async def attempt(i: int) -> str:
            try:
                await executor.run("evaluate", job("import time; time.sleep(0.05)"), 0.12)
            except ScriptTimeout:
                return "timeout"
            return "ok"

        outcomes = await asyncio.gather(*(attempt(i) for i in range(30)))
        assert "timeout" in outcomes and "ok" in outcomes
        # Replacements of killed workers join the pool once ready; on a loaded machine that
        # can take more than a second, and the timing below needs both.
        deadline = asyncio.get_running_loop().time() + 30
        while executor.size < 2:
            assert asyncio.get_running_loop().time() < deadline, "no replacement in 30 s"
            await asyncio.sleep(0.05)
        assert executor.queued == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        sleeps = [executor.run("evaluate", job("import time; time.sleep(0.5)"), 30) for _ in "ab"]
        await asyncio.gather(*sleeps)
        assert loop.time() - started < 0.95  # both workers still serve, side by side
        assert executor.size == 2

    run_with_pool(test, workers=2, queue_length=64)


def test_meta_has_rows_out_and_script_hash() -> None:
    async def test(executor: Executor) -> None:
        result = await executor.run("evaluate", job("return [1, 2, 3]", _arg1=[0, 0, 0]), 5)
        assert result.meta["rows_out"] == 3
        assert len(result.meta["script_hash"]) == 12
        scalar = await executor.run("evaluate", job("return 7"), 5)
        assert scalar.meta["rows_out"] == 1
        same = await executor.run("evaluate", job("return 7"), 5)
        assert same.meta["script_hash"] == scalar.meta["script_hash"]
        assert same.meta["script_hash"] != result.meta["script_hash"]

    run_with_pool(test)


def test_a_worker_dying_while_idle_is_replaced_without_a_job() -> None:
    """The pool notices an idle worker's death by itself (the exit callback), not when a job
    finds the corpse: nothing runs a job before the replacement is checked."""

    async def test(executor: Executor) -> None:
        (victim,) = executor.pids
        os.kill(victim, 9)
        for _ in range(300):
            if executor.stats.restarts == 1 and executor.alive == 1:
                break
            await asyncio.sleep(0.05)
        assert (executor.stats.restarts, executor.alive) == (1, 1)
        assert executor.pids != [victim]
        assert (executor.stats.crashes, executor.stats.kills) == (1, 1)
        result = await executor.run("evaluate", job("return 1"), 5)
        assert result.body == b"1"
        assert executor.stats.crashes == 1  # the corpse is not counted twice

    run_with_pool(test)


def test_kills_count_timeouts_of_running_jobs_not_of_queued_ones() -> None:
    async def test(executor: Executor) -> None:
        running = asyncio.ensure_future(executor.run("evaluate", job("while True: pass"), 1))
        await asyncio.sleep(0.1)
        with pytest.raises(ScriptTimeout):
            await executor.run("evaluate", job("return 1"), 0.3)  # times out in the queue
        with pytest.raises(ScriptTimeout):
            await running
        assert executor.stats.timeouts == 2
        assert executor.stats.kills == 1

    run_with_pool(test)


def test_a_job_cancelled_mid_run_costs_its_worker_not_the_pool() -> None:
    async def test(executor: Executor) -> None:
        running = asyncio.create_task(
            executor.run("evaluate", job("import time; time.sleep(5)"), 30)
        )
        await asyncio.sleep(0.3)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # A fresh worker replaces the one whose reply can no longer be matched to a job.
        assert (await executor.run("evaluate", job("return 5"), 30)).body == b"5"
        assert executor.size == 1

    run_with_pool(test)


def test_close_answers_queued_callers_at_once() -> None:
    async def test(executor: Executor) -> None:
        busy = asyncio.create_task(executor.run("evaluate", job("import time; time.sleep(3)"), 30))
        await asyncio.sleep(0.2)
        queued = asyncio.create_task(executor.run("evaluate", job("return 1"), 30))
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await executor.close(grace=0.1)
        with pytest.raises(Overloaded, match="shutting down"):
            await queued
        assert loop.time() - started < 2.5
        with pytest.raises((WorkerDied, asyncio.CancelledError, Overloaded)):
            await busy

    run_with_pool(test)


def test_an_endpoint_table_larger_than_any_frame_header_reaches_the_workers() -> None:
    """The table travels as a payload: its size is not bounded by the header cap."""

    async def test(executor: Executor) -> None:
        table = {
            f"model{i}": {"model": f"model{i}", "version": 1, "path": f"/nowhere/{i}/archive"}
            for i in range(30_000)
        }
        assert len(orjson.dumps(table)) > MAX_HEADER
        executor.set_context({"endpoints": table})  # type: ignore[typeddict-item]
        with pytest.raises(ScriptError) as caught:
            await executor.run(JobKind.QUERY, b'{"data": []}', 30, {"name": "model29999"})
        # Known to the worker (not a 404), and then not found on disk.
        assert caught.value.info["type"] == "LoadFailed"  # type: ignore[index]
        assert "FileNotFoundError" in caught.value.info["error"]  # type: ignore[index]

    run_with_pool(test)


def test_a_payload_of_more_parts_than_one_write_takes_arrives_whole() -> None:
    """A body passed as its chunks: the kernel takes at most 1,024 buffers per write, so
    3,000 parts go out over several, in order."""

    async def test(executor: Executor) -> None:
        body = job("return ''.join(_arg1)", _arg1=[f"{i:04d}" for i in range(600)])
        parts = [body[i : i + 1] for i in range(len(body))]
        assert len(parts) > 3000
        result = await executor.run(JobKind.EVALUATE, parts, timeout=10)
        assert orjson.loads(result.body) == "".join(f"{i:04d}" for i in range(600))
        assert parts == []  # handed over: its chunks were freed as they were sent

    run_with_pool(test)


def test_a_large_reply_is_received_whole_into_its_own_buffer() -> None:
    """Over DIRECT_PAYLOAD a reply is read straight into a buffer handed on as it is; the
    frames after it are read as before."""

    async def test(executor: Executor) -> None:
        for size in (DIRECT_PAYLOAD - 10, DIRECT_PAYLOAD + 10, 5 * DIRECT_PAYLOAD):
            big = await executor.run(JobKind.EVALUATE, job(f"return 'ab' * {size // 2}"), 10)
            assert big.body == b'"' + b"ab" * (size // 2) + b'"'
            assert isinstance(big.body, bytearray) == (len(big.body) >= DIRECT_PAYLOAD)
            small = await executor.run(JobKind.EVALUATE, job("return 7"), 10)
            assert small.body == b"7"

    run_with_pool(test, workers=1)
