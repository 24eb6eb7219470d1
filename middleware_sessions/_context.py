"""The session slot that a database's private ``ContextVar`` points at.

The holder, not the session, is what lives in the ``ContextVar``: contexts are
copied into threads and tasks, and a session created lazily in a copy (a sync
route in the threadpool, a dependency) must be visible to the owner that settles
it. The owner (the middleware for a request, ``session_scope()`` for a block)
empties the holder when it is done, so a stale copy of the context finds nothing
usable instead of a closed or foreign session.
"""

from __future__ import annotations

from typing import Any


class Holder:
    """The session slot of one request or one ``session_scope()``.

    No ``__init__``: the defaults live on the class, so a request that never
    touches the database pays for a bare object and nothing else.
    """

    session: Any = None
    open: bool = True
    rollback_only: bool = False
    # A statement failed with this retryable SQLSTATE (noted by ``_retry.watch``).
    conflict: str | None = None

    def empty(self) -> Any:
        """Empty the slot for good (it never fills again) and return what it held."""
        session, self.session, self.open = self.session, None, False
        return session
