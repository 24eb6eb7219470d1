"""An exhausted pool is a quick 503; database errors leave the app without SQL or values."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from middleware_sessions import AsyncDatabase

from .helpers import AnyDatabase, Client, add_item, checked_out, committed_names, make_app, route

SECRET = "tok-7f3a9c-secret"


async def test_request_that_finds_no_free_connection_gets_503_with_retry_after(
    make_database: Callable[..., AnyDatabase], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_database(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2})
    holding = anyio.Event()
    release = anyio.Event()
    app = make_app(db)

    def hold(session: Session, name: str) -> Any:
        add_item(session, name)
        anyio.from_thread.run_sync(holding.set)
        anyio.from_thread.run(release.wait)
        return {"name": name}

    if isinstance(db, AsyncDatabase):
        adb = db

        @app.post("/hold", status_code=201)
        async def hold_async(name: str) -> Any:
            await adb.session.run_sync(add_item, name)
            holding.set()
            await release.wait()
            return {"name": name}

    else:
        route(app, db, "/hold", hold, status_code=201)
    route(app, db, "/items", add_item, status_code=201)
    c = client(app)
    statuses: dict[str, httpx.Response] = {}

    async def post(path: str, name: str) -> None:
        statuses[name] = await c.post(path, params={"name": name})

    with caplog.at_level(logging.WARNING, logger="middleware_sessions"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "/hold", "holder")
            await holding.wait()
            await post("/items", "starved")
            release.set()

    assert statuses["holder"].status_code == 201
    busy = statuses["starved"]
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"
    assert busy.text == "Service Unavailable"
    assert "pool_timeout" in caplog.text
    assert await committed_names(db) == {"holder"}
    assert checked_out(db) == 0


def write_secret_twice(session: Session, name: str) -> Any:
    add_item(session, SECRET)
    return add_item(session, SECRET)  # unique violation: the value is in the driver's message


@pytest.mark.parametrize("redact", [True, False])
async def test_database_errors_leave_the_app_without_sql_or_values(
    database: AnyDatabase, redact: bool
) -> None:
    app = make_app(database, redact_errors=redact)
    route(app, database, "/items", write_secret_twice)
    transport = httpx.ASGITransport(app=app)

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(IntegrityError) as info:  # the type is kept for handlers and tests
            await c.post("/items")

    text = str(info.value)
    if redact:
        assert "INSERT" not in text
        assert SECRET not in text
        assert "items" in text  # what went wrong stays: the table (SQLite) or constraint
        assert info.value.__cause__ is None  # the driver's error, with its DETAIL line
        assert info.value.orig is not None  # still there for code that needs it
    else:
        assert "INSERT" in text


async def test_error_response_is_generic(database: AnyDatabase, client: Client) -> None:
    app = make_app(database)
    route(app, database, "/items", write_secret_twice)

    response = await client(app).post("/items")

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
