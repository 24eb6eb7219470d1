"""The demo ledger's HTTP API, one behaviour per test, on SQLite and PostgreSQL.

The tests share one real ``python -m demo_app`` per backend, so each works on
accounts and idempotency keys of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..helpers import poll_until
from .conftest import DemoServer, LedgerDatabase
from .load import all_pages, balances, export, open_accounts

pytestmark = pytest.mark.anyio

UNKNOWN = 10**9  # an id no test creates


def new_key() -> str:
    return uuid.uuid4().hex


async def pool(client: httpx.AsyncClient) -> dict[str, int]:
    response = await client.get("/debug/pool")
    assert response.status_code == 200
    stats: dict[str, int] = response.json()
    return stats


async def history(client: httpx.AsyncClient, account: int) -> list[dict[str, Any]]:
    return await all_pages(client, f"/accounts/{account}/transfers")


async def test_walkthrough_overdraw_is_409_and_balances_are_unchanged(server: DemoServer) -> None:
    """The README's walkthrough: two accounts, a transfer, an over-draw refused."""
    async with server.client() as client:
        alice = (await client.post("/accounts", json={"owner": "alice", "balance": 10_000})).json()
        bob = (await client.post("/accounts", json={"owner": "bob", "balance": 500})).json()
        assert alice == {"id": alice["id"], "owner": "alice", "balance": 10_000}

        move = {"from_account": alice["id"], "to_account": bob["id"], "amount": 2_500}
        response = await client.post("/transfers", json=move)
        assert response.status_code == 201
        transfer = {**move, "id": response.json()["id"], "idempotency_key": None}
        assert response.json() == transfer

        overdraw = {"from_account": bob["id"], "to_account": alice["id"], "amount": 3_001}
        response = await client.post("/transfers", json=overdraw)
        assert response.status_code == 409
        assert response.json() == {
            "detail": f"Account {bob['id']} has insufficient funds for a transfer of 3001 cents."
        }

        assert (await client.get(f"/accounts/{alice['id']}")).json()["balance"] == 7_500
        assert (await client.get(f"/accounts/{bob['id']}")).json()["balance"] == 3_000
        assert await history(client, bob["id"]) == [transfer]
        assert (await client.get(f"/transfers/{transfer['id']}")).json() == transfer


async def test_accounts_are_paginated_in_id_order(server: DemoServer) -> None:
    """``limit``/``offset`` page through accounts; bad page parameters are 422."""
    async with server.client() as client:
        opened = sorted(await open_accounts(client, [100, 200, 300]))
        everyone = [a["id"] for a in await all_pages(client, "/accounts", page=7)]
        assert everyone == sorted(everyone)
        start = everyone.index(opened[0])
        page = await client.get("/accounts", params={"limit": 2, "offset": start + 1})
        assert [(a["id"], a["balance"]) for a in page.json()] == [
            (opened[1], 200),
            (opened[2], 300),
        ]
        assert (await client.get("/accounts", params={"offset": len(everyone)})).json() == []
        for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
            assert (await client.get("/accounts", params=bad)).status_code == 422


@pytest.mark.parametrize("path", ["/accounts/{}", "/accounts/{}/transfers", "/transfers/{}"])
async def test_unknown_ids_are_404(server: DemoServer, path: str) -> None:
    """Unknown accounts and transfers are 404 with a message, not an error page."""
    async with server.client() as client:
        response = await client.get(path.format(UNKNOWN))
        assert response.status_code == 404
        assert response.json()["detail"].endswith(f"{UNKNOWN} does not exist.")


async def test_transfer_to_unknown_account_is_404_and_moves_nothing(server: DemoServer) -> None:
    """The debit was flushed before the unknown account was found; the 404 undoes it."""
    async with server.client() as client:
        [account] = await open_accounts(client, [1_000])
        body = {"from_account": account, "to_account": UNKNOWN, "amount": 10}
        response = await client.post("/transfers", json=body)
        assert response.status_code == 404
        assert response.json() == {"detail": f"Account {UNKNOWN} does not exist."}
        assert (await client.get(f"/accounts/{account}")).json()["balance"] == 1_000
        assert await history(client, account) == []


INVALID_TRANSFERS = [
    pytest.param({"amount": 0}, "Input should be greater than 0", id="zero-amount"),
    pytest.param({"amount": -5}, "Input should be greater than 0", id="negative-amount"),
    pytest.param({"amount": 1.5}, "Input should be a valid integer", id="fractional-amount"),
    pytest.param({"amount": "5"}, "Input should be a valid integer", id="amount-as-string"),
    pytest.param({"amount": 10**16}, "less than or equal to", id="absurd-amount"),
    pytest.param({"to_account": "SAME"}, "must be different accounts", id="same-account"),
    pytest.param({"note": "hi"}, "Extra inputs are not permitted", id="unknown-field"),
    pytest.param({"idempotency_key": ""}, "at least 1 character", id="empty-key"),
]


@pytest.mark.parametrize(("change", "message"), INVALID_TRANSFERS)
async def test_invalid_transfer_is_422_and_touches_no_database(
    server: DemoServer, change: dict[str, Any], message: str
) -> None:
    """Bad input is refused with a clear message before any connection is checked out."""
    async with server.client() as client:
        source, target = await open_accounts(client, [1_000, 1_000])
        body = {"from_account": source, "to_account": target, "amount": 5, **change}
        if body["to_account"] == "SAME":
            body["to_account"] = source
        before = await pool(client)
        response = await client.post("/transfers", json=body)
        assert response.status_code == 422
        assert message in str(response.json()["detail"])
        assert (await pool(client))["checkouts"] == before["checkouts"]
        for account in (source, target):
            assert (await client.get(f"/accounts/{account}")).json()["balance"] == 1_000


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"owner": "x", "balance": -1}, id="negative-balance"),
        pytest.param({"owner": "", "balance": 1}, id="empty-owner"),
        pytest.param({"owner": "x"}, id="missing-balance"),
        pytest.param({"owner": "x", "balance": 1, "id": 7}, id="unknown-field"),
    ],
)
async def test_invalid_account_is_422_and_writes_nothing(
    server: DemoServer, body: dict[str, Any]
) -> None:
    async with server.client() as client:
        before = await balances(client)
        assert (await client.post("/accounts", json=body)).status_code == 422
        assert await balances(client) == before


async def test_repeated_idempotency_key_replays_the_first_transfer(server: DemoServer) -> None:
    """The replay is a 200 with ``Idempotent-Replayed: true``; money moves once."""
    async with server.client() as client:
        source, target = await open_accounts(client, [1_000, 0])
        body: dict[str, Any] = {"from_account": source, "to_account": target, "amount": 300}
        body["idempotency_key"] = new_key()
        first = await client.post("/transfers", json=body)
        again = await client.post("/transfers", json=body)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert {a: b for a, b in (await balances(client)).items() if a in (source, target)} == {
            source: 700,
            target: 300,
        }


async def test_key_reused_for_a_different_transfer_is_422(server: DemoServer) -> None:
    async with server.client() as client:
        source, target = await open_accounts(client, [1_000, 0])
        body: dict[str, Any] = {"from_account": source, "to_account": target, "amount": 300}
        body["idempotency_key"] = new_key()
        assert (await client.post("/transfers", json=body)).status_code == 201
        response = await client.post("/transfers", json={**body, "amount": 301})
        assert response.status_code == 422
        assert "already used for a different transfer" in response.json()["detail"]
        assert (await client.get(f"/accounts/{source}")).json()["balance"] == 700


async def test_refused_transfer_does_not_keep_its_key(server: DemoServer) -> None:
    """A 409 rolled everything back, the key included: the same request can succeed later."""
    async with server.client() as client:
        source, target = await open_accounts(client, [100, 500])
        body: dict[str, Any] = {"from_account": source, "to_account": target, "amount": 200}
        body["idempotency_key"] = new_key()
        assert (await client.post("/transfers", json=body)).status_code == 409
        top_up = {"from_account": target, "to_account": source, "amount": 100}
        assert (await client.post("/transfers", json=top_up)).status_code == 201
        assert (await client.post("/transfers", json=body)).status_code == 201
        assert (await client.get(f"/accounts/{source}")).json()["balance"] == 0
        assert (await client.get(f"/accounts/{target}")).json()["balance"] == 600


async def test_account_history_lists_both_directions_in_order(server: DemoServer) -> None:
    async with server.client() as client:
        a, b, c = await open_accounts(client, [1_000, 1_000, 1_000])
        for source, target in [(a, b), (b, c), (c, a), (b, a)]:
            body = {"from_account": source, "to_account": target, "amount": 10}
            assert (await client.post("/transfers", json=body)).status_code == 201
        page_by_page = await all_pages(client, f"/accounts/{c}/transfers", page=1)
        assert [(t["from_account"], t["to_account"]) for t in page_by_page] == [(b, c), (c, a)]


async def test_health_checks_out_no_connection(server: DemoServer) -> None:
    """``/health`` never touches ``db.session``, so the pool is never asked for a connection.

    ``/debug/pool`` reports the pool's own ``checkout`` event count; a route that
    does use the database moves it by exactly one, which shows the count is live.
    """
    async with server.client() as client:
        before = await pool(client)
        for _ in range(20):
            response = await client.get("/health")
            assert response.json() == {"status": "ok"}
        after = await pool(client)
        assert after["checkouts"] == before["checkouts"]
        assert after["checked_out"] == 0

        assert (await client.get("/accounts", params={"limit": 1})).status_code == 200
        assert (await pool(client))["checkouts"] == after["checkouts"] + 1


async def test_background_task_writes_one_audit_row_per_transfer(
    server: DemoServer, shared_db: LedgerDatabase
) -> None:
    """Replays and refusals write no audit row; the row appears after the response."""
    async with server.client() as client:
        source, target = await open_accounts(client, [1_000, 0])
        key = new_key()
        for amount, idempotency_key in [(100, key), (100, key), (5_000, None), (200, None)]:
            body = {"from_account": source, "to_account": target, "amount": amount}
            await client.post("/transfers", json={**body, "idempotency_key": idempotency_key})
        ids = [t["id"] for t in await history(client, source)]
    assert len(ids) == 2

    def audited() -> list[Any]:
        return shared_db.query(
            "SELECT transfer_id, event FROM audit_log"
            f" WHERE transfer_id IN ({ids[0]}, {ids[1]}) ORDER BY transfer_id"
        )

    await poll_until(lambda: len(audited()) >= 2)
    assert audited() == [(ids[0], "transfer.created"), (ids[1], "transfer.created")]


async def test_export_streams_every_transfer_as_csv(
    server: DemoServer, shared_db: LedgerDatabase
) -> None:
    """More rows than one fetch of the streaming cursor, in id order, keys quoted properly."""
    async with server.client() as client:
        source, target = await open_accounts(client, [0, 0])
    prefix = new_key()
    keys = [f'{prefix} "{n}", quoted' if n % 2 else None for n in range(1_234)]
    shared_db.insert(
        "INSERT INTO transfers (from_account, to_account, amount, idempotency_key)"
        " VALUES (:source, :target, :amount, :key)",
        [
            {"source": source, "target": target, "amount": n + 1, "key": k}
            for n, k in enumerate(keys)
        ],
    )
    async with server.client() as client:
        exported = await export(client)
        assert exported == await all_pages(client, "/transfers")
    mine = [t for t in exported if t["from_account"] == source]
    assert [t["idempotency_key"] for t in mine] == keys
    assert [t["amount"] for t in mine] == list(range(1, 1_235))


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["-m", "demo_app"], id="python-m-demo_app"),
        pytest.param(["-m", "uvicorn", "demo_app.main:app"], id="uvicorn-demo_app.main:app"),
    ],
)
async def test_fresh_start_without_database_url_creates_demo_db(
    start_server: Callable[..., DemoServer], tmp_path: Path, command: list[str]
) -> None:
    """What ``make demo`` does on a fresh checkout: ``./demo.db`` and its tables appear."""
    server = start_server(None, command=command)
    assert (tmp_path / "demo.db").exists()
    async with server.client() as client:
        [account] = await open_accounts(client, [42])
        assert (await client.get(f"/accounts/{account}")).json()["balance"] == 42
