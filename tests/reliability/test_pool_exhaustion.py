"""More concurrent requests than ``pool_size + max_overflow``: wait, or fail fast with 503.

A request that cannot get a connection within ``pool_timeout`` gets
``sqlalchemy.exc.TimeoutError`` from the pool. Nothing was written (no
connection, no transaction), so the honest answer is 503 with ``Retry-After``:
the service is overloaded, the request may be retried as it is. The middleware
answers so when the error escapes the app; an app's own handler can answer
first. Keep
``pool_timeout`` short (a second or two, not SQLAlchemy's default 30 s): a
worker stuck waiting for a connection serves nobody, and the client's own
timeout has usually fired long before 30 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from .._postgres import PostgresServer
from .conftest import FLAVOURS, InProcess, PgDatabase
from .faultapp import add_work_route, write
from .load import Outcomes, truth

pytestmark = pytest.mark.postgres

POOL = {"pool_size": 2, "max_overflow": 1, "pool_timeout": 0.5}
CAPACITY = 3
REQUESTS = 12
GATE = 4242  # the advisory lock the test holds and the held requests wait for


async def pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    """What an app can do today: the pool's timeout becomes a 503 with Retry-After."""
    return JSONResponse(
        {"detail": "The service is busy. Try again shortly."},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def held_write(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """Write the row, then wait inside the database until the test opens the gate."""
    write(session, params)
    session.execute(text("SELECT pg_advisory_xact_lock_shared(:gate)"), {"gate": GATE})
    return {"key": params["key"]}


class Gate:
    """An advisory lock the test holds: ``held_write`` requests keep their connection till it opens."""

    def __init__(self, dsn: str) -> None:
        self.connection = psycopg.connect(dsn, autocommit=True)
        self.connection.execute("SELECT pg_advisory_lock(%s)", (GATE,))

    def open(self) -> None:
        self.connection.execute("SELECT pg_advisory_unlock(%s)", (GATE,))


@pytest.fixture
def gate(postgres_server: PostgresServer, pg_database: PgDatabase) -> Iterator[Gate]:
    """A closed gate on ``pg_database`` (advisory locks belong to one database)."""
    dsn = postgres_server.superuser_url("psycopg", pg_database.name)
    gate = Gate(dsn.replace("postgresql+psycopg", "postgresql"))
    try:
        yield gate
    finally:
        gate.connection.close()  # opens it too, whatever happened


async def held_burst(subject: InProcess, gate: Gate, n: int) -> Outcomes:
    """``n`` concurrent held writes; the gate opens once all but CAPACITY were answered.

    The CAPACITY requests that got a connection keep it until the gate opens, so
    every other request must be refused by the pool, without a connection ever
    coming free: the order proves it, no clock involved.
    """
    add_work_route(subject.app, subject.db, "/held", held_write)
    outcomes = Outcomes()
    all_but_capacity_answered = anyio.Event()

    async def one(key: str) -> None:
        started = time.monotonic()
        response = await subject.client.post("/held", params={"key": key})
        outcomes.record(key, response, started)
        if len(outcomes.statuses) == n - CAPACITY:
            all_but_capacity_answered.set()

    with anyio.fail_after(30):  # a request that waited instead of failing would hang here
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, f"b{i}")
            await all_but_capacity_answered.wait()
            gate.open()
    return outcomes


def answered_before_the_gate_opened(outcomes: Outcomes, n: int) -> list[int]:
    """The statuses of the first ``n - CAPACITY`` answers, in the order they came."""
    return [status for _, _, status, _ in outcomes.timeline[: n - CAPACITY]]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_requests_beyond_the_pool_wait_within_pool_timeout(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """9 requests of 0.3 s on 3 connections with a long pool_timeout: all wait and succeed."""
    subject = in_process(flavour, {**POOL, "pool_timeout": 30})
    outcomes = Outcomes()

    async def one(key: str) -> None:
        started = time.monotonic()
        response = await subject.client.post("/writes", params={"key": key, "sleep": 0.3})
        outcomes.record(key, response, started)

    with anyio.fail_after(60):  # a deadlock would hang here
        async with anyio.create_task_group() as tg:
            for i in range(9):
                tg.start_soon(one, f"w{i}")

    first_start = min(started for started, _, _, _ in outcomes.timeline)
    last_end = max(started + took for started, took, _, _ in outcomes.timeline)
    figures.update(
        requests=9, statuses=outcomes.counts(), max_latency_s=round(outcomes.max_latency, 2)
    )
    assert set(outcomes.statuses.values()) == {201}
    # 9 requests holding a connection 0.3 s each on 3 connections: at least three
    # rounds, so they did queue (a bound that a busy machine only makes safer).
    assert last_end - first_start >= 3 * 0.3
    assert truth(pg_database.sync_url, outcomes).acknowledged_missing == set()
    await subject.assert_no_leaks(figures)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_pool_exhaustion_fails_fast_with_503_through_an_app_handler(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    gate: Gate,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """12 requests on 3 held connections, pool_timeout=0.5: 9 get 503 while 3 still hold."""
    subject = in_process(flavour, POOL)
    subject.app.add_exception_handler(PoolTimeout, pool_exhausted)
    outcomes = await held_burst(subject, gate, REQUESTS)

    check = truth(pg_database.sync_url, outcomes)
    refused = [seconds for _, seconds, status, _ in outcomes.timeline if status == 503]
    figures.update(
        requests=REQUESTS,
        faults=f"{REQUESTS - CAPACITY} requests over capacity",
        statuses=outcomes.counts(),
        max_wait_before_503_s=round(max(refused, default=0), 2),
    )
    assert outcomes.counts() == {"201": CAPACITY, "503": REQUESTS - CAPACITY}
    # Refused while every connection was still held: failed after pool_timeout,
    # not after queueing behind a held request.
    assert answered_before_the_gate_opened(outcomes, REQUESTS) == [503] * (REQUESTS - CAPACITY)
    assert all(r.headers["retry-after"] == "1" for r in outcomes.errors.values())
    assert check.acknowledged_missing == set()
    assert check.failed_present == set()
    await subject.assert_no_leaks(figures)
    # The pool is whole again.
    assert (await subject.client.post("/writes", params={"key": "after"})).status_code == 201


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_pool_exhaustion_is_a_503_with_retry_after_without_any_handler(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    gate: Gate,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """The middleware's own answer to an exhausted pool: 503 and Retry-After, nothing written."""
    subject = in_process(flavour, POOL)
    outcomes = await held_burst(subject, gate, 6)
    figures.update(requests=6, faults=6 - CAPACITY, statuses=outcomes.counts())

    refused = list(outcomes.errors.values())
    assert len(refused) == 6 - CAPACITY
    assert answered_before_the_gate_opened(outcomes, 6) == [503] * (6 - CAPACITY)
    assert all(r.status_code == 503 and "retry-after" in r.headers for r in refused)
    assert truth(pg_database.sync_url, outcomes).failed_present == set()
    await subject.assert_no_leaks(figures)
