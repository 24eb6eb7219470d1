"""The demo ledger under concurrent load, a crash, retries and two workers.

Every test starts its own ``python -m demo_app`` on an empty database, drives
it with concurrent httpx clients, then checks the books: total money conserved
exactly, and the transfer history is exactly what the clients were told.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from ..helpers import poll_until
from .conftest import DemoServer, LedgerDatabase
from .load import TransferLoad, all_pages, balances, export, open_accounts

pytestmark = pytest.mark.anyio

OPENING = [1_000] * 10  # ten accounts; transfers of up to 300 cents over-draw often


async def opening_balances(server: DemoServer) -> dict[int, int]:
    async with server.client() as client:
        return await open_accounts(client, OPENING)


async def check_books(server: DemoServer, load: TransferLoad, initial: dict[int, int]) -> None:
    async with server.client() as client:
        listing = await all_pages(client, "/transfers")
        load.check(initial, await balances(client), listing)
        assert await export(client) == listing


async def test_concurrent_transfers_conserve_money_exactly(
    start_server: Callable[..., DemoServer], ledger_db: LedgerDatabase
) -> None:
    """50 clients, 1,000 transfers among 10 accounts: no lost update, no trace of a 409."""
    server = start_server(ledger_db.url)
    initial = await opening_balances(server)
    load = TransferLoad(list(initial), transfers=1_000, clients=50, seed=1)
    await load.run(server.base_url)

    assert load.unknown == {}
    assert len(load.created) + len(load.refused) == 1_000
    assert len(load.created) > 300
    assert len(load.refused) > 100
    await check_books(server, load, initial)

    # The background task audited every transfer once (it runs after the response).
    ids = sorted(t["id"] for t in load.created.values())

    def audited() -> list[int]:
        return sorted(row[0] for row in ledger_db.query("SELECT transfer_id FROM audit_log"))

    await poll_until(lambda: len(audited()) >= len(ids))
    assert audited() == ids


async def test_acknowledged_transfers_survive_sigkill(
    start_server: Callable[..., DemoServer], ledger_db: LedgerDatabase
) -> None:
    """SIGKILL mid-load, restart: every 201 is still there and the books balance.

    Requests cut off by the crash have an unknown outcome; retried with their
    idempotency keys after the restart, they are replayed (they had committed)
    or carried out now (they had not) — never applied twice.
    """
    server = start_server(ledger_db.url)
    initial = await opening_balances(server)
    load = TransferLoad(list(initial), transfers=1_000, clients=50, seed=2, milestone=250)
    async with anyio.create_task_group() as tg:
        tg.start_soon(load.run, server.base_url)
        await load.reached.wait()
        server.kill()

    assert load.unknown, "the kill did not interrupt any request"
    assert len(load.created) < 1_000

    server.start()  # same database, after a crash
    await check_books(server, load, initial)
    async with server.client() as client:
        statuses = await load.retry_unknown(client)
    assert sum(statuses.values()) > 0
    assert set(statuses) <= {200, 201, 409}
    await check_books(server, load, initial)


async def test_concurrent_retries_of_one_key_move_money_once(
    start_server: Callable[..., DemoServer], ledger_db: LedgerDatabase
) -> None:
    """20 keys, each sent 5 times at once: one 201 per key, four identical 200 replays."""
    server = start_server(ledger_db.url)
    async with server.client() as client:
        accounts = list(await open_accounts(client, [100_000, 0, 0, 0]))
    rng = random.Random(3)
    bodies: list[dict[str, Any]] = [
        {
            "from_account": accounts[0],
            "to_account": rng.choice(accounts[1:]),
            "amount": rng.randint(1, 1_000),
            "idempotency_key": f"retry-{n}",
        }
        for n in range(20)
    ]
    attempts = [body for body in bodies for _ in range(5)]
    rng.shuffle(attempts)
    responses: list[tuple[dict[str, Any], httpx.Response]] = []

    async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        responses.append((body, await client.post("/transfers", json=body)))

    limits = httpx.Limits(max_connections=len(attempts))
    async with server.client(limits=limits) as client, anyio.create_task_group() as tg:
        for body in attempts:
            tg.start_soon(send, client, body)

    outcomes: dict[str, Counter[int]] = {}
    answers: dict[str, list[Any]] = {}
    for body, response in responses:
        key = body["idempotency_key"]
        outcomes.setdefault(key, Counter())[response.status_code] += 1
        answers.setdefault(key, []).append(response.json())
    assert all(counts == Counter({201: 1, 200: 4}) for counts in outcomes.values()), outcomes
    for key, seen in answers.items():
        assert all(answer == seen[0] for answer in seen), key

    expected = dict.fromkeys(accounts, 0)
    expected[accounts[0]] = 100_000
    for body in bodies:
        expected[body["from_account"]] -= body["amount"]
        expected[body["to_account"]] += body["amount"]
    async with server.client() as client:
        assert await balances(client) == expected
        listing = await all_pages(client, "/transfers")
    assert sorted(t["idempotency_key"] for t in listing) == sorted(
        b["idempotency_key"] for b in bodies
    )


async def test_two_workers_both_serve_and_conserve_money(
    start_server: Callable[..., DemoServer], ledger_db: LedgerDatabase
) -> None:
    """``--workers 2``: both processes take transfers; the books still balance.

    The two workers also start at the same moment on the same empty database,
    so creating the tables must not race.
    """
    server = start_server(ledger_db.url, workers=2)
    pids: set[str] = set()
    # Fresh connections until both workers have answered: the second may start later.
    async with server.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(500):
            pids.add((await client.get("/health")).headers["x-worker-pid"])
            if len(pids) == 2:
                break
            await anyio.sleep(0.01)
    assert len(pids) == 2

    initial = await opening_balances(server)
    load = TransferLoad(list(initial), transfers=300, clients=50, seed=4)
    await load.run(server.base_url)
    assert load.unknown == {}
    assert set(load.pids) == pids, "one worker took no transfer"
    await check_books(server, load, initial)
