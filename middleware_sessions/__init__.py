"""Request-scoped SQLAlchemy sessions for FastAPI and Starlette, through pure ASGI middleware."""

from ._database import AsyncDatabase, Database
from ._middleware import DBSessionMiddleware
from ._policy import transaction_policy
from .exceptions import (
    BlockingSessionWarning,
    ConcurrentSessionError,
    MissingSessionError,
    ReadOnlySessionError,
)

__all__ = [
    "AsyncDatabase",
    "BlockingSessionWarning",
    "ConcurrentSessionError",
    "DBSessionMiddleware",
    "Database",
    "MissingSessionError",
    "ReadOnlySessionError",
    "transaction_policy",
]
__version__ = "0.1.0"
