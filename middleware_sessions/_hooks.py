"""After-commit and after-rollback hooks, tied to the transaction they were registered in.

Hooks wait in ``session.info`` until SQLAlchemy reports how the outermost
transaction ended (savepoints don't count): on commit the ``on_commit`` hooks
become ready and the ``on_rollback`` ones are dropped, and the reverse on
rollback. The owner of the session (middleware or ``session_scope()``) runs the
ready ones once the session is closed, so hooks never delay the status.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import anyio.to_thread
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from ._redaction import redact as redact_errors

logger = logging.getLogger("middleware_sessions")

Hook = Callable[[], Any]
Outcome = Literal["commit", "rollback"]

_PENDING = "middleware_sessions.pending_hooks"
_READY = "middleware_sessions.ready_hooks"


def install(session_class: type[Session]) -> None:
    """Listen for transaction outcomes on a session class of our own."""
    event.listen(session_class, "after_commit", _after_commit)
    event.listen(session_class, "after_soft_rollback", _after_soft_rollback)


def register(session: Session, outcome: Outcome, hook: Hook) -> None:
    """Run ``hook`` if the session's current (or next) transaction ends in ``outcome``."""
    if not callable(hook):
        raise TypeError(
            f"on_{outcome} expects a callable taking no arguments, not {type(hook).__name__}. "
            "Wrap arguments with functools.partial or a lambda."
        )
    if not session.in_transaction():
        # Join a transaction now (no connection needed), so the hook has one to follow.
        session.begin()
    session.info.setdefault(_PENDING, []).append((outcome, hook))


def take_ready(session: Session) -> list[Hook]:
    """The hooks whose transaction has ended the way they wait for."""
    ready: list[Hook] = session.info.pop(_READY, [])
    return ready


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint was released; the outer transaction goes on
    _resolve(session, "commit")


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    if previous.parent is None:
        _resolve(session, "rollback")


def _resolve(session: Session, outcome: Outcome) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending:
        ready = session.info.setdefault(_READY, [])
        ready.extend(hook for wanted, hook in pending if wanted == outcome)


def is_async_callable(obj: object) -> bool:
    """Whether calling ``obj`` gives a coroutine (seeing through ``functools.partial``)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - an instance with async __call__
    )


def _log_failure(
    hook: Hook, where: str, error: Exception, redact: Callable[[BaseException], Any]
) -> None:
    # A hook that queries the database can fail with SQL and values in its error.
    logger.error("The transaction hook %r of %s failed.", hook, where, exc_info=redact(error))


async def run_async(
    hooks: list[Hook], where: str, redact: Callable[[BaseException], Any] = redact_errors
) -> None:
    """Run hooks in order: coroutines awaited, plain callables in a worker thread."""
    for hook in hooks:
        try:
            if is_async_callable(hook):
                await hook()
            else:
                await anyio.to_thread.run_sync(hook)
        except Exception as error:
            _log_failure(hook, where, error, redact)


def run_sync(hooks: list[Hook], where: str) -> None:
    """Run hooks in order where nothing can be awaited (a sync ``session_scope()``)."""
    for hook in hooks:
        if is_async_callable(hook):
            logger.error(
                "The async transaction hook %r of %s was not run: a sync session_scope() "
                "cannot await it. Register a plain function, or use AsyncDatabase.",
                hook,
                where,
            )
            continue
        try:
            hook()
        except Exception as error:
            _log_failure(hook, where, error, redact_errors)
