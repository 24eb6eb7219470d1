"""The one place where sync and async sessions differ.

The middleware calls the same small interface for both: ``settle`` (commit or
roll back, at ``http.response.start``), ``end`` (settle what is left, then
close), ``run_hooks`` and ``dispose``. A sync ``Session`` does its I/O in a
worker thread so the event loop never blocks: at most one hop per call, and none
when there is no transaction (closing such a session does no I/O).
"""

from __future__ import annotations

import logging
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

logger = logging.getLogger("middleware_sessions")

S = TypeVar("S", Session, AsyncSession, contravariant=True)

_ROLLBACK_FAILED = "Rolling back a database session failed; its connection will be discarded."


def settle_sync(session: Session, commit: bool) -> None:
    """Commit (rolling back if that fails, then re-raising) or roll back."""
    if commit:
        try:
            session.commit()
        except BaseException:
            rollback_sync(session)
            raise
    else:
        rollback_sync(session)


def rollback_sync(session: Session) -> None:
    """Roll back; a failure is logged, not raised (nothing was written either way)."""
    try:
        session.rollback()
    except Exception:
        logger.warning(_ROLLBACK_FAILED, exc_info=True)


def end_sync(session: Session, commit: bool) -> None:
    """Settle what is left of the transaction, then close, in one call."""
    try:
        if session.in_transaction():
            settle_sync(session, commit)
    finally:
        session.close()


async def settle_async(session: AsyncSession, commit: bool) -> None:
    """Async twin of :func:`settle_sync`."""
    if commit:
        try:
            await session.commit()
        except BaseException:
            await rollback_async(session)
            raise
    else:
        await rollback_async(session)


async def rollback_async(session: AsyncSession) -> None:
    """Async twin of :func:`rollback_sync`."""
    try:
        await session.rollback()
    except Exception:
        logger.warning(_ROLLBACK_FAILED, exc_info=True)


async def end_async(session: AsyncSession, commit: bool) -> None:
    """Async twin of :func:`end_sync`."""
    try:
        if session.in_transaction():
            await settle_async(session, commit)
    finally:
        await session.close()


class Lifecycle(Protocol[S]):
    """How the middleware settles and closes one kind of session."""

    async def settle(self, session: S, commit: bool) -> None:
        """Commit or roll back; a failed commit is rolled back and re-raised."""

    async def end(self, session: S, commit: bool) -> None:
        """Settle any open transaction, then close the session."""

    async def discard(self, session: S) -> None:
        """Close the session and throw its connection away instead of pooling it."""

    async def dispose(self) -> None:
        """Dispose of the engine's pool."""


# Threads of our own for COMMIT, ROLLBACK and close. With the default limiter shared
# with routes, a full thread pool of `def` routes waiting for a connection would
# leave the requests that hold the connections no thread to release them with.
_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("middleware_sessions.threads")


def _limiter() -> anyio.CapacityLimiter:
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(40)
        _LIMITER.set(limiter)
        return limiter


class SyncLifecycle:
    """``Session`` I/O in a worker thread, at most one hop per call."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def settle(self, session: Session, commit: bool) -> None:
        await anyio.to_thread.run_sync(settle_sync, session, commit, limiter=_limiter())

    async def end(self, session: Session, commit: bool) -> None:
        if session.in_transaction():
            await anyio.to_thread.run_sync(end_sync, session, commit, limiter=_limiter())
        else:
            # No transaction means no connection: closing only forgets objects.
            session.close()

    async def discard(self, session: Session) -> None:
        await anyio.to_thread.run_sync(session.invalidate, limiter=_limiter())

    async def dispose(self) -> None:
        await anyio.to_thread.run_sync(self._engine.dispose)


class AsyncLifecycle:
    """``AsyncSession`` I/O awaited on the event loop."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def settle(self, session: AsyncSession, commit: bool) -> None:
        await settle_async(session, commit)

    async def end(self, session: AsyncSession, commit: bool) -> None:
        await end_async(session, commit)

    async def discard(self, session: AsyncSession) -> None:
        await session.invalidate()

    async def dispose(self) -> None:
        await self._engine.dispose()
