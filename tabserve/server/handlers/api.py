"""The Analytics Extensions and TabPy API: /info, /evaluate, /status, /endpoints, /query."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...errors import (
    EvaluateDisabled,
    NotFound,
)
from ...protocol import JobKind
from ...store.records import JobRecord
from .. import paging
from ..cache import Call, check_max_age
from ..executor import JobResult
from ..flight import MAX_FLIGHT_BODY, data_path
from ..jobs import KIND_EVALUATE, KIND_EVALUATE_NO_QUERY, KIND_QUERY, job_document
from .base import BaseHandler

if TYPE_CHECKING:
    from ..users import UserService

# What ``GET /endpoints`` may filter and sort on (``server.paging``).
ENDPOINT_FIELDS: dict[str, type] = {
    "name": str,
    "type": str,
    "version": int,
    "description": str,
    "target": str,
    "is_public": bool,
    "creation_time": int,
    "last_modified_time": int,
}
# And ``GET /users``: permissions is the comma-separated list, so ``permissions:has:manage``.
USER_FIELDS: dict[str, type] = {"name": str, "permissions": str}


class InfoHandler(BaseHandler):
    async def get(self) -> None:
        """Tableau's Test Connection: static facts about this server."""
        settings = self.services.settings
        features: dict[str, Any] = {}
        if settings.auth_enabled:
            methods: dict[str, Any] = {}
            if "basic-auth" in settings.auth_methods:  # the password file, or store users
                methods["basic-auth"] = {}
            bearer = self.services.auth.bearer
            if bearer is not None:
                methods["oauth-jwt"] = bearer.config.info()
            features["authentication"] = {"required": True, "methods": methods}
        # A failed sandbox self-check refuses ad-hoc scripts: Tableau should know up front.
        features["evaluate_enabled"] = settings.evaluate_enabled and self.services.sandbox.ok
        features["gzip_enabled"] = settings.gzip_enabled
        features["arrow_enabled"] = settings.arrow_enabled
        info: dict[str, Any] = {
            "description": self.services.service.description,
            "creation_time": self.services.service.creation_time,
            "state_path": self.services.state_path,
            "server_version": __version__,
            "name": self.services.service.name,
            "versions": {"v1": {"features": features}},
        }
        if not self.services.sandbox.ok:
            # Exactly TabPy's answer while all is well; the reason only when something is not.
            info["sandbox"] = self.services.sandbox.info()
        self.add_cors_headers()
        self.write_json(info)


def prefers_async(values: list[str]) -> bool:
    """Whether ``Prefer`` headers (RFC 7240) ask for ``respond-async``. A preference is a
    token, optionally ``=value`` and ``;`` parameters; anything malformed is ignored, as
    the RFC says, and never refused."""
    for value in values:
        for preference in value.split(","):
            token = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if token == "respond-async":
                return True
    return False


_MAX_DELTA_SECONDS = 2**31


def cache_control_max_age(values: list[str]) -> int | None:
    """The ``max-age`` directive of ``Cache-Control`` request headers, or None; 400 when it
    is not a non-negative whole number."""
    for value in values:
        for directive in value.split(","):
            name, _, argument = directive.partition("=")
            if name.strip().lower() == "max-age":
                text = argument.strip().strip('"')
                if not (text.isdigit() and text.isascii()):
                    return check_max_age(text, "Cache-Control: max-age")
                # RFC 9111 §1.2.2: a delta-seconds too large to hold counts as 2^31 (and int()
                # refuses over 4,300 digits, which would be a 500).
                return _MAX_DELTA_SECONDS if len(text) > 10 else min(int(text), _MAX_DELTA_SECONDS)
    return None


class CallHandler(BaseHandler):
    """/evaluate and /query: answered at once, from the cache, or as an asynchronous job
    (``ResultCache.answer`` decides which)."""

    async def answer(
        self,
        run: Callable[[], Awaitable[JobResult]],
        submit: Callable[[], Awaitable[JobRecord]],
        target: str,
        scope: str,
        default: int | None,
    ) -> None:
        headers = self.request.headers
        answer = await self.services.cache.answer(
            Call(
                scope=f"{self._scope()}|{scope}",
                target=target,
                parts=self.body_parts,
                encoding=self.content_encoding,
                header_max_age=cache_control_max_age(headers.get_list("Cache-Control")),
                default_max_age=default,
                asynchronous=prefers_async(headers.get_list("Prefer")),
                run=run,
                submit=submit,
            )
        )
        if answer.job is not None:
            self._write_job(answer.job)
        else:
            assert answer.result is not None
            self._write_result(answer.result, answer.age)

    def _scope(self) -> str:
        """Who may share a cached answer: callers with the same permissions (and the same
        endpoint restriction, for endpoint keys)."""
        user = self.user
        return f"{','.join(sorted(user.permissions))}|{user.endpoint or ''}"

    def _write_result(self, result: JobResult, age: float | None) -> None:
        self.meta = result.meta
        if age is not None:
            # A hit ran nothing: the access log and metrics must not count the original run.
            self.meta = {k: v for k, v in result.meta.items() if k in ("model", "version")}
            self.set_header("Age", str(int(age)))
        self.add_cors_headers()
        self.finish_body(result.body)

    def _write_job(self, job: JobRecord) -> None:
        self.set_header("Location", f"/jobs/{job.id}")
        self.set_header("Preference-Applied", "respond-async")
        self.keep_private()
        self.add_cors_headers()
        self.write_json({"job": job_document(job)}, status=202)


class EvaluateHandler(CallHandler):
    async def post(self) -> None:
        """Run an ad-hoc script in a worker; the worker parses the body and encodes the result."""
        settings = self.services.settings
        if not settings.evaluate_enabled:
            raise EvaluateDisabled()
        flight = self.services.flight
        # Only a small body can name a Flight table: a large one is not joined to find out.
        small = self._received <= MAX_FLIGHT_BODY
        path = data_path(self.body, self.content_encoding) if flight and small else None
        if flight is not None and path is not None:
            # Arrow Flight (Tableau Prep): the input is the caller's stored table.
            self.services.auth.authorize(self.user, "evaluate")
            self.services.sandbox.require_evaluate()
            result = await flight.evaluate(
                self.user, path, self.body, self.content_encoding, settings.evaluate_timeout
            )
        else:
            # The 'evaluate' permission, checked here: Tableau's connection test is exempt
            # (for password-file users; a token needs the evaluate scope even for that).
            self.services.auth.authorize_evaluate(
                self.user, self._received, lambda: self.body, self.content_encoding
            )
            self.services.sandbox.require_evaluate()
            options: dict[str, Any] = {"encoding": self.content_encoding}
            refusal = self.services.auth.script_query_refusal(self.user)
            if refusal is not None:
                options["query_refusal"] = refusal  # the worker raises it from tabpy.query()
            kind = KIND_EVALUATE if refusal is None else KIND_EVALUATE_NO_QUERY

            def run() -> Awaitable[JobResult]:
                return self.services.executor.run(
                    JobKind.EVALUATE, self.body_parts, settings.evaluate_timeout, options
                )

            def submit() -> Awaitable[JobRecord]:
                return self.services.jobs.submit(
                    self.user, kind, None, self.body, self.content_encoding
                )

            await self.answer(run, submit, "evaluate", kind, settings.evaluate_max_age)
            return
        self.meta = result.meta
        self.add_cors_headers()
        self.finish_body(result.body)


class StatusHandler(BaseHandler):
    async def get(self) -> None:
        """Load status of every deployed endpoint."""
        self.add_cors_headers()
        await self.services.endpoints.ensure_fresh()
        self.write_json(self.services.endpoints.statuses())


class EndpointsHandler(BaseHandler):
    async def get(self) -> None:
        """Every deployed endpoint's description, keyed by name, as TabPy answers; with paging
        parameters, one page of them as a list, in the pagination envelope."""
        self.add_cors_headers()
        await self.services.endpoints.ensure_fresh()
        infos = self.services.endpoints.infos()
        query = self.list_query()
        if not paging.asked(query):
            self.write_json(infos)
            return
        items = [{"name": name, **info} for name, info in infos.items()]
        page, pagination = paging.paginate(items, query, ENDPOINT_FIELDS)
        self.write_json({"pagination": pagination.as_json(), "endpoints": page})

    async def post(self) -> None:
        """Deploy a new endpoint (version 1)."""
        endpoint = await self.services.endpoints.add(await self.json_body())
        self.write_json({endpoint.name: endpoint.info()}, status=201)


class EndpointHandler(BaseHandler):
    async def get(self, name: str) -> None:
        """One endpoint's description, unwrapped (as TabPy answers)."""
        self.add_cors_headers()
        await self.services.endpoints.ensure_fresh()
        self.write_json(self.services.endpoints.info(name))

    async def put(self, name: str) -> None:
        """Update an endpoint; a new version when ``should_update_version`` is true."""
        endpoint = await self.services.endpoints.update(name, await self.json_body())
        self.write_json({endpoint.name: endpoint.info()})

    async def delete(self, name: str) -> None:
        """Remove an endpoint: it stops answering at once."""
        await self.services.endpoints.remove(name)
        self.set_status(204)
        self.finish()


class UploadDestinationHandler(BaseHandler):
    async def get(self) -> None:
        """Where TabPy's client writes pickles before deploying (shared filesystems only)."""
        staging = self.services.endpoints.registry.staging
        self.write_json({"path": str(staging)})


class QueryHandler(CallHandler):
    async def post(self, name: str) -> None:
        """Call a deployed function in a worker: ``{"data": {...}}`` or ``{"data": [...]}``."""
        endpoints = self.services.endpoints
        model = await endpoints.resolve(name)  # unknown: a 404 without using a worker
        self.endpoint = name  # deployed, so a bounded metrics label

        def run() -> Awaitable[JobResult]:
            return endpoints.query(name, self.body_parts, self.content_encoding)

        def submit() -> Awaitable[JobRecord]:
            endpoints.guard()  # refused now, not later in the job
            return self.services.jobs.submit(
                self.user, KIND_QUERY, name, self.body, self.content_encoding
            )

        # The version is in the key: a redeploy never answers an older version's result.
        target = f"query\0{name}\0{model.name}\0{model.version}"
        await self.answer(run, submit, target, KIND_QUERY, model.max_age)

    get = post


class _UsersBase(BaseHandler):
    @property
    def users(self) -> UserService:
        users = self.services.users
        if users is None:
            raise NotFound(
                "Users are not kept in the store",
                "TABSERVE_USERS is not store: users come from the password file, edited with "
                "`tabserve user`",
            )
        return users


class UsersHandler(_UsersBase):
    async def get(self) -> None:
        """The store's users (names and permissions), one page at a time."""
        users = await self.users.list()
        page, pagination = paging.paginate(users, self.list_query(), USER_FIELDS)
        self.write_json({"pagination": pagination.as_json(), "users": page})

    async def post(self) -> None:
        """Add a user: ``{"name", "password", "permissions"}``."""
        self.write_json({"user": await self.users.add(await self.json_body())}, status=201)


class UserHandler(_UsersBase):
    async def get(self, name: str) -> None:
        self.write_json({"user": await self.users.get(name)})

    async def put(self, name: str) -> None:
        """Change a user's password, permissions or both."""
        self.write_json({"user": await self.users.update(name, await self.json_body())})

    async def delete(self, name: str) -> None:
        await self.users.delete(name)
        self.set_status(204)
        self.finish()
