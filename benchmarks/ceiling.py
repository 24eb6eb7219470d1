"""Part 3: the concurrency ceiling, where the pool and not the CPU is the limit.

PostgreSQL, a read that takes 10 ms (``SELECT pg_sleep(0.01)``), a pool of 5
connections and 64 concurrent clients: at most 5 / 0.01 s = 500 requests/s.
What fraction of that does each pattern reach? A pattern loses throughput for
every moment it holds a connection without using it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware

from . import driver
from .backends import Backend

SLEEP = 0.01
POOL_SIZE = 5
CLIENTS = 64
CEILING = POOL_SIZE / SLEEP
# A request that cannot get a connection fails after this long instead of 30 s.
POOL = {"pool_size": POOL_SIZE, "max_overflow": 0, "pool_timeout": 2}
VARIANTS = ("b", "f", "g", "c", "is", "ia", "f0")
# Beyond the three the issue asks for: the sync ones beside ours, (c) `Depends` on
# a sync generator and (is) the hand-written sync floor, both on plain `def` routes
# and AnyIO's default thread limiter; the async hand-written floor; and ours without
# pool_pre_ping, which shows what the default pre-ping costs here.
LABELS = {"f0": "(f) ours, AsyncDatabase, pool_pre_ping=False"}
_SQL = text(f"SELECT pg_sleep({SLEEP})")


def _app_b(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = async_sessionmaker(async_engine, expire_on_commit=False)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    app = FastAPI()

    @app.get("/slow")
    async def slow(session: AsyncSession = Depends(get_db)) -> dict[str, bool]:
        await session.execute(_SQL)
        return {"ok": True}

    return app


def _app_f(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    db = AsyncDatabase(engine=async_engine)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await db.session.execute(_SQL)
        return {"ok": True}

    return app


def _app_g(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    db = Database(engine=sync_engine)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    @app.get("/slow")
    def slow() -> dict[str, bool]:
        db.session.execute(_SQL)
        return {"ok": True}

    return app


def _app_c(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = sessionmaker(sync_engine)

    def get_db() -> Iterator[Session]:
        with factory() as session:
            yield session

    app = FastAPI()

    @app.get("/slow")
    def slow(session: Session = Depends(get_db)) -> dict[str, bool]:
        session.execute(_SQL)
        return {"ok": True}

    return app


def _app_is(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = sessionmaker(sync_engine)
    app = FastAPI()

    @app.get("/slow")
    def slow() -> dict[str, bool]:
        with factory() as session, session.begin():
            session.execute(_SQL)
        return {"ok": True}

    return app


def _app_ia(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = async_sessionmaker(async_engine, expire_on_commit=False)
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        async with factory() as session, session.begin():
            await session.execute(_SQL)
        return {"ok": True}

    return app


_BUILDERS = {
    "b": _app_b,
    "f": _app_f,
    "g": _app_g,
    "c": _app_c,
    "is": _app_is,
    "ia": _app_ia,
    "f0": _app_f,
}


@dataclass
class CeilingResult:
    rates: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    log_records: dict[str, int] = field(default_factory=dict)

    def ratio(self, num: str, den: str) -> float | None:
        """Mean rate of ``num`` over mean rate of ``den``, measured side by side."""
        a, b = self.fraction(num), self.fraction(den)
        if a is None or not b:
            return None
        return a / b

    def fraction(self, variant: str) -> float | None:
        values = self.rates.get(variant)
        if not values:
            return None
        return sum(values) / len(values) / CEILING


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def run(backend: Backend, *, rounds: int, warm: float, window: float) -> CeilingResult:
    result = CeilingResult()
    request = driver.make_request("GET", "/slow")
    engines = {
        v: backend.engines(**POOL, **({"pool_pre_ping": False} if v == "f0" else {}))
        for v in VARIANTS
    }
    built = {v: _BUILDERS[v](*engines[v]) for v in VARIANTS}
    # A stalled pattern logs one error per failed request: count them instead.
    logger = logging.getLogger("middleware_sessions")
    counter = _Counter()
    logger.addHandler(counter)
    propagate, logger.propagate = logger.propagate, False
    try:
        for variant in VARIANTS:
            await driver.run_count(built[variant], request, concurrency=POOL_SIZE, total=20)
        order = list(VARIANTS)
        for _ in range(rounds):
            sequence = [*order, *reversed(order)]
            steps = [(built[order[0]], request, warm)]
            steps += [(built[v], request, window / 2) for v in sequence]
            measured = await driver.measure_sequence(steps, concurrency=CLIENTS)
            for variant, seen in zip(sequence, measured[1:], strict=True):
                result.rates.setdefault(variant, []).append(seen.rate)
                if seen.failures:
                    result.failures[variant] = result.failures.get(variant, 0) + seen.failures
            order.reverse()
        result.log_records = {"middleware_sessions": counter.count} if counter.count else {}
    finally:
        logger.removeHandler(counter)
        logger.propagate = propagate
        for async_engine, sync_engine in engines.values():
            await async_engine.dispose()
            sync_engine.dispose()
    return result
