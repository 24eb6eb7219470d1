"""Typed ``session_options``: the session class given as ``class_`` types ``db.session``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Literal

from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import TypedDict, TypeVar

SessionT = TypeVar("SessionT", bound=Session, default=Session)
AsyncSessionT = TypeVar("AsyncSessionT", bound=AsyncSession, default=AsyncSession)

JoinTransactionMode = Literal[
    "conservative_savepoint", "create_savepoint", "control_fully", "rollback_only"
]


class SessionOptions(TypedDict, Generic[SessionT], total=False):
    """``sessionmaker`` keyword arguments, with ``class_`` typing the sessions it makes."""

    class_: type[SessionT]
    autoflush: bool
    autobegin: bool
    expire_on_commit: bool
    info: dict[Any, Any]
    twophase: bool
    binds: dict[Any, Any]
    enable_baked_queries: bool
    join_transaction_mode: JoinTransactionMode
    close_resets_only: bool
    query_cls: Any


class AsyncSessionOptions(TypedDict, Generic[AsyncSessionT], total=False):
    """``async_sessionmaker`` keyword arguments, with ``class_`` typing the sessions."""

    class_: type[AsyncSessionT]
    sync_session_class: type[Session]
    autoflush: bool
    autobegin: bool
    expire_on_commit: bool
    info: dict[Any, Any]
    twophase: bool
    binds: dict[Any, Any]
    enable_baked_queries: bool
    join_transaction_mode: JoinTransactionMode
    close_resets_only: bool
    query_cls: Any


class ReplicaOptions(TypedDict, total=False):
    """Read replicas (PostgreSQL streaming replicas), for read-only routes; see docs/replicas.md."""

    replicas: Sequence[str | URL]
    replica_engines: Sequence[Any]
    max_replica_lag: float
    replica_wait: float
    replica_cookie: str | None
    replica_secret: str | bytes | None
