"""The errors this library raises."""

from __future__ import annotations

__all__ = ["MissingSessionError"]


class MissingSessionError(RuntimeError):
    """``db.session`` was used where no request or ``session_scope()`` provides one."""


NO_SESSION = (
    "There is no database session here. "
    "db.session only exists inside an HTTP request that went through DBSessionMiddleware, "
    "or inside a db.session_scope() block. "
    "Install the middleware with app.add_middleware(DBSessionMiddleware, db=db), "
    "or wrap this code in 'with db.session_scope():' (Database) or "
    "'async with db.session_scope():' (AsyncDatabase)."
)

SESSION_CLOSED = (
    "The database session of this request is already closed. "
    "The request that owned it has finished, and this code (typically a task or thread "
    "started by the request) outlived it. "
    "Give the work its own session with db.session_scope() or db.sessionmaker()."
)
