"""Beyond one process: the demo ledger under ``uvicorn --workers 4`` on one PostgreSQL."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .._postgres import PostgresServer
from ..demo.conftest import DemoServer
from ..demo.load import TransferLoad, all_pages, balances, export, open_accounts
from .conftest import full_run_only

pytestmark = [pytest.mark.postgres, full_run_only]

WORKERS = 4
TRANSFERS = 2_000
LOADS = 10
_names = (f"scale{n}" for n in itertools.count())


@pytest.fixture
def ledger_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = next(_names)
    postgres_server.create_database(name)
    yield postgres_server.url("asyncpg", database=name)
    postgres_server.drop_database(name)


async def test_four_workers_conserve_money(
    ledger_url: str, tmp_path: Path, figures: dict[str, Any]
) -> None:
    """``--workers 4``, 2,000 transfers from 50 clients: the books balance to the cent."""
    server = DemoServer(tmp_path, ledger_url, workers=WORKERS).start()
    try:
        pids: set[str] = set()
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        async with server.client(limits=no_keepalive) as client:
            with anyio.fail_after(30):
                while len(pids) < WORKERS:  # every worker is up and answering
                    pids.add((await client.get("/health")).headers["x-worker-pid"])
        async with server.client() as client:
            initial = await open_accounts(client, [1_000] * 10)
        # Ten loads of 5 clients, started 0.1 s apart: one worker's accept loop
        # would otherwise take all 50 connections opened in the same instant.
        loads = [
            TransferLoad(
                list(initial), transfers=TRANSFERS // LOADS, clients=5, seed=n, prefix=f"l{n}"
            )
            for n in range(LOADS)
        ]
        async with anyio.create_task_group() as tg:
            for load in loads:
                tg.start_soon(load.run, server.base_url)
                await anyio.sleep(0.1)
        async with server.client() as client:
            listing = await all_pages(client, "/transfers")
            final = await balances(client)
            for load in loads:
                load.check(initial, final, listing)
            assert await export(client) == listing
    finally:
        server.stop()
    server.assert_no_errors_logged()

    per_worker = sum((load.pids for load in loads), Counter[str]())
    created = sum(len(load.created) for load in loads)
    refused = sum(len(load.refused) for load in loads)
    figures.update(
        requests=TRANSFERS,
        workers=WORKERS,
        transfers_per_worker=sorted(per_worker.values(), reverse=True),
        created=created,
        refused=refused,
        total_cents_before=sum(initial.values()),
        total_cents_after=sum(final.values()),
    )
    assert all(load.unknown == {} for load in loads)
    assert created + refused == TRANSFERS
    assert len(per_worker) >= 2, "the load reached only one worker"
