"""Test helpers: tests inside one outer transaction, rolled back afterwards.

Route code that commits still leaves nothing behind: while the block runs, the
database's sessions (the request's ``db.session``, ``session_scope()``,
``db.sessionmaker()``, background tasks) are bound to one connection whose outer
transaction is rolled back at the end, and each session works inside a SAVEPOINT
(``join_transaction_mode="create_savepoint"``), so its COMMIT and ROLLBACK stay
inside the test.

Blocks nest: inside an outer transaction (say, one a session-scoped fixture opened
so that module- or session-wide fixtures can build data once), another
``outer_transaction(db)`` opens a SAVEPOINT on the same connection and rolls back
to it at the end, so each test still starts from the data the wider fixture made::

    with outer_transaction(db):              # Database
        ...
    async with async_outer_transaction(db):  # AsyncDatabase
        ...

This module does not need pytest. The pytest fixtures (``db_transaction``,
``async_db_transaction``) live in the plugin that pytest loads automatically when
the package is installed; they are importable from here too when pytest is.

All sessions share the one connection, so requests in a test must run one at a
time (which ``TestClient`` and ``httpx.AsyncClient`` do unless you gather them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from ._database import AsyncDatabase, Database

__all__ = ["async_outer_transaction", "outer_transaction"]

_JOIN = {"join_transaction_mode": "create_savepoint"}
_FIXTURES = ("async_db_transaction", "db_transaction", "middleware_sessions_databases")


def _begin_for_real(connection: Connection) -> None:
    # Python's sqlite3 driver only opens a transaction before a write, and a
    # SAVEPOINT outside one would commit on RELEASE: open it ourselves.
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN")


@contextmanager
def outer_transaction(db: Database[Any]) -> Iterator[Connection]:
    """Bind ``db``'s sessions to one connection; roll everything back at the end."""
    if not isinstance(db, Database):
        raise TypeError(
            "outer_transaction() takes a Database. For an AsyncDatabase use "
            "'async with async_outer_transaction(db)'."
        )
    binding = db._binding
    outer = binding.sessionmaker.kw.get("bind")
    if isinstance(outer, Connection):
        # Already inside one: a savepoint on the same connection isolates this block.
        savepoint = outer.begin_nested()
        try:
            yield outer
        finally:
            if savepoint.is_active:
                savepoint.rollback()
        return
    with binding.engine.connect() as connection:
        transaction = connection.begin()
        _begin_for_real(connection)
        # Same options and session class (with its hook listeners), bound to the connection.
        options = {**binding.sessionmaker.kw, **_JOIN, "bind": connection}
        factory = sessionmaker(class_=binding.sessionmaker.class_, **options)
        db._swap(replace(binding, sessionmaker=factory, replicas=None))
        try:
            yield connection
        finally:
            db._swap(binding)
            transaction.rollback()


@asynccontextmanager
async def async_outer_transaction(db: AsyncDatabase[Any]) -> AsyncIterator[AsyncConnection]:
    """Async twin of :func:`outer_transaction`, for an ``AsyncDatabase``."""
    if not isinstance(db, AsyncDatabase):
        raise TypeError(
            "async_outer_transaction() takes an AsyncDatabase. For a Database use "
            "'with outer_transaction(db)'."
        )
    binding = db._binding
    outer = binding.sessionmaker.kw.get("bind")
    if isinstance(outer, AsyncConnection):
        savepoint = await outer.begin_nested()
        try:
            yield outer
        finally:
            if savepoint.is_active:
                await savepoint.rollback()
        return
    try:
        async with binding.engine.connect() as connection:
            transaction = await connection.begin()
            await connection.run_sync(_begin_for_real)
            options = {**binding.sessionmaker.kw, **_JOIN, "bind": connection}
            factory = async_sessionmaker(class_=binding.sessionmaker.class_, **options)
            db._swap(replace(binding, sessionmaker=factory, replicas=None))
            try:
                yield connection
            finally:
                db._swap(binding)
                await transaction.rollback()
    finally:
        # Pooled connections belong to the event loop that opened them, and test runners
        # often start a loop per test: close them on this one, so the next test starts clean.
        await binding.engine.dispose()


def __getattr__(name: str) -> Any:
    # The fixtures need pytest; import them only when asked for.
    if name in _FIXTURES:
        from . import _pytest_plugin

        return getattr(_pytest_plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
