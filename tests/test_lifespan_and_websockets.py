"""Lifespan: our engine is disposed at shutdown, the user's is not. Websockets pass through."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, WebSocket
from sqlalchemy import create_engine, event, select
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.testclient import TestClient

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware, MissingSessionError

from .helpers import AnyDatabase, Base, Item, checked_out

DatabaseFactory = Callable[[Path, bool], AnyDatabase]


def sync_db(path: Path, given_engine: bool) -> AnyDatabase:
    url = f"sqlite:///{path}"
    return Database(engine=create_engine(url)) if given_engine else Database(url)


def async_db(path: Path, given_engine: bool) -> AnyDatabase:
    url = f"sqlite+aiosqlite:///{path}"
    return AsyncDatabase(engine=create_async_engine(url)) if given_engine else AsyncDatabase(url)


flavours = pytest.mark.parametrize("make", [sync_db, async_db], ids=["sync", "async"])


def closed_connections(db: AnyDatabase) -> list[object]:
    """Connections the pool closes (dispose closes the idle ones)."""
    closed: list[object] = []
    engine = db.engine.sync_engine if isinstance(db, AsyncDatabase) else db.engine
    event.listen(engine, "close", lambda *args: closed.append(args[0]))
    return closed


def app_touching(db: AnyDatabase, lifespan: Any = None) -> FastAPI:
    app = FastAPI(lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware, db=db)
    if isinstance(db, AsyncDatabase):
        adb = db

        @app.get("/touch")
        async def touch_async() -> None:
            await adb.session.execute(select(1))

    else:
        sdb = db

        @app.get("/touch")
        def touch_sync() -> None:
            sdb.session.execute(select(1))

    return app


@flavours
@pytest.mark.parametrize("with_user_lifespan", [False, True])
def test_engine_the_database_created_is_disposed_at_shutdown(
    make: DatabaseFactory, tmp_path: Path, with_user_lifespan: bool
) -> None:
    db = make(tmp_path / "l.db", False)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = app_touching(db, lifespan if with_user_lifespan else None)
    closed = closed_connections(db)

    with TestClient(app) as client:
        assert client.get("/touch").status_code == 200
        assert closed == []  # the connection went back to the pool, still open

    assert len(closed) == 1
    assert events == (["startup", "shutdown"] if with_user_lifespan else [])


@flavours
def test_engine_passed_in_by_the_user_is_left_alone(make: DatabaseFactory, tmp_path: Path) -> None:
    db = make(tmp_path / "l.db", True)
    app = app_touching(db)
    closed = closed_connections(db)

    with TestClient(app) as client:
        assert client.get("/touch").status_code == 200

    assert closed == []


@flavours
def test_database_can_be_used_again_after_a_shutdown(make: DatabaseFactory, tmp_path: Path) -> None:
    db = make(tmp_path / "l.db", False)
    app = app_touching(db)

    for _ in range(2):
        with TestClient(app) as client:
            assert client.get("/touch").status_code == 200


@flavours
def test_websocket_traffic_passes_through_and_uses_a_scope_per_unit_of_work(
    make: DatabaseFactory, tmp_path: Path
) -> None:
    db = make(tmp_path / "ws.db", False)
    setup = create_engine(f"sqlite:///{tmp_path / 'ws.db'}")
    Base.metadata.create_all(setup)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)
    outside_scope: list[bool] = []

    if isinstance(db, AsyncDatabase):
        adb = db

        @app.websocket("/ws")
        async def ws_async(websocket: WebSocket) -> None:
            await websocket.accept()
            try:
                _ = adb.session
            except MissingSessionError:
                outside_scope.append(True)
            async for name in websocket.iter_text():
                async with adb.session_scope() as session:
                    session.add(Item(name=name))
                await websocket.send_text(f"saved {name}")

    else:
        sdb = db

        @app.websocket("/ws")
        async def ws_sync(websocket: WebSocket) -> None:
            await websocket.accept()
            try:
                _ = sdb.session
            except MissingSessionError:
                outside_scope.append(True)
            async for name in websocket.iter_text():

                def save(name: str = name) -> None:
                    with sdb.session_scope() as session:
                        session.add(Item(name=name))

                await anyio.to_thread.run_sync(save)
                await websocket.send_text(f"saved {name}")

    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        for name in ("a", "b"):
            ws.send_text(name)
            assert ws.receive_text() == f"saved {name}"

    assert outside_scope == [True]
    with setup.connect() as conn:
        assert sorted(conn.scalars(select(Item.name))) == ["a", "b"]
    assert checked_out(db) == 0
    setup.dispose()
