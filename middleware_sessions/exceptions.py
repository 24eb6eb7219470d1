"""The errors and warnings this library raises."""

from __future__ import annotations

__all__ = [
    "BlockingSessionWarning",
    "ConcurrentSessionError",
    "MissingSessionError",
    "ReadOnlySessionError",
]


class MissingSessionError(RuntimeError):
    """``db.session`` was used where no request or ``session_scope()`` provides one."""


class ConcurrentSessionError(RuntimeError):
    """One session was used by two tasks or threads at the same time."""


class ReadOnlySessionError(RuntimeError):
    """A read-only request's session (reading from a replica) was asked to write."""


class BlockingSessionWarning(RuntimeWarning):
    """A sync ``Database.session`` was used on the event loop thread, blocking it."""


NO_SESSION = (
    "There is no database session here. "
    "db.session only exists inside an HTTP request that went through DBSessionMiddleware, "
    "or inside a db.session_scope() block. "
    "Install the middleware with app.add_middleware(DBSessionMiddleware, db=db), "
    "or wrap this code in 'with db.session_scope():' (Database) or "
    "'async with db.session_scope():' (AsyncDatabase)."
)

OTHER_DATABASE = (
    "There is no session for {db!r} in this request. "
    "The request went through DBSessionMiddleware for {others}, but not for this database. "
    "Add app.add_middleware(DBSessionMiddleware, db=...) for it too (one per database)."
)

SESSION_CLOSED = (
    "The database session of this request is already closed. "
    "The request that owned it has finished, and this code (typically a task or thread "
    "started by the request) outlived it. "
    "Give the work its own session with db.session_scope() or db.sessionmaker()."
)

CONCURRENT_USE = (
    "The session of {where} was used by two tasks or threads at the same time. "
    "A SQLAlchemy session is one transaction on one connection and cannot run two "
    "operations at once (asyncio.gather, task groups or threads over db.session do that). "
    "Give each concurrent task its own session: 'await db.gather(a(), b())' runs "
    "coroutines with a session each, and inside 'async with db.task_sessions():' every "
    "task gets its own (AsyncDatabase); or open 'db.session_scope()' in each task."
)

TASK_OUTLIVED_BLOCK = (
    "This task's db.task_sessions() block has already ended. "
    "The task was started inside the block and outlived it, so no session is settled for it. "
    "Await the task inside the block, or give it its own db.session_scope()."
)

TASK_WITHOUT_SLOT = (
    "This task read db.session inside 'db.task_sessions(max_concurrent=...)' without a slot. "
    "With max_concurrent, a task must wait for a free slot before it gets a session. "
    "Run the work through db.gather() or inside 'async with db.task_session():' "
    "(fastapi-async-sqlalchemy's db.connection())."
)

BLOCKING_USE = (
    "A sync Database.session was used on the event loop thread, inside 'async def' code. "
    "Its queries block the event loop, so every other request waits for them. "
    "Make the route a plain 'def' (FastAPI runs it in a worker thread) or use AsyncDatabase; "
    "Database(..., blocking_check=...) chooses what happens here: "
    "'warn' (the default), 'raise' (an error) or 'ignore'."
)

INSTALLED_TWICE = (
    "DBSessionMiddleware is installed twice for {db!r}. "
    "Each request already gets its session from the outer middleware, so the inner one "
    "does nothing. Remove one of the add_middleware(DBSessionMiddleware, db=...) calls."
)

REPLICA_WRITE = (
    "This request tried to {what}, but its route is read-only ({policy}). "
    "A read-only route's session reads from a replica, and a replica cannot write. "
    "Remove read_only=True from the route's transaction_policy(), or pass replica=False "
    "to keep it on the primary (its writes are still rolled back)."
)
