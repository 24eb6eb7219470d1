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
    """The session slot of one request or one ``session_scope()``."""

    __slots__ = ("open", "owner", "rollback_only", "session")

    def __init__(self, session: S | None = None, owner: object = None) -> None:
        self.session: S | None = session
        self.open = True
        self.rollback_only = False
        # The ASGI scope of the request that set this holder (None for a session_scope()).
        self.owner = owner

    def close(self) -> S | None:
        """Empty the slot for good and return what it held."""
        session, self.session, self.open = self.session, None, False
        return session
