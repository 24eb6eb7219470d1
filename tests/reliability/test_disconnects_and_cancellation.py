"""Clients that hang up, and requests the server cancels: rollback unless started, no leak.

A disconnect does not cancel a Starlette route: the app finishes, its status is
decided (and the transaction settled) as usual, and the server drops what it
cannot deliver. Only a streaming body notices and stops. A server-side timeout
(an anyio cancel scope around the app) does cancel the route, at any await.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .conftest import (
    FLAVOURS,
    InProcess,
    PgDatabase,
    only_lost_connections,
    until_no_statement_runs,
)
from .faultapp import committed_keys
from .load import Outcomes, truth

pytestmark = pytest.mark.postgres

CANCELLED_REQUESTS = 60
ROUND = 20  # writes per round; the latency is measured again before each
CONCURRENCY = 4
WRITE_SLEEP = 0.05  # seconds each write spends in the database


def http_scope(method: str, path: str, query: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"content-length", b"1000")],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1),
    }


async def call(app: ASGIApp, scope: Scope, messages: list[Message]) -> list[Message]:
    """Run one request whose ``receive`` yields ``messages``, then waits for ever."""
    sent: list[Message] = []
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        # The server would log it; the test checks the outcome.
        with contextlib.suppress(Exception):
            await app(scope, receive, send)
    return sent


DISCONNECT: Message = {"type": "http.disconnect"}


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_disconnect_while_the_body_uploads_rolls_back(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """The route wrote, then the client vanished mid-body: no response started, no row."""
    subject = in_process(flavour)
    partial: Message = {"type": "http.request", "body": b"x" * 100, "more_body": True}
    sent = await call(subject.app, http_scope("POST", "/upload", "key=gone"), [partial, DISCONNECT])

    assert not [m for m in sent if m["type"] == "http.response.start" and m["status"] < 300]
    assert committed_keys(pg_database.sync_url) == set()
    figures.update(requests=1, faults=1)
    await subject.assert_no_leaks(figures)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_disconnect_while_the_route_awaits_the_database_still_settles_by_status(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """The client left during a 0.3 s query; the route finished, so its 201 was committed."""
    subject = in_process(flavour)
    body: Message = {"type": "http.request", "body": b"", "more_body": False}
    scope = http_scope("POST", "/writes", "key=orphaned&sleep=0.3")
    sent = await call(subject.app, scope, [body, DISCONNECT])

    assert sent[0]["status"] == 201
    assert committed_keys(pg_database.sync_url) == {"orphaned"}
    figures.update(requests=1, faults=1)
    await subject.assert_no_leaks(figures)


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_disconnect_mid_stream_keeps_the_committed_write_and_leaks_nothing(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    spec: str,
    figures: dict[str, Any],
) -> None:
    """The status (and so the commit) went out before the body; the stream then stops.

    ASGI 2.3 servers report the disconnect through ``receive``; from 2.4 on,
    ``send`` raises ``OSError`` instead (as uvicorn does).
    """
    subject = in_process(flavour)
    body: Message = {"type": "http.request", "body": b"", "more_body": False}
    scope = http_scope("GET", "/stream", "key=streamed&chunks=50&sleep=0.02")
    scope["asgi"]["spec_version"] = spec
    gone = anyio.Event()
    sent: list[Message] = []
    pending = [body]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await gone.wait()
        return DISCONNECT

    async def send(message: Message) -> None:
        if gone.is_set() and spec == "2.4":
            raise OSError("the client hung up")
        sent.append(message)
        if len(sent) == 3:
            gone.set()

    with anyio.fail_after(10):
        # Starlette's ClientDisconnect, as a server would see it.
        with contextlib.suppress(Exception):
            await subject.app(scope, receive, send)

    assert sent[0]["status"] == 200
    assert len(sent) < 10  # it did stop early
    assert committed_keys(pg_database.sync_url) == {"streamed"}
    figures.update(requests=1, faults=1)
    await subject.assert_no_leaks(figures)


class QueryTimeout:
    """Cancels the request after ``?timeout=`` seconds; 504 if nothing was sent yet."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        with anyio.move_on_after(float(params.get("timeout", 60))):
            await self.app(scope, receive, send_wrapper)
            return
        if not started:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"Gateway Timeout"})


async def uncancelled_latency(client: httpx.AsyncClient, prefix: str) -> float:
    """How long a write takes right now without a timeout, at the test's concurrency (median)."""
    took: list[float] = []

    async def probe(n: int) -> None:
        started = anyio.current_time()
        response = await client.post(
            "/writes", params={"key": f"{prefix}{n}", "sleep": WRITE_SLEEP}
        )
        took.append(anyio.current_time() - started)
        assert response.status_code == 201

    async with anyio.create_task_group() as tg:
        for n in range(CONCURRENCY):
            tg.start_soon(probe, n)
    return statistics.median(took)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_cancellation_at_random_points_never_acknowledges_a_rolled_back_write(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
    loop_errors: list[str],
) -> None:
    """60 writes (flush, 50 ms in the database, commit) cancelled anywhere in their course.

    Each timeout is drawn between 0 and twice the time an uncancelled write
    takes, measured just before each round of 20: on a busy machine the
    timeouts stretch with the requests, so some land before the COMMIT and some
    after it however slow the machine is.
    """
    subject = in_process(flavour, {"pool_size": CONCURRENCY})
    subject.app.add_middleware(QueryTimeout)
    commit_began: set[str] = set()

    @event.listens_for(subject.tracker.session_class, "before_commit")
    def remember(session: Session) -> None:
        commit_began.update(session.info.get("keys", ()))

    rng = random.Random(11)
    outcomes = Outcomes()
    limiter = anyio.Semaphore(CONCURRENCY)
    latencies: list[float] = []

    async def one(n: int, latency: float) -> None:
        async with limiter:
            key, timeout = f"c{n}", round(rng.uniform(0, 2) * latency, 4)
            started = anyio.current_time()
            params = {"key": key, "sleep": WRITE_SLEEP, "timeout": timeout}
            response = await subject.client.post("/writes", params=params)
            outcomes.record(key, response, started)

    with anyio.fail_after(120):
        for first in range(0, CANCELLED_REQUESTS, ROUND):
            latencies.append(await uncancelled_latency(subject.client, f"probe{first}-"))
            async with anyio.create_task_group() as tg:
                for n in range(first, first + ROUND):
                    tg.start_soon(one, n, latencies[-1])

    check = truth(pg_database.sync_url, outcomes)
    # A 504 whose row is there: the cancellation arrived once the COMMIT was on its
    # way (see test_cancellation_during_commit_reports_what_happened).
    cancelled_in_commit = check.failed_present & commit_began
    figures.update(
        requests=len(outcomes.statuses),
        faults=sum(1 for status in outcomes.statuses.values() if status == 504),
        statuses=outcomes.counts(),
        ambiguous=len(check.failed_present),
        uncancelled_latency_ms=[round(seconds * 1000) for seconds in latencies],
        asyncio_errors_logged=len(loop_errors),
    )
    assert only_lost_connections(loop_errors), loop_errors
    assert set(outcomes.statuses.values()) <= {201, 504}
    assert 0 < len(outcomes.acknowledged) < CANCELLED_REQUESTS
    assert check.acknowledged_missing == set()
    assert check.failed_present == cancelled_in_commit
    await subject.assert_no_leaks(figures)
    # After all that, the pool still serves.
    response = await subject.client.post("/writes", params={"key": "after"})
    assert response.status_code == 201


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_cancellation_during_commit_reports_what_happened(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    admin: psycopg.Connection[Any],
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """A timeout that fires while COMMIT runs: a 2xx with the row, or a 504 without it.

    The middleware shields the COMMIT: once sent, it finishes and its status goes
    out; the cancellation is delivered afterwards. (Unshielded, asyncpg gave up
    on the COMMIT that the server then carried out: a 504 for committed data.)
    With a sync ``Database`` the COMMIT runs in a thread, which cannot be
    cancelled anyway.
    """
    subject = in_process(flavour)
    subject.app.add_middleware(QueryTimeout)
    key = "slow-commit-1"
    # The route is quick; the COMMIT takes SLOW_COMMIT (0.3 s) in the server.
    response = await subject.client.post("/writes", params={"key": key, "timeout": 0.15})

    # Whatever the client did, the server finishes the COMMIT: look once it has.
    await until_no_statement_runs(admin, pg_database.name)
    present = key in committed_keys(pg_database.sync_url)
    figures.update(requests=1, faults=1)
    await subject.assert_no_leaks(figures)
    assert (response.status_code, present) in {(201, True), (504, False)}
