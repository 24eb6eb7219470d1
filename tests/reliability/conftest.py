"""Fixtures of the fault tests, and the figures they leave in ``docs/reliability.md``.

Each test records what it did through the ``figures`` fixture (requests tried,
faults injected, leaks found, ...). At the end of the run the figures are
written as JSON to ``$MIDDLEWARE_SESSIONS_RELIABILITY_FIGURES`` when that is
set, and, when ``MIDDLEWARE_SESSIONS_RELIABILITY=1`` (``make reliability``),
rendered into the generated section of ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from fastapi import FastAPI

from middleware_sessions import AsyncDatabase

from .._postgres import Driver, PostgresServer
from .faultapp import (
    AnyDatabase,
    SessionTracker,
    build_app,
    checked_out,
    create_schema,
    make_database,
)
from .load import NO_LEAKS, wait_for_no_leaks
from .report import write as write_report

RELIABILITY = os.environ.get("MIDDLEWARE_SESSIONS_RELIABILITY") == "1"
FIGURES_ENV = "MIDDLEWARE_SESSIONS_RELIABILITY_FIGURES"

full_run_only = pytest.mark.skipif(
    not RELIABILITY,
    reason="slow: runs with `make reliability` (MIDDLEWARE_SESSIONS_RELIABILITY=1 pytest tests/reliability)",
)

FLAVOURS = [pytest.param("async", id="asyncpg"), pytest.param("sync", id="psycopg")]

_database_names = (f"rel{n}" for n in itertools.count())
_figures: dict[str, dict[str, Any]] = {}
_outcomes: dict[str, str] = {}
_started = time.monotonic()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """This test's figures: fill in what it did; they end up in docs/reliability.md."""
    entry: dict[str, Any] = {"doc": (request.function.__doc__ or "").strip().split("\n")[0]}
    _figures[request.node.nodeid] = entry
    return entry


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/reliability/" not in report.nodeid:
        return
    if report.when == "call" or report.outcome != "passed":
        previous = _outcomes.get(report.nodeid)
        if previous is None or previous == "passed":
            _outcomes[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        if report.when == "call" and report.nodeid in _figures:
            _figures[report.nodeid]["duration_s"] = round(report.duration, 1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _outcomes:
        return
    data = {
        "outcomes": _outcomes,
        "figures": _figures,
        "wall_time_s": round(time.monotonic() - _started, 1),
        "full_run": RELIABILITY,
    }
    if path := os.environ.get(FIGURES_ENV):
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if RELIABILITY:
        write_report(data)


@dataclass(frozen=True)
class PgDatabase:
    """One fresh database with the fault app's tables, on a PostgreSQL server."""

    server: PostgresServer
    name: str

    def url(self, driver: Driver) -> str:
        return self.server.url(driver, database=self.name)

    @property
    def sync_url(self) -> str:
        return self.url("psycopg")

    def url_for(self, flavour: str) -> str:
        return self.url("asyncpg" if flavour == "async" else "psycopg")


def new_database(server: PostgresServer) -> PgDatabase:
    name = next(_database_names)
    server.create_database(name)
    database = PgDatabase(server, name)
    create_schema(database.sync_url)
    return database


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[PgDatabase]:
    """A fresh database with the fault app's tables on the shared test server."""
    database = new_database(postgres_server)
    yield database
    postgres_server.drop_database(database.name)


@pytest.fixture
def admin(postgres_server: PostgresServer) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection (autocommit) for killing backends and holding locks."""
    dsn = postgres_server.superuser_url("psycopg").replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@dataclass
class InProcess:
    """The fault app on one database, and an in-process client for it."""

    db: AnyDatabase
    tracker: SessionTracker
    app: FastAPI
    client: httpx.AsyncClient

    def checked_out(self) -> int:
        return checked_out(self.db)

    async def assert_no_leaks(self, figures: dict[str, Any]) -> None:
        """Nothing left behind by this app's requests: see ``assert_no_leaks``."""
        await assert_no_leaks(self.checked_out, self.tracker, figures)


async def assert_no_leaks(
    checked_out: Callable[[], int], tracker: SessionTracker, figures: dict[str, Any]
) -> None:
    """No connection checked out, no session or transaction open, once cleanup has finished.

    What was found goes into ``figures["leaks"]`` (and so into the report) first.
    """
    found = await wait_for_no_leaks(checked_out, tracker)
    figures["leaks"] = found
    assert found == NO_LEAKS


@pytest.fixture
async def in_process(pg_database: PgDatabase) -> AsyncIterator[Callable[..., InProcess]]:
    """Build the fault app on ``pg_database``: ``in_process(flavour, engine_options)``."""
    made: list[InProcess] = []

    def make(flavour: str, engine_options: dict[str, Any] | None = None) -> InProcess:
        db, tracker = make_database(pg_database.url_for(flavour), flavour, engine_options)
        app = build_app(db, tracker)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)
        made.append(InProcess(db, tracker, app, client))
        return made[-1]

    yield make
    for subject in made:
        await subject.client.aclose()
        await dispose(subject.db)


async def dispose(db: AnyDatabase) -> None:
    if isinstance(db, AsyncDatabase):
        await db.engine.dispose()
    else:
        db.engine.dispose()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[str]]:
    """Errors the event loop reports instead of raising, e.g. a future nobody awaited.

    asyncpg leaves one behind ("Future exception was never retrieved ...
    ConnectionError: unexpected connection_lost() call") when a query is
    cancelled and SQLAlchemy then closes the connection. asyncio logs them at
    ERROR; the test counts them instead of failing on them, and checks that
    nothing else turned up.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[str] = []

    def collect(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.append(f"{context.get('message')}: {context.get('exception')!r}")

    loop.set_exception_handler(collect)
    try:
        yield seen
        gc.collect()  # "never retrieved" is reported when the future is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)


async def until_no_statement_runs(
    admin: psycopg.Connection[Any], database: str, seconds: float = 30
) -> None:
    """Wait until no backend of ``database`` is running a statement.

    Whatever a client gave up on (a COMMIT the server carries out regardless,
    say) is then over: what the database holds is final. ``seconds`` only bounds
    a hang.
    """
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND state = 'active' AND pid <> pg_backend_pid()"
    )
    with anyio.fail_after(seconds):
        while True:
            row = admin.execute(query, (database,)).fetchone()
            if row is not None and row[0] == 0:
                return
            await anyio.sleep(0.01)


def only_lost_connections(errors: list[str]) -> bool:
    return all("unexpected connection_lost() call" in error for error in errors)
