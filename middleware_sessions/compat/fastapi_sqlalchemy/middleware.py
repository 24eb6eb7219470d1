"""fastapi-sqlalchemy's ``DBSessionMiddleware`` and ``db``, over ``Database``.

The middleware builds a ``Database`` from the peer's arguments when it is created
(the module-wide ``db`` then uses it) and hands each request to our
``DBSessionMiddleware``: ``commit_on_exit=True`` commits responses below 400 at
response start, ``False`` never commits on its own (explicit
``db.session.commit()`` only).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from types import TracebackType
from typing import Any

from sqlalchemy import URL, Engine
from sqlalchemy.orm import Session
from starlette.types import ASGIApp

from middleware_sessions._database import Database
from middleware_sessions._middleware import DBSessionMiddleware as _DBSessionMiddleware
from middleware_sessions._middleware import _commit_below_400
from middleware_sessions.compat._errors import peer_errors

from .exceptions import MissingSessionError, SessionNotInitialisedError

# The peer's message, unchanged: it says what to do.
NO_ENGINE = "You need to pass a db_url or a custom_engine parameter."

__all__ = ["DBSessionMiddleware", "db"]

_database: Database | None = None


def _configured() -> Database:
    if _database is None:
        raise SessionNotInitialisedError
    return _database


class DBSessionMiddleware(_DBSessionMiddleware):
    """fastapi-sqlalchemy's middleware: one ``db.session`` per request.

    Takes ``db_url`` or ``custom_engine`` (``ValueError`` without either),
    ``engine_args`` for ``create_engine``, ``session_args`` for the sessionmaker,
    and ``commit_on_exit``: commit responses below 400 (``True``) or only what the
    routes commit themselves (``False``, the default). Either way a 4xx/5xx or an
    exception rolls back, and work after the response is settled, never lost.
    """

    def __init__(
        self,
        app: ASGIApp,
        db_url: str | URL | None = None,
        custom_engine: Engine | None = None,
        engine_args: Mapping[str, Any] | None = None,
        session_args: Mapping[str, Any] | None = None,
        commit_on_exit: bool = False,
    ) -> None:
        global _database
        if not custom_engine and not db_url:
            raise ValueError(NO_ENGINE)  # word for word the peer's: code may match on it
        if custom_engine is not None:
            database = Database(engine=custom_engine, session_options=session_args)
        else:
            database = Database(db_url, engine_options=engine_args, session_options=session_args)
        _database = database
        self.commit_on_exit = commit_on_exit
        # Our middleware itself, not a wrapper around it: no extra call per request.
        super().__init__(app, db=database, commit_on=_commit_below_400 if commit_on_exit else None)


class DBSessionMeta(type):
    """Gives the ``db`` class its ``db.session`` property."""

    @property
    def session(cls) -> Session:
        """The current request's (or ``with db():`` block's) session."""
        database = _configured()
        with peer_errors(MissingSessionError):
            return database.session


class DBSession(metaclass=DBSessionMeta):
    """``with db():`` opens a session for work outside a request (scripts, tests, tasks).

    ``session_args`` go to the sessionmaker for this block; ``commit_on_exit=True``
    commits at the end of a block that raised nothing. An exception rolls back.
    Blocks nest: each gets its own session.
    """

    def __init__(
        self, session_args: Mapping[str, Any] | None = None, commit_on_exit: bool = False
    ) -> None:
        self.session_args = dict(session_args or {})
        self.commit_on_exit = commit_on_exit
        self._stack: ExitStack | None = None

    def __enter__(self) -> type[DBSession]:
        database = _configured()
        stack = ExitStack()
        stack.enter_context(database.session_scope(commit=self.commit_on_exit, **self.session_args))
        self._stack = stack
        return type(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None, "__exit__ without __enter__"
        return stack.__exit__(exc_type, exc, tb)


db: DBSessionMeta = DBSession
