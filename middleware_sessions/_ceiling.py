"""Sync routes at the pool's ceiling: a thread that waits for a connection lends its token.

FastAPI runs ``def`` routes (and their response validation) in AnyIO worker
threads, at most as many at once as the default thread limiter has tokens (40).
A route thread that waits for a pooled connection keeps its token while it
waits. Once every token is held by such a waiter, the requests that *hold* the
connections get no thread to finish on, so nobody returns a connection, and
everyone waits for ``pool_timeout``: the "QueuePool limit ... reached" lock-up.

Here a thread about to wait for a connection first raises the default limiter's
``total_tokens`` by one, for as long as it waits, and lowers it again once it
has its connection (or gives up): while it waits, its token is free for another
thread, such as the one that will return a connection. It costs nothing when a
connection is free: the pool is asked without blocking first, and only a thread
that would block goes to the event loop. A thread that isn't an AnyIO worker (a
script, ``session_scope()`` outside any event loop) just waits as before.
While threads wait, more route threads run than the limiter's 40: at most one
more per waiting request, each asleep until its connection comes.

What it changes is the pool's queue, and only for SQLAlchemy's own ``QueuePool``
(the default): other pools (``NullPool``, ``StaticPool``, ``SingletonThreadPool``)
never make anyone wait for another thread's connection, and a pool or queue of
someone else's making is left as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import queue as sqla_queue


def lend_while_waiting(engine: Engine) -> None:
    """Make threads that wait for one of ``engine``'s connections lend their thread token.

    Idempotent, and it lasts across ``engine.dispose()`` (the pool it makes then is
    covered as it is made).
    """
    _cover(engine.pool)


def _cover(pool: Pool) -> None:
    if not isinstance(pool, QueuePool) or type(pool._pool) not in (sqla_queue.Queue, _LendingQueue):
        return
    # Same object, same state: only how a blocking get() waits changes.
    pool._pool.__class__ = _LendingQueue
    if "recreate" not in vars(pool):
        # Through a weak reference: a bound method would make a pool <-> method cycle,
        # leaving every disposed pool (and the connections still in it) to the cyclic
        # garbage collector, which closes them at some unrelated later moment.
        pool.recreate = functools.partial(_recreate, weakref.ref(pool))  # type: ignore[method-assign]


def _recreate(ref: weakref.ReferenceType[QueuePool]) -> QueuePool:
    """``pool.recreate()`` (what ``engine.dispose()`` calls), covering the new pool too."""
    pool = ref()
    assert pool is not None  # it is the pool being asked to recreate itself
    new = type(pool).recreate(pool)
    _cover(new)
    return new


class _LendingQueue(sqla_queue.Queue[Any]):
    """SQLAlchemy's pool queue, lending the thread's token while a ``get()`` waits."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(False)
        except sqla_queue.Empty:
            if not block:
                raise
        with _token_lent():
            # A full pool_timeout of waiting, counted from here.
            return super().get(True, timeout)


@contextmanager
def _token_lent() -> Iterator[None]:
    try:
        give_back = anyio.from_thread.run_sync(_lend)
    except RuntimeError:
        # Not an AnyIO worker thread (or its event loop is gone): nothing to lend.
        give_back = None
    try:
        yield
    finally:
        if give_back is not None:
            give_back()


def _lend() -> Callable[[], None] | None:
    """On the event loop: one more token for the default limiter; how to take it back."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    if math.isinf(total):
        return None
    limiter.total_tokens = int(total) + 1
    schedule: Callable[..., Any]
    try:
        schedule = asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        # Another backend (trio): through AnyIO, which waits for the loop.
        schedule = anyio.from_thread.run_sync
    return functools.partial(_give_back, schedule, limiter)


def _give_back(schedule: Callable[..., Any], limiter: anyio.CapacityLimiter) -> None:
    """From the worker thread: have the event loop take the lent token back."""
    # On asyncio without waiting: a thread that now holds a connection shouldn't
    # wait for the loop. A closed loop takes its limiter with it.
    with contextlib.suppress(RuntimeError):
        schedule(_take_back, limiter)


def _take_back(limiter: anyio.CapacityLimiter) -> None:
    total = limiter.total_tokens
    if not math.isinf(total):  # unless someone lifted the limit meanwhile
        limiter.total_tokens = max(int(total) - 1, 0)
