"""Misuse is named: each diagnostic says what happened, why, and the fix."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from middleware_sessions import (
    AsyncDatabase,
    BlockingSessionWarning,
    ConcurrentSessionError,
    Database,
    DBSessionMiddleware,
    MissingSessionError,
)

from .helpers import (
    AnyDatabase,
    Base,
    Client,
    Item,
    add_item,
    checked_out,
    committed_names,
    make_app,
    poll_until,
    route,
)


def sqlite_database(cls: type[AnyDatabase], path: Path, **options: Any) -> AnyDatabase:
    url = f"sqlite:///{path}" if cls is Database else f"sqlite+aiosqlite:///{path}"
    setup = Database(f"sqlite:///{path}")
    Base.metadata.create_all(setup.engine)
    setup.engine.dispose()
    return cls(url, **options)


async def test_request_session_used_by_gathered_tasks_names_the_mistake(
    async_database: AsyncDatabase,
) -> None:
    adb = async_database
    app = make_app(adb)
    finished: list[None] = []

    @app.get("/gather")
    async def gather() -> None:
        async def read() -> None:
            try:
                await adb.session.execute(select(Item))
            finally:
                finished.append(None)

        await asyncio.gather(read(), read(), read())

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(ConcurrentSessionError, match="session_scope") as info:
            await c.get("/gather")

    assert "GET /gather" in str(info.value)
    assert info.value.__cause__ is not None
    # asyncio.gather doesn't cancel the siblings of a failed task: they run out.
    await poll_until(lambda: len(finished) == 3)
    assert checked_out(adb) == 0


async def test_concurrent_use_becomes_a_500_for_the_client(
    async_database: AsyncDatabase, client: Client
) -> None:
    adb = async_database
    app = make_app(adb)
    finished: list[None] = []

    @app.post("/gather")
    async def gather() -> None:
        async def write(n: int) -> None:
            try:
                adb.session.add(Item(name=f"g{n}"))
                await adb.session.flush()
            finally:
                finished.append(None)

        await asyncio.gather(*(write(n) for n in range(3)))

    assert (await client(app).post("/gather")).status_code == 500
    # asyncio.gather doesn't cancel the siblings of a failed task: wait till they ran
    # out, then start from a fresh pool (a sibling may have been cut off mid-statement).
    await poll_until(lambda: len(finished) == 3)
    assert checked_out(adb) == 0
    await adb.engine.dispose()
    assert await committed_names(adb) == set()


@pytest.mark.parametrize("cls", [Database, AsyncDatabase])
async def test_session_kept_past_its_request_cannot_be_reopened(
    cls: type[AnyDatabase], tmp_path: Path, client: Client
) -> None:
    db = sqlite_database(cls, tmp_path / "d.db")
    app = make_app(db)
    kept: list[Any] = []

    @app.get("/keep")
    async def keep() -> None:
        kept.append(db.session)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlockingSessionWarning)
        assert (await client(app).get("/keep")).status_code == 200

    session = kept[0]
    with pytest.raises(InvalidRequestError, match="permanently closed"):
        if isinstance(session, Session):
            session.add(Item(name="late"))
            session.flush()
        else:
            session.add(Item(name="late"))
            await session.flush()
    assert await committed_names(db) == set()


async def test_sync_session_on_the_event_loop_warns_once_per_call_site(
    tmp_path: Path, client: Client
) -> None:
    db = sqlite_database(Database, tmp_path / "w.db")
    assert isinstance(db, Database)
    app = make_app(db)

    @app.get("/blocking")
    async def blocking() -> int:
        return len(db.session.scalars(select(Item)).all())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            assert (await client(app).get("/blocking")).status_code == 200

    [warning] = [w for w in caught if w.category is BlockingSessionWarning]
    assert "def" in str(warning.message)
    assert "AsyncDatabase" in str(warning.message)
    assert warning.filename == __file__  # points at the route, not the library


async def test_sync_session_on_the_event_loop_can_raise(tmp_path: Path, client: Client) -> None:
    db = sqlite_database(Database, tmp_path / "r.db", blocking_check="raise")
    app = make_app(db)

    @app.get("/blocking")
    async def blocking() -> None:
        db.session.execute(select(Item))

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(RuntimeError, match="block the event loop"):
            await c.get("/blocking")


async def test_sync_session_in_a_def_route_does_not_warn(tmp_path: Path, client: Client) -> None:
    db = sqlite_database(Database, tmp_path / "ok.db", blocking_check="raise")
    app = make_app(db)
    route(app, db, "/items", add_item, status_code=201)

    assert (await client(app).post("/items", params={"name": "fine"})).status_code == 201


def test_on_event_loop_must_be_a_known_value() -> None:
    with pytest.raises(ValueError, match="'warn', 'raise' or 'ignore'"):
        Database("sqlite://", blocking_check="sometimes")  # type: ignore[arg-type]


async def test_middleware_installed_twice_says_so_and_still_works_once(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    app.add_middleware(DBSessionMiddleware, db=database)
    route(app, database, "/items", add_item, status_code=201)

    with pytest.warns(RuntimeWarning, match="installed twice"):
        response = await client(app).post("/items", params={"name": "once"})

    assert response.status_code == 201
    assert await committed_names(database) == {"once"}
    assert checked_out(database) == 0


async def test_database_without_middleware_names_the_one_that_is_installed(
    make_database: Callable[..., AnyDatabase], client: Client
) -> None:
    installed, forgotten = make_database(), make_database()
    app = make_app(installed)
    errors: list[str] = []

    @app.get("/both")
    async def both() -> None:
        _ = installed.session
        try:
            _ = forgotten.session
        except MissingSessionError as exc:
            errors.append(str(exc))

    assert (await client(app).get("/both")).status_code == 200
    [message] = errors
    assert "not for this database" in message
    assert repr(installed) in message
    assert "add_middleware" in message


async def test_rollback_of_a_4xx_logs_what_was_discarded_at_debug(
    database: AnyDatabase, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    alive: list[Item] = []  # the identity map holds objects weakly; the log lists live ones

    def add_two_then_refuse(session: Session, name: str) -> Any:
        alive.append(Item(name="flushed"))
        session.add(alive[-1])
        session.flush()
        session.add(Item(name="pending"))
        raise HTTPException(409)

    app = make_app(database)
    route(app, database, "/items", add_two_then_refuse)

    with caplog.at_level(logging.DEBUG, logger="middleware_sessions"):
        assert (await client(app).post("/items")).status_code == 409

    [line] = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert "POST /items (status 409)" in line
    assert "2 new" in line
    assert "Item(pending)" in line
    assert "Item(1)" in line
    assert await committed_names(database) == set()


async def test_no_debug_work_when_debug_logging_is_off(
    database: AnyDatabase, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(session: Session, name: str) -> Any:
        add_item(session, name)
        raise HTTPException(400)

    app = make_app(database)
    route(app, database, "/items", refuse)

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        assert (await client(app).post("/items", params={"name": "x"})).status_code == 400

    assert caplog.records == []


def test_on_event_loop_is_a_deprecated_alias_of_blocking_check() -> None:
    with pytest.warns(DeprecationWarning, match="blocking_check"):
        db = Database("sqlite://", on_event_loop="raise")

    assert db._blocking_check == "raise"
