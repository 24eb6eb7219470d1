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

    Slotted: a request that never touches the database pays for one small object
    (the middleware's per-request object is a ``Holder`` too, so not two).
    """

    # route_scope: with read replicas, the ASGI scope whose route says where the session
    # reads from (unset or None: the primary). Only a database with replicas reads it.
    __slots__ = ("never_commits", "open", "rollback_only", "route_scope", "session", "tasks")
    route_scope: Any

    def __init__(self) -> None:
        self.session: Any = None
        self.open = True
        self.rollback_only = False
        # Set by an owner that never commits (``session_scope(commit=False)``,
        # ``commit_on=None``), so per-task sessions under it don't either.
        self.never_commits = False
        # Inside ``task_sessions()``: the block (a ``_tasks.TaskSessions``) that
        # hands each task a holder of its own.
        self.tasks: Any = None

    def empty(self) -> Any:
        """Empty the slot for good (it never fills again) and return what it held."""
        session, self.session, self.open = self.session, None, False
        return session
