"""The one place where sync and async sessions differ.

Everything the library does to a session at its end (commit, roll back, close,
invalidate) is written once, as plain functions of a sync ``Session``. A flavour
says how to run such a function on its kind of session: in a worker thread for a
``Session`` (so the event loop never blocks), through ``AsyncSession.run_sync``
(SQLAlchemy's greenlet bridge) for an ``AsyncSession``. ``Database`` and
``AsyncDatabase`` each pick their flavour once, at class creation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from . import _hooks
from ._ceiling import lend_while_waiting
from ._redaction import redact

logger = logging.getLogger("middleware_sessions")

S = TypeVar("S", Session, AsyncSession)
T = TypeVar("T")

_ROLLBACK_FAILED = "Rolling back a database session failed; its connection will be discarded."


def settle(session: Session, commit: bool) -> None:
    """Commit (rolling back if that fails, then re-raising) or roll back."""
    if commit:
        try:
            session.commit()
        except BaseException:
            rollback(session)
            raise
    else:
        rollback(session)


def rollback(session: Session) -> None:
    """Roll back; a failure is logged, not raised (nothing was written either way)."""
    try:
        session.rollback()
    except DBAPIError as error:
        if not error.connection_invalidated:
            logger.warning(_ROLLBACK_FAILED, exc_info=redact(error))
        else:
            # The connection is gone (a server restart, a replica stopped): one line says
            # it all, a traceback would only make a routine failover look like a bug.
            logger.warning("%s The connection was lost: %s", _ROLLBACK_FAILED, redact(error))
    except Exception as error:
        logger.warning(_ROLLBACK_FAILED, exc_info=redact(error))


def finish(session: Session, commit: bool) -> None:
    """Settle what is left of the transaction, then close.

    The hooks the outcome made due wait in the session for its owner to take them
    (``_hooks.take_ready``), also when a failed commit raises from here.
    """
    try:
        if session.in_transaction():
            settle(session, commit)
    finally:
        session.close()


def discard(session: Session) -> None:
    """Close the session and throw its connection away instead of pooling it."""
    session.invalidate()


# Threads of our own for COMMIT, ROLLBACK and close. Sharing AnyIO's default limiter
# with `def` routes would let a full pool of route threads waiting for a connection
# leave the requests that hold the connections no thread to release them with.
# A plain executor rather than anyio.to_thread: 18-27 us per hop instead of 61-77 us
# at 32 concurrent requests (measured for issue 12); every call is awaited inside a
# shielded cancel scope, so AnyIO's cancellation handling would add nothing.
_EXECUTOR = ThreadPoolExecutor(max_workers=40, thread_name_prefix="middleware_sessions")


class Flavour(Generic[S]):
    """How one kind of session is created and driven; subclassed once per kind."""

    is_async: bool

    def create_engine(self, url: URL, options: Mapping[str, Any]) -> Any:
        """Create an engine of this flavour."""
        raise NotImplementedError

    def sessionmaker(self, engine: Any, options: Mapping[str, Any]) -> Any:
        """A session factory whose sessions carry our transaction-hook listeners."""
        raise NotImplementedError

    def sync_session(self, session: S) -> Session:
        """The sync ``Session`` behind ``session`` (itself, for a sync one)."""
        raise NotImplementedError

    async def run(self, session: S, fn: Callable[[Session], T]) -> T:
        """Run ``fn(sync_session)`` without blocking the event loop."""
        raise NotImplementedError

    async def dispose(self, engine: Any) -> None:
        """Dispose of the engine's pool."""
        raise NotImplementedError

    async def settle(self, session: S, commit: bool) -> None:
        """Commit or roll back; a failed commit is rolled back and re-raised."""
        await self.run(session, functools.partial(settle, commit=commit))

    async def finish(self, session: S, *, commit: bool, discard_connection: bool = False) -> None:
        """Settle what is left and close (or discard the connection), off the event loop."""
        sync_session = self.sync_session(session)
        if discard_connection:
            await self.run(session, discard)
        elif sync_session.in_transaction():
            await self.run(session, functools.partial(finish, commit=commit))
        else:
            # No transaction means no connection: closing only forgets objects, no I/O.
            sync_session.close()


class SyncFlavour(Flavour[Session]):
    """``Session``: I/O in a worker thread of our own, one hop per call."""

    is_async = False

    def create_engine(self, url: URL, options: Mapping[str, Any]) -> Engine:
        return create_engine(url, **options)

    def sessionmaker(self, engine: Engine, options: Mapping[str, Any]) -> sessionmaker[Any]:
        # Every engine a Database binds passes here: route threads waiting for one
        # of its connections lend their thread token meanwhile.
        lend_while_waiting(engine)
        # sessionmaker makes a subclass of its own: our event listeners stay on it.
        factory: sessionmaker[Any] = sessionmaker(engine, **options)
        _hooks.install(factory.class_)
        return factory

    def sync_session(self, session: Session) -> Session:
        return session

    async def run(self, session: Session, fn: Callable[[Session], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, fn, session)

    async def dispose(self, engine: Engine) -> None:
        await asyncio.get_running_loop().run_in_executor(_EXECUTOR, engine.dispose)


class AsyncFlavour(Flavour[AsyncSession]):
    """``AsyncSession``: the same sync functions, run through SQLAlchemy's greenlet bridge."""

    is_async = True

    def create_engine(self, url: URL, options: Mapping[str, Any]) -> AsyncEngine:
        return create_async_engine(url, **options)

    def sessionmaker(
        self, engine: AsyncEngine, options: Mapping[str, Any]
    ) -> async_sessionmaker[Any]:
        options = {"expire_on_commit": False, **options}
        # A sync session class of our own, so our event listeners stay on it. Its base
        # is the one the user asked for, else the async class's own (SQLModel's
        # AsyncSession brings a Session with .exec()).
        async_class = options.get("class_", AsyncSession)
        base: type[Session] = options.get("sync_session_class") or async_class.sync_session_class
        options["sync_session_class"] = type(base.__name__, (base,), {})
        _hooks.install(options["sync_session_class"])
        return async_sessionmaker(engine, **options)

    def sync_session(self, session: AsyncSession) -> Session:
        return session.sync_session

    async def run(self, session: AsyncSession, fn: Callable[[Session], T]) -> T:
        return await session.run_sync(fn)

    async def dispose(self, engine: AsyncEngine) -> None:
        await engine.dispose()


SYNC = SyncFlavour()
ASYNC = AsyncFlavour()
