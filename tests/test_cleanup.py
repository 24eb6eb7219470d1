"""The session is closed after every request, whatever happened: no connection is left out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware_sessions import AsyncDatabase

from .helpers import (
    AnyDatabase,
    Client,
    Item,
    add_item,
    add_orphan,
    checked_out,
    committed_names,
    make_app,
    route,
)


class CancelAtPoint:
    """Cancels the request once the route reaches ``point``, as a server's timeout would.

    Answers 504 if nothing was sent yet. The route sets ``point`` (see ``reach``)
    where the cancellation should land, so it lands there however slow the
    machine is.
    """

    def __init__(self, app: ASGIApp, point: anyio.Event) -> None:
        self.app, self.point = app, point

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = finished = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        async with anyio.create_task_group() as tg:

            async def cancel_at_point() -> None:
                await self.point.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(cancel_at_point)
            await self.app(scope, receive, send_wrapper)
            finished = True
            tg.cancel_scope.cancel()
        if not finished and not started:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"timeout"})


def reach(point: anyio.Event) -> None:
    """Set ``point`` from a route's sync work: in a worker thread, or on the event loop."""
    try:
        anyio.from_thread.run_sync(point.set)
    except RuntimeError:  # AsyncSession.run_sync: already on the event loop's thread
        point.set()


def slow_query(session: Session) -> None:
    """About a second of work inside the database."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_sleep(1)"))
    else:
        session.execute(
            text(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000)"
                " SELECT count(*) FROM c"
            )
        )


def write_then_query(point: anyio.Event) -> Callable[[Session, str], dict[str, Any]]:
    def work(session: Session, name: str) -> dict[str, Any]:
        result = add_item(session, name)
        reach(point)  # the cancellation is delivered while the slow query runs
        slow_query(session)
        return result

    return work


async def test_request_cancelled_mid_query_leaks_nothing(
    database: AnyDatabase, client: Client
) -> None:
    if isinstance(database, AsyncDatabase) and database.engine.dialect.name == "sqlite":
        pytest.skip(
            "aiosqlite cannot cancel a running query: SQLAlchemy then terminates the "
            "connection and aiosqlite leaves a close() task pending forever, which hangs the "
            "event loop's shutdown (aiosqlite 0.22 close-after-stop)"
        )
    app = make_app(database)
    point = anyio.Event()
    route(app, database, "/items", write_then_query(point), status_code=201)
    app.add_middleware(CancelAtPoint, point=point)

    response = await client(app).post("/items", params={"name": "cancelled"})

    assert response.status_code == 504
    assert await committed_names(database) == set()
    assert checked_out(database) == 0
    # The pool still works afterwards (for an app that cancels nothing).
    plain = make_app(database)
    route(plain, database, "/ok", add_item, status_code=201)
    assert (await client(plain).post("/ok", params={"name": "after"})).status_code == 201
    assert await committed_names(database) == {"after"}


async def test_request_cancelled_between_statements_rolls_back(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    flushed = anyio.Event()
    if isinstance(db, AsyncDatabase):
        adb = db

        @app.post("/items", status_code=201)
        async def create_async() -> None:
            adb.session.add(Item(name="cancelled"))
            await adb.session.flush()
            flushed.set()
            await anyio.sleep_forever()

    else:
        sdb = db

        @app.post("/items", status_code=201)
        def create_sync() -> None:
            sdb.session.add(Item(name="cancelled"))
            sdb.session.flush()
            # A thread cannot be cancelled: the cancellation lands once it returns.
            reach(flushed)

    app.add_middleware(CancelAtPoint, point=flushed)

    assert (await client(app).post("/items")).status_code == 504
    assert await committed_names(db) == set()
    assert checked_out(db) == 0


async def test_client_disconnect_mid_stream_returns_the_connection(database: AnyDatabase) -> None:
    db = database
    app = make_app(db)
    streamed = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        streamed.set()
        await anyio.sleep_forever()
        yield b"never"

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        db.session.add(Item(name="before-stream"))
        return StreamingResponse(body())

    async def receive() -> Message:
        await streamed.wait()
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},  # before 2.4, Starlette listens for the disconnect
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1),
    }
    with anyio.fail_after(30):  # only a hang: the disconnect ends the stream
        await app(scope, receive, send)

    assert sent[0]["status"] == 200
    assert await committed_names(db) == {"before-stream"}
    assert checked_out(db) == 0


async def test_every_outcome_leaves_no_connection_checked_out(
    database: AnyDatabase, client: Client
) -> None:
    def not_found(session: Session, name: str) -> None:
        add_item(session, name)
        raise HTTPException(404)

    def crash(session: Session, name: str) -> None:
        add_item(session, name)
        raise KeyError(name)

    app = make_app(database)
    route(app, database, "/ok", add_item, status_code=201)
    route(app, database, "/not-found", not_found)
    route(app, database, "/crash", crash)
    route(app, database, "/bad-commit", add_orphan, status_code=201)
    route(app, database, "/duplicate", add_item)
    c = client(app)

    statuses = [
        (await c.post("/ok", params={"name": "a"})).status_code,
        (await c.post("/not-found", params={"name": "b"})).status_code,
        (await c.post("/crash", params={"name": "c"})).status_code,
        (await c.post("/bad-commit", params={"name": "d"})).status_code,
        (await c.post("/duplicate", params={"name": "a"})).status_code,
    ]

    assert statuses == [201, 404, 500, 500, 500]
    assert await committed_names(database) == {"a"}
    assert checked_out(database) == 0
