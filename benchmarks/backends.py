"""Databases to run against: a SQLite file and the throwaway PostgreSQL server.

Engine options are the ones ``AsyncDatabase(url)`` / ``Database(url)`` apply by
default (``pool_pre_ping`` on PostgreSQL, ``check_same_thread=False`` for sync
SQLite, ``hide_parameters``), and every variant gets the same ones.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import _pg, apps


@dataclass
class Backend:
    name: str
    async_url: str
    sync_url: str
    options: dict[str, Any]
    sync_connect_args: dict[str, Any] = field(default_factory=dict)
    server: Any = None  # the PostgresServer, when there is one

    def engines(self, **pool: Any) -> tuple[AsyncEngine, Engine]:
        """A fresh async and sync engine with the shared options and this pool."""
        options = {**self.options, **pool}
        async_engine = create_async_engine(self.async_url, **options)
        sync_engine = create_engine(
            self.sync_url, connect_args=dict(self.sync_connect_args), **options
        )
        if self.name == "sqlite":
            apps.sqlite_tuning(async_engine.sync_engine)
            apps.sqlite_tuning(sync_engine)
        return async_engine, sync_engine

    @property
    def versions(self) -> str:
        if self.server is None:
            import sqlite3

            return f"SQLite {sqlite3.sqlite_version}"
        return self.server.psql("SHOW server_version").strip().split()[0]


@contextlib.contextmanager
def sqlite() -> Iterator[Backend]:
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        path = Path(tmp) / "bench.db"
        backend = Backend(
            name="sqlite",
            async_url=f"sqlite+aiosqlite:///{path}",
            sync_url=f"sqlite:///{path}",
            options={"hide_parameters": True},
            sync_connect_args={"check_same_thread": False},
        )
        _, engine = backend.engines()
        apps.create_schema(engine)
        engine.dispose()
        yield backend


@contextlib.contextmanager
def postgresql() -> Iterator[Backend | str]:
    """Yield a Backend on a throwaway server, or a string saying why there is none."""
    module, reason = _pg.load()
    if module is None:
        assert reason is not None
        yield reason
        return
    with module.PostgresServer() as server:
        backend = Backend(
            name="postgresql",
            async_url=server.url("asyncpg"),
            sync_url=server.url("psycopg"),
            options={"hide_parameters": True, "pool_pre_ping": True},
            server=server,
        )
        _, engine = backend.engines()
        apps.create_schema(engine)
        engine.dispose()
        yield backend
