"""The ledger's tables. Money is integer cents; ids are integers.

Every integer column is 64-bit (``BIGINT`` on PostgreSQL; SQLite's ``INTEGER``
already is), so ids, balances and amounts all range up to ``MAX_INTEGER``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Integer, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The largest integer a column holds: BIGINT, and SQLite's INTEGER, are signed 64-bit.
MAX_INTEGER = 2**63 - 1


class Base(DeclarativeBase):
    # SQLite only numbers "INTEGER PRIMARY KEY" columns by itself: keep that name there.
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        int: BigInteger().with_variant(Integer(), "sqlite")
    }


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    # Deliberately no CHECK (balance >= 0): an over-draw is flushed, found out and
    # answered with 409, and the middleware's rollback is what undoes it.
    balance: Mapped[int]


class Transfer(Base):
    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="transfer_amount_positive"),
        CheckConstraint("from_account <> to_account", name="transfer_distinct_accounts"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    from_account: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    to_account: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int]
    # NULLs never collide, so only transfers that carry a key are deduplicated.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)


class AuditEntry(Base):
    """Written by a background task after each transfer, through ``db.session``."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("transfers.id"), index=True)
    event: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
