"""``statement_timeout`` and ``lock_timeout``: the request rolls back, the pool stays healthy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .conftest import FLAVOURS, InProcess, PgDatabase
from .faultapp import add_work_route, committed_keys, write
from .load import REQUEST_BOUND

pytestmark = pytest.mark.postgres

QUERY_CANCELED = "57014"  # statement_timeout
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout
TOO_LONG = 60  # seconds: a query that would outlast any request's bound


def statement_timeout(flavour: str, milliseconds: int) -> dict[str, Any]:
    """Engine options that give every connection a ``statement_timeout``."""
    if flavour == "async":
        settings = {"statement_timeout": str(milliseconds)}
        return {"connect_args": {"server_settings": settings}}
    return {"connect_args": {"options": f"-c statement_timeout={milliseconds}"}}


def bump_counter(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """Write a row, then update the counter row, waiting at most 200 ms for its lock."""
    write(session, params)
    session.execute(text("SET LOCAL lock_timeout = '200ms'"))
    session.execute(text("UPDATE counters SET value = value + 1 WHERE id = 1"))
    return {"key": params["key"]}


async def database_busy(request: Request, exc: Exception) -> JSONResponse:
    """The app's own answer to a timeout: 503, try again shortly."""
    assert isinstance(exc, DBAPIError)
    if getattr(exc.orig, "sqlstate", None) in (QUERY_CANCELED, LOCK_NOT_AVAILABLE):
        return JSONResponse(
            {"detail": "The database is busy. Try again shortly."},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    raise exc


@pytest.fixture
def counter_locked(postgres_server: Any, pg_database: PgDatabase) -> Iterator[None]:
    """Another connection holds the counter row's lock (SELECT ... FOR UPDATE)."""
    dsn = postgres_server.superuser_url("psycopg", pg_database.name)
    with psycopg.connect(dsn.replace("postgresql+psycopg", "postgresql")) as conn:
        conn.execute("SELECT value FROM counters WHERE id = 1 FOR UPDATE")
        yield
        conn.rollback()


@pytest.mark.parametrize("handled", [False, True], ids=["default", "app-handler"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_statement_timeout_rolls_back_and_the_pool_stays_healthy(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    handled: bool,
    figures: dict[str, Any],
) -> None:
    """A 60 s query under a 200 ms statement_timeout: 500 (or the handler's 503), no row."""
    subject = in_process(flavour, statement_timeout(flavour, 200))
    if handled:
        subject.app.add_exception_handler(DBAPIError, database_busy)
    client = subject.client

    # The query asks for far longer than REQUEST_BOUND: an answer at all means
    # statement_timeout cut it short.
    with anyio.fail_after(REQUEST_BOUND):
        response = await client.post("/writes", params={"key": "too-slow", "sleep": TOO_LONG})
    after = await client.post("/writes", params={"key": "after"})

    figures.update(requests=2, faults=1, statuses={str(response.status_code): 1})
    if handled:
        assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    else:
        assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert after.status_code == 201
    assert committed_keys(pg_database.sync_url) == {"after"}
    await subject.assert_no_leaks(figures)


@pytest.mark.parametrize("handled", [False, True], ids=["default", "app-handler"])
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.usefixtures("counter_locked")
async def test_lock_timeout_rolls_back_and_the_pool_stays_healthy(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    handled: bool,
    figures: dict[str, Any],
) -> None:
    """The counter row is locked elsewhere: lock_timeout fires, the request's write is undone."""
    subject = in_process(flavour)
    add_work_route(subject.app, subject.db, "/bump", bump_counter)
    if handled:
        subject.app.add_exception_handler(DBAPIError, database_busy)
    client = subject.client

    # The lock is held until the test ends: an answer at all means lock_timeout fired.
    with anyio.fail_after(REQUEST_BOUND):
        response = await client.post("/bump", params={"key": "blocked"})
    after = await client.post("/writes", params={"key": "after"})

    figures.update(requests=2, faults=1, statuses={str(response.status_code): 1})
    assert response.status_code == (503 if handled else 500)
    assert after.status_code == 201
    assert committed_keys(pg_database.sync_url) == {"after"}
    await subject.assert_no_leaks(figures)
