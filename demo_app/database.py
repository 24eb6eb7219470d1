"""The service's one ``AsyncDatabase``, and creating its tables at startup.

SQLite by default (a file next to where the server runs); ``DATABASE_URL``
switches to PostgreSQL, e.g. ``postgresql+asyncpg://user:password@host/ledger``.
``DATABASE_ISOLATION`` (``read-committed``, ``repeatable-read``, ``serializable``)
sets the isolation level of every transaction.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event, text

from middleware_sessions import AsyncDatabase

from .models import Base

DEFAULT_URL = "sqlite+aiosqlite:///./demo.db"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never wait for the writer, and the writer never waits for readers.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def isolation_options() -> dict[str, Any]:
    """Engine options for ``DATABASE_ISOLATION``, e.g. ``serializable``."""
    level = os.environ.get("DATABASE_ISOLATION")
    if not level:
        return {}
    return {"isolation_level": level.replace("-", " ").replace("_", " ").upper()}


def make_database(url: str | None = None) -> AsyncDatabase:
    """An ``AsyncDatabase`` for ``url``, else ``DATABASE_URL``, else the SQLite file.

    ``DATABASE_REPLICA_URLS`` (comma-separated PostgreSQL URLs) adds read replicas for
    the read-only routes; ``DATABASE_REPLICA_SECRET`` lets every worker check the
    others' read-your-writes cookies (see docs/replicas.md).
    """
    url = url or os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith("sqlite"):
        replicas = [u.strip() for u in os.environ.get("DATABASE_REPLICA_URLS", "").split(",")]
        return AsyncDatabase(
            url,
            replicas=[u for u in replicas if u],
            replica_secret=os.environ.get("DATABASE_REPLICA_SECRET") or None,
            engine_options=isolation_options(),
        )
    # SQLite has one writer at a time: concurrent transfers wait for the lock
    # (up to 30 s) instead of failing with "database is locked".
    options = {"connect_args": {"timeout": 30}, **isolation_options()}
    database = AsyncDatabase(url, engine_options=options)
    event.listen(database.engine.sync_engine, "connect", _sqlite_pragmas)
    return database


db = make_database()


async def create_tables(database: AsyncDatabase) -> None:
    """Create missing tables; safe when several workers start at once."""
    async with database.engine.begin() as conn:
        # Without a lock, two workers could both find a table missing and both
        # try to create it.
        if conn.dialect.name == "postgresql":
            # Any constant works, as long as nothing else in the database uses it.
            await conn.execute(text("SELECT pg_advisory_xact_lock(7110)"))
        elif conn.dialect.name == "sqlite":
            # The driver does not begin transactions before DDL; take the write lock.
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        await conn.run_sync(Base.metadata.create_all)


class PoolWatch:
    """Counts connection checkouts, so ``GET /debug/pool`` can show who needs one."""

    def __init__(self, database: AsyncDatabase) -> None:
        self.checkouts = 0
        self._engine = database.engine
        event.listen(database.engine.sync_engine, "checkout", self._on_checkout)

    def _on_checkout(self, *_: Any) -> None:
        self.checkouts += 1

    @property
    def checked_out(self) -> int | None:
        """Connections in use right now (``None`` for a pool that does not count them)."""
        count = getattr(self._engine.pool, "checkedout", None)
        return None if count is None else int(count())


pool_watch = PoolWatch(db)
