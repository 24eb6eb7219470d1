"""fastapi-async-sqlalchemy's ``SQLAlchemyMiddleware`` and ``db``, over ``AsyncDatabase``.

``create_middleware_and_session_proxy()`` returns a middleware class and a ``db``
proxy sharing one slot: creating the middleware builds an ``AsyncDatabase`` from
the peer's arguments and puts it there. Requests go through our
``DBSessionMiddleware`` (``commit_on_exit=True``: commit responses below 400;
``False``: never commit on its own), ``async with db():`` is
``session_scope()``, and ``multi_sessions=True`` is ``task_sessions()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.types import ASGIApp

from middleware_sessions._database import AsyncDatabase
from middleware_sessions._middleware import DBSessionMiddleware, _commit_below_400
from middleware_sessions.compat._errors import peer_errors

from .exceptions import MissingSessionError, SessionNotInitialisedError

# The peer's message, unchanged: it says what to do.
NO_ENGINE = "You need to pass a db_url or a custom_engine parameter."

__all__ = [
    "DefaultAsyncSession",
    "SQLAlchemyMiddleware",
    "create_middleware_and_session_proxy",
    "db",
]

try:
    from sqlmodel.ext.asyncio.session import (  # type: ignore[import-not-found,unused-ignore]
        AsyncSession as _SQLModelAsyncSession,
    )
except ImportError:  # pragma: no cover - depends on what is installed
    DefaultAsyncSession: type[AsyncSession] = AsyncSession
else:  # pragma: no cover - depends on what is installed
    DefaultAsyncSession = _SQLModelAsyncSession
"""The session class: SQLModel's ``AsyncSession`` when SQLModel is installed."""


class _Slot:
    """The database one middleware class and its ``db`` proxy share."""

    database: AsyncDatabase | None = None

    def get(self) -> AsyncDatabase:
        if self.database is None:
            raise SessionNotInitialisedError
        return self.database


def create_middleware_and_session_proxy() -> tuple[type[Any], Any]:
    """A new ``(SQLAlchemyMiddleware, db)`` pair of its own: one per database.

    ``FirstMiddleware, first_db = create_middleware_and_session_proxy()``; add each
    middleware to the app with its own ``db_url``, and use each ``db`` for its database.
    """
    slot = _Slot()

    class SQLAlchemyMiddleware(DBSessionMiddleware):
        """One ``db.session`` per request, settled before the status is sent.

        Takes ``db_url`` or ``custom_engine`` (``ValueError`` without either),
        ``engine_args`` for ``create_async_engine``, ``session_args`` for the
        sessionmaker and ``commit_on_exit``: commit responses below 400 (``True``)
        or only what routes commit themselves (``False``, the default). A 4xx/5xx
        or an exception rolls back; work after the response is settled, not lost.
        """

        __test__ = False  # not a test class, whatever its module is called

        def __init__(
            self,
            app: ASGIApp,
            db_url: str | URL | None = None,
            custom_engine: AsyncEngine | None = None,
            engine_args: Mapping[str, Any] | None = None,
            session_args: Mapping[str, Any] | None = None,
            commit_on_exit: bool = False,
        ) -> None:
            if not custom_engine and not db_url:
                raise ValueError(NO_ENGINE)  # word for word the peer's: code may match on it
            options = {"class_": DefaultAsyncSession, **(session_args or {})}
            if custom_engine is not None:
                database = AsyncDatabase(engine=custom_engine, session_options=options)
            else:
                database = AsyncDatabase(
                    db_url, engine_options=engine_args, session_options=options
                )
            slot.database = database
            self.commit_on_exit = commit_on_exit
            # Our middleware itself, not a wrapper around it: no extra call per request.
            super().__init__(
                app, db=database, commit_on=_commit_below_400 if commit_on_exit else None
            )

        async def dispose(self) -> None:
            """Dispose of the engine this middleware created (not a ``custom_engine``)."""
            database = slot.database
            if database is not None and database.owns_engine:
                await database.engine.dispose()

    class DBSessionMeta(type):
        """Gives the ``db`` class ``db.session``, ``db.connection()`` and ``db.gather()``."""

        @property
        def session(cls) -> AsyncSession:
            """The current request's (``async with db():`` block's, task's) session."""
            database = slot.get()
            with peer_errors(MissingSessionError):
                return database.session

        @asynccontextmanager
        async def connection(cls) -> AsyncIterator[AsyncSession]:
            """This task's session, waiting for a ``max_concurrent`` slot first."""
            database = slot.get()
            with peer_errors(MissingSessionError):
                async with database.task_session() as session:
                    yield session

        async def gather(cls, *aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
            """``asyncio.gather`` with a session of its own per coroutine."""
            return await slot.get().gather(*aws, return_exceptions=return_exceptions)

    class DBSession(metaclass=DBSessionMeta):
        """``async with db():`` opens a session for work outside a request.

        ``session_args`` go to the sessionmaker for this block; ``commit_on_exit``
        commits at the end of a block that raised nothing (an exception rolls
        back). ``multi_sessions=True`` gives each task started inside the block a
        session of its own, ``max_concurrent`` caps how many are open at once.
        """

        def __init__(
            self,
            session_args: Mapping[str, Any] | None = None,
            commit_on_exit: bool = False,
            multi_sessions: bool = False,
            max_concurrent: int | None = None,
        ) -> None:
            if max_concurrent is not None and max_concurrent < 1:
                raise ValueError(
                    f"`max_concurrent` must be greater than 0, not {max_concurrent}: "
                    "no task could have a session. "
                    "It caps how many per-task sessions are open at once. "
                    "Pass a number >= 1 or None."
                )
            self.session_args = dict(session_args or {})
            self.commit_on_exit = commit_on_exit
            self.multi_sessions = multi_sessions
            self.max_concurrent = max_concurrent
            self._stack: AsyncExitStack | None = None

        async def __aenter__(self) -> type[DBSession]:
            database = slot.get()
            async with AsyncExitStack() as stack:
                await stack.enter_async_context(
                    database.session_scope(commit=self.commit_on_exit, **self.session_args)
                )
                if self.multi_sessions:
                    await stack.enter_async_context(
                        database.task_sessions(max_concurrent=self.max_concurrent)
                    )
                self._stack = stack.pop_all()
            return type(self)

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool | None:
            stack, self._stack = self._stack, None
            assert stack is not None, "__aexit__ without __aenter__"
            return await stack.__aexit__(exc_type, exc, tb)

    return SQLAlchemyMiddleware, DBSession


SQLAlchemyMiddleware, db = create_middleware_and_session_proxy()
