"""db.session is the request's own session everywhere the request runs, and nowhere else."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from fastapi import BackgroundTasks, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from middleware_sessions import AsyncDatabase, DBSessionMiddleware, MissingSessionError

from .helpers import AnyDatabase, Client, Item, checked_out, committed_names, make_app


async def test_same_session_in_dependency_route_handler_stream_and_background(
    database: AnyDatabase, client: Client
) -> None:
    seen: dict[str, int] = {}
    db = database
    app = make_app(db)

    class Boom(Exception):
        pass

    def dependency() -> Iterator[None]:
        seen["dependency"] = id(db.session)
        yield
        seen["dependency_exit"] = id(db.session)

    async def async_dependency() -> AsyncIterator[None]:
        seen["async_dependency"] = id(db.session)
        yield

    @app.exception_handler(Boom)
    async def on_boom(request: Request, exc: Boom) -> JSONResponse:
        seen["handler"] = id(db.session)
        return JSONResponse({}, status_code=418)

    def record(where: str) -> None:
        seen[where] = id(db.session)

    async def arecord(where: str) -> None:
        seen[where] = id(db.session)

    @app.get("/sync", dependencies=[Depends(dependency), Depends(async_dependency)])
    def sync_route(background: BackgroundTasks) -> None:
        seen["sync_route"] = id(db.session)
        background.add_task(record, "sync_background")
        background.add_task(arecord, "async_background")

    @app.get("/async", dependencies=[Depends(dependency)])
    async def async_route() -> None:
        seen["async_route"] = id(db.session)

    @app.get("/raise")
    async def raising_route() -> None:
        seen["raise_route"] = id(db.session)
        raise Boom

    @app.get("/stream")
    async def stream_route() -> StreamingResponse:
        seen["stream_route"] = id(db.session)

        async def body() -> AsyncIterator[bytes]:
            seen["stream_body"] = id(db.session)
            yield b"x"

        return StreamingResponse(body())

    c = client(app)
    assert (await c.get("/sync")).status_code == 200
    one_request = {k: seen.pop(k) for k in list(seen)}
    assert len(set(one_request.values())) == 1, one_request
    assert set(one_request) == {
        "dependency",
        "dependency_exit",
        "async_dependency",
        "sync_route",
        "sync_background",
        "async_background",
    }

    assert (await c.get("/async")).status_code == 200
    assert len({seen.pop("dependency"), seen.pop("async_route"), seen.pop("dependency_exit")}) == 1

    assert (await c.get("/raise")).status_code == 418
    assert seen.pop("raise_route") == seen.pop("handler")

    assert (await c.get("/stream")).text == "x"
    assert seen.pop("stream_route") == seen.pop("stream_body")
    assert checked_out(db) == 0


async def test_concurrent_requests_never_share_a_session(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    owners: dict[int, str] = {}
    clashes: list[str] = []

    alive: list[object] = []  # ids are only unique among live objects

    async def check(tag: str) -> None:
        session = db.session
        alive.append(session)
        owner = owners.setdefault(id(session), tag)
        if owner != tag:
            clashes.append(f"{tag} got the session of {owner}")

    if isinstance(db, AsyncDatabase):

        @app.get("/{tag}")
        async def async_route(tag: str) -> str:
            await check(tag)
            await asyncio.sleep(random.random() / 100)
            await check(tag)
            return str(id(db.session))

    else:

        @app.get("/{tag}")
        def sync_route(tag: str) -> str:
            anyio.from_thread.run(check, tag)
            return str(id(db.session))

    c = client(app)
    results = await asyncio.gather(*(c.get(f"/r{n}") for n in range(300)))

    assert [r.status_code for r in results] == [200] * 300
    assert clashes == []
    assert len(owners) == 300
    assert checked_out(db) == 0


async def test_session_is_closed_after_the_request(database: AnyDatabase, client: Client) -> None:
    db = database
    app = make_app(db)
    kept: list[Any] = []

    @app.post("/items", status_code=201)
    async def create() -> None:
        kept.append(db.session)

    assert (await client(app).post("/items")).status_code == 201
    session = kept[0]
    assert not session.in_transaction()
    assert list(session.identity_map.values()) == []


async def test_outside_a_request_db_session_raises_missing_session_error(
    database: AnyDatabase,
) -> None:
    with pytest.raises(MissingSessionError, match="add_middleware") as info:
        _ = database.session
    assert "session_scope" in str(info.value)
    assert isinstance(info.value, RuntimeError)


async def test_a_task_that_outlives_its_request_cannot_use_the_session(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    released = asyncio.Event()
    outcome: list[BaseException | None] = []

    async def straggler() -> None:
        await released.wait()
        try:
            _ = db.session
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    tasks: list[asyncio.Task[None]] = []

    @app.get("/spawn")
    async def spawn() -> None:
        tasks.append(asyncio.create_task(straggler()))  # copies the request's context

    assert (await client(app).get("/spawn")).status_code == 200
    released.set()
    await tasks[0]

    assert isinstance(outcome[0], MissingSessionError)
    assert "already closed" in str(outcome[0])
    assert checked_out(db) == 0


async def test_two_databases_in_one_app_have_their_own_sessions(
    make_database: Callable[..., AnyDatabase], client: Client
) -> None:
    first, second = make_database(), make_database()
    app = make_app(first)
    app.add_middleware(DBSessionMiddleware, db=second)
    ids: list[int] = []

    @app.get("/both")
    async def both() -> None:
        ids.extend([id(first.session), id(second.session), id(first.session)])

    assert (await client(app).get("/both")).status_code == 200
    assert ids[0] == ids[2] != ids[1]


async def test_untouched_database_of_two_stays_untouched(
    make_database: Callable[..., AnyDatabase], client: Client
) -> None:
    first, second = make_database(), make_database()
    app = make_app(first)
    app.add_middleware(DBSessionMiddleware, db=second)

    if isinstance(first, AsyncDatabase):

        @app.post("/items", status_code=201)
        async def create_async() -> None:
            first.session.add(Item(name="only-first"))

    else:

        @app.post("/items", status_code=201)
        def create_sync() -> None:
            first.session.add(Item(name="only-first"))

    assert (await client(app).post("/items")).status_code == 201
    assert await committed_names(second) == {"only-first"}  # same tables, one database
    assert checked_out(first) == checked_out(second) == 0


async def test_route_reading_what_it_wrote_sees_its_own_writes(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)

    if isinstance(db, AsyncDatabase):
        adb = db

        @app.post("/items")
        async def create_async() -> list[str]:
            adb.session.add(Item(name="mine"))
            return list((await adb.session.scalars(select(Item.name))).all())

    else:
        sdb = db

        @app.post("/items")
        def create_sync() -> list[str]:
            sdb.session.add(Item(name="mine"))
            return list(sdb.session.scalars(select(Item.name)))

    assert (await client(app).post("/items")).json() == ["mine"]
