"""Running a request again after a serialization failure or a deadlock.

Under ``SERIALIZABLE`` isolation PostgreSQL aborts one of two conflicting
transactions with SQLSTATE 40001 and expects the client to run it again; any
isolation level can deadlock (40P01). The middleware settles the transaction
before anything of the response is forwarded, so it can run the whole request
again: routing, dependencies, validation and the route itself, on a fresh session
and with the request body replayed byte for byte.

What lives here is what the dispatcher needs for that and nothing else: spotting
a retryable failure from the driver's SQLSTATE (never the message text), noting
one that the app turned into a response, keeping the body for the next attempt,
the backoff, the log lines and the answer when the retries run out.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session
from starlette.types import Message, Receive, Scope, Send

from ._policy import ATTRIBUTE as POLICY_ATTRIBUTE
from ._policy import check_retries

logger = logging.getLogger("middleware_sessions")

#: The SQLSTATEs after which the database expects the transaction to be run again.
RETRYABLE = {"40001": "serialization_failure", "40P01": "deadlock_detected"}

DEFAULT_BODY_LIMIT = 1024 * 1024
DEFAULT_BACKOFF_BASE = 0.01
DEFAULT_BACKOFF_CAP = 1.0

# How far down a chain of causes, contexts and groups to look (cycles are skipped anyway).
_CHAIN_LIMIT = 64


class Conflict(BaseException):
    """Leaves the app when an attempt is over and runs again; caught by its own name only.

    A ``BaseException``, so the app's handlers for ``Exception`` let it pass: nothing
    of the attempt's response may reach the client. The attempt keeps the SQLSTATE.
    """


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the driver errors it wraps, its causes and contexts, group members."""
    todo: list[object] = [exc]
    seen: set[int] = set()
    while todo and len(seen) < _CHAIN_LIMIT:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # DBAPIError.orig is the driver's error; SQLAlchemy's asyncpg adapter keeps
        # asyncpg's own on __cause__; task groups wrap errors in exception groups.
        todo += [getattr(current, "orig", None), current.__cause__, current.__context__]
        todo += getattr(current, "exceptions", ())


def conflict_of(exc: BaseException | None) -> str | None:
    """The SQLSTATE if ``exc`` comes from a serialization failure or a deadlock, else ``None``.

    Looks at the ``sqlstate`` attribute that psycopg, asyncpg and SQLAlchemy's
    asyncpg adapter give their errors (``pgcode`` for psycopg2), anywhere in the
    exception's chain; the message text is never consulted.
    """
    if exc is None:
        return None
    for current in _chain(exc):
        for attribute in ("sqlstate", "pgcode"):
            state = getattr(current, attribute, None)
            if isinstance(state, str) and state in RETRYABLE:
                return state
    return None


def describe(sqlstate: str) -> str:
    return f"SQLSTATE {sqlstate} ({RETRYABLE.get(sqlstate, 'unknown')})"


@dataclass(frozen=True)
class Settings:
    """The middleware's retry options, checked once at construction."""

    retries: int = 0
    body_limit: int = DEFAULT_BODY_LIMIT
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP

    def __post_init__(self) -> None:
        check_retries(self.retries, "DBSessionMiddleware's retries")
        if isinstance(self.body_limit, bool) or not isinstance(self.body_limit, int):
            raise TypeError(
                f"DBSessionMiddleware's retry_body_limit must be a number of bytes, "
                f"not {self.body_limit!r}. It bounds the request body kept for running the "
                "request again. Pass an int, e.g. retry_body_limit=1024 * 1024."
            )
        if self.body_limit < 0:
            raise ValueError(
                f"DBSessionMiddleware got retry_body_limit={self.body_limit}. "
                "A body limit cannot be negative. Pass 0 to retry only requests without a body."
            )
        for name, value in (("base", self.backoff_base), ("cap", self.backoff_cap)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"DBSessionMiddleware's retry_backoff_{name} must be a number of seconds, "
                    f"not {value!r}. It shapes the random wait between two attempts. "
                    f"Pass a float, e.g. retry_backoff_{name}={getattr(Settings, 'backoff_' + name)}."
                )
        if not (0 <= self.backoff_base <= self.backoff_cap):
            raise ValueError(
                f"DBSessionMiddleware got retry_backoff_base={self.backoff_base!r} and "
                f"retry_backoff_cap={self.backoff_cap!r}. "
                "The wait before a retry grows from the base up to the cap. "
                "Pass 0 <= retry_backoff_base <= retry_backoff_cap (seconds)."
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): full jitter.

        A random wait between 0 and ``base * 2 ** (retry - 1)``, capped: requests
        that collided once spread out instead of colliding again in step.
        """
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (retry - 1))
        return random.uniform(0, ceiling)


def retries_for(scope: Scope, default: int) -> int:
    """The route's ``@transaction_policy(retries=...)`` if it sets one, else ``default``."""
    policy = getattr(scope.get("endpoint"), POLICY_ATTRIBUTE, None)
    retries: int | None = getattr(policy, "retries", None)
    return default if retries is None else retries


# --- What the attempt running now did: listeners -------------------------------------
#
# Two SQLAlchemy listeners report to the attempt running in the current context
# (``CURRENT``, set only around attempts of requests that may run again):
#
# - ``handle_error`` on the database's engine notes a serialization failure or
#   deadlock, also one that the route or an exception handler then turned into a
#   response (409, 500, ...) the middleware only sees as a status;
# - ``after_commit`` on every ``Session`` notes that the attempt made work of its own
#   durable (``db.session.commit()``, a ``session_scope()``, a session from
#   ``db.sessionmaker()``): running it again would repeat that work.
#
# They are installed with the first request that may run again, so an app that never
# retries carries neither, and they run only when a statement fails or a session commits.


class Attempt:
    """What the listeners learn about one attempt on one database's engine."""

    def __init__(self, engine: Any, outer: Attempt | None) -> None:
        self.engine = getattr(engine, "sync_engine", engine)  # where an AsyncEngine's events live
        self.outer = outer  # the attempt of a middleware further out (another database)
        self.conflict: str | None = None  # the SQLSTATE of a conflict on this engine
        self.committed = False


CURRENT: ContextVar[Attempt | None] = ContextVar("middleware_sessions.attempt", default=None)
_WATCHED: weakref.WeakSet[Engine] = weakref.WeakSet()
_listening_for_commits = False


def watch(attempt: Attempt) -> None:
    """Install the listeners that report to ``attempt`` (once per engine, once for commits)."""
    global _listening_for_commits
    if not _listening_for_commits:
        event.listen(Session, "after_commit", _note_commit)
        _listening_for_commits = True
    if attempt.engine not in _WATCHED:
        _WATCHED.add(attempt.engine)
        event.listen(attempt.engine, "handle_error", _note_conflict)


def _note_conflict(context: ExceptionContext) -> None:
    state = conflict_of(context.original_exception)
    attempt = CURRENT.get() if state is not None else None
    while attempt is not None:
        if attempt.engine is context.engine:
            attempt.conflict = state
            return
        attempt = attempt.outer


def _note_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint: nothing is durable yet
    attempt = CURRENT.get()
    while attempt is not None:
        # Durable work of an inner attempt is durable for every attempt around it.
        attempt.committed = True
        attempt = attempt.outer


# --- The request body, kept for the next attempt --------------------------------------


class Body:
    """The request body as the app reads it, so that the next attempt reads the same bytes.

    Each attempt gets its own ``receive``: it hands back the messages read so far,
    unchanged and in order, then goes on reading (and keeping) from the server's
    ``receive``. A part the app never read is simply read by a later attempt. Once
    more than ``limit`` bytes were read, or the client disconnected, nothing is
    kept any more and :attr:`problem` says why the request cannot run again.
    """

    def __init__(self, receive: Receive, limit: int, wanted: Callable[[], bool]) -> None:
        self._receive = receive
        self._limit = limit
        # Asked at the first read, when routing has found the route: a request that
        # will never run again (its route says retries=0) keeps nothing.
        self._wanted: Callable[[], bool] | None = wanted
        self._messages: list[Message] = []
        self._size = 0
        self.problem: str | None = None

    def receive(self) -> Receive:
        """A ``receive`` for the next attempt, starting again at the first byte."""
        kept = iter(list(self._messages))

        async def receive() -> Message:
            message = next(kept, None)
            if message is not None:
                return message
            return await self._read()

        return receive

    async def _read(self) -> Message:
        message = await self._receive()
        if self._wanted is not None:
            if not self._wanted():
                # Its route does not retry; or the body was read before routing, when
                # only the middleware's retries were known.
                self.problem = (
                    "its body was read before its route was known, and the middleware's "
                    "retries=0 kept none of it (set retries= on the middleware)"
                )
            self._wanted = None
        if self.problem is None:
            if message["type"] == "http.request":
                self._size += len(message.get("body", b""))
                if self._size > self._limit:
                    self.problem = f"its body is larger than retry_body_limit ({self._limit} bytes)"
                    self._messages.clear()
                else:
                    self._messages.append(message)
            elif message["type"] == "http.disconnect":
                self.problem = "the client disconnected"
        return message


class Pristine:
    """The scope as it came in: each attempt starts from it (routing writes into it).

    Restored in place, so middleware further out that reads the scope after the
    request (the matched route, say) sees what the last attempt left there.
    """

    def __init__(self, scope: Scope) -> None:
        self._scope = scope
        self._items = dict(scope)
        state = scope.get("state")
        self._state = dict(state) if isinstance(state, dict) else None

    def restore(self) -> None:
        scope = self._scope
        scope.clear()
        scope.update(self._items)
        if self._state is not None:
            state = scope["state"]
            state.clear()
            state.update(self._state)


# --- Telling what happened ---------------------------------------------------------------


def where(scope: Scope) -> str:
    return f"{scope.get('method')} {scope.get('path')}"


def log_retry(scope: Scope, attempt: int, sqlstate: str, delay: float) -> None:
    """One line per retry: method, path, the attempt about to run and the SQLSTATE."""
    logger.info(
        "Running %s again (attempt %d) after %s, in %.3f s.",
        where(scope),
        attempt,
        describe(sqlstate),
        delay,
    )


def log_gave_up(scope: Scope, attempts: int, sqlstate: str, reason: str | None) -> None:
    """A WARNING when a conflicting request is answered 503 instead of run again."""
    if reason is None:
        logger.warning(
            "%s failed with %s on each of its %d attempts; answered 503 with Retry-After, "
            "nothing was written. Conflicts this frequent call for more retries= or "
            "shorter transactions on the contended rows.",
            where(scope),
            describe(sqlstate),
            attempts,
        )
    else:
        logger.warning(
            "%s failed with %s and was not run again: %s. Answered 503 with Retry-After, "
            "nothing was written.",
            where(scope),
            describe(sqlstate),
            reason,
        )


def log_committed_already(scope: Scope, sqlstate: str) -> None:
    logger.warning(
        "%s failed with %s and was not run again: it had already committed work of its "
        "own (a commit() in the route, a session_scope(), ...), which running it again "
        "would repeat.",
        where(scope),
        describe(sqlstate),
    )


async def send_unavailable(send: Send) -> None:
    """503 with ``Retry-After``: nothing was written, and sending it again may well work."""
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": b"Service Unavailable"})
