"""Read replicas, side by side: read-only throughput with a streaming replica against the
primary alone, and what read-your-writes costs.

``python -m benchmarks.replicas [--rounds N] [--window SECONDS]`` (part 5 of ``make bench``).

Every variant is an ``AsyncDatabase`` (asyncpg) app with the same two routes, on one
throwaway primary and one streaming replica on this machine:

- ``P``  primary only, ``GET /items/42`` marked ``read_only``;
- ``R``  ``replicas=[replica]``, the same read, no cookie (served by the replica);
- ``RT`` ``R`` with a valid read-your-writes cookie the replica has already replayed
  (the token check: cookie parsing and one HMAC);
- ``W``  primary only, ``POST /items``;
- ``WT`` ``replicas=[...]``, ``POST /items`` (after the commit: the WAL position, a cookie).

Variants run in turns within each round, in a new random order per round; ratios
are per round. Both servers share this machine's cores, so ``R / P`` shows what
routing costs, not what a replica on its own hardware would add.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from sqlalchemy import create_engine, insert

from middleware_sessions import AsyncDatabase, DBSessionMiddleware, transaction_policy

from . import apps, driver
from .stats import Summary, ratios

CONCURRENCY = 16
POOL = {"pool_size": CONCURRENCY, "max_overflow": 0}
READ = driver.make_request("GET", f"/items/{apps.READ_ID}")
WRITE = driver.make_request("POST", "/items", {"name": "bench"}, expect=201)
RATIOS = (
    ("R", "P", "read-only throughput, replica / primary only"),
    ("RT", "R", "reads with a token / without (the token check)"),
    ("WT", "W", "writes with tokens / without replicas (the WAL position)"),
)


@dataclass
class Results:
    rates: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def ratio(self, num: str, den: str) -> Summary | None:
        if num in self.failures or den in self.failures:
            return None
        return ratios(self.rates[num], self.rates[den])

    def lines(self) -> list[str]:
        """One sentence per ratio, for RESULTS.md and the terminal."""
        out = []
        for num, den, title in RATIOS:
            ratio = self.ratio(num, den)
            if ratio is None:
                failed = self.failures.get(num) or self.failures.get(den)
                out.append(f"Replicas, {title}: n/a ({failed})")
                continue
            rate_num, rate_den = Summary.of(self.rates[num]), Summary.of(self.rates[den])
            out.append(
                f"Replicas, {title}: {ratio.fmt_ratio()} ({num} {rate_num.fmt_rate()} req/s, "
                f"{den} {rate_den.fmt_rate()} req/s, concurrency {CONCURRENCY}, "
                f"{ratio.n} rounds)."
            )
        return out


def _app(db: AsyncDatabase) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    @app.get("/items/{item_id}")
    @transaction_policy(read_only=True)
    async def read_item(item_id: int) -> dict[str, Any]:
        item = await db.session.get(apps.Item, item_id)
        assert item is not None
        return {"id": item.id, "name": item.name}

    @app.post("/items", status_code=201)
    async def create_item(body: apps.ItemIn) -> dict[str, Any]:
        item = apps.Item(name=body.name)
        db.session.add(item)
        await db.session.flush()
        return {"id": item.id}

    return app


def _with_cookie(request: driver.Request, cookie: str) -> driver.Request:
    scope = {**request.scope, "headers": [*request.scope["headers"], (b"cookie", cookie.encode())]}
    return driver.Request(scope, request.body, request.expect)


@contextmanager
def _servers() -> Iterator[Any]:
    from tests._replica import Replication, replication_skip_reason

    reason = replication_skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    replication = Replication().start()
    try:
        setup = create_engine(replication.url("psycopg"))
        apps.Base.metadata.create_all(setup)
        with setup.begin() as conn:
            rows = [{"name": f"item {n}"} for n in range(1, apps.SEED_ROWS + 1)]
            conn.execute(insert(apps.Item), rows)
        setup.dispose()
        replication.replica.catch_up()
        yield replication
    finally:
        replication.stop()


async def _measure(replication: Any, rounds: int, warm: float, window: float) -> Results:
    primary_only = AsyncDatabase(replication.url("asyncpg"), engine_options=POOL)
    replicated = AsyncDatabase(
        replication.url("asyncpg"),
        engine_options=POOL,
        replicas=[replication.replica_url("asyncpg")],
        replica_secret="bench",
    )
    replicas = replicated._binding.replicas
    assert replicas is not None
    assert replicas.tokens is not None
    token = f"{replicas.tokens.cookie}={replicas.tokens.sign(1)}"  # long replayed
    plain, routed = _app(primary_only), _app(replicated)
    steps = {
        "P": (plain, READ),
        "R": (routed, READ),
        "RT": (routed, _with_cookie(READ, token)),
        "W": (plain, WRITE),
        "WT": (routed, WRITE),
    }
    results = Results()
    try:
        rng = random.Random(0)
        for _ in range(rounds):
            order = list(steps)
            rng.shuffle(order)
            sequence = [(steps[order[0]][0], steps[order[0]][1], warm)]  # the warm-up
            sequence += [(*steps[key], window) for key in order]
            windows = await driver.measure_sequence(sequence, concurrency=CONCURRENCY)
            for key, measured in zip(order, windows[1:], strict=True):
                if measured.failures:
                    results.failures.setdefault(key, measured.error or "failed")
                results.rates.setdefault(key, []).append(measured.rate)
    finally:
        for db in (primary_only, replicated):
            await db.engine.dispose()
        for engine in replicas.owned_engines:
            await engine.dispose()
    return results


def run(rounds: int = 5, warm: float = 0.3, window: float = 0.5) -> Results | str:
    """Measure every variant; a string says why it could not run."""
    try:
        with _servers() as replication:
            return asyncio.run(_measure(replication, rounds, warm, window))
    except (ImportError, RuntimeError) as exc:
        return f"skipped: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=0.5, help="seconds per variant")
    args = parser.parse_args(argv)
    results = run(args.rounds, window=args.window)
    if isinstance(results, str):
        print(results)
        return 0
    print("\n".join(results.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
