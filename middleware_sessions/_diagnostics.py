"""Turning cryptic misuse into messages that name the mistake."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from ._redaction import redact

__all__ = ["describe_discarded", "is_concurrent_use", "redact"]

# What drivers say when a second operation arrives on a busy connection.
_DRIVER_BUSY = (
    "another operation is in progress",  # asyncpg
    "another command is already in progress",  # psycopg
    "recursive use of cursors not allowed",  # sqlite3
)


def is_concurrent_use(exc: BaseException) -> bool:
    """Whether ``exc`` is what SQLAlchemy or a driver raises for a session used twice at once."""
    if isinstance(exc, SQLAlchemyError) and exc.code == "isce":
        return True  # IllegalStateChangeError, "concurrent operations are not permitted"
    if isinstance(exc, DBAPIError):
        text = str(exc.orig).lower()
        return any(marker in text for marker in _DRIVER_BUSY)
    return False


def _label(obj: object) -> str:
    identity = inspect(obj).identity
    key = ", ".join(map(str, identity)) if identity else "pending"
    return f"{type(obj).__name__}({key})"


def _labels(objects: Any, limit: int = 10) -> str:
    labels = [_label(obj) for obj in list(objects)[:limit]]
    more = len(objects) - limit
    return ", ".join(labels) + (f" and {more} more" if more > 0 else "")


def describe_discarded(session: Session) -> str:
    """The objects a rollback of ``session`` throws away, for a DEBUG log line."""
    new, changed, deleted = set(session.new), set(session.dirty), set(session.deleted)
    transaction = session.get_transaction()
    if transaction is not None:
        # Objects already flushed in this transaction (SQLAlchemy keeps them for rollback).
        new.update(state.obj() for state in getattr(transaction, "_new", ()))
        deleted.update(state.obj() for state in getattr(transaction, "_deleted", ()))
        changed.update(state.obj() for state in getattr(transaction, "_dirty", ()))
    new.discard(None)
    deleted.discard(None)
    changed.discard(None)
    changed -= new | deleted
    parts = [
        f"{len(group)} {what}" + (f" ({_labels(group)})" if group else "")
        for what, group in (("new", new), ("changed", changed), ("deleted", deleted))
    ]
    return ", ".join(parts)
