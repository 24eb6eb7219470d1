"""PostgreSQL stopped and started again under concurrent writes: fail fast, recover alone.

These tests stop their own server, so they get one of their own: the shared
``postgres_server`` of the other tests is left alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from .._postgres import PostgresServer, ShutdownMode
from ..helpers import postgres_or_skip
from .conftest import FLAVOURS, assert_no_leaks, new_database, only_lost_connections
from .faultapp import AnyDatabase, build_app, checked_out, make_database
from .load import REQUEST_BOUND, Outcomes, post_write, truth

pytestmark = pytest.mark.postgres

WRITERS = 8
BEFORE = 60  # writes acknowledged before the stop
AFTER = 60  # writes acknowledged after the restart
OUTAGE = 1.5  # seconds the server stays down
# No request started during the outage may take longer than this, or than four
# times the slowest request before it, on a busy machine: still well below the
# waits a hang would show (connect and pool timeouts of HANG seconds).
FAIL_FAST = 2.0
HANG = 10


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server these tests may stop and start (a fixed port survives the restart)."""
    with postgres_or_skip() as server:
        yield server


def engine_options(flavour: str) -> dict[str, Any]:
    # A connect attempt during the outage is refused at once (closed port); the
    # timeouts bound the case where the host does not answer at all.
    connect = {"timeout": HANG} if flavour == "async" else {"connect_timeout": HANG}
    return {"pool_size": 5, "max_overflow": 5, "pool_timeout": HANG, "connect_args": connect}


@pytest.fixture
async def dispose() -> AsyncIterator[list[AnyDatabase]]:
    made: list[AnyDatabase] = []
    yield made
    for db in made:
        result = db.engine.dispose()
        if result is not None:
            await result


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_writes_fail_fast_during_a_restart_and_recover_without_an_app_restart(
    own_server: PostgresServer,
    flavour: str,
    mode: ShutdownMode,
    dispose: list[AnyDatabase],
    figures: dict[str, Any],
    loop_errors: list[str],
) -> None:
    """Stop PostgreSQL (fast shutdown, or a crash) under 8 writers, start it again."""
    database = new_database(own_server)
    db, tracker = make_database(database.url_for(flavour), flavour, engine_options(flavour))
    dispose.append(db)
    app = build_app(db, tracker)
    outcomes = Outcomes()
    restarted = anyio.Event()
    warmed_up = anyio.Event()  # BEFORE writes acknowledged
    done = anyio.Event()
    outage: list[float] = []  # [stopped at, started again at]
    acked_after_restart = 0

    async def writer(n: int) -> None:
        nonlocal acked_after_restart
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for i in range(100_000):
                if done.is_set():
                    return
                response = await post_write(client, outcomes, f"w{n}-{i}")
                if len(outcomes.acknowledged) >= BEFORE:
                    warmed_up.set()
                if response.is_success and restarted.is_set():
                    acked_after_restart += 1
                    if acked_after_restart >= AFTER:
                        done.set()
                if response.status_code >= 500:
                    await anyio.sleep(0.01)  # a client that backs off a little

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            for n in range(WRITERS):
                tg.start_soon(writer, n)
            await warmed_up.wait()
            outage.append(time.monotonic())
            await anyio.to_thread.run_sync(own_server.stop_server_only, mode)
            await anyio.sleep(OUTAGE)
            await anyio.to_thread.run_sync(own_server.start_again)
            outage.append(time.monotonic())
            restarted.set()

    check = truth(database.sync_url, outcomes)
    before = [s for at, s, _, _ in outcomes.timeline if at + s < outage[0]]
    fail_fast = max(FAIL_FAST, 4 * max(before))
    during = [s for at, s, _, _ in outcomes.timeline if outage[0] <= at < outage[1]]
    recovered = min(
        at + s for at, s, status, _ in outcomes.timeline if at >= outage[1] and status < 300
    )
    # Requests that were on their way when the server went down.
    in_flight = {key for at, s, _, key in outcomes.timeline if at < outage[0] < at + s}
    figures.update(
        requests=len(outcomes.statuses),
        faults=f"1 {mode} stop, {OUTAGE}s down",
        statuses=outcomes.counts(),
        max_latency_s=round(outcomes.max_latency, 2),
        max_latency_during_outage_s=round(max(during, default=0), 2),
        first_2xx_after_restart_s=round(recovered - outage[1], 2),
        acknowledged=len(outcomes.acknowledged),
        ambiguous=len(check.failed_present),
        fail_fast_bound_s=round(fail_fast, 2),
        asyncio_errors_logged=len(loop_errors),
    )
    assert only_lost_connections(loop_errors), loop_errors

    assert set(outcomes.statuses.values()) <= {201, 500}, outcomes.counts()
    assert outcomes.failed, "no request noticed the outage"
    assert max(during) < fail_fast, "a request hung during the outage"
    assert outcomes.max_latency < REQUEST_BOUND
    assert check.acknowledged_missing == set()
    assert check.unexplained == set()
    # A 500 whose row exists is possible only for a COMMIT the server carried out
    # and could not acknowledge before going down: a request in flight then.
    assert check.failed_present <= in_flight
    await assert_no_leaks(lambda: checked_out(db), tracker, figures)
