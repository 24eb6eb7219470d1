"""The session is closed after every request, whatever happened: no connection is left out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
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


class TimeoutMiddleware:
    """Cancels the request after ``seconds`` and answers 504 if nothing was sent yet."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        with anyio.move_on_after(self.seconds):
            await self.app(scope, receive, send_wrapper)
            return
        if not started:
            await send({"type": "http.response.start", "status": 504, "headers": []})
            await send({"type": "http.response.body", "body": b"timeout"})


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


def write_then_query(session: Session, name: str) -> dict[str, Any]:
    result = add_item(session, name)
    slow_query(session)
    return result


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
    route(app, database, "/items", write_then_query, status_code=201)
    app.add_middleware(TimeoutMiddleware, seconds=0.2)

    response = await client(app).post("/items", params={"name": "cancelled"})

    assert response.status_code == 504
    assert await committed_names(database) == set()
    assert checked_out(database) == 0
    # The pool still works afterwards.
    route(app, database, "/ok", add_item, status_code=201)
    assert (await client(app).post("/ok", params={"name": "after"})).status_code == 201
    assert await committed_names(database) == {"after"}


async def test_request_cancelled_between_statements_rolls_back(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    if isinstance(db, AsyncDatabase):
        adb = db

        @app.post("/items", status_code=201)
        async def create_async() -> None:
            adb.session.add(Item(name="cancelled"))
            await adb.session.flush()
            await anyio.sleep(5)

    else:
        sdb = db

        @app.post("/items", status_code=201)
        def create_sync() -> None:
            sdb.session.add(Item(name="cancelled"))
            sdb.session.flush()
            time.sleep(0.5)  # a thread cannot be cancelled: the request ends when it returns

    app.add_middleware(TimeoutMiddleware, seconds=0.2)

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
        await anyio.sleep(10)
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
    with anyio.fail_after(5):
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
