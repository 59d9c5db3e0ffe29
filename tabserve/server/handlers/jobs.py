"""Jobs and their results: GET/DELETE /jobs/<id>, GET /query_results/<id>[.json|.csv].

Every answer here is the caller's own data: ``keep_private`` keeps it out of caches."""

from __future__ import annotations

import asyncio
import json

from ..exports import filename, result_data, to_csv, to_json
from ..jobs import job_document
from ..paging import paginate
from .base import BaseHandler

# What GET /jobs may filter and sort by.
_JOB_FIELDS = {"status": int, "endpoint": str, "created_at": str, "updated_at": str}


class JobsHandler(BaseHandler):
    async def get(self) -> None:
        """The newest jobs the caller may see (their own; everyone's for a manager)."""
        jobs = await self.services.jobs.recent(self.user, limit=1000)
        items = [{**job_document(job), "endpoint": job.endpoint} for job in jobs]
        page, pagination = paginate(items, self.list_query(), _JOB_FIELDS)
        self.keep_private()
        self.write_json({"jobs": page, "pagination": pagination.as_json()})


class JobHandler(BaseHandler):
    async def get(self, job_id: str) -> None:
        """A job's status: 1 pending, 2 started, 3 success, 4 failure, 5 cancelled."""
        job = await self.services.jobs.get(job_id, self.user)
        self.keep_private()
        self.write_json({"job": job_document(job)})

    async def delete(self, job_id: str) -> None:
        """Cancel a job: a pending one never starts, a running one's worker is killed."""
        job = await self.services.jobs.cancel(job_id, self.user)
        self.keep_private()
        self.write_json({"job": job_document(job)})


class QueryResultHandler(BaseHandler):
    async def get(self, result_id: str) -> None:
        """A job's result, with what produced it and when."""
        result = await self.services.jobs.result(result_id, self.user)
        data = await asyncio.to_thread(_data_json, result.body, result.endpoint is not None)
        head = {
            "id": result.id,
            "endpoint": result.endpoint,
            "version": result.version,
            "retrieved_at": result.retrieved_at,
            "runtime_ms": result.runtime_ms,
        }
        self.keep_private()
        # The data is spliced in as bytes: it is never re-encoded on the event loop.
        self.finish(b'{"query_result": ' + json.dumps(head)[:-1].encode() + b', "data": ' +
                    data + b"}}")  # fmt: skip


class QueryResultFileHandler(BaseHandler):
    async def get(self, result_id: str) -> None:
        """A job's result as a file to download: JSON, or CSV (by the route's extension)."""
        extension = self.route.path.rsplit(".", 1)[1]
        result = await self.services.jobs.result(result_id, self.user)
        is_query = result.endpoint is not None
        if extension == "csv":
            body = await asyncio.to_thread(_csv, result.body, is_query)
            self.set_header("Content-Type", "text/csv; charset=utf-8")
        else:
            body = await asyncio.to_thread(_data_json, result.body, is_query)
        name = filename(result.endpoint, result.id, extension)
        self.set_header("Content-Disposition", f'attachment; filename="{name}"')
        self.keep_private()
        self.finish(body)  # for HEAD, Tornado sends the headers only

    head = get


def _data_json(body: bytes, is_query: bool) -> bytes:
    return to_json(result_data(body, is_query))


def _csv(body: bytes, is_query: bool) -> bytes:
    return to_csv(result_data(body, is_query))
