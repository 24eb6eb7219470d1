"""The demo ledger under SERIALIZABLE isolation: conflicts are run again, the books balance.

Every transfer updates two balances; under SERIALIZABLE two concurrent transfers
touching one account conflict, and PostgreSQL aborts one of them with SQLSTATE
40001. The demo's middleware has ``retries=10``: the aborted request runs again,
whole, before its client hears anything. ``make reliability`` sends 3,000
transfers under SERIALIZABLE and, for comparison, the same 3,000 under READ
COMMITTED (where the ledger's lock order leaves nothing to retry); the normal
suite sends 200 under SERIALIZABLE only.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .._postgres import PostgresServer
from ..demo.conftest import DemoServer
from ..demo.load import TransferLoad, all_pages, balances, open_accounts
from .conftest import RELIABILITY

pytestmark = pytest.mark.postgres

TRANSFERS = 3_000 if RELIABILITY else 200
CLIENTS = 16 if RELIABILITY else 8
ISOLATIONS = ["read-committed", "serializable"] if RELIABILITY else ["serializable"]
ACCOUNTS = 20
RETRIED = "again (attempt"  # in the library's INFO line for each retry
GAVE_UP = "answered 503"

_names = (f"serial{n}" for n in itertools.count())


@pytest.fixture
def ledger_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = next(_names)
    postgres_server.create_database(name)
    yield postgres_server.url("asyncpg", database=name)
    postgres_server.drop_database(name)


@dataclass
class TimedTransferLoad(TransferLoad):
    """``TransferLoad`` that also times each transfer and keeps the 503s apart."""

    seconds: list[float] = field(default_factory=list)
    gave_up: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def run(self, base_url: str) -> None:
        bodies = self.bodies()

        async def client_loop() -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                for body in bodies:
                    started = time.monotonic()
                    response = await client.post("/transfers", json=body)
                    self.seconds.append(time.monotonic() - started)
                    if response.status_code == 503:
                        self.gave_up[body["idempotency_key"]] = body
                    else:
                        self.record(body, response)

        async with anyio.create_task_group() as tg:
            for _ in range(self.clients):
                tg.start_soon(client_loop)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@pytest.mark.parametrize("isolation", ISOLATIONS)
async def test_transfers_with_retries_conserve_money(
    ledger_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    figures: dict[str, Any],
    isolation: str,
) -> None:
    """Transfers through uvicorn, conflicts run again: the books balance to the cent."""
    monkeypatch.setenv("DATABASE_ISOLATION", isolation)
    server = DemoServer(tmp_path, ledger_url).start()
    try:
        async with server.client() as client:
            initial = await open_accounts(client, [100_000] * ACCOUNTS)
        load = TimedTransferLoad(list(initial), transfers=TRANSFERS, clients=CLIENTS, seed=7)
        started = time.monotonic()
        with anyio.fail_after(600):
            await load.run(server.base_url)
        elapsed = time.monotonic() - started
        async with server.client() as client:
            listing = await all_pages(client, "/transfers")
            final = await balances(client)
    finally:
        server.stop()
    log = server.log()
    server.assert_no_errors_logged()

    retried = [line for line in log.splitlines() if RETRIED in line]
    retries = len(retried)
    figures.update(
        isolation=isolation,
        requests=TRANSFERS,
        serializable_clients=CLIENTS,
        serializable_accounts=ACCOUNTS,
        created=len(load.created),
        refused=len(load.refused),
        gave_up=len(load.gave_up),
        retries=retries,
        retries_40001=sum("SQLSTATE 40001" in line for line in retried),
        p50_ms=round(statistics.median(load.seconds) * 1000, 1),
        p99_ms=round(percentile(load.seconds, 0.99) * 1000, 1),
        transfers_per_s=round(TRANSFERS / elapsed),
        total_cents_before=sum(initial.values()),
        total_cents_after=sum(final.values()),
    )
    # The books balance, every 201 is in the history as its client saw it, every 409
    # and every 503 left no trace (TransferLoad.check, with the 503s as refusals).
    load.refused.update(load.gave_up)
    load.check(initial, final, listing)
    assert len(load.created) + len(load.refused) == TRANSFERS
    assert log.count(GAVE_UP) == len(load.gave_up)
    if isolation == "serializable":
        # The workload did conflict, and the conflicts were run again.
        assert retries > 0
    else:
        # Transfers lock their two accounts in id order: no deadlock, nothing to retry.
        assert (retries, len(load.gave_up)) == (0, 0)
