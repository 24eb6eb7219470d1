"""Per-task sessions: ``async with db.task_sessions():`` and ``await db.gather(...)``.

One SQLAlchemy session is one transaction on one connection, so tasks that run
queries at the same time need a session each. Inside a ``task_sessions()`` block
the ``ContextVar`` holds a marker instead of the request's holder; ``db.session``
asks it which holder belongs to the calling task. The task that opened the block
keeps the request's (or scope's) session; every other task gets a holder of its
own, created on first use and settled when the task finishes: committed if it
finished without an exception, rolled back otherwise (always rolled back under a
scope or middleware that never commits), then closed.

``gather()`` and ``task_session()`` settle inside the task itself, so their
outcome is known when they return; a plain ``asyncio`` task is settled from its
done callback, and the block waits for those settlements before it ends.
Sessions of tasks that outlive the block are rolled back and closed at its end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from . import _hooks
from ._context import Holder
from .exceptions import TASK_OUTLIVED_BLOCK, TASK_WITHOUT_SLOT, MissingSessionError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._database import AsyncDatabase

logger = logging.getLogger("middleware_sessions")


class TaskSessions:
    """The state of one ``task_sessions()`` block: a holder per task, and the slots."""

    def __init__(
        self, db: AsyncDatabase[Any], parent: Holder | None, max_concurrent: int | None
    ) -> None:
        if max_concurrent is not None and (
            isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
        ):
            raise TypeError(f"max_concurrent must be an int or None, not {max_concurrent!r}.")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(
                f"max_concurrent={max_concurrent} would let no task have a session. "
                "It caps how many per-task sessions are open at once. "
                "Pass a number >= 1 (at most the pool's size) or None for no cap."
            )
        self._db = db
        self._parent = parent
        self._owner = asyncio.current_task()
        self._holders: dict[asyncio.Task[Any], Holder] = {}
        self._slots: set[asyncio.Task[Any]] = set()
        self._semaphore = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self._settling: set[asyncio.Task[None]] = set()
        self._open = True

    def _commits(self) -> bool:
        """Under a scope or request that never commits (or rolls back), no task commits."""
        parent = self._parent
        return parent is None or not (parent.never_commits or parent.rollback_only)

    def holder(self) -> Holder:
        """The calling task's holder: the parent's for the block's own task."""
        task = asyncio.current_task()
        if task is None or task is self._owner:
            if self._parent is None:
                raise self._db._missing()
            return self._parent
        holder = self._holders.get(task)
        if holder is None:
            if not self._open:
                raise MissingSessionError(TASK_OUTLIVED_BLOCK)
            if self._semaphore is not None and task not in self._slots:
                raise RuntimeError(TASK_WITHOUT_SLOT)
            holder = self._holders[task] = Holder()
            task.add_done_callback(self._task_done)
        return holder

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        holder = self._holders.pop(task, None)
        session = holder.empty() if holder is not None else None
        if session is None:
            return
        commit = self._outcome(task) and not holder.rollback_only  # type: ignore[union-attr]
        settling = task.get_loop().create_task(self._end_logged(session, commit))
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)

    def _outcome(self, task: asyncio.Task[Any]) -> bool:
        """Commit (True) for a task that finished without an exception, where allowed."""
        if not task.done() or task.cancelled():
            return False
        return self._commits() and task.exception() is None

    async def _end(self, session: AsyncSession, commit: bool) -> None:
        """Settle and close (shielded from cancellation), then run the ready hooks."""
        with anyio.CancelScope(shield=True):
            await self._db._flavour.finish(session, commit=commit)
        hooks = _hooks.take_ready(session.sync_session)
        if hooks:
            await _hooks.run_async(hooks, "a task session")

    async def _end_logged(self, session: AsyncSession, commit: bool) -> None:
        try:
            await self._end(session, commit)
        except Exception:
            # The task is gone: nobody is left to raise to.
            logger.error(
                "Could not commit the session of a finished task; it was rolled back.",
                exc_info=True,
            )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_concurrent`` slots; settle this task's session at the end."""
        task = asyncio.current_task()
        if task is None or task is self._owner or task in self._slots:
            yield  # the block's own task, or a slot already held: nothing to take
            return
        if self._semaphore is not None:
            await self._semaphore.acquire()
        self._slots.add(task)
        failed = True
        try:
            yield
            failed = False
        finally:
            self._slots.discard(task)
            holder = self._holders.pop(task, None)
            session = holder.empty() if holder is not None else None
            try:
                if session is not None:
                    commit = self._commits() and not failed and not holder.rollback_only  # type: ignore[union-attr]
                    await self._end(session, commit)
            finally:
                if self._semaphore is not None:
                    self._semaphore.release()

    async def gather(self, *aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        """``asyncio.gather`` with a session (and a slot) per coroutine, settled as each ends.

        Unlike ``asyncio.gather``, a failure is raised only once every coroutine has
        ended, so the outcome of each session never depends on timing.
        """
        if self._semaphore is not None and not all(asyncio.iscoroutine(aw) for aw in aws):
            for aw in aws:
                if asyncio.iscoroutine(aw):
                    aw.close()  # never awaited: don't leave a warning behind
            raise TypeError(
                "db.gather() with max_concurrent takes coroutine objects only, not tasks or futures. "
                "A task already running cannot wait for a slot first. "
                "Pass the coroutines themselves: db.gather(work(1), work(2))."
            )
        # Every coroutine runs to its end (and its session is settled) before gather
        # returns or raises: with asyncio.gather's own early raise, a sibling still
        # running would be rolled back when the block ends, or committed, by chance.
        results = await asyncio.gather(
            *(self._in_slot(aw) if asyncio.iscoroutine(aw) else aw for aw in aws),
            return_exceptions=True,
        )
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    async def _in_slot(self, coro: Awaitable[Any]) -> Any:
        async with self.slot():
            return await coro

    async def close(self) -> None:
        """End the block: settle what tasks still hold, then wait for every settlement.

        A task that has finished but whose done callback has not run yet is settled
        by its outcome; one still running outlived the block and is rolled back.
        """
        self._open = False
        leftovers = [
            (self._outcome(task) and not holder.rollback_only, holder.empty())
            for task, holder in self._holders.items()
        ]
        self._holders.clear()
        with anyio.CancelScope(shield=True):
            for commit, session in leftovers:
                if session is not None:
                    await self._end_logged(session, commit)
            while self._settling:
                await asyncio.gather(*self._settling, return_exceptions=True)


@asynccontextmanager
async def task_sessions(
    db: AsyncDatabase[Any], max_concurrent: int | None
) -> AsyncIterator[TaskSessions]:
    """The body of ``AsyncDatabase.task_sessions()``."""
    current = db._var.get(None)
    parent = None if current is None else current.tasks.holder() if current.tasks else current
    block = TaskSessions(db, parent, max_concurrent)
    marker: Holder = Holder()
    marker.tasks = block
    token = db._var.set(marker)
    try:
        yield block
    finally:
        db._var.reset(token)
        await block.close()


def current_block(db: AsyncDatabase[Any]) -> TaskSessions | None:
    """The innermost ``task_sessions()`` block around the caller, if any."""
    current = db._var.get(None)
    return None if current is None else current.tasks
