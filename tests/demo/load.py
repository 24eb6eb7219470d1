"""A load generator for the demo ledger, and the checks that its books balance."""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

OVERDRAW = 10**9  # more than any account in these tests ever holds


async def open_accounts(client: httpx.AsyncClient, balances: list[int]) -> dict[int, int]:
    """Create one account per balance; returns ``{id: balance}``."""
    opened = {}
    for n, balance in enumerate(balances):
        response = await client.post("/accounts", json={"owner": f"owner {n}", "balance": balance})
        assert response.status_code == 201, response.text
        opened[response.json()["id"]] = balance
    return opened


async def all_pages(client: httpx.AsyncClient, path: str, page: int = 1000) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        response = await client.get(path, params={"limit": page, "offset": len(items)})
        assert response.status_code == 200, response.text
        items += response.json()
        if len(response.json()) < page:
            return items


async def balances(client: httpx.AsyncClient) -> dict[int, int]:
    return {a["id"]: a["balance"] for a in await all_pages(client, "/accounts")}


async def export(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """``GET /transfers/export``, parsed back into the shape of ``GET /transfers``."""
    response = await client.get("/transfers/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    return [
        {
            **{name: int(row[name]) for name in ("id", "from_account", "to_account", "amount")},
            "idempotency_key": row["idempotency_key"] or None,
        }
        for row in rows
    ]


@dataclass
class TransferLoad:
    """Transfers between random accounts from concurrent clients, each with its own key.

    About one in ten asks for far more than any account holds (a certain 409);
    the rest are small, so balances drift and some of those over-draw too.
    Every outcome is recorded by idempotency key.
    """

    accounts: list[int]
    transfers: int
    clients: int
    seed: int = 0
    prefix: str = "load"
    # ``reached`` is set once this many transfers were acknowledged with a 201.
    milestone: int | None = None
    reached: anyio.Event = field(default_factory=anyio.Event)
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The connection broke (server killed): the transfer may or may not exist.
    unknown: dict[str, dict[str, Any]] = field(default_factory=dict)
    unexpected: list[tuple[int, str]] = field(default_factory=list)
    pids: Counter[str] = field(default_factory=Counter)

    def bodies(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed)
        for n in range(self.transfers):
            source, target = rng.sample(self.accounts, 2)
            amount = OVERDRAW if rng.random() < 0.1 else rng.randint(1, 300)
            yield {
                "from_account": source,
                "to_account": target,
                "amount": amount,
                "idempotency_key": f"{self.prefix}-{n}",
            }

    async def run(self, base_url: str) -> None:
        """Send every transfer; a client whose connection breaks stops there."""
        bodies = self.bodies()  # shared: each body is taken by exactly one client

        async def client_loop() -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                for body in bodies:
                    try:
                        response = await client.post("/transfers", json=body)
                    except httpx.TransportError:
                        self.unknown[body["idempotency_key"]] = body
                        return
                    self.record(body, response)

        async with anyio.create_task_group() as tg:
            for _ in range(self.clients):
                tg.start_soon(client_loop)

    def record(self, body: dict[str, Any], response: httpx.Response) -> None:
        key = body["idempotency_key"]
        self.pids[response.headers["x-worker-pid"]] += 1
        if response.status_code in (200, 201):
            self.created[key] = response.json()
            if self.milestone is not None and len(self.created) >= self.milestone:
                self.reached.set()
        elif response.status_code == 409:
            self.refused[key] = body
        else:
            self.unexpected.append((response.status_code, response.text))

    async def retry_unknown(self, client: httpx.AsyncClient) -> Counter[int]:
        """Resend every transfer of unknown outcome with its key; returns the statuses."""
        statuses: Counter[int] = Counter()
        for key, body in list(self.unknown.items()):
            response = await client.post("/transfers", json=body)
            statuses[response.status_code] += 1
            del self.unknown[key]
            self.record(body, response)
        return statuses

    def check(
        self, initial: dict[int, int], final: dict[int, int], listing: list[dict[str, Any]]
    ) -> None:
        """The books balance, and the history is exactly what the clients were told."""
        assert self.unexpected == []
        mine = [t for t in listing if (t["idempotency_key"] or "").startswith(f"{self.prefix}-")]
        by_key = {t["idempotency_key"]: t for t in mine}
        assert len(by_key) == len(mine), "an idempotency key was used twice"
        # Every 201 is in the history, exactly as the client saw it...
        missing = {key for key, seen in self.created.items() if by_key.get(key) != seen}
        assert missing == set(), f"{len(missing)} acknowledged transfers are missing or differ"
        # ...every 409 left no trace, and nothing else is there.
        assert by_key.keys() & self.refused.keys() == set()
        assert by_key.keys() <= self.created.keys() | self.unknown.keys()
        # Balances are the opening balances plus exactly the transfers in the history.
        expected = dict(initial)
        for t in listing:
            expected[t["from_account"]] -= t["amount"]
            expected[t["to_account"]] += t["amount"]
        assert final == expected
        assert sum(final.values()) == sum(initial.values())
        assert min(final.values()) >= 0
