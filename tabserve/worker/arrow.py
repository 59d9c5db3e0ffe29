"""In a worker: ``/evaluate`` over an Arrow Flight table (``dataPath``), Arrow both ways.

The server hands the worker the stored table as a sealed memfd holding an Arrow IPC file
(fdpass.py). The worker maps it read-only, turns it into a pandas DataFrame for ``_arg1``
(as TabPy does), runs the script, and writes the result table as an Arrow IPC file into a
new memfd, which it seals and hands back. No JSON is involved but the small request body.

pyarrow is the optional ``arrow`` extra: this module is imported by the first such job.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.ipc

from .. import fdpass
from ..errors import BadRequest, ScriptError, TabserveError
from ..protocol import JobHeader, Telemetry
from .bodies import decode_body, parse_json
from .script import describe_exception

if TYPE_CHECKING:
    import pandas

    from .main import Worker

# What a script must return when its input came from Flight, for the error message.
_TABLE_HINT = (
    "with dataPath the script must return a table: a pandas DataFrame or a dict of columns"
)


def evaluate(
    worker: Worker, header: JobHeader, payload: bytes, fds: Sequence[int]
) -> tuple[bytes, Telemetry]:
    """Run the script of ``payload`` over the table in ``fds[0]``.

    A ``None`` result answers ``null`` (TabPy's answer); a table is handed back through
    ``worker.outgoing_fds`` and the body is empty (the server answers with the new path).
    """
    body = decode_body(payload, header.get("encoding"), worker.request_limit, worker.gzip_enabled)
    document = parse_json(body)
    if not isinstance(document, dict) or "script" not in document:
        raise BadRequest("Script is empty.")
    script = document["script"]
    if not isinstance(script, str):
        raise BadRequest("'script' must be a string")
    if len(fds) != 1:
        raise TabserveError("Internal server error", "the input table did not reach the worker")
    frame = read_frame(fds[0])
    rows_in = len(frame)
    result, script_hash = worker.run_script(script, {"_arg1": frame}, header.get("query_refusal"))
    del frame  # its memory (possibly the mapped table itself) can go once the script is done
    meta: Telemetry = {"rows_in": rows_in, "script_hash": script_hash}
    if result is None:
        return b"null", meta
    table = as_table(result)
    meta["rows_out"] = table.num_rows
    worker.outgoing_fds.append(write_table(table))
    return b"", meta


def read_frame(fd: int) -> pandas.DataFrame:
    """The Arrow IPC file in ``fd`` as a DataFrame, read from a read-only mapping."""
    size = fdpass.file_size(fd)
    if size == 0:
        raise BadRequest("The stored table is empty (not an Arrow IPC file)")
    # The mapping lives as long as the Arrow buffers (and any zero-copy column) refer to it.
    mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    try:
        table = pyarrow.ipc.open_file(pa.py_buffer(mapped)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadRequest("The stored table is not a readable Arrow IPC file", str(exc)) from None
    return table.to_pandas()


def as_table(result: Any) -> pa.Table:
    """The script's result as an Arrow table, or TabPy's 500 naming what went wrong."""
    try:
        return pa.table(result)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise ScriptError(info=f"{describe_exception(exc)} ({_TABLE_HINT})") from None


def write_table(table: pa.Table) -> int:
    """Write ``table`` as an Arrow IPC file into a new memfd and seal it; the caller owns it.

    Writes go through the file (never a shared mapping) so that sealing cannot fail. The
    worker's file size limit (TABSERVE_WORKER_FILE_SIZE_MB) bounds the result.
    """
    fd = fdpass.new_table_file("tabserve-result")
    try:
        with os.fdopen(os.dup(fd), "wb") as handle:
            sink = pa.PythonFile(handle, mode="w")
            with pyarrow.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        fdpass.seal(fd)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EFBIG:
            raise ScriptError(
                info="The result table is larger than the worker's file size limit "
                "(TABSERVE_WORKER_FILE_SIZE_MB)"
            ) from None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd
