"""Commit or roll back, decided at http.response.start, before the client sees the status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from .helpers import (
    AnyDatabase,
    Client,
    add_item,
    add_orphan,
    checked_out,
    committed_names,
    make_app,
    route,
)


def add_then_fail(status: int) -> Callable[[Session, str], Any]:
    def work(session: Session, name: str) -> Any:
        add_item(session, name)
        raise HTTPException(status, "no")

    return work


def add_then_crash(session: Session, name: str) -> Any:
    add_item(session, name)
    raise ZeroDivisionError("boom")


async def test_commits_when_the_response_is_a_success(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    route(app, database, "/items", add_item, status_code=201)

    response = await client(app).post("/items", params={"name": "kept"})

    assert response.status_code == 201
    assert await committed_names(database) == {"kept"}
    assert checked_out(database) == 0


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500, 503])
async def test_rolls_back_when_the_route_returns_an_error_status(
    database: AnyDatabase, client: Client, status: int
) -> None:
    app = make_app(database)
    route(app, database, "/items", add_then_fail(status))

    response = await client(app).post("/items", params={"name": "dropped"})

    assert response.status_code == status
    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def test_rolls_back_and_propagates_when_the_route_raises(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    route(app, database, "/items", add_then_crash)

    response = await client(app).post("/items", params={"name": "dropped"})

    assert response.status_code == 500
    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def test_exception_escaping_the_app_reaches_the_caller(database: AnyDatabase) -> None:
    app = make_app(database)
    route(app, database, "/items", add_then_crash)
    transport = httpx.ASGITransport(app=app)  # raise_app_exceptions=True

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(ZeroDivisionError):
            await c.post("/items", params={"name": "dropped"})

    assert await committed_names(database) == set()


async def test_commit_on_decides_which_statuses_commit(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database, commit_on=lambda status: status < 300 or status == 409)
    route(app, database, "/conflict", add_then_fail(409))
    route(app, database, "/moved", add_item, status_code=302)

    assert (await client(app).post("/conflict", params={"name": "recorded"})).status_code == 409
    moved = await client(app).post("/moved", params={"name": "not-recorded"})

    assert moved.status_code == 302
    assert await committed_names(database) == {"recorded"}


async def test_redirects_commit_by_default(database: AnyDatabase, client: Client) -> None:
    app = make_app(database)
    route(app, database, "/moved", add_item, status_code=303)

    assert (await client(app).post("/moved", params={"name": "kept"})).status_code == 303
    assert await committed_names(database) == {"kept"}


async def test_failed_commit_turns_the_success_into_a_500(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    route(app, database, "/items", add_orphan, status_code=201)

    response = await client(app).post("/items", params={"name": "orphan"})

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def test_failed_commit_is_a_500_even_with_a_sqlalchemy_error_handler(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    handled: list[str] = []

    @app.exception_handler(SQLAlchemyError)
    async def on_db_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        handled.append(type(exc).__name__)
        return JSONResponse({"detail": "database error"}, status_code=409)

    route(app, database, "/items", add_orphan, status_code=201)
    route(app, database, "/dupes", add_item)

    response = await client(app).post("/items", params={"name": "orphan"})
    assert response.status_code == 500
    assert "Caught handled exception" not in response.text
    assert await committed_names(database) == set()

    # The handler still works for errors raised inside the route.
    assert (await client(app).post("/dupes", params={"name": "x"})).status_code == 200
    assert (await client(app).post("/dupes", params={"name": "x"})).status_code == 409
    assert handled == ["IntegrityError"]
    assert checked_out(database) == 0


async def test_failed_commit_reaches_the_server_as_the_database_error(
    database: AnyDatabase,
) -> None:
    app = make_app(database)
    route(app, database, "/items", add_orphan, status_code=201)
    transport = httpx.ASGITransport(app=app)

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(SQLAlchemyError):
            await c.post("/items", params={"name": "orphan"})


async def test_failed_commit_sends_no_body_after_the_replacement_response(
    database: AnyDatabase,
) -> None:
    app = make_app(database)
    route(app, database, "/items", add_orphan, status_code=201)
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/items",
        "raw_path": b"/items",
        "root_path": "",
        "query_string": b"name=orphan",
        "headers": [(b"host", b"test")],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }
    with pytest.raises(SQLAlchemyError):
        await app(scope, receive, send)

    starts = [m for m in messages if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [500]
    assert messages[-1] == {"type": "http.response.body", "body": b"Internal Server Error"} or (
        messages[-1]["type"] == "http.response.body" and not messages[-1].get("more_body", False)
    )
    assert b"orphan" not in b"".join(m.get("body", b"") for m in messages)


async def test_explicit_commit_in_the_route_is_kept_even_on_error(
    database: AnyDatabase, client: Client
) -> None:
    def commit_then_fail(session: Session, name: str) -> Any:
        add_item(session, name)
        session.commit()
        add_item(session, name + "-after")
        raise HTTPException(400)

    app = make_app(database)
    route(app, database, "/items", commit_then_fail)

    assert (await client(app).post("/items", params={"name": "early"})).status_code == 400
    assert await committed_names(database) == {"early"}
