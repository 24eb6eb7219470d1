"""Read replicas through the middleware, against a real primary and streaming replica.

Every test runs twice: ``Database`` with psycopg (``def`` routes) and
``AsyncDatabase`` with asyncpg (``async def`` routes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from sqlalchemy import create_engine, delete, event, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from middleware_sessions import (
    AsyncDatabase,
    Database,
    DBSessionMiddleware,
    ReadOnlySessionError,
    transaction_policy,
)
from middleware_sessions.exceptions import REPLICA_WRITE

from ._replica import Replication
from .helpers import AnyDatabase, Item, add_item

pytestmark = pytest.mark.postgres

Make = Callable[..., AnyDatabase]
SECRET = "a-secret-every-worker-shares"


@pytest.fixture(params=["sync", "async"])
async def make_db(request: pytest.FixtureRequest, replicated: Replication) -> AsyncIterator[Make]:
    """Build databases on the primary with the replica in ``replicas=[...]``."""
    flavour = request.param
    made: list[AnyDatabase] = []

    def make(**options: Any) -> AnyDatabase:
        options = {"replica_secret": SECRET, **options}
        db: AnyDatabase
        if flavour == "sync":
            options.setdefault("replicas", [replicated.replica_url("psycopg")])
            db = Database(replicated.url("psycopg"), blocking_check="ignore", **options)
        else:
            options.setdefault("replicas", [replicated.replica_url("asyncpg")])
            db = AsyncDatabase(replicated.url("asyncpg"), **options)
        made.append(db)
        return db

    yield make
    for db in made:
        engines = [db.engine]
        if db._binding.replicas is not None:
            engines += db._binding.replicas.owned_engines
        for engine in engines:
            await db._flavour.dispose(engine)


def where(session: Session, name: str) -> dict[str, Any]:
    """Which server answered, and whether it has the item ``name``."""
    row = session.execute(
        select(
            func.pg_is_in_recovery(),
            select(func.count(Item.id)).where(Item.name == name).scalar_subquery(),
        )
    ).one()
    return {"replica": row[0], "found": row[1] == 1}


def build_app(db: AnyDatabase) -> FastAPI:
    """``POST /items`` writes; ``GET /read`` is read-only (replica); ``GET /primary-read``
    is read-only on the primary; ``GET /plain`` has no policy; ``POST /sneaky`` is
    read-only but writes."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)
    routes: dict[str, tuple[str, Callable[[Session, str], Any], dict[str, Any] | None]] = {
        "/items": ("POST", add_item, None),
        "/read": ("GET", where, {"read_only": True}),
        "/primary-read": ("GET", where, {"read_only": True, "replica": False}),
        "/plain": ("GET", where, None),
        "/sneaky": ("POST", add_item, {"read_only": True}),
    }
    for path, (method, work, policy) in routes.items():
        endpoint = _endpoint(db, work)
        if policy is not None:
            endpoint = transaction_policy(**policy)(endpoint)
        app.add_api_route(path, endpoint, methods=[method])
    return app


def _endpoint(db: AnyDatabase, work: Callable[[Session, str], Any]) -> Callable[..., Any]:
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint(name: str = "") -> Any:
            return await adb.session.run_sync(work, name)

        return async_endpoint
    sdb = db

    def sync_endpoint(name: str = "") -> Any:
        return work(sdb.session, name)

    return sync_endpoint


def client_for(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_read_only_routes_read_from_the_replica_and_the_others_from_the_primary(
    make_db: Make,
) -> None:
    async with client_for(build_app(make_db())) as client:
        assert (await client.get("/read")).json()["replica"] is True
        assert (await client.get("/primary-read")).json()["replica"] is False
        assert (await client.get("/plain")).json()["replica"] is False
        assert (await client.post("/items", params={"name": "w"})).status_code == 200


async def test_session_scope_stays_on_the_primary(make_db: Make) -> None:
    db = make_db()
    if isinstance(db, AsyncDatabase):
        async with db.session_scope() as session:
            assert await session.scalar(select(func.pg_is_in_recovery())) is False
    else:
        with db.session_scope() as sync_session:
            assert sync_session.scalar(select(func.pg_is_in_recovery())) is False


async def test_a_write_in_a_read_only_route_is_an_error_naming_the_policy(make_db: Make) -> None:
    app = build_app(make_db())
    transport = httpx.ASGITransport(app=app)  # the app's exception reaches the test
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(ReadOnlySessionError) as caught:
            await client.post("/sneaky", params={"name": "sneaked"})
    assert str(caught.value) == REPLICA_WRITE.format(
        what="flush changes to objects",
        policy="@transaction_policy(read_only=True) on POST /sneaky",
    )
    async with client_for(app) as client:
        assert (await client.get("/plain", params={"name": "sneaked"})).json()["found"] is False


async def test_only_a_response_to_a_write_carries_the_token(make_db: Make) -> None:
    async with client_for(build_app(make_db(replica_cookie="lsn"))) as client:
        assert "set-cookie" not in (await client.get("/plain")).headers
        assert "set-cookie" not in (await client.get("/read")).headers
        cookie = (await client.post("/items", params={"name": "x"})).headers["set-cookie"]
    assert cookie.startswith("lsn=")
    assert "Max-Age=5; Path=/; HttpOnly; SameSite=Lax" in cookie


async def test_no_cookie_is_set_when_tokens_are_off(make_db: Make) -> None:
    async with client_for(build_app(make_db(replica_cookie=None))) as client:
        assert "set-cookie" not in (await client.post("/items", params={"name": "x"})).headers


@pytest.mark.parametrize("replay", ["paused", "delayed"])
async def test_a_client_always_reads_its_own_writes(
    make_db: Make, replicated: Replication, replay: str
) -> None:
    """Paused: 1,000 alternations, every read after a write goes to the primary.
    Delayed: 100 alternations, every read waits for the replica to replay its write."""
    if replay == "paused":
        rounds, options = 1000, {"replica_wait": 0.0}
        replicated.replica.pause_replay()
    else:
        # Waiting for the replica can take long on a busy machine; it is what we test.
        rounds, options = 100, {"replica_wait": 30.0, "max_replica_lag": 60.0}
        replicated.replica.set_apply_delay(0.005)
    served_by_replica = 0
    async with client_for(build_app(make_db(**options))) as client:
        for n in range(rounds):
            assert (await client.post("/items", params={"name": f"item-{n}"})).status_code == 200
            read = (await client.get("/read", params={"name": f"item-{n}"})).json()
            assert read["found"], f"round {n}: the client did not see its own write"
            served_by_replica += read["replica"]
    assert served_by_replica == (0 if replay == "paused" else rounds)


async def test_a_client_without_the_token_may_read_stale_data_within_max_replica_lag(
    make_db: Make, replicated: Replication
) -> None:
    replicated.replica.pause_replay()
    async with client_for(build_app(make_db(max_replica_lag=3600))) as writer:
        await writer.post("/items", params={"name": "unseen"})
    await _until_received(replicated)
    async with client_for(build_app(make_db(max_replica_lag=3600))) as stranger:
        assert (await stranger.get("/read", params={"name": "unseen"})).json() == {
            "replica": True,
            "found": False,
        }
    # A bound the replica cannot meet: the same read goes to the primary.
    async with client_for(build_app(make_db(max_replica_lag=0))) as stranger:
        assert (await stranger.get("/read", params={"name": "unseen"})).json() == {
            "replica": False,
            "found": True,
        }


async def _until_received(replicated: Replication) -> None:
    """Wait until the paused replica has received (not applied) the latest WAL."""
    sql = "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"
    with anyio.fail_after(30):
        while replicated.replica.psql(sql).strip() != "t":  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_token_from_a_worker_sharing_the_secret_is_honoured(
    make_db: Make, replicated: Replication
) -> None:
    async with client_for(build_app(make_db())) as one:
        await one.post("/items", params={"name": "shared"})
        cookies = one.cookies
    replicated.replica.catch_up()
    # Another worker: another Database object, same secret.
    async with client_for(build_app(make_db())) as two:
        two.cookies = cookies
        assert (await two.get("/read", params={"name": "shared"})).json() == {
            "replica": True,
            "found": True,
        }


async def test_a_token_that_cannot_be_verified_reads_from_the_primary(
    make_db: Make, replicated: Replication
) -> None:
    async with client_for(build_app(make_db(replica_secret=None))) as one:
        await one.post("/items", params={"name": "private"})
        cookies = one.cookies
    replicated.replica.catch_up()
    # Another process with its own random secret cannot check the token: primary.
    async with client_for(build_app(make_db(replica_secret=None))) as two:
        two.cookies = cookies
        assert (await two.get("/read", params={"name": "private"})).json()["replica"] is False


async def test_a_stopped_replica_never_fails_a_read_and_is_used_again_once_back(
    make_db: Make, replicated: Replication
) -> None:
    app = build_app(make_db(max_replica_lag=60))
    statuses: list[int] = []
    servers: list[bool] = []
    stop_now = anyio.Event()
    done = anyio.Event()

    async def reader(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            response = await client.get("/read")
            statuses.append(response.status_code)
            if response.status_code == 200:
                servers.append(response.json()["replica"])
            if sum(servers) >= 20:
                stop_now.set()

    async with client_for(app) as client, anyio.create_task_group() as readers:
        for _ in range(4):
            readers.start_soon(reader, client)
        await stop_now.wait()
        await anyio.to_thread.run_sync(replicated.replica.stop_server_only)
        stopped_at = len(servers)
        with anyio.fail_after(60):
            while servers[stopped_at:].count(False) < 20:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(replicated.replica.start_again)
        restarted_at = len(servers)
        # Back: after its quarantine the replica serves reads again.
        with anyio.fail_after(60):
            while not any(servers[restarted_at:]):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        done.set()
    assert set(statuses) == {200}


async def test_lifespan_shutdown_disposes_of_the_replica_pools(make_db: Make) -> None:
    db = make_db()
    replicas = db._binding.replicas
    assert replicas is not None
    (engine,) = replicas.owned_engines
    sync_engine = getattr(engine, "sync_engine", engine)
    closed: list[object] = []
    event.listen(sync_engine, "close", lambda *args: closed.append(args[0]))
    with TestClient(build_app(db)) as client:
        assert client.get("/read").json()["replica"] is True
        assert sync_engine.pool.checkedin() >= 1  # type: ignore[attr-defined]
        assert not closed
    assert closed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": ["sqlite:///x.db"]}, "not PostgreSQL"),
        ({"max_replica_lag": -1}, "max_replica_lag=-1"),
        ({"replica_wait": "soon"}, "replica_wait='soon'"),
        ({"replica_cookie": "bad name"}, "not a valid cookie name"),
    ],
)
def test_bad_replica_options_are_clear_errors(
    replicated: Replication, options: dict[str, Any], message: str
) -> None:
    options = {"replicas": [replicated.replica_url("psycopg")], **options}
    with pytest.raises(ValueError, match=message) as caught:
        Database(replicated.url("psycopg"), **options)
    assert replicated.primary.password not in str(caught.value)


def test_replicas_need_a_postgresql_primary(tmp_path: Any, replicated: Replication) -> None:
    with pytest.raises(ValueError, match="the primary is not PostgreSQL"):
        Database(f"sqlite:///{tmp_path / 'x.db'}", replicas=[replicated.replica_url("psycopg")])


def test_an_unknown_option_is_a_type_error(replicated: Replication) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'replica'"):
        Database(replicated.url("psycopg"), replica=["x"])  # type: ignore[call-arg]


def test_replica_false_needs_read_only() -> None:
    with pytest.raises(ValueError, match="replica=False without read_only=True"):
        transaction_policy(commit_on=lambda status: True, replica=False)


def test_without_replicas_nothing_changes(replicated: Replication) -> None:
    db = Database(replicated.url("psycopg"))
    try:
        assert db._binding.replicas is None
    finally:
        db.engine.dispose()


async def test_a_raw_write_the_replica_refuses_is_not_run_again_on_the_primary(
    make_db: Make,
) -> None:
    db = make_db()
    app = build_app(db)

    def raw_insert(session: Session, name: str) -> None:
        session.execute(text("INSERT INTO items (name) VALUES (:name)"), {"name": name})

    app.add_api_route(
        "/raw", transaction_policy(read_only=True)(_endpoint(db, raw_insert)), methods=["POST"]
    )
    async with client_for(app) as client:
        assert (await client.post("/raw", params={"name": "raw"})).status_code == 500
        assert (await client.get("/plain", params={"name": "raw"})).json()["found"] is False


async def test_when_the_position_cannot_be_read_the_client_reads_from_the_primary(
    make_db: Make, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db()
    engine = db.engine.sync_engine if isinstance(db, AsyncDatabase) else db.engine

    @event.listens_for(engine, "before_cursor_execute")
    def fail_position(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pg_current_wal_insert_lsn" in statement:
            raise RuntimeError("position unavailable")

    async with client_for(build_app(db)) as client:
        response = await client.post("/items", params={"name": "committed"})
        assert response.status_code == 200  # the data is committed all the same
        assert response.headers["set-cookie"].startswith("db_lsn=primary;")
        read = (await client.get("/read", params={"name": "committed"})).json()
    assert read == {"replica": False, "found": True}
    assert "Could not read the primary's WAL position after POST /items" in caplog.text


async def test_replica_engines_of_the_user_are_used_and_left_alone_at_shutdown(
    make_db: Make, replicated: Replication
) -> None:
    probe = make_db()  # for its flavour
    if isinstance(probe, AsyncDatabase):
        engine: Any = create_async_engine(replicated.replica_url("asyncpg"))
        sync_engine = engine.sync_engine
    else:
        engine = sync_engine = create_engine(replicated.replica_url("psycopg"))
    closed: list[object] = []
    event.listen(sync_engine, "close", lambda *args: closed.append(args[0]))
    try:
        db = make_db(replicas=[], replica_engines=[engine])
        with TestClient(build_app(db)) as client:
            assert client.get("/read").json()["replica"] is True
        assert closed == []
    finally:
        await db._flavour.dispose(engine)


async def test_an_orm_delete_in_a_read_only_route_is_refused(make_db: Make) -> None:
    db = make_db()
    app = build_app(db)

    def orm_delete(session: Session, name: str) -> None:
        session.execute(delete(Item).where(Item.name == name))

    app.add_api_route(
        "/delete", transaction_policy(read_only=True)(_endpoint(db, orm_delete)), methods=["POST"]
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(ReadOnlySessionError, match="run an INSERT, UPDATE or DELETE"):
            await client.post("/delete", params={"name": "x"})


async def test_work_after_a_tokened_response_is_still_one_transaction(make_db: Make) -> None:
    """The position is read in autocommit mode; what a background task writes afterwards
    is not: it is rolled back when the task fails."""
    db = make_db()
    app = build_app(db)

    def fail_after_writing(session: Session) -> None:
        add_item(session, "after")
        raise RuntimeError("the background task failed")

    if isinstance(db, AsyncDatabase):
        adb = db

        async def task() -> None:
            await adb.session.run_sync(fail_after_writing)

        async def write_then_task(background: BackgroundTasks) -> Any:
            await adb.session.run_sync(add_item, "before")
            background.add_task(task)

        endpoint: Callable[..., Any] = write_then_task
    else:
        sdb = db

        def sync_write_then_task(background: BackgroundTasks) -> Any:
            add_item(sdb.session, "before")
            background.add_task(lambda: fail_after_writing(sdb.session))

        endpoint = sync_write_then_task
    app.add_api_route("/write-then-task", endpoint, methods=["POST"])
    async with client_for(app) as client:
        response = await client.post("/write-then-task")
        assert response.status_code == 200
        assert response.headers["set-cookie"].startswith("db_lsn=")
        assert (await client.get("/plain", params={"name": "before"})).json()["found"] is True
        assert (await client.get("/plain", params={"name": "after"})).json()["found"] is False
