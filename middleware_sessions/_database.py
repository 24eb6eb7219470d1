"""``Database`` and ``AsyncDatabase``: an engine, a session factory and ``db.session``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Generic

import anyio
from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from ._config import check_driver, engine_kwargs, resolve_url, safe_url
from ._context import Holder, S
from ._lifecycle import (
    AsyncLifecycle,
    Lifecycle,
    SyncLifecycle,
    end_async,
    end_sync,
    settle_async,
    settle_sync,
)
from .exceptions import NO_SESSION, SESSION_CLOSED, MissingSessionError


class _BaseDatabase(Generic[S]):
    """What ``Database`` and ``AsyncDatabase`` share: ``db.session`` and bookkeeping."""

    _is_async: ClassVar[bool]
    _lifecycle: Lifecycle[S]
    _url: URL | None
    _engine: Engine | AsyncEngine
    _new_session: Callable[[], S]

    def __init__(
        self,
        url: str | URL | None,
        engine: Engine | AsyncEngine | None,
        engine_options: Mapping[str, Any] | None,
    ) -> None:
        name = type(self).__name__
        self._url = resolve_url(url, engine_given=engine is not None, cls_name=name)
        if engine is not None:
            if engine_options:
                raise ValueError(
                    f"{name}() got engine_options together with an engine. "
                    "Options only apply to an engine the database creates itself. "
                    "Configure your engine when you create it, or pass a URL instead."
                )
            self._check_engine(engine)
        else:
            assert self._url is not None
            check_driver(self._url, want_async=self._is_async, cls_name=name)
        # An engine passed in belongs to the caller; one we create is ours to dispose.
        self.owns_engine = engine is None
        self._var: ContextVar[Holder[S] | None] = ContextVar(f"middleware_sessions.{name}")

    def _check_engine(self, engine: object) -> None:
        raise NotImplementedError

    @property
    def session(self) -> S:
        """The current request's (or ``session_scope()``'s) session, created on first use.

        Raises ``MissingSessionError`` outside a request or scope.
        """
        holder = self._var.get(None)
        if holder is None:
            raise MissingSessionError(NO_SESSION)
        session = holder.session
        if session is None:
            if not holder.open:
                raise MissingSessionError(SESSION_CLOSED)
            session = holder.session = self._new_session()
        return session

    def __repr__(self) -> str:
        name = type(self).__name__
        if self._url is not None:
            return f"{name}({safe_url(self._url)!r})"
        # SQLAlchemy's Engine repr already masks the password.
        return f"{name}(engine={self._engine!r})"


class Database(_BaseDatabase[Session]):
    """A sync database: an ``Engine``, a ``sessionmaker`` and ``db.session``.

    The database is ``url``, else ``engine``, else the ``DATABASE_URL`` environment
    variable. ``engine_options`` go to ``create_engine``; ``session_options`` to
    ``sessionmaker``.
    """

    _is_async = False
    engine: Engine
    """The engine, created from the URL or passed in."""
    sessionmaker: sessionmaker[Session]
    """The session factory; each call returns a new, independent session."""

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, engine, engine_options)
        if engine is None:
            assert self._url is not None
            engine = create_engine(
                self._url, **engine_kwargs(self._url, engine_options, is_async=False)
            )
        self.engine = self._engine = engine
        self.sessionmaker = sessionmaker(engine, **dict(session_options or {}))
        self._new_session = self.sessionmaker
        self._lifecycle = SyncLifecycle(engine)

    def _check_engine(self, engine: object) -> None:
        if isinstance(engine, AsyncEngine):
            raise ValueError(
                "Database() was given an AsyncEngine. "
                "A sync Session cannot use an async engine. "
                "Use AsyncDatabase(engine=...) for it, or pass a sync Engine."
            )
        if not isinstance(engine, Engine):
            raise ValueError(
                f"Database() expects engine to be a sqlalchemy Engine, not {type(engine).__name__}."
            )

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A session for work outside a request: commit on exit, roll back on error, close.

        Inside the block ``db.session`` is this session.
        """
        holder = Holder(self.sessionmaker())
        token = self._var.set(holder)
        session = holder.session
        assert session is not None
        failed = True
        try:
            yield session
            settle_sync(session, commit=True)
            failed = False
        finally:
            self._var.reset(token)
            holder.close()
            end_sync(session, commit=not failed)


class AsyncDatabase(_BaseDatabase[AsyncSession]):
    """An async database: an ``AsyncEngine``, an ``async_sessionmaker`` and ``db.session``.

    Same arguments as ``Database``. Sessions default to ``expire_on_commit=False``,
    so objects stay readable after the commit without awaiting a reload.
    """

    _is_async = True
    engine: AsyncEngine
    """The engine, created from the URL or passed in."""
    sessionmaker: async_sessionmaker[AsyncSession]
    """The session factory; each call returns a new, independent session."""

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: AsyncEngine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, engine, engine_options)
        if engine is None:
            assert self._url is not None
            engine = create_async_engine(
                self._url, **engine_kwargs(self._url, engine_options, is_async=True)
            )
        self.engine = self._engine = engine
        options = {"expire_on_commit": False, **(session_options or {})}
        self.sessionmaker = async_sessionmaker(engine, **options)
        self._new_session = self.sessionmaker
        self._lifecycle = AsyncLifecycle(engine)

    def _check_engine(self, engine: object) -> None:
        if isinstance(engine, Engine):
            raise ValueError(
                "AsyncDatabase() was given a sync Engine. "
                "AsyncSession needs an AsyncEngine. "
                "Use Database(engine=...) for it, or create the engine with create_async_engine()."
            )
        if not isinstance(engine, AsyncEngine):
            raise ValueError(
                "AsyncDatabase() expects engine to be a sqlalchemy AsyncEngine, "
                f"not {type(engine).__name__}."
            )

    @asynccontextmanager
    async def session_scope(self) -> AsyncIterator[AsyncSession]:
        """A session for work outside a request: commit on exit, roll back on error, close.

        Inside the block ``db.session`` is this session.
        """
        holder = Holder(self.sessionmaker())
        token = self._var.set(holder)
        session = holder.session
        assert session is not None
        failed = True
        try:
            yield session
            await settle_async(session, commit=True)
            failed = False
        finally:
            self._var.reset(token)
            holder.close()
            # Clean up even when the block was cancelled.
            with anyio.CancelScope(shield=True):
                await end_async(session, commit=not failed)
