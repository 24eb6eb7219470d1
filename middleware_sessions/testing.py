"""Test helpers: every test inside one outer transaction, rolled back afterwards.

Route code that commits still leaves nothing behind: while the block runs, the
database's sessions (the request's ``db.session``, ``session_scope()``,
``db.sessionmaker()``, background tasks) are bound to one connection whose outer
transaction is rolled back at the end, and each session works inside a SAVEPOINT
(``join_transaction_mode="create_savepoint"``), so its COMMIT and ROLLBACK stay
inside the test.

Use the context managers directly::

    with outer_transaction(db):              # Database
        ...
    async with async_outer_transaction(db):  # AsyncDatabase
        ...

or, as a pytest plugin (registered automatically when the package is installed),
define ``middleware_sessions_databases`` in your ``conftest.py`` and request
``db_transaction`` (sync databases) or ``async_db_transaction`` (any; runs on
AnyIO's pytest plugin) in your tests.

All sessions share the one connection, so requests in a test must run one at a
time (which ``TestClient`` and ``httpx.AsyncClient`` do unless you gather them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from ._database import AsyncDatabase, Database

__all__ = [
    "async_db_transaction",
    "async_outer_transaction",
    "db_transaction",
    "middleware_sessions_databases",
    "outer_transaction",
]

_JOIN = {"join_transaction_mode": "create_savepoint"}


def _begin_for_real(connection: Connection) -> None:
    # Python's sqlite3 driver only opens a transaction before a write, and a
    # SAVEPOINT outside one would commit on RELEASE: open it ourselves.
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN")


@contextmanager
def outer_transaction(db: Database) -> Iterator[Connection]:
    """Bind ``db``'s sessions to one connection; roll everything back at the end."""
    if not isinstance(db, Database):
        raise TypeError(
            "outer_transaction() takes a Database. For an AsyncDatabase use "
            "'async with async_outer_transaction(db)'."
        )
    state = db._snapshot()
    with db.engine.connect() as connection:
        transaction = connection.begin()
        _begin_for_real(connection)
        # Same options and session class (with its hook listeners), bound to the connection.
        options = {**db.sessionmaker.kw, **_JOIN, "bind": connection}
        db.sessionmaker = sessionmaker(class_=db.sessionmaker.class_, **options)
        try:
            yield connection
        finally:
            db._restore(state)
            transaction.rollback()


@asynccontextmanager
async def async_outer_transaction(db: AsyncDatabase) -> AsyncIterator[AsyncConnection]:
    """Async twin of :func:`outer_transaction`, for an ``AsyncDatabase``."""
    if not isinstance(db, AsyncDatabase):
        raise TypeError(
            "async_outer_transaction() takes an AsyncDatabase. For a Database use "
            "'with outer_transaction(db)'."
        )
    state = db._snapshot()
    try:
        async with db.engine.connect() as connection:
            transaction = await connection.begin()
            await connection.run_sync(_begin_for_real)
            options = {**db.sessionmaker.kw, **_JOIN, "bind": connection}
            db.sessionmaker = async_sessionmaker(class_=db.sessionmaker.class_, **options)
            try:
                yield connection
            finally:
                db._restore(state)
                await transaction.rollback()
    finally:
        # Pooled connections belong to the event loop that opened them, and test runners
        # often start a loop per test: close them on this one, so the next test starts clean.
        await db.engine.dispose()


@pytest.fixture
def middleware_sessions_databases() -> Sequence[Database | AsyncDatabase]:
    """The databases to isolate; define this fixture in your ``conftest.py``."""
    raise pytest.UsageError(
        "The middleware_sessions test fixtures need to know your databases. "
        "middleware_sessions can't guess which Database objects your app uses. "
        "Define a fixture named 'middleware_sessions_databases' in conftest.py that "
        "returns them, e.g. 'return [myapp.db]'."
    )


def _as_list(databases: Any) -> list[Database | AsyncDatabase]:
    return list(databases) if isinstance(databases, Sequence) else [databases]


@pytest.fixture
def db_transaction(middleware_sessions_databases: Any) -> Iterator[None]:
    """Run the test inside outer transactions (sync ``Database`` objects) rolled back after it."""
    with ExitStack() as stack:
        for db in _as_list(middleware_sessions_databases):
            if isinstance(db, AsyncDatabase):
                raise pytest.UsageError(
                    f"db_transaction got {db!r}. An AsyncDatabase needs an event loop to "
                    "open its connection. Use the async_db_transaction fixture instead."
                )
            stack.enter_context(outer_transaction(db))
        yield


@pytest.fixture
async def async_db_transaction(
    middleware_sessions_databases: Any, anyio_backend: Any
) -> AsyncIterator[None]:
    """Like ``db_transaction``, for ``AsyncDatabase`` (and ``Database``) objects, on AnyIO."""
    async with AsyncExitStack() as stack:
        for db in _as_list(middleware_sessions_databases):
            if isinstance(db, AsyncDatabase):
                await stack.enter_async_context(async_outer_transaction(db))
            else:
                stack.enter_context(outer_transaction(db))
        yield
