"""fastapi-sqlalchemy's public names over ``middleware_sessions``: change the import only.

``from fastapi_sqlalchemy import DBSessionMiddleware, db`` becomes
``from middleware_sessions.compat.fastapi_sqlalchemy import DBSessionMiddleware, db``.
"""

from .middleware import DBSessionMiddleware, db

__all__ = ["DBSessionMiddleware", "db"]
