"""Work done after the status went out: committed if the app finishes cleanly, else rolled back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from middleware_sessions import AsyncDatabase

from .helpers import AnyDatabase, Client, Item, checked_out, committed_names, make_app


def add_in_background(app: FastAPI, db: AnyDatabase, *, parent_id: int | None = None) -> None:
    """POST /items: adds 'route', and a background task adds 'background'."""
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_task() -> None:
            adb.session.add(Item(name="background", parent_id=parent_id))
            await adb.session.flush()

        @app.post("/items", status_code=201)
        async def create_async(background: BackgroundTasks) -> None:
            adb.session.add(Item(name="route"))
            background.add_task(async_task)

    else:
        sdb = db

        def sync_task() -> None:
            sdb.session.add(Item(name="background", parent_id=parent_id))
            sdb.session.flush()

        @app.post("/items", status_code=201)
        def create_sync(background: BackgroundTasks) -> None:
            sdb.session.add(Item(name="route"))
            background.add_task(sync_task)


async def with_scope_add(db: AnyDatabase, *names: str) -> None:
    if isinstance(db, AsyncDatabase):
        async with db.session_scope() as session:
            session.add_all(Item(name=n) for n in names)
    else:
        with db.session_scope() as sync_session:
            sync_session.add_all(Item(name=n) for n in names)


async def test_background_task_work_is_committed(database: AnyDatabase, client: Client) -> None:
    app = make_app(database)
    add_in_background(app, database)

    assert (await client(app).post("/items")).status_code == 201

    assert await committed_names(database) == {"route", "background"}
    assert checked_out(database) == 0


async def test_background_task_failure_rolls_back_only_its_own_work(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)

    def fail() -> None:
        db.session.add(Item(name="background"))
        raise RuntimeError("background task failed")

    if isinstance(db, AsyncDatabase):
        adb = db

        @app.post("/items", status_code=201)
        async def create_async(background: BackgroundTasks) -> None:
            adb.session.add(Item(name="route"))
            background.add_task(fail)

    else:
        sdb = db

        @app.post("/items", status_code=201)
        def create_sync(background: BackgroundTasks) -> None:
            sdb.session.add(Item(name="route"))
            background.add_task(fail)

    assert (await client(app).post("/items")).status_code == 201

    assert await committed_names(db) == {"route"}
    assert checked_out(db) == 0


async def test_failed_commit_after_the_response_started_is_logged_with_method_and_path(
    database: AnyDatabase, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(database)
    add_in_background(app, database, parent_id=424242)  # no such parent: COMMIT fails

    with caplog.at_level(logging.ERROR, logger="middleware_sessions"):
        response = await client(app).post("/items")

    assert response.status_code == 201  # already sent; the route's own work is committed
    assert await committed_names(database) == {"route"}
    [record] = [r for r in caplog.records if r.name == "middleware_sessions"]
    assert record.levelno == logging.ERROR
    assert "POST /items" in record.getMessage()
    assert record.exc_info is not None
    assert checked_out(database) == 0


async def test_streaming_body_reads_through_the_request_session(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    await with_scope_add(db, "a", "b")

    if isinstance(db, AsyncDatabase):
        adb = db

        @app.get("/export")
        async def export_async() -> StreamingResponse:
            async def rows() -> AsyncIterator[str]:
                for name in await adb.session.scalars(select(Item.name).order_by(Item.name)):
                    yield f"{name}\n"

            return StreamingResponse(rows())

    else:
        sdb = db

        @app.get("/export")
        def export_sync() -> StreamingResponse:
            def rows() -> Iterator[str]:
                for name in sdb.session.scalars(select(Item.name).order_by(Item.name)):
                    yield f"{name}\n"

            return StreamingResponse(rows())

    response = await client(app).get("/export")

    assert response.status_code == 200
    assert response.text.split() == ["a", "b"]
    assert checked_out(db) == 0


async def test_streaming_body_that_raises_rolls_back_its_writes(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)

    async def body() -> AsyncIterator[bytes]:
        yield b"partial"
        db.session.add(Item(name="during-stream"))
        raise RuntimeError("stream broke")

    @app.post("/items")
    async def create() -> StreamingResponse:
        db.session.add(Item(name="before-stream"))
        return StreamingResponse(body())

    response = await client(app).post("/items")

    assert response.status_code == 200  # the status went out before the body broke

    assert await committed_names(db) == {"before-stream"}
    assert checked_out(db) == 0


async def test_never_commit_mode_rolls_back_background_work_too(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database, commit_on=None)
    add_in_background(app, database)

    assert (await client(app).post("/items")).status_code == 201

    assert await committed_names(database) == set()
    assert checked_out(database) == 0
