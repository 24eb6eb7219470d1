"""Models and helpers the tests share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware

from ._postgres import PostgresServer, skip_reason
from ._replica import Replication, replication_skip_reason

# CI sets this: there the PostgreSQL tests must run, and a missing server fails them.
REQUIRE_POSTGRES = os.environ.get("MIDDLEWARE_SESSIONS_REQUIRE_POSTGRES") == "1"

AnyDatabase = Database | AsyncDatabase
# The ``client`` fixture: an in-process HTTP client for an app.
Client = Callable[[FastAPI], httpx.AsyncClient]


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parents"
    id: Mapped[int] = mapped_column(primary_key=True)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Checked only at COMMIT: the honest way to make a real commit fail on both backends.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED"), default=None
    )


def make_app(db: AnyDatabase, **middleware_options: Any) -> FastAPI:
    """A FastAPI app with the middleware installed for ``db``."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db, **middleware_options)
    return app


def route(
    app: FastAPI,
    db: AnyDatabase,
    path: str,
    work: Callable[..., Any],
    *,
    method: str = "POST",
    status_code: int = 200,
) -> None:
    """Add a route that runs ``work(session, name)`` on the request's session.

    With ``Database`` it is a ``def`` route (run in the threadpool); with
    ``AsyncDatabase`` an ``async def`` route calling ``db.session.run_sync``.
    Either way ``work`` receives a sync ``Session`` view of ``db.session`` and
    the ``name`` query parameter.
    """
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint(name: str = "") -> Any:
            return await adb.session.run_sync(work, name)

        endpoint: Callable[..., Any] = async_endpoint
    else:
        sdb = db

        def sync_endpoint(name: str = "") -> Any:
            return work(sdb.session, name)

        endpoint = sync_endpoint
    app.add_api_route(path, endpoint, methods=[method], status_code=status_code)


def add_item(session: Session, name: str) -> dict[str, Any]:
    """Insert an item and flush it, so a failing statement fails inside the route."""
    item = Item(name=name)
    session.add(item)
    session.flush()
    return {"id": item.id, "name": name}


def add_orphan(session: Session, name: str) -> dict[str, Any]:
    """Insert an item whose parent does not exist: the flush passes, the COMMIT fails."""
    return add_item_with_parent(session, name, parent_id=999_999)


def add_item_with_parent(session: Session, name: str, parent_id: int) -> dict[str, Any]:
    item = Item(name=name, parent_id=parent_id)
    session.add(item)
    session.flush()
    return {"id": item.id, "name": name}


async def committed_names(db: AnyDatabase) -> set[str]:
    """Item names a brand-new session sees: what a later request would read."""
    if isinstance(db, AsyncDatabase):
        async with db.sessionmaker() as session:
            return set((await session.scalars(select(Item.name))).all())
    with db.sessionmaker() as sync_session:
        return set(sync_session.scalars(select(Item.name)))


def checked_out(db: AnyDatabase) -> int:
    """Connections currently checked out of the database's pool."""
    return db.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


async def poll_until(predicate: Callable[[], bool], attempts: int = 1000) -> None:
    """Check ``predicate`` every 10 ms, for at most ``attempts`` times; fail if it never holds.

    For what finishes in the background (tasks running out, sessions closing):
    the test waits for it, not for a guessed delay. ``attempts`` only bounds a
    hang, so it can be generous.
    """
    for _ in range(attempts):
        if predicate():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"still not true after {attempts} attempts")


@contextmanager
def postgres_or_skip() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server, or a skip that says why not (a failure in CI)."""
    reason = skip_reason()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required here: {reason}")
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@contextmanager
def replication_or_skip() -> Iterator[Replication]:
    """A throwaway primary and streaming replica, or a skip that says why not (a failure in CI)."""
    reason = replication_skip_reason()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL replication is required here: {reason}")
        pytest.skip(reason)
    replication = Replication().start()
    try:
        yield replication
    finally:
        replication.stop()
