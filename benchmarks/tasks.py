"""Per-task sessions: ``await db.gather(...)`` against ``asyncio.gather`` over sessions by hand.

``python -m benchmarks.tasks [--quick]``. Each round runs, in a fresh random order,
a fixed number of fan-outs per variant: one fan-out is ``WIDTH`` coroutines, each
reading one row by primary key in a session of its own, inside one
``session_scope()`` (as a route would, in its request):

- ``gather``: ``await db.gather(*coros)``, each coroutine reading ``db.session``;
- ``hand``: ``asyncio.gather`` over coroutines that each open
  ``async with db.sessionmaker() as session, session.begin():`` themselves.

Both commit a read-only transaction per coroutine. Printed: fan-outs per second
for each, and the ratio gather/hand (median and 95 % interval over rounds);
the target is that per-task sessions cost nothing (ratio >= 0.97).
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Awaitable, Callable
from time import perf_counter

from middleware_sessions import AsyncDatabase

from . import apps, backends
from .stats import Summary, ratios

WIDTH = 8


async def _fan_out_gather(db: AsyncDatabase) -> None:
    async def read(item_id: int) -> None:
        item = await db.session.get(apps.Item, item_id)
        assert item is not None

    await db.gather(*(read(1 + n) for n in range(WIDTH)))


async def _fan_out_hand(db: AsyncDatabase) -> None:
    async def read(item_id: int) -> None:
        async with db.sessionmaker() as session, session.begin():
            item = await session.get(apps.Item, item_id)
            assert item is not None

    await asyncio.gather(*(read(1 + n) for n in range(WIDTH)))


VARIANTS: dict[str, Callable[[AsyncDatabase], Awaitable[None]]] = {
    "gather": _fan_out_gather,
    "hand": _fan_out_hand,
}


async def measure(db: AsyncDatabase, *, rounds: int, fan_outs: int) -> dict[str, list[float]]:
    """Fan-outs per second, per variant, one figure per round."""
    rates: dict[str, list[float]] = {key: [] for key in VARIANTS}
    order = list(VARIANTS)
    rng = random.Random(11)
    async with db.session_scope():
        for fan_out in VARIANTS.values():  # warm-up: pool, statement caches
            for _ in range(5):
                await fan_out(db)
        for _ in range(rounds):
            rng.shuffle(order)
            for key in order:
                fan_out = VARIANTS[key]
                started = perf_counter()
                for _ in range(fan_outs):
                    await fan_out(db)
                rates[key].append(fan_outs / (perf_counter() - started))
    return rates


async def _run(quick: bool) -> None:
    rounds, fan_outs = (3, 20) if quick else (15, 200)
    with backends.sqlite() as backend:
        async_engine, _ = backend.engines(pool_size=WIDTH, max_overflow=0)
        db = AsyncDatabase(engine=async_engine)
        try:
            rates = await measure(db, rounds=rounds, fan_outs=fan_outs)
        finally:
            await async_engine.dispose()
    for key, values in rates.items():
        print(f"{key:>7}: {Summary.of(values).fmt_rate()} fan-outs/s ({WIDTH} sessions each)")
    print(f"gather / hand: {ratios(rates['gather'], rates['hand']).fmt_ratio()} (target >= 0.97)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds, to see it works")
    asyncio.run(_run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
