"""Numbers past what the database holds are refused, never a 500 or a dropped connection.

Ids, offsets, balances and amounts are 64-bit integers in the database (BIGINT on
PostgreSQL, INTEGER on SQLite): 2**63 and beyond cannot even be sent as a query
parameter. The demo answers them with 422 (or 404/409 where the number is valid
but names nothing, or would overflow a balance), on both backends, through a real
uvicorn whose log must show no error.
"""

from __future__ import annotations

from typing import Any

import pytest

from demo_app.models import MAX_INTEGER

from .conftest import DemoServer, LedgerDatabase
from .load import open_accounts

pytestmark = pytest.mark.anyio

TOO_LARGE = [MAX_INTEGER + 1, 2**64, 10**30]
TOO_SMALL = [0, -1, -(2**63) - 1]
PATHS = ["/accounts/{}", "/transfers/{}", "/accounts/{}/transfers"]
PAGES = ["/accounts", "/transfers", "/accounts/{account}/transfers"]


@pytest.mark.parametrize("number", TOO_LARGE + TOO_SMALL)
@pytest.mark.parametrize("path", PATHS)
async def test_ids_out_of_range_in_the_path_are_422(
    server: DemoServer, path: str, number: int
) -> None:
    async with server.client() as client:
        response = await client.get(path.format(number))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "path"


@pytest.mark.parametrize("path", PATHS)
async def test_the_largest_id_is_valid_and_unknown(server: DemoServer, path: str) -> None:
    async with server.client() as client:
        response = await client.get(path.format(MAX_INTEGER))
    assert response.status_code == 404, response.text
    assert (
        response.json()["detail"]
        == f"{path.split('/')[1][:-1].title()} {MAX_INTEGER} does not exist."
    )


@pytest.mark.parametrize("number", [*TOO_LARGE, -1])
@pytest.mark.parametrize("path", PAGES)
async def test_offsets_out_of_range_are_422(server: DemoServer, path: str, number: int) -> None:
    async with server.client() as client:
        [account] = await open_accounts(client, [1])
        response = await client.get(path.format(account=account), params={"offset": number})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "offset"]


@pytest.mark.parametrize("path", PAGES)
async def test_the_largest_offset_is_an_empty_page(server: DemoServer, path: str) -> None:
    async with server.client() as client:
        [account] = await open_accounts(client, [1])
        response = await client.get(path.format(account=account), params={"offset": MAX_INTEGER})
    assert response.status_code == 200, response.text
    assert response.json() == []


@pytest.mark.parametrize("number", TOO_LARGE + TOO_SMALL)
@pytest.mark.parametrize("field", ["from_account", "to_account", "amount"])
async def test_transfer_numbers_out_of_range_are_422_and_move_nothing(
    server: DemoServer, field: str, number: int
) -> None:
    async with server.client() as client:
        source, target = await open_accounts(client, [1_000, 1_000])
        body: dict[str, Any] = {"from_account": source, "to_account": target, "amount": 5}
        body[field] = number
        response = await client.post("/transfers", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", field]
        for account in (source, target):
            assert (await client.get(f"/accounts/{account}")).json()["balance"] == 1_000


@pytest.mark.parametrize("number", [*TOO_LARGE, -1])
async def test_opening_balances_out_of_range_are_422(server: DemoServer, number: int) -> None:
    async with server.client() as client:
        response = await client.post("/accounts", json={"owner": "big", "balance": number})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "balance"]


async def test_a_credit_past_the_largest_balance_is_409_and_moves_nothing(
    server: DemoServer, shared_db: LedgerDatabase
) -> None:
    """A balance that would overflow the column is refused, and the debit rolled back."""
    async with server.client() as client:
        [source, target] = await open_accounts(client, [1_000, 0])
        shared_db.insert(
            "UPDATE accounts SET balance = :balance WHERE id = :id",
            [{"balance": MAX_INTEGER - 10, "id": target}],
        )
        body = {"from_account": source, "to_account": target, "amount": 11}
        response = await client.post("/transfers", json=body)
        assert response.status_code == 409, response.text
        assert str(MAX_INTEGER) in response.json()["detail"]
        assert (await client.get(f"/accounts/{source}")).json()["balance"] == 1_000
        assert (await client.get(f"/accounts/{target}")).json()["balance"] == MAX_INTEGER - 10

        body["amount"] = 10  # exactly up to the largest balance is fine
        assert (await client.post("/transfers", json=body)).status_code == 201
        assert (await client.get(f"/accounts/{target}")).json()["balance"] == MAX_INTEGER
