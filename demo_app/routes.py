"""The HTTP API. Routes use ``db.session`` (through ``ledger``) without ``Depends``."""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Path, Query, Response
from fastapi.responses import StreamingResponse

from middleware_sessions import transaction_policy

from . import ledger
from .database import pool_watch
from .models import MAX_INTEGER
from .schemas import AccountIn, AccountOut, TransferIn, TransferOut

router = APIRouter()

# Every number that reaches a query is one the database can hold (a 64-bit
# integer): anything larger is a 422, never a driver's overflow error.
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=MAX_INTEGER, description="Items to skip.")]
AccountId = Annotated[int, Path(ge=1, le=MAX_INTEGER, description="An account id.")]
TransferId = Annotated[int, Path(ge=1, le=MAX_INTEGER, description="A transfer id.")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown account"},
}


@router.post("/accounts", status_code=201)
async def create_account(body: AccountIn) -> AccountOut:
    return AccountOut.model_validate(await ledger.open_account(body))


@router.get("/accounts")
@transaction_policy(read_only=True)  # from a replica when there are some
async def list_accounts(limit: Limit = 100, offset: Offset = 0) -> list[AccountOut]:
    accounts = await ledger.list_accounts(limit, offset)
    return [AccountOut.model_validate(account) for account in accounts]


@router.get("/accounts/{account_id}", responses=_ERRORS)
@transaction_policy(read_only=True)  # from a replica when there are some
async def read_account(account_id: AccountId) -> AccountOut:
    return AccountOut.model_validate(await ledger.get_account(account_id))


@router.get("/accounts/{account_id}/transfers", responses=_ERRORS)
@transaction_policy(read_only=True)  # from a replica when there are some
async def list_account_transfers(
    account_id: AccountId, limit: Limit = 100, offset: Offset = 0
) -> list[TransferOut]:
    transfers = await ledger.list_transfers(limit, offset, account_id=account_id)
    return [TransferOut.model_validate(transfer) for transfer in transfers]


@router.post(
    "/transfers",
    status_code=201,
    responses={
        200: {"description": "Idempotent replay: the transfer first made with this key"},
        **_ERRORS,
        409: {"description": "Insufficient funds, or a balance too large; nothing was moved"},
        422: {"description": "Invalid transfer, or idempotency_key reused for another transfer"},
    },
)
async def create_transfer(
    body: TransferIn, response: Response, background_tasks: BackgroundTasks
) -> TransferOut:
    """Debit one account and credit the other, all or nothing.

    Repeating an ``idempotency_key`` moves no money again: the answer is the
    first transfer, with status 200 and ``Idempotent-Replayed: true``.
    """
    transfer, created = await ledger.transfer(body)
    if created:
        # Runs after the response, on this request's db.session.
        background_tasks.add_task(ledger.record_audit, transfer.id)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return TransferOut.model_validate(transfer)


@router.get("/transfers")
@transaction_policy(read_only=True)  # from a replica when there are some
async def list_transfers(limit: Limit = 100, offset: Offset = 0) -> list[TransferOut]:
    transfers = await ledger.list_transfers(limit, offset)
    return [TransferOut.model_validate(transfer) for transfer in transfers]


# Declared before /transfers/{transfer_id}, which would otherwise match "export".
@router.get("/transfers/export", response_class=StreamingResponse)
async def export_transfers() -> StreamingResponse:
    """Every transfer as CSV. The body is read from ``db.session`` while it streams."""
    return StreamingResponse(
        ledger.export_transfers_csv(),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="transfers.csv"'},
    )


@router.get("/transfers/{transfer_id}", responses={404: {"description": "Unknown transfer"}})
@transaction_policy(read_only=True)  # from a replica when there are some
async def read_transfer(transfer_id: TransferId) -> TransferOut:
    return TransferOut.model_validate(await ledger.get_transfer(transfer_id))


@router.get("/health")
async def health() -> dict[str, str]:
    """Touches no database, so the middleware opens no session for it."""
    return {"status": "ok"}


@router.get("/debug/pool")
async def debug_pool() -> dict[str, int | None]:
    """This worker's pool: connections in use now, and checkouts since it started."""
    return {
        "pid": os.getpid(),
        "checked_out": pool_watch.checked_out,
        "checkouts": pool_watch.checkouts,
    }
