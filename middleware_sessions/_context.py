"""The per-request holder that a private ``ContextVar`` points at.

The holder, not the session, is what lives in the ``ContextVar``: contexts are
copied into threads and tasks, and a session created lazily in a copy (a sync
route in the threadpool, a dependency) must be visible to the middleware that
settles it. The owner empties the holder when it is done, so a stale copy of the
context finds nothing usable instead of a closed or foreign session.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

S = TypeVar("S", Session, AsyncSession)


class Holder(Generic[S]):
    """The session slot of one request or one ``session_scope()``.

    No ``__init__``: the defaults live on the class, so a request that never
    touches the database pays for a bare object and nothing else.
    """

    session: S | None = None
    open: bool = True
    rollback_only: bool = False
    # Request bookkeeping for the middleware: the start message went out; the
    # commit at the start failed (and what it raised).
    started: bool = False
    error: BaseException | None = None
    # Two tasks used the session at once: its connection may still be busy.
    poisoned: bool = False
    # A statement failed with this retryable SQLSTATE (noted by ``_retry.watch``).
    conflict: str | None = None

    def close(self) -> S | None:
        """Empty the slot for good and return what it held."""
        session, self.session, self.open = self.session, None, False
        return session
