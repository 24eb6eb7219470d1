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
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .conftest import FLAVOURS, InProcess, PgDatabase
from .load import NO_LEAKS, Outcomes, truth, wait_for_no_leaks

pytestmark = pytest.mark.postgres

POOL = {"pool_size": 2, "max_overflow": 1, "pool_timeout": 0.5}
CAPACITY = 3
REQUESTS = 12
QUERY = 2.0  # seconds each request spends in the database: longer than pool_timeout


async def pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    """What an app can do today: the pool's timeout becomes a 503 with Retry-After."""
    return JSONResponse(
        {"detail": "The service is busy. Try again shortly."},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def burst(client: httpx.AsyncClient, n: int, sleep: float) -> Outcomes:
    outcomes = Outcomes()

    async def one(key: str) -> None:
        started = time.monotonic()
        response = await client.post("/writes", params={"key": key, "sleep": sleep})
        outcomes.record(key, response, started)

    with anyio.fail_after(30):  # a deadlock would hang here
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, f"b{i}")
    return outcomes


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_requests_beyond_the_pool_wait_within_pool_timeout(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """9 requests of 0.3 s on 3 connections with pool_timeout=3: all wait their turn and succeed."""
    subject = in_process(flavour, {**POOL, "pool_timeout": 3})
    outcomes = await burst(subject.client, 9, 0.3)

    found = await wait_for_no_leaks(subject.checked_out, subject.tracker)
    figures.update(
        requests=9, statuses=outcomes.counts(), max_latency_s=round(outcomes.max_latency, 2)
    )
    figures["leaks"] = found
    assert set(outcomes.statuses.values()) == {201}
    assert 0.8 < outcomes.max_latency < 3  # three rounds of 0.3 s, no timeout
    assert truth(pg_database.sync_url, outcomes).acknowledged_missing == set()
    assert found == NO_LEAKS


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_pool_exhaustion_fails_fast_with_503_through_an_app_handler(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """12 requests of 2 s on 3 connections, pool_timeout=0.5: 3 succeed, 9 get 503 after 0.5 s."""
    subject = in_process(flavour, POOL)
    subject.app.add_exception_handler(PoolTimeout, pool_exhausted)
    outcomes = await burst(subject.client, REQUESTS, QUERY)

    found = await wait_for_no_leaks(subject.checked_out, subject.tracker)
    check = truth(pg_database.sync_url, outcomes)
    refused = [seconds for _, seconds, status, _ in outcomes.timeline if status == 503]
    figures.update(
        requests=REQUESTS,
        faults=f"{REQUESTS - CAPACITY} requests over capacity",
        statuses=outcomes.counts(),
        max_wait_before_503_s=round(max(refused), 2),
        leaks=found,
    )
    assert outcomes.counts() == {"201": CAPACITY, "503": REQUESTS - CAPACITY}
    # Failed after pool_timeout (0.5 s), not after queueing behind a 2 s query.
    assert max(refused) < QUERY - 0.5
    assert all(r.headers["retry-after"] == "1" for r in outcomes.errors.values())
    assert check.acknowledged_missing == set()
    assert check.failed_present == set()
    assert found == NO_LEAKS
    # The pool is whole again.
    assert (await subject.client.post("/writes", params={"key": "after"})).status_code == 201


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_pool_exhaustion_is_a_503_with_retry_after_without_any_handler(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """The middleware's own answer to an exhausted pool: 503 and Retry-After, nothing written."""
    subject = in_process(flavour, POOL)
    outcomes = await burst(subject.client, 6, QUERY)
    figures.update(requests=6, faults=6 - CAPACITY, statuses=outcomes.counts())

    refused = list(outcomes.errors.values())
    assert len(refused) == 6 - CAPACITY
    assert all(r.status_code == 503 and "retry-after" in r.headers for r in refused)
    assert truth(pg_database.sync_url, outcomes).failed_present == set()
    found = await wait_for_no_leaks(subject.checked_out, subject.tracker)
    figures["leaks"] = found
    assert found == NO_LEAKS
