"""The demo ledger with a streaming replica: reads offloaded, and every 201 seen at once."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from .._replica import Replication
from ..demo.conftest import DemoServer
from ..demo.load import OVERDRAW, balances, open_accounts
from .conftest import full_run_only

pytestmark = [pytest.mark.postgres, full_run_only]

WORKERS = 2
CLIENTS = 10
ROUNDS = 40  # per client: a transfer, then its history and the transfer itself, at once
APPLY_DELAY = 0.02  # seconds: the replica is always a little behind
_names = (f"replicated_ledger{n}" for n in itertools.count())


@pytest.fixture
def ledger(replication: Replication) -> Iterator[Replication]:
    replication.database = next(_names)
    replication.create_database(replication.database)
    replication.replica.set_apply_delay(APPLY_DELAY)
    try:
        yield replication
    finally:
        replication.replica.set_apply_delay(0)


def replica_scans(ledger: Replication, table: str) -> int:
    """Scans of ``table`` the replica ran: its reads of it (probes touch no table).

    Read once the server has stopped: a backend reports its counts when it exits.
    """
    sql = f"SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = '{table}'"
    return int(ledger.replica.psql(sql, database=ledger.database).strip() or 0)


async def test_every_201_is_visible_to_its_client_at_once_on_a_lagging_replica(
    ledger: Replication, tmp_path: Path, figures: dict[str, Any]
) -> None:
    """Two workers, a replica 20 ms behind: each client reads its transfer back at once."""
    env = {
        "DATABASE_REPLICA_URLS": ledger.replica_url("asyncpg"),
        "DATABASE_REPLICA_SECRET": "shared-by-the-workers",
    }
    server = DemoServer(tmp_path, ledger.url("asyncpg"), workers=WORKERS, env=env).start()
    unseen: list[str] = []
    statuses: dict[int, int] = {}
    reads = 0
    try:
        async with server.client() as client:
            initial = await open_accounts(client, [1_000] * 10)

        async def customer(n: int) -> None:
            nonlocal reads
            rng = random.Random(n)
            async with server.client() as client:  # keeps its cookies, as a browser would
                for round_ in range(ROUNDS):
                    source, target = rng.sample(sorted(initial), 2)
                    amount = OVERDRAW if rng.random() < 0.1 else rng.randint(1, 300)
                    body = {"from_account": source, "to_account": target, "amount": amount}
                    body["idempotency_key"] = f"c{n}-{round_}"
                    response = await client.post("/transfers", json=body)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code != 201:
                        continue
                    made = response.json()
                    history = await client.get(
                        f"/accounts/{source}/transfers", params={"limit": 1000}
                    )
                    one = await client.get(f"/transfers/{made['id']}")
                    reads += 2
                    if made not in history.json() or one.status_code != 200:
                        unseen.append(body["idempotency_key"])

        async with anyio.create_task_group() as tg:
            for n in range(CLIENTS):
                tg.start_soon(customer, n)
        # A client without any token: balances from the replica, once it has caught up.
        ledger.replica.set_apply_delay(0)
        ledger.replica.catch_up()
        async with server.client() as stranger:
            final = await balances(stranger)
    finally:
        server.stop()
    server.assert_no_errors_logged()
    served_by_replica = replica_scans(ledger, "transfers")
    figures.update(
        requests=CLIENTS * ROUNDS + reads,
        apply_delay_ms=round(APPLY_DELAY * 1000),
        workers=WORKERS,
        transfers=CLIENTS * ROUNDS,
        statuses=statuses,
        reads_after_a_201=reads,
        reads_not_seeing_their_write=len(unseen),
        reads_from_replica=served_by_replica,
        total_cents_before=sum(initial.values()),
        total_cents_after=sum(final.values()),
    )
    assert unseen == []
    assert set(statuses) <= {201, 409}
    assert sum(final.values()) == sum(initial.values())
    # Most reads came from the replica (each waited for it to replay the client's write).
    assert served_by_replica >= reads // 2, (served_by_replica, reads)


async def test_reads_survive_the_replica_stopping_under_load(
    ledger: Replication, tmp_path: Path, figures: dict[str, Any]
) -> None:
    """The replica stops mid-load: every read still answers 200, and it is used again."""
    env = {"DATABASE_REPLICA_URLS": ledger.replica_url("asyncpg")}
    ledger.replica.set_apply_delay(0)
    server = DemoServer(tmp_path, ledger.url("asyncpg"), env=env).start()
    statuses: dict[int, int] = {}
    done = anyio.Event()
    try:
        async with server.client() as client:
            await open_accounts(client, [1_000] * 5)

        async def reader() -> None:
            async with server.client() as client:
                while not done.is_set():
                    status = (await client.get("/accounts")).status_code
                    statuses[status] = statuses.get(status, 0) + 1

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(reader)
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(ledger.replica.stop_server_only)
            await anyio.sleep(1.0)
            await anyio.to_thread.run_sync(ledger.replica.start_again)
            # Back after its quarantine: reads reach it again (its activity shows them).
            with anyio.fail_after(60):
                while not await anyio.to_thread.run_sync(replica_reading, ledger):  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            done.set()
    finally:
        server.stop()
    figures.update(requests=sum(statuses.values()), faults=1, statuses=statuses)
    assert set(statuses) == {200}
    log = server.log()
    assert "Traceback" not in log.replace("reading from the primary instead", "")


def replica_reading(ledger: Replication) -> bool:
    """Whether a client of the replica is reading the accounts table right now, or just did."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE datname = '{ledger.database}' AND query LIKE '%FROM accounts%'"
    )
    return ledger.replica.psql(sql).strip() != "0"
