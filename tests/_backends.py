"""URLs for tests that build their databases themselves (SQLite file or PostgreSQL)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, create_engine, event

from ._postgres import PostgresServer
from .helpers import Base

_names = (f"c{n}" for n in itertools.count())

URL_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def fresh_urls(
    request: pytest.FixtureRequest, tmp_path: Path, metadata: MetaData = Base.metadata
) -> tuple[str, str]:
    """A new database with the test tables (or ``metadata``'s): its (sync, async) URLs."""
    if request.param == "sqlite":
        sync_url = f"sqlite:///{tmp_path / 'test.db'}"
        async_url = sync_url.replace("sqlite", "sqlite+aiosqlite", 1)
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        name = next(_names)
        server.create_database(name)
        sync_url = server.url("psycopg", database=name)
        async_url = server.url("asyncpg", database=name)
    engine = create_engine(sync_url)
    metadata.create_all(engine)
    engine.dispose()
    return sync_url, async_url


def enforce_foreign_keys(engine: Engine) -> None:
    """SQLite checks foreign keys only when asked to (PostgreSQL always does)."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys=ON")
