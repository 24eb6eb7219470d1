"""fastapi-async-sqlalchemy's errors, as subclasses of ours."""

from __future__ import annotations

from middleware_sessions.exceptions import MissingSessionError as _MissingSessionError

__all__ = ["MissingSessionError", "SessionNotInitialisedError"]

NO_SESSION = (
    "No session found: there is no database session here. "
    "db.session only exists inside an HTTP request that went through SQLAlchemyMiddleware, "
    "or inside an 'async with db():' block. "
    "Install the middleware with app.add_middleware(SQLAlchemyMiddleware, db_url=...), "
    "or wrap this code in 'async with db():'."
)

NOT_INITIALISED = (
    "Session not initialised: no SQLAlchemyMiddleware has been created for this db. "
    "db.session and 'async with db():' get their engine from the middleware's db_url or "
    "custom_engine. "
    "Call app.add_middleware(SQLAlchemyMiddleware, db_url=...) before using the database."
)


class MissingSessionError(_MissingSessionError):
    """``db.session`` was used outside a request and outside ``async with db():``."""

    def __init__(self, message: str = NO_SESSION) -> None:
        super().__init__(message)


class SessionNotInitialisedError(_MissingSessionError):
    """``db`` was used before its ``SQLAlchemyMiddleware`` was created."""

    def __init__(self, message: str = NOT_INITIALISED) -> None:
        super().__init__(message)
