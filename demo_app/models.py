"""The ledger's tables. Money is integer cents; ids are integers."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    # Deliberately no CHECK (balance >= 0): an over-draw is flushed, found out and
    # answered with 409, and the middleware's rollback is what undoes it.
    balance: Mapped[int] = mapped_column(BigInteger)


class Transfer(Base):
    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="transfer_amount_positive"),
        CheckConstraint("from_account <> to_account", name="transfer_distinct_accounts"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    from_account: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    to_account: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    # NULLs never collide, so only transfers that carry a key are deduplicated.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)


class AuditEntry(Base):
    """Written by a background task after each transfer, through ``db.session``."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("transfers.id"), index=True)
    event: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
