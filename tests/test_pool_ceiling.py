"""Sync apps at the pool's ceiling keep serving, with the library's defaults.

FastAPI runs ``def`` routes and their response-model validation on AnyIO's
default thread limiter (40 tokens). Without help, route threads waiting for a
pooled connection hold every token, the requests that hold the connections get
no thread to finish on, and everything waits for ``pool_timeout``. Here a thread
that waits for a connection lends its token meanwhile.

The load tests run one burst per number of databases (PostgreSQL, psycopg, pool
of 5 each, SQLAlchemy's default ``pool_timeout``) and check what it did. Their
bounds come from measurements in the same run, never from wall-clock constants.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import create_engine, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

from middleware_sessions import Database, DBSessionMiddleware

from ._postgres import PostgresServer

pytestmark = pytest.mark.postgres

POOL_SIZE = 5
CLIENTS = 64
REQUESTS_EACH = 10
# Each request holds a connection of every database for about this long in all,
# so the ceiling is POOL_SIZE / HOLD requests/s whatever the number of databases.
HOLD = 0.04
TOKENS = 40  # AnyIO's default thread limiter


class Ok(BaseModel):
    ok: bool


def build_app(databases: list[Database]) -> FastAPI:
    """``def`` routes with a response model: ``/work`` queries every database, ``/health`` none."""
    app = FastAPI()
    for db in databases:
        app.add_middleware(DBSessionMiddleware, db=db)
    query = text(f"SELECT pg_sleep({HOLD / len(databases)})")

    @app.get("/work", response_model=Ok)
    def work() -> Any:
        for db in databases:
            db.session.execute(query)
        return {"ok": True}

    @app.get("/health", response_model=Ok)
    def health() -> Any:
        return {"ok": True}

    return app


@dataclass
class Burst:
    """What one burst of 64 clients x 10 requests did."""

    reference_latency: float = 0.0  # median, with as many clients as connections
    reference_rate: float = 0.0  # the ceiling measured: POOL_SIZE / reference_latency
    rate: float = 0.0  # requests/s of the burst
    statuses: dict[int, int] = field(default_factory=dict)
    health: list[float] = field(default_factory=list)  # latencies, seconds
    finished: bool = False
    tokens_before: tuple[float, int] = (0, 0)  # total, borrowed
    tokens_after: tuple[float, int] = (0, 0)
    checked_out_after: list[int] = field(default_factory=list)


def tokens() -> tuple[float, int]:
    limiter = anyio.to_thread.current_default_thread_limiter()
    return limiter.total_tokens, limiter.borrowed_tokens


async def run_burst(databases: list[Database]) -> Burst:
    burst = Burst()
    app = build_app(databases)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None) as c:
        burst.tokens_before = tokens()
        # The reference: as many clients as connections, so nobody waits for one.
        latencies: list[float] = []

        async def reference_client() -> None:
            for _ in range(4):
                started = time.perf_counter()
                (await c.get("/work")).raise_for_status()
                latencies.append(time.perf_counter() - started)

        async with anyio.create_task_group() as tg:
            for _ in range(POOL_SIZE):
                tg.start_soon(reference_client)
        # The median: the first requests also open the pool's connections.
        burst.reference_latency = statistics.median(latencies)
        burst.reference_rate = POOL_SIZE / burst.reference_latency

        statuses: list[int] = []
        done = anyio.Event()

        async def client() -> None:
            for _ in range(REQUESTS_EACH):
                statuses.append((await c.get("/work")).status_code)

        async def health() -> None:
            while not done.is_set():
                started = time.perf_counter()
                (await c.get("/health")).raise_for_status()
                burst.health.append(time.perf_counter() - started)
                await anyio.sleep(0.02)

        # Ten times what the reference pace needs: a lock-up (30 s per round of
        # waiters) runs out of it; a slow machine does not.
        bound = 10 * CLIENTS * REQUESTS_EACH / burst.reference_rate
        started = time.perf_counter()
        with anyio.move_on_after(bound):
            async with anyio.create_task_group() as outer:
                outer.start_soon(health)
                async with anyio.create_task_group() as tg:
                    for _ in range(CLIENTS):
                        tg.start_soon(client)
                burst.finished = True
                done.set()
        burst.rate = len(statuses) / (time.perf_counter() - started)
        burst.statuses = {s: statuses.count(s) for s in sorted(set(statuses))}
    await anyio.sleep(0.05)  # the loop takes lent tokens back soon after the last wait
    burst.tokens_after = tokens()
    burst.checked_out_after = [db.engine.pool.checkedout() for db in databases]  # type: ignore[attr-defined]
    return burst


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    from .helpers import postgres_or_skip

    with postgres_or_skip() as running:
        yield running


def make_databases(server: PostgresServer, count: int, **options: Any) -> list[Database]:
    pool = {"pool_size": POOL_SIZE, "max_overflow": 0, **options}
    return [Database(server.url("psycopg"), engine_options=pool) for _ in range(count)]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}-databases")
def burst(request: pytest.FixtureRequest, server: PostgresServer) -> Iterator[Burst]:
    """One burst on ``n`` databases, each its own pool of 5, SQLAlchemy's default pool_timeout."""
    databases = make_databases(server, request.param)
    try:
        yield anyio.run(run_burst, databases, backend="asyncio")
    finally:
        for db in databases:
            db.engine.dispose()


def test_every_request_beyond_the_pool_succeeds(burst: Burst) -> None:
    assert burst.finished, f"the burst locked up: {burst.statuses} after the time allowed"
    assert burst.statuses == {200: CLIENTS * REQUESTS_EACH}


def test_throughput_beyond_the_pool_stays_near_the_pools_ceiling(burst: Burst) -> None:
    ceiling = POOL_SIZE / HOLD
    assert burst.rate >= 0.4 * burst.reference_rate, (
        f"{burst.rate:.0f} requests/s with {CLIENTS} clients; {burst.reference_rate:.0f} "
        f"with {POOL_SIZE} (the ceiling on this machine now; {ceiling:.0f} in theory)"
    )


def test_a_route_without_database_answers_promptly_while_the_pool_is_saturated(
    burst: Burst,
) -> None:
    latencies = sorted(burst.health)
    assert len(latencies) >= 10
    p99 = latencies[int(len(latencies) * 0.99)]
    # A second, or on a machine so busy that one request alone takes a tenth of
    # that, ten requests' time (a lock-up makes it wait for pool_timeout, 30 s).
    assert p99 < max(1.0, 10 * burst.reference_latency)


def test_the_burst_leaves_no_thread_token_and_no_connection_behind(burst: Burst) -> None:
    assert burst.tokens_before == (TOKENS, 0)
    assert burst.tokens_after == (TOKENS, 0)
    assert set(burst.checked_out_after) == {0}


# -- one waiter, watched closely ---------------------------------------------------


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll until ``condition()`` holds; the bound only turns a hang into a failure."""
    with anyio.fail_after(60):
        while not condition():  # noqa: ASYNC110 (limiter and pool counts have no event)
            await anyio.sleep(0.005)


@dataclass
class OneConnection:
    """An app whose ``/hold`` request keeps a connection until released; ``/work`` needs one."""

    db: Database
    app: FastAPI = field(default_factory=FastAPI)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        db, app = self.db, self.app
        app.add_middleware(DBSessionMiddleware, db=db)

        @app.get("/hold", response_model=Ok)
        def hold() -> Any:
            db.session.execute(text("SELECT 1"))
            self.release.wait(60)
            return {"ok": True}

        @app.get("/work", response_model=Ok)
        def work() -> Any:
            db.session.execute(text("SELECT 1"))
            return {"ok": True}

    def checked_out(self) -> int:
        return self.db.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]

    async def run_waiter(
        self, client: httpx.AsyncClient, waiter: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Run ``waiter()`` once ``/hold`` has the pool's only connection; release it
        once the waiting route thread has lent its token (and the waiter has had its
        chance to leave)."""
        total, _ = tokens()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/hold")
            await wait_for(lambda: self.checked_out() == 1)
            tg.start_soon(waiter)
            await wait_for(lambda: tokens()[0] == total + 1)
            await anyio.lowlevel.checkpoint()
            self.release.set()


def pool_of_one(server: PostgresServer, **options: Any) -> Database:
    [db] = make_databases(server, 1, pool_size=1, **options)
    return db


def in_process(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def call_and_hang_up(app: FastAPI, path: str) -> None:
    """A request whose client is gone: as under uvicorn, receive says so and sends go nowhere."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    await app(scope, receive, send)


@pytest.mark.parametrize("leaving", ["cancelled", "disconnected"])
async def test_a_request_leaving_while_waiting_for_a_connection_leaks_no_token_or_connection(
    server: PostgresServer, leaving: str
) -> None:
    subject = OneConnection(pool_of_one(server))
    before = tokens()
    scope = anyio.CancelScope()
    async with in_process(subject.app) as client:

        async def waiter() -> None:
            with scope:
                if leaving == "cancelled":
                    await client.get("/work")
                else:
                    await call_and_hang_up(subject.app, "/work")

        async with anyio.create_task_group() as tg:
            tg.start_soon(subject.run_waiter, client, waiter)
            await wait_for(lambda: tokens()[0] == before[0] + 1)
            if leaving == "cancelled":
                scope.cancel()

        await wait_for(lambda: tokens() == before)
        assert subject.checked_out() == 0
        assert (await client.get("/work")).status_code == 200
    subject.db.engine.dispose()


async def test_a_request_that_waits_out_pool_timeout_gets_503_and_leaks_nothing(
    server: PostgresServer,
) -> None:
    db = pool_of_one(server, pool_timeout=0.5)
    subject = OneConnection(db)
    before = tokens()
    async with in_process(subject.app) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.get, "/hold")
        await wait_for(lambda: subject.checked_out() == 1)
        started = time.perf_counter()
        response = await client.get("/work")
        waited = time.perf_counter() - started
        subject.release.set()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert waited >= 0.5  # a real pool_timeout of waiting, never less
    await wait_for(lambda: tokens() == before)
    assert subject.checked_out() == 0
    db.engine.dispose()


def bind_by_url(server: PostgresServer) -> Database:
    return pool_of_one(server)


def bind_given_engine(server: PostgresServer) -> Database:
    engine = create_engine(server.url("psycopg"), pool_size=1, max_overflow=0)
    return Database(engine=engine)


def bind_given_pool(server: PostgresServer) -> Database:
    import psycopg

    dsn = server.url("psycopg").replace("postgresql+psycopg", "postgresql")
    pool = QueuePool(lambda: psycopg.connect(dsn), pool_size=1, max_overflow=0)  # type: ignore[arg-type]
    return Database(engine=create_engine("postgresql+psycopg://", pool=pool))


def bind_twice(server: PostgresServer) -> Database:
    first = pool_of_one(server)
    return Database(engine=first.engine)


def bind_after_dispose(server: PostgresServer) -> Database:
    db = pool_of_one(server)
    with db.session_scope() as session:
        session.execute(text("SELECT 1"))
    db.engine.dispose()  # a new pool, made by SQLAlchemy
    return db


@pytest.mark.parametrize(
    "bind",
    [bind_by_url, bind_given_engine, bind_given_pool, bind_twice, bind_after_dispose],
    ids=lambda bind: bind.__name__.removeprefix("bind_").replace("_", " "),
)
async def test_a_route_thread_waiting_for_a_connection_lends_its_thread_token(
    server: PostgresServer, bind: Callable[[PostgresServer], Database]
) -> None:
    subject = OneConnection(bind(server))
    before = tokens()
    statuses: list[int] = []

    async def waiter() -> None:
        statuses.append((await client.get("/work")).status_code)

    async with in_process(subject.app) as client:
        await subject.run_waiter(client, waiter)  # waits for total_tokens + 1
    assert statuses == [200]
    await wait_for(lambda: tokens() == before)
    subject.db.engine.dispose()


async def test_a_route_thread_waiting_for_an_overriding_databases_connection_lends_its_token(
    server: PostgresServer,
) -> None:
    db = Database("sqlite://")
    subject = OneConnection(db)
    statuses: list[int] = []

    async def waiter() -> None:
        statuses.append((await client.get("/work")).status_code)

    with db.override(server.url("psycopg"), engine_options={"pool_size": 1, "max_overflow": 0}):
        async with in_process(subject.app) as client:
            await subject.run_waiter(client, waiter)
    assert statuses == [200]


def test_outside_an_event_loop_a_thread_waits_for_a_connection_as_before(
    server: PostgresServer,
) -> None:
    db = pool_of_one(server, pool_timeout=0.2)
    failures: list[BaseException] = []

    def script() -> None:
        try:
            with db.session_scope() as session:
                session.execute(text("SELECT 1"))
        except BaseException as exc:
            failures.append(exc)

    with db.session_scope() as holding:
        holding.execute(text("SELECT 1"))
        thread = threading.Thread(target=script)
        thread.start()
        thread.join()
    assert [type(exc) for exc in failures] == [PoolTimeout]
    script()  # and with the connection back, it just works
    assert len(failures) == 1
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    db.engine.dispose()


@pytest.mark.parametrize("poolclass", [StaticPool, NullPool, SingletonThreadPool, QueuePool])
def test_databases_on_any_kind_of_pool_work_as_before(poolclass: type[Any]) -> None:
    db = Database(engine=create_engine("sqlite://", poolclass=poolclass))
    with db.session_scope() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    db.engine.dispose()
