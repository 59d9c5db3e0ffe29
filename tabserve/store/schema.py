"""The store's tables, declared once, and the migrations that build them, for both SQL backends.

SQLite (the state directory's ``tabserve.db``) and PostgreSQL get their DDL from the same
declarations: a column has one of a few portable types, rendered per dialect. The schema
only ever changes by appending a :class:`Migration` to :data:`MIGRATIONS`; a database records
the migrations it has had in ``schema_migrations``, and :func:`pending` says what it lacks.

Adding a feature's tables (jobs, cached results, API keys, ...) is one new migration at the
end of the list, with the next number. Never edit or reorder a migration that has shipped:
databases in the field have already applied it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]

# Portable column types -> each dialect's spelling. Integers are 64-bit everywhere (SQLite's
# INTEGER is); JSON documents are stored as text, so both dialects read them the same way.
_TYPES: dict[str, dict[Dialect, str]] = {
    "text": {"sqlite": "TEXT", "postgresql": "TEXT"},
    "int": {"sqlite": "INTEGER", "postgresql": "BIGINT"},
    "real": {"sqlite": "REAL", "postgresql": "DOUBLE PRECISION"},
    "bytes": {"sqlite": "BLOB", "postgresql": "BYTEA"},
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = False
    default: str | None = None  # an SQL literal both dialects accept, e.g. "0" or "''"

    def ddl(self, dialect: Dialect) -> str:
        text = f"{self.name} {_TYPES[self.type][dialect]}"
        if not self.nullable:
            text += " NOT NULL"
        if self.default is not None:
            text += f" DEFAULT {self.default}"
        return text


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    # Foreign keys as (columns, "table(columns)", on delete action).
    foreign_keys: tuple[tuple[tuple[str, ...], str, str], ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()

    def ddl(self, dialect: Dialect) -> list[str]:
        parts = [column.ddl(dialect) for column in self.columns]
        parts.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        for columns, target, on_delete in self.foreign_keys:
            parts.append(
                f"FOREIGN KEY ({', '.join(columns)}) REFERENCES {target} ON DELETE {on_delete}"
            )
        statements = [f"CREATE TABLE {self.name} (\n  " + ",\n  ".join(parts) + "\n)"]
        for columns in self.indexes:
            index = f"{self.name}_{'_'.join(columns)}_idx"
            statements.append(f"CREATE INDEX {index} ON {self.name} ({', '.join(columns)})")
        return statements


Step = Table | Callable[[Dialect], list[str]]


@dataclass(frozen=True)
class Migration:
    """One schema change: tables to create, or statements rendered for a dialect."""

    number: int
    description: str
    steps: Sequence[Step] = field(default_factory=tuple)

    def statements(self, dialect: Dialect) -> list[str]:
        result: list[str] = []
        for step in self.steps:
            result.extend(step.ddl(dialect) if isinstance(step, Table) else step(dialect))
        return result


# -- migration 1: endpoints, their archives, users, service info, the change generation ------

ENDPOINTS = Table(
    "endpoints",
    (
        Column("name", "text"),
        Column("type", "text"),  # model | alias
        Column("version", "int"),
        Column("target", "text", nullable=True),  # an alias's target
        # Everything else about the endpoint (description, docstring, schema, ...) as JSON:
        # the fields TabPy's state.ini carries, so import/export is a plain copy.
        Column("document", "text"),
        Column("modified", "int"),  # the generation that last changed this row
    ),
    primary_key=("name",),
)

ARCHIVES = Table(
    "archives",
    (
        Column("name", "text"),
        Column("version", "int"),
        Column("data", "bytes"),  # the pickle_archive file, byte for byte
        Column("sha256", "text"),
        Column("created", "real"),
    ),
    primary_key=("name", "version"),
)

USERS = Table(
    "users",
    (
        Column("name", "text"),  # normalised: lower case, as the password file compares them
        # The password file's hash token (scrypt$..., or TabPy's PBKDF2 hex), so a user moves
        # between a password file and a store unchanged.
        Column("password_hash", "text"),
        Column("permissions", "text", nullable=True),  # comma list; NULL: all (TabPy's)
        Column("modified", "int"),
    ),
    primary_key=("name",),
)

SERVICE_INFO = Table(
    "service_info",  # [Service Info] of state.ini: name, description, CORS headers
    (Column("key", "text"), Column("value", "text")),
    primary_key=("key",),
)

GENERATION = Table(
    # One row: bumped by every change to endpoints, users or service info, in the same
    # transaction. Replicas compare it after a reconnect, because notifications are not
    # replayed.
    "generation",
    (Column("id", "int"), Column("value", "int")),
    primary_key=("id",),
)


def _seed_generation(dialect: Dialect) -> list[str]:
    return ["INSERT INTO generation (id, value) VALUES (1, 0)"]


# -- migration 2: the tables the jobs, result cache and API keys (issue 12) build on ---------
# Declared here so that the schema's shape is settled with the store; the features that use
# them change them, if they must, with a migration of their own.

JOBS = Table(
    "jobs",
    (
        Column("id", "text"),
        Column("kind", "text"),  # evaluate | query
        Column("endpoint", "text", nullable=True),
        Column("owner", "text", nullable=True),  # the user who submitted it
        # 1 pending, 2 started, 3 success, 4 failure, 5 cancelled (Redash's codes)
        Column("status", "int"),
        Column("request", "bytes"),
        Column("encoding", "text", default="''"),  # the request's Content-Encoding
        Column("created", "real"),
        Column("started", "real", nullable=True),
        Column("finished", "real", nullable=True),
        Column("claimed_by", "text", nullable=True),  # replica id while it runs
        Column("heartbeat", "real", nullable=True),
        Column("error", "text", nullable=True),  # the {"message", "info"} envelope, as JSON
        Column("result_key", "text", nullable=True),  # -> results.key
    ),
    primary_key=("id",),
    indexes=(("status", "created"), ("owner",)),
)

RESULTS = Table(
    "results",
    (
        # A hash of what the answer depends on: endpoint, its version, the request body.
        Column("key", "text"),
        Column("endpoint", "text", nullable=True),
        Column("version", "int", nullable=True),
        Column("body", "bytes"),
        Column("retrieved_at", "real"),
        Column("size", "int"),
    ),
    primary_key=("key",),
    indexes=(("retrieved_at",),),
)

API_KEYS = Table(
    "api_keys",
    (
        Column("id", "text"),  # the public part shown in lists and logs
        Column("secret_hash", "text"),
        Column("user_name", "text"),
        Column("permissions", "text", nullable=True),  # NULL: the user's own
        Column("endpoint", "text", nullable=True),  # restricted to one endpoint, or NULL
        Column("created", "real"),
        Column("expires", "real", nullable=True),
        Column("revoked", "real", nullable=True),
        Column("last_used", "real", nullable=True),
    ),
    primary_key=("id",),
    indexes=(("user_name",),),
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "endpoints, archives, users, service info, change generation",
        (ENDPOINTS, ARCHIVES, USERS, SERVICE_INFO, GENERATION, _seed_generation),
    ),
    Migration(2, "jobs, cached results, API keys", (JOBS, RESULTS, API_KEYS)),
)

LATEST = MIGRATIONS[-1].number

# Every migration's own record; created before the first migration runs.
HISTORY = Table(
    "schema_migrations",
    (Column("number", "int"), Column("description", "text"), Column("applied", "real")),
    primary_key=("number",),
)


def pending(applied: int) -> list[Migration]:
    """The migrations a database at version ``applied`` still needs, in order."""
    return [m for m in MIGRATIONS if m.number > applied]


def check_numbers() -> None:
    """Migrations are numbered 1, 2, 3, ... with no gap (a test calls this)."""
    numbers = [m.number for m in MIGRATIONS]
    if numbers != list(range(1, len(numbers) + 1)):
        raise AssertionError(f"migration numbers must be 1..N in order, got {numbers}")
