"""``Database`` and ``AsyncDatabase``: an engine, a session factory and ``db.session``."""

from __future__ import annotations

import asyncio
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Generic, Literal

import anyio
from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from . import _hooks, _tasks
from ._config import check_driver, check_engine, engine_kwargs, resolve_url, safe_url
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
from ._override import Override
from .exceptions import (
    BLOCKING_USE,
    NO_SESSION,
    OTHER_DATABASE,
    SESSION_CLOSED,
    BlockingSessionWarning,
    MissingSessionError,
)

_running_loop = asyncio._get_running_loop  # the fast check, without raising
# Every database, so a missing session can say which other database's middleware ran.
_DATABASES: weakref.WeakSet[_BaseDatabase[Any]] = weakref.WeakSet()


class _BaseDatabase(Generic[S]):
    """What ``Database`` and ``AsyncDatabase`` share: ``db.session`` and its bookkeeping."""

    _is_async: ClassVar[bool]
    engine: Engine | AsyncEngine
    owns_engine: bool
    _url: URL | None
    sessionmaker: Callable[..., S]
    _lifecycle: Lifecycle[S]
    _check_loop = False

    def __init__(
        self,
        url: str | URL | None,
        engine: Any,
        engine_options: Mapping[str, Any] | None,
        session_options: Mapping[str, Any] | None,
    ) -> None:
        self._var: ContextVar[Holder[S] | None] = ContextVar(
            f"middleware_sessions.{type(self).__name__}"
        )
        self._configure(url, engine, engine_options, session_options)
        _DATABASES.add(self)

    def _configure(
        self,
        url: str | URL | None,
        engine: Any,
        engine_options: Mapping[str, Any] | None,
        session_options: Mapping[str, Any] | None,
    ) -> None:
        """Validate the arguments, then set the engine, factory and lifecycle."""
        name = type(self).__name__
        self._url = resolve_url(url, engine_given=engine is not None, cls_name=name)
        if self._url is not None:
            check_driver(self._url, want_async=self._is_async, cls_name=name)
        elif engine_options:
            raise ValueError(
                f"{name}() got engine_options together with an engine. "
                "Options only apply to an engine the database creates itself. "
                "Configure your engine when you create it, or pass a URL instead."
            )
        else:
            check_engine(engine, want_async=self._is_async, cls_name=name)
        # An engine created here is ours to dispose (at lifespan shutdown); a given one is not.
        self.owns_engine = engine is None
        if engine is None:
            assert self._url is not None
            options = engine_kwargs(self._url, engine_options, is_async=self._is_async)
            engine = self._create_engine(self._url, options)
        self._set_engine(engine, dict(session_options or {}))

    def _create_engine(self, url: URL, options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _set_engine(self, engine: Any, session_options: dict[str, Any]) -> None:
        raise NotImplementedError

    def override(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | AsyncEngine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> Override:
        """Point this database somewhere else until the block ends (for tests).

        Takes the constructor's arguments (``url`` or ``engine``, no environment
        fallback). Use ``with`` for ``Database``, ``async with`` for
        ``AsyncDatabase``; an engine created for the override is disposed at the end.
        """
        if url is None and engine is None:
            raise ValueError(
                "override() needs url=... or engine=... to point the database at. "
                "It does not read DATABASE_URL, so a test cannot silently hit the real database."
            )
        return Override(self, url, engine, engine_options, session_options)

    _STATE = ("engine", "sessionmaker", "_lifecycle", "_url", "owns_engine")

    def _snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._STATE}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _holder(self) -> Holder[S]:
        holder = self._var.get(None)
        if holder is None:
            raise self._missing()
        if holder.tasks is not None:
            return holder.tasks.holder()  # type: ignore[no-any-return]
        return holder

    @property
    def session(self) -> S:
        """The current request's (or ``session_scope()``'s) session, created on first use.

        Raises ``MissingSessionError`` outside a request or scope.
        """
        holder = self._var.get(None)
        if holder is None:
            raise self._missing()
        if holder.tasks is not None:
            holder = holder.tasks.holder()  # this task's own, inside task_sessions()
        session = holder.session
        if session is None:
            if not holder.open:
                raise MissingSessionError(SESSION_CLOSED)
            # A closed request session must fail loudly, never quietly start over.
            session = holder.session = self.sessionmaker(close_resets_only=False)
        if self._check_loop and _running_loop() is not None:
            self._used_on_event_loop()
        return session

    def _missing(self) -> MissingSessionError:
        others = [db for db in list(_DATABASES) if db is not self and db._var.get(None) is not None]
        if others:
            names = ", ".join(repr(db) for db in others)
            return MissingSessionError(OTHER_DATABASE.format(db=self, others=names))
        return MissingSessionError(NO_SESSION)

    def _used_on_event_loop(self) -> None:
        raise NotImplementedError

    def on_commit(self, hook: Callable[[], Any]) -> None:
        """Call ``hook()`` once the current transaction has committed; never if it rolls back.

        Hooks run in registration order after the session is closed (in a request:
        after the response). Async functions are awaited; plain ones run in a worker
        thread. A failing hook is logged and changes nothing: the data is committed.
        """
        _hooks.register(self._sync_session(self.session), "commit", hook)

    def on_rollback(self, hook: Callable[[], Any]) -> None:
        """Call ``hook()`` once the current transaction has rolled back; never if it commits."""
        _hooks.register(self._sync_session(self.session), "rollback", hook)

    def rollback_only(self) -> None:
        """Roll back the current request's (or scope's) transaction, whatever the status.

        For dry runs and previews: the route runs for real, nothing is kept.
        """
        self._holder().rollback_only = True

    def _sync_session(self, session: S) -> Session:
        raise NotImplementedError

    def __repr__(self) -> str:
        name = type(self).__name__
        if self._url is not None:
            return f"{name}({safe_url(self._url)!r})"
        # SQLAlchemy's Engine repr already masks the password.
        return f"{name}(engine={self.engine!r})"


class Database(_BaseDatabase[Session]):
    """A sync database: an ``Engine``, a ``sessionmaker`` and ``db.session``.

    The database is ``url``, else ``engine``, else the ``DATABASE_URL`` environment
    variable. ``engine_options`` go to ``create_engine``; ``session_options`` to
    ``sessionmaker``. ``on_event_loop`` says what happens when ``db.session`` is used
    on the event loop thread (an ``async def`` route), where it would block every
    other request: ``"warn"`` (a ``BlockingSessionWarning``), ``"raise"`` or ``"ignore"``.
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
        on_event_loop: Literal["warn", "raise", "ignore"] = "warn",
    ) -> None:
        if on_event_loop not in ("warn", "raise", "ignore"):
            raise ValueError(
                f"Database() got on_event_loop={on_event_loop!r}; "
                "it must be 'warn', 'raise' or 'ignore'."
            )
        self._on_event_loop = on_event_loop
        self._check_loop = on_event_loop != "ignore"
        super().__init__(url, engine, engine_options, session_options)

    def _used_on_event_loop(self) -> None:
        if self._on_event_loop == "raise":
            raise RuntimeError(BLOCKING_USE)
        # Through the warnings filters: shown once per call site by default.
        warnings.warn(BLOCKING_USE, BlockingSessionWarning, stacklevel=3)

    def _create_engine(self, url: URL, options: dict[str, Any]) -> Engine:
        return create_engine(url, **options)

    def _set_engine(self, engine: Engine, session_options: dict[str, Any]) -> None:
        self.engine = engine
        # sessionmaker makes a subclass of its own: our event listeners stay on it.
        self.sessionmaker = sessionmaker(engine, **session_options)
        _hooks.install(self.sessionmaker.class_)
        self._lifecycle = SyncLifecycle(engine)

    def _sync_session(self, session: Session) -> Session:
        return session

    @contextmanager
    def session_scope(self, *, commit: bool = True, **session_options: Any) -> Iterator[Session]:
        """A session for work outside a request: commit on exit, roll back on error, close.

        Inside the block ``db.session`` is this session. ``commit=False`` never
        commits (explicit ``session.commit()`` calls aside): what is left is rolled
        back. ``session_options`` go to the session factory for this scope only.
        """
        holder: Holder[Session] = Holder()
        holder.rollback_only = not commit
        session = holder.session = self.sessionmaker(**session_options)
        token = self._var.set(holder)
        try:
            yield session
            settle_sync(session, commit=not holder.rollback_only)
        finally:
            self._var.reset(token)
            holder.close()
            end_sync(session, commit=False)
            _hooks.run_sync(_hooks.take_ready(session), "a session_scope()")


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
        super().__init__(url, engine, engine_options, session_options)

    def _create_engine(self, url: URL, options: dict[str, Any]) -> AsyncEngine:
        return create_async_engine(url, **options)

    def _set_engine(self, engine: AsyncEngine, session_options: dict[str, Any]) -> None:
        self.engine = engine
        options: dict[str, Any] = {"expire_on_commit": False, **session_options}
        # A sync session class of our own, so our event listeners stay on it.
        base: type[Session] = options.get("sync_session_class", Session)
        options["sync_session_class"] = type(base.__name__, (base,), {})
        _hooks.install(options["sync_session_class"])
        self.sessionmaker = async_sessionmaker(engine, **options)
        self._lifecycle = AsyncLifecycle(engine)

    def _sync_session(self, session: AsyncSession) -> Session:
        return session.sync_session

    @asynccontextmanager
    async def session_scope(
        self, *, commit: bool = True, **session_options: Any
    ) -> AsyncIterator[AsyncSession]:
        """A session for work outside a request: commit on exit, roll back on error, close.

        Inside the block ``db.session`` is this session. ``commit=False`` never
        commits (explicit ``session.commit()`` calls aside): what is left is rolled
        back. ``session_options`` go to the session factory for this scope only.
        """
        holder: Holder[AsyncSession] = Holder()
        holder.rollback_only = not commit
        session = holder.session = self.sessionmaker(**session_options)
        token = self._var.set(holder)
        try:
            yield session
            await settle_async(session, commit=not holder.rollback_only)
        finally:
            self._var.reset(token)
            holder.close()
            # Clean up even when the block was cancelled.
            with anyio.CancelScope(shield=True):
                await end_async(session, commit=False)
            await _hooks.run_async(_hooks.take_ready(session.sync_session), "a session_scope()")

    def task_sessions(
        self, *, max_concurrent: int | None = None
    ) -> AbstractAsyncContextManager[Any]:
        """Give each asyncio task started inside the block a session of its own.

        The task that opens the block keeps the request's (or scope's) session.
        Every other task that reads ``db.session`` gets its own, committed when the
        task finishes without an exception and rolled back otherwise (always rolled
        back under a scope or middleware that never commits), then closed.
        ``max_concurrent`` caps how many are open at once: tasks then take a slot
        through ``db.gather()`` or ``db.task_session()``.
        """
        return _tasks.task_sessions(self, max_concurrent)

    async def gather(self, *aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        """``asyncio.gather`` where each coroutine runs with a session of its own.

        Each session is settled (commit on success, rollback on error) as its
        coroutine ends, before ``gather`` returns. Inside ``task_sessions()`` it
        honours the block's ``max_concurrent``; elsewhere it opens a block for the call.
        """
        block = _tasks.current_block(self)
        if block is not None:
            return await block.gather(*aws, return_exceptions=return_exceptions)
        async with _tasks.task_sessions(self, None) as block:
            return await block.gather(*aws, return_exceptions=return_exceptions)

    @asynccontextmanager
    async def task_session(self) -> AsyncIterator[AsyncSession]:
        """This task's own session inside ``task_sessions()``, taking a slot first.

        Waits for one of the block's ``max_concurrent`` slots, yields the task's
        session and settles it when the block ends. Outside ``task_sessions()``
        it is simply ``db.session``.
        """
        block = _tasks.current_block(self)
        if block is None:
            yield self.session
            return
        async with block.slot():
            yield self.session
