"""Fixtures: databases parametrised over sync/async and SQLite/PostgreSQL.

A test that takes ``database`` (or ``make_database``) runs four times: sync and
async, each on an SQLite file and on a throwaway PostgreSQL server (psycopg for
sync, asyncpg for async). Tests build the tiny app they need with
``helpers.make_app`` and talk to it with the ``client`` fixture.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.engine import Engine

from middleware_sessions import AsyncDatabase, Database

from ._postgres import PostgresServer
from ._replica import Replication
from .helpers import AnyDatabase, Base, Client, postgres_or_skip, replication_or_skip

BACKENDS = [
    pytest.param(("sync", "sqlite"), id="sync-sqlite"),
    pytest.param(("async", "sqlite"), id="async-sqlite"),
    pytest.param(("sync", "postgres"), id="sync-postgres", marks=pytest.mark.postgres),
    pytest.param(("async", "postgres"), id="async-postgres", marks=pytest.mark.postgres),
]

_database_names = (f"t{n}" for n in itertools.count())


@pytest.fixture
def anyio_backend() -> str:
    # SQLAlchemy's asyncio extension needs asyncio.
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run, or a skip that says why not."""
    with postgres_or_skip() as server:
        yield server


@pytest.fixture(scope="session")
def replication() -> Iterator[Replication]:
    """A primary and a streaming replica for the whole run, or a skip that says why not."""
    with replication_or_skip() as pair:
        yield pair


@pytest.fixture
def replicated(replication: Replication) -> Iterator[Replication]:
    """The primary and replica with a fresh database (``replicated.database``), empty tables.

    Whatever a test does to the replica (pause, delay, stop) is undone afterwards.
    """
    name = next(_database_names)
    replication.create_database(name)
    replication.database = name
    setup = Database(replication.url("psycopg"))
    Base.metadata.create_all(setup.engine)
    setup.engine.dispose()
    replication.replica.catch_up()
    yield replication
    replica = replication.replica
    if not replica.running:
        replica.start_again()
    replica.set_apply_delay(0)
    replica.resume_replay()
    replica.catch_up()


def _enforce_sqlite_foreign_keys(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _only(flavour: str) -> list[Any]:
    return [param for param in BACKENDS if param.values[0][0] == flavour]


@asynccontextmanager
async def _factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., AnyDatabase]]:
    """Build databases of ``request.param``'s flavour and backend, on one fresh database."""
    flavour, backend = request.param
    if backend == "sqlite":
        sync_url = f"sqlite:///{tmp_path / 'test.db'}"
        url = sync_url if flavour == "sync" else sync_url.replace("sqlite", "sqlite+aiosqlite", 1)
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        name = next(_database_names)
        server.create_database(name)
        sync_url = server.url("psycopg", database=name)
        url = sync_url if flavour == "sync" else server.url("asyncpg", database=name)
    setup = Database(sync_url)
    Base.metadata.create_all(setup.engine)
    setup.engine.dispose()

    made: list[AnyDatabase] = []

    def make(**kwargs: Any) -> AnyDatabase:
        db: AnyDatabase
        if flavour == "sync":
            # The tests drive sync sessions from async test code on purpose; the
            # blocking-use diagnostic has tests of its own.
            db = Database(url, **{"blocking_check": "ignore", **kwargs})
        else:
            db = AsyncDatabase(url, **kwargs)
        engine = db.engine if isinstance(db, Database) else db.engine.sync_engine
        if backend == "sqlite":
            _enforce_sqlite_foreign_keys(engine)
        made.append(db)
        return db

    make.url = url  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for db in made:
            if isinstance(db, AsyncDatabase):
                await db.engine.dispose()
            else:
                db.engine.dispose()


@pytest.fixture(params=BACKENDS)
async def make_database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., AnyDatabase]]:
    """Build databases of one flavour and backend, on one fresh database with empty tables."""
    async with _factory(request, tmp_path) as make:
        yield make


@pytest.fixture
def database(make_database: Callable[..., AnyDatabase]) -> AnyDatabase:
    """One database: sync or async, SQLite or PostgreSQL, with empty tables."""
    return make_database()


@pytest.fixture(params=_only("async"))
async def async_database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncDatabase]:
    """One ``AsyncDatabase``, on SQLite and on PostgreSQL, for what only the async flavour has."""
    async with _factory(request, tmp_path) as make:
        db = make()
        assert isinstance(db, AsyncDatabase)
        yield db


@pytest.fixture(params=_only("sync"))
async def sync_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """One ``Database``, on SQLite and on PostgreSQL, for what only the sync flavour has."""
    async with _factory(request, tmp_path) as make:
        db = make()
        assert isinstance(db, Database)
        yield db


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """In-process HTTP clients for an app; server errors come back as 500s."""
    clients: list[httpx.AsyncClient] = []

    def make(app: FastAPI) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        new = httpx.AsyncClient(transport=transport, base_url="http://test")
        clients.append(new)
        return new

    yield make
    for c in clients:
        await c.aclose()
