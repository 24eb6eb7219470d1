"""``Database`` and ``AsyncDatabase``: an engine, a session factory and ``db.session``."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar, Token, copy_context
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, overload

import anyio
from sqlalchemy import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import TypeVar, Unpack

from . import _hooks, _tasks
from ._binding import Binding, bind
from ._context import Holder
from ._flavour import ASYNC, SYNC, Flavour, finish
from ._override import Override
from ._types import AsyncSessionOptions, AsyncSessionT, ReplicaOptions, SessionOptions, SessionT
from .exceptions import (
    BLOCKING_USE,
    NO_SESSION,
    OTHER_DATABASE,
    SESSION_CLOSED,
    BlockingSessionWarning,
    MissingSessionError,
)

S = TypeVar("S", bound="Session | AsyncSession")

BlockingCheck = Literal["warn", "raise", "ignore"]

# asyncio._get_running_loop() answers "is there a loop?" in ~90 ns; get_running_loop()
# raises outside one (every db.session in a `def` route's thread) and costs ~500 ns.
_running_loop = asyncio._get_running_loop

_VAR_PREFIX = "middleware_sessions:"


class _BaseDatabase(Generic[S]):
    """What ``Database`` and ``AsyncDatabase`` share: ``db.session`` and its bookkeeping."""

    _flavour: ClassVar[Flavour[Any]]
    _check_loop: bool = False
    _binding: Binding

    def __init__(
        self,
        url: str | URL | None,
        engine: Any,
        engine_options: Mapping[str, Any] | None,
        session_options: Mapping[str, Any] | None,
        replica_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._binding = bind(
            self._flavour,
            type(self).__name__,
            url,
            engine,
            engine_options,
            session_options,
            replica_options,
        )
        # Named after the database, so a missing session can say which others are here.
        self._var: ContextVar[Holder | None] = ContextVar(_VAR_PREFIX + repr(self))

    @property
    def engine(self) -> Any:
        """The engine, created from the URL or passed in."""
        return self._binding.engine

    @property
    def owns_engine(self) -> bool:
        """Whether the engine was created here (and so is disposed at application shutdown)."""
        return self._binding.owns_engine

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
            binding = self._binding
            if binding.replicas is None or getattr(holder, "route_scope", None) is None:
                session = binding.sessionmaker(close_resets_only=False)
            else:
                session = binding.replicas.session_for(holder.route_scope, self._flavour)
                if session is None:
                    session = binding.sessionmaker(close_resets_only=False)
            holder.session = session
        if self._check_loop and _running_loop() is not None:
            self._used_on_event_loop()
        return session  # type: ignore[no-any-return]

    def _used_on_event_loop(self) -> None:
        """Only sync databases check; see ``Database``."""

    def _missing(self) -> MissingSessionError:
        # The current context knows which databases have a session here: no registry needed.
        others = [
            var.name.removeprefix(_VAR_PREFIX)
            for var, value in copy_context().items()
            if isinstance(value, Holder) and value.open and var is not self._var
        ]
        if others:
            names = ", ".join(sorted(others))
            return MissingSessionError(OTHER_DATABASE.format(db=self, others=names))
        return MissingSessionError(NO_SESSION)

    def on_commit(self, hook: Callable[[], Any]) -> None:
        """Call ``hook()`` once the current transaction has committed; never if it rolls back.

        Hooks run in registration order after the session is closed (in a request:
        after the response). Async functions are awaited; plain ones run in a worker
        thread. A failing hook is logged and changes nothing: the data is committed.
        """
        _hooks.register(self._flavour.sync_session(self.session), "commit", hook)

    def on_rollback(self, hook: Callable[[], Any]) -> None:
        """Call ``hook()`` once the current transaction has rolled back; never if it commits."""
        _hooks.register(self._flavour.sync_session(self.session), "rollback", hook)

    def rollback_only(self) -> None:
        """Roll back the current request's (or scope's) transaction, whatever the status.

        For dry runs and previews: the route runs for real, nothing is kept.
        """
        holder = self._var.get(None)
        if holder is None:
            raise self._missing()
        if holder.tasks is not None:
            holder = holder.tasks.holder()
        holder.rollback_only = True

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
        fallback); the constructor's ``session_options`` are kept unless new ones are
        given. Use ``with`` for ``Database``, ``async with`` for ``AsyncDatabase``; an
        engine created for the override is disposed at the end.
        """
        if url is None and engine is None:
            raise ValueError(
                "override() needs url=... or engine=... to point the database at. "
                "It does not read DATABASE_URL, so a test cannot silently hit the real database."
            )
        if session_options is None:
            session_options = self._binding.session_options
        return Override(
            self,
            lambda: self._rebind(url, engine, engine_options, session_options),
            creates_engine=url is not None,
        )

    def _rebind(
        self,
        url: str | URL | None,
        engine: Any,
        engine_options: Mapping[str, Any] | None,
        session_options: Mapping[str, Any] | None,
    ) -> Binding:
        return bind(
            self._flavour, type(self).__name__, url, engine, engine_options, session_options
        )

    def _swap(self, binding: Binding) -> Binding:
        """Put ``binding`` in place and return the one it replaces."""
        previous, self._binding = self._binding, binding
        return previous

    def _open_scope(
        self, session_options: Mapping[str, Any], commit: bool = True
    ) -> tuple[Holder, Token[Any]]:
        holder = Holder()
        holder.never_commits = not commit
        holder.session = self._binding.sessionmaker(**session_options)
        return holder, self._var.set(holder)

    def __repr__(self) -> str:
        return self._binding.describe(type(self).__name__)


class Database(_BaseDatabase[SessionT]):
    """A sync database: an ``Engine``, a ``sessionmaker`` and ``db.session``.

    The database is ``url``, else ``engine``, else the ``DATABASE_URL`` environment
    variable. ``engine_options`` go to ``create_engine``; ``session_options`` to
    ``sessionmaker`` (``{"class_": sqlmodel.Session}`` makes ``db.session`` a SQLModel
    session, typed as such). ``blocking_check`` says what happens when ``db.session``
    is used on the event loop thread (an ``async def`` route), where it would block
    every other request: ``"warn"`` (a ``BlockingSessionWarning``), ``"raise"`` or
    ``"ignore"``.

    ``replicas=[url, ...]`` (or ``replica_engines=[...]``) adds PostgreSQL streaming
    replicas: a request whose route is ``@transaction_policy(read_only=True)`` reads
    from one, and everything else stays on the primary. ``max_replica_lag`` (seconds,
    default 5) bounds how stale a replica may be; after a request that wrote, the
    response sets a signed cookie (``replica_cookie``, default ``"db_lsn"``; ``None``
    for none, ``replica_secret`` shared by every worker) with which the same client's
    reads wait up to ``replica_wait`` seconds (default 0.1) for a replica to replay
    the write, else read from the primary. See docs/replicas.md.
    """

    _flavour = SYNC

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: Database[SessionT],
            url: str | URL | None = None,
            *,
            engine: Engine | None = None,
            engine_options: Mapping[str, Any] | None = None,
            session_options: SessionOptions[SessionT],
            blocking_check: BlockingCheck = "warn",
            on_event_loop: BlockingCheck | None = None,
            **replica_options: Unpack[ReplicaOptions],
        ) -> None: ...

        @overload
        def __init__(
            self: Database[Session],
            url: str | URL | None = None,
            *,
            engine: Engine | None = None,
            engine_options: Mapping[str, Any] | None = None,
            session_options: Mapping[str, Any] | None = None,
            blocking_check: BlockingCheck = "warn",
            on_event_loop: BlockingCheck | None = None,
            **replica_options: Unpack[ReplicaOptions],
        ) -> None: ...

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        blocking_check: BlockingCheck = "warn",
        on_event_loop: BlockingCheck | None = None,
        **replica_options: Unpack[ReplicaOptions],
    ) -> None:
        if on_event_loop is not None:
            warnings.warn(
                "Database(on_event_loop=...) is deprecated and will be removed in 0.3; "
                "use Database(blocking_check=...) instead.",
                DeprecationWarning,
                stacklevel=2,
            )
            blocking_check = on_event_loop
        if blocking_check not in ("warn", "raise", "ignore"):
            raise ValueError(
                f"Database() got blocking_check={blocking_check!r}. "
                "It says what happens when db.session is used on the event loop thread. "
                "Pass 'warn', 'raise' or 'ignore'."
            )
        self._blocking_check = blocking_check
        self._check_loop = blocking_check != "ignore"
        super().__init__(url, engine, engine_options, session_options, replica_options)

    @property
    def engine(self) -> Engine:
        """The engine, created from the URL or passed in."""
        return self._binding.engine  # type: ignore[no-any-return]

    @property
    def sessionmaker(self) -> sessionmaker[SessionT]:
        """The session factory; each call returns a new, independent session."""
        return self._binding.sessionmaker  # type: ignore[no-any-return]

    def _used_on_event_loop(self) -> None:
        if self._blocking_check == "raise":
            raise RuntimeError(BLOCKING_USE)
        # Through the warnings filters: shown once per call site by default.
        warnings.warn(BLOCKING_USE, BlockingSessionWarning, stacklevel=3)

    @contextmanager
    def session_scope(self, *, commit: bool = True, **session_options: Any) -> Iterator[SessionT]:
        """A session for work outside a request: commit on exit, roll back on error, close.

        Inside the block ``db.session`` is this session. ``commit=False`` never
        commits (the block's work is rolled back at the end); ``session_options``
        go to the session factory for this scope only.
        """
        holder, token = self._open_scope(session_options, commit)
        session = holder.session
        succeeded = False
        try:
            yield session
            succeeded = True
        finally:
            self._var.reset(token)
            holder.empty()
            try:
                finish(session, commit and succeeded and not holder.rollback_only)
            finally:
                _hooks.run_sync(_hooks.take_ready(session), "a session_scope()")


class AsyncDatabase(_BaseDatabase[AsyncSessionT]):
    """An async database: an ``AsyncEngine``, an ``async_sessionmaker`` and ``db.session``.

    Same arguments as ``Database`` (``replicas=[...]`` included, with async drivers).
    Sessions default to ``expire_on_commit=False``,
    so objects stay readable after the commit without awaiting a reload. With
    ``session_options={"class_": sqlmodel.ext.asyncio.session.AsyncSession}``,
    ``db.session`` is a SQLModel session (``.exec()``), typed as such.
    """

    _flavour = ASYNC

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: AsyncDatabase[AsyncSessionT],
            url: str | URL | None = None,
            *,
            engine: AsyncEngine | None = None,
            engine_options: Mapping[str, Any] | None = None,
            session_options: AsyncSessionOptions[AsyncSessionT],
            **replica_options: Unpack[ReplicaOptions],
        ) -> None: ...

        @overload
        def __init__(
            self: AsyncDatabase[AsyncSession],
            url: str | URL | None = None,
            *,
            engine: AsyncEngine | None = None,
            engine_options: Mapping[str, Any] | None = None,
            session_options: Mapping[str, Any] | None = None,
            **replica_options: Unpack[ReplicaOptions],
        ) -> None: ...

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: AsyncEngine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        **replica_options: Unpack[ReplicaOptions],
    ) -> None:
        super().__init__(url, engine, engine_options, session_options, replica_options)

    @property
    def engine(self) -> AsyncEngine:
        """The engine, created from the URL or passed in."""
        return self._binding.engine  # type: ignore[no-any-return]

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSessionT]:
        """The session factory; each call returns a new, independent session."""
        return self._binding.sessionmaker  # type: ignore[no-any-return]

    @asynccontextmanager
    async def session_scope(
        self, *, commit: bool = True, **session_options: Any
    ) -> AsyncIterator[AsyncSessionT]:
        """A session for work outside a request: commit on exit, roll back on error, close.

        Inside the block ``db.session`` is this session. ``commit=False`` never
        commits (the block's work is rolled back at the end); ``session_options``
        go to the session factory for this scope only.
        """
        holder, token = self._open_scope(session_options, commit)
        session = holder.session
        succeeded = False
        try:
            yield session
            succeeded = True
        finally:
            self._var.reset(token)
            holder.empty()
            try:
                # Clean up even when the block was cancelled.
                with anyio.CancelScope(shield=True):
                    await self._flavour.finish(
                        session, commit=commit and succeeded and not holder.rollback_only
                    )
            finally:
                ready = _hooks.take_ready(session.sync_session)
                await _hooks.run_async(ready, "a session_scope()")

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
    async def task_session(self) -> AsyncIterator[AsyncSessionT]:
        """This task's own session inside ``task_sessions()``, taking a slot first.

        Waits for one of the block's ``max_concurrent`` slots, yields the task's
        session, and settles it when the ``async with`` ends. Outside
        ``task_sessions()`` it is simply ``db.session``.
        """
        block = _tasks.current_block(self)
        if block is None:
            yield self.session
            return
        async with block.slot():
            yield self.session
