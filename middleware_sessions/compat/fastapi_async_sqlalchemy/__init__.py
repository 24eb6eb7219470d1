"""fastapi-async-sqlalchemy's public names over ``middleware_sessions``: change the import only.

``from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db`` becomes
``from middleware_sessions.compat.fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db``.
"""

from .middleware import SQLAlchemyMiddleware, create_middleware_and_session_proxy, db

DBSessionMeta = type(db)
"""The type of ``db`` (for annotations)."""
DBSessionType = DBSessionMeta

__all__ = [
    "DBSessionMeta",
    "DBSessionType",
    "SQLAlchemyMiddleware",
    "create_middleware_and_session_proxy",
    "db",
]
