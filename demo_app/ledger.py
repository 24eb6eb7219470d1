"""The ledger's rules, written against ``db.session``: no session is passed around.

Every function here runs inside a request (or a ``db.session_scope()``); the
middleware commits the request's work when the response is a success and rolls
it back otherwise, so these functions never commit themselves.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from .database import db
from .models import MAX_INTEGER, Account, AuditEntry, Transfer
from .schemas import AccountIn, TransferIn


class LedgerError(Exception):
    """A request the ledger refuses; ``status_code`` and ``detail`` go to the client."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(LedgerError):
    status_code = 404


class InsufficientFunds(LedgerError):
    status_code = 409


class BalanceTooLarge(LedgerError):
    status_code = 409


class IdempotencyKeyReused(LedgerError):
    status_code = 422


async def open_account(body: AccountIn) -> Account:
    account = Account(owner=body.owner, balance=body.balance)
    db.session.add(account)
    await db.session.flush()  # assigns the id
    return account


async def get_account(account_id: int) -> Account:
    account = await db.session.get(Account, account_id)
    if account is None:
        raise NotFound(f"Account {account_id} does not exist.")
    return account


async def list_accounts(limit: int, offset: int) -> Sequence[Account]:
    query = select(Account).order_by(Account.id).limit(limit).offset(offset)
    return (await db.session.scalars(query)).all()


async def get_transfer(transfer_id: int) -> Transfer:
    transfer = await db.session.get(Transfer, transfer_id)
    if transfer is None:
        raise NotFound(f"Transfer {transfer_id} does not exist.")
    return transfer


async def list_transfers(
    limit: int, offset: int, account_id: int | None = None
) -> Sequence[Transfer]:
    query = select(Transfer).order_by(Transfer.id).limit(limit).offset(offset)
    if account_id is not None:
        await get_account(account_id)
        query = query.where(
            or_(Transfer.from_account == account_id, Transfer.to_account == account_id)
        )
    return (await db.session.scalars(query)).all()


async def transfer(body: TransferIn) -> tuple[Transfer, bool]:
    """Move ``body.amount`` between two accounts.

    Returns the transfer and whether it was created now (``False``: the
    idempotency key was seen before, and that earlier transfer is returned).
    """
    key = body.idempotency_key
    if key is not None and (earlier := await _transfer_with_key(key)) is not None:
        return _replay(earlier, body), False

    # Touch the two rows in id order: two opposite transfers then take their row
    # locks in the same order and cannot deadlock on PostgreSQL.
    changes = sorted([(body.from_account, -body.amount), (body.to_account, body.amount)])
    for account_id, change in changes:
        balance = await _add_to_balance(account_id, change)
        if balance is None:
            await get_account(account_id)  # a 404 if there is no such account
            raise BalanceTooLarge(
                f"Account {account_id} cannot hold {body.amount} more cents: "
                f"no balance can exceed {MAX_INTEGER} cents."
            )
        if balance < 0:
            # The debit is already in the database (flushed, not committed). The
            # 409 makes the middleware roll this request back: nothing moved.
            raise InsufficientFunds(
                f"Account {account_id} has insufficient funds for a transfer of {body.amount} cents."
            )

    new = Transfer(
        from_account=body.from_account,
        to_account=body.to_account,
        amount=body.amount,
        idempotency_key=key,
    )
    db.session.add(new)
    try:
        await db.session.flush()
    except IntegrityError:
        # A concurrent request with the same key committed first. Roll back all
        # of this request's work (its debit and credit too) and answer as that
        # request did. The whole transaction, not a SAVEPOINT: there is nothing
        # in it to keep, and SQLite's Python drivers mishandle SAVEPOINTs.
        await db.session.rollback()
        earlier = await _transfer_with_key(key) if key is not None else None
        if earlier is None:
            raise
        return _replay(earlier, body), False
    return new, True


async def _add_to_balance(account_id: int, change: int) -> int | None:
    """Add ``change`` to a balance in one statement; the new balance, or ``None``.

    The database computes ``balance + change`` from the row as it is, under the
    row's write lock, so concurrent transfers never lose an update (a read, then
    a write of the result, would). ``None``: no such account, or the new balance
    would not fit in the column (compared without computing the overflowing sum).
    """
    statement = (
        update(Account)
        .where(Account.id == account_id)
        .values(balance=Account.balance + change)
        .returning(Account.balance)
    )
    if change > 0:
        statement = statement.where(Account.balance <= MAX_INTEGER - change)
    return (await db.session.execute(statement)).scalar_one_or_none()


async def _transfer_with_key(key: str) -> Transfer | None:
    return await db.session.scalar(select(Transfer).where(Transfer.idempotency_key == key))


def _replay(earlier: Transfer, body: TransferIn) -> Transfer:
    same = (earlier.from_account, earlier.to_account, earlier.amount) == (
        body.from_account,
        body.to_account,
        body.amount,
    )
    if not same:
        raise IdempotencyKeyReused(
            "This idempotency_key was already used for a different transfer. "
            "Use a new key for a new transfer."
        )
    return earlier


async def record_audit(transfer_id: int) -> None:
    """Runs as a background task, after the response: committed when the request ends."""
    db.session.add(AuditEntry(transfer_id=transfer_id, event="transfer.created"))


EXPORT_COLUMNS = ("id", "from_account", "to_account", "amount", "idempotency_key")


async def export_transfers_csv() -> AsyncIterator[str]:
    """All transfers as CSV, streamed in chunks straight from the database cursor."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def take() -> str:
        chunk = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return chunk

    writer.writerow(EXPORT_COLUMNS)
    yield take()
    columns = [getattr(Transfer, name) for name in EXPORT_COLUMNS]
    query = select(*columns).order_by(Transfer.id).execution_options(yield_per=500)
    result = await db.session.stream(query)
    async for rows in result.partitions():
        writer.writerows(rows)
        yield take()
