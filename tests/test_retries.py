"""Running a request again after a serialization failure (40001) or a deadlock (40P01).

Real PostgreSQL, both flavours: sync (psycopg, ``def`` routes in the threadpool)
and async (asyncpg, ``async def`` routes). Conflicts are made on purpose, never
left to timing: another transaction changes the row a route has read, two routes
lock two rows in opposite orders after meeting each other, or concurrent
read-modify-write requests meet after their read.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import String, create_engine, func, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from middleware_sessions import (
    AsyncDatabase,
    Database,
    DBSessionMiddleware,
    _policy,
    transaction_policy,
)

from ._postgres import PostgresServer

pytestmark = pytest.mark.postgres

AnyDatabase = Database | AsyncDatabase
Client = Callable[[FastAPI], httpx.AsyncClient]

FLAVOURS = [pytest.param("sync", id="sync-psycopg"), pytest.param("async", id="async-asyncpg")]
SERIALIZABLE = {"isolation_level": "SERIALIZABLE"}
HOT = 3  # the counter row that conflicts are made on
WAIT = 30  # seconds: a bound for waits that a correct run ends long before

_names = (f"retry{n}" for n in itertools.count())


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


@pytest.fixture(autouse=True)
def _route_retries_stay_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route with retries here must not put later tests' requests on the retrying path."""
    monkeypatch.setattr(_policy, "any_route_retries", _policy.any_route_retries)


@pytest.fixture(params=FLAVOURS)
async def make_db(
    request: pytest.FixtureRequest, postgres_server: PostgresServer
) -> AsyncIterator[Callable[..., AnyDatabase]]:
    """Databases of one flavour on a fresh database holding counters 1, 2 and HOT at 0."""
    flavour = request.param
    name = next(_names)
    postgres_server.create_database(name)
    sync_url = postgres_server.url("psycopg", database=name)
    setup = create_engine(sync_url)
    Base.metadata.create_all(setup)
    with setup.begin() as conn:
        conn.execute(insert(Counter), [{"id": n, "value": 0} for n in (1, 2, HOT)])
    setup.dispose()
    made: list[AnyDatabase] = []

    def make(engine_options: dict[str, Any] | None = SERIALIZABLE) -> AnyDatabase:
        db: AnyDatabase
        if flavour == "sync":
            db = Database(sync_url, engine_options=engine_options, blocking_check="ignore")
        else:
            url = postgres_server.url("asyncpg", database=name)
            db = AsyncDatabase(url, engine_options=engine_options)
        made.append(db)
        return db

    make.sync_url = sync_url  # type: ignore[attr-defined]
    yield make
    for db in made:
        if isinstance(db, AsyncDatabase):
            await db.engine.dispose()
        else:
            db.engine.dispose()
    postgres_server.drop_database(name)


def app_for(db: AnyDatabase, **options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db, **options)
    return app


def route(
    app: FastAPI,
    db: AnyDatabase,
    path: str,
    work: Callable[[Session], Any],
    *,
    retries: int | None = None,
    status_code: int = 200,
) -> None:
    """``POST path`` running ``work`` on the request's session (def or async def route)."""
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint() -> Any:
            return await adb.session.run_sync(work)

        endpoint: Callable[..., Any] = async_endpoint
    else:
        sdb = db

        def sync_endpoint() -> Any:
            return work(sdb.session)

        endpoint = sync_endpoint
    if retries is not None:
        endpoint = transaction_policy(retries=retries)(endpoint)
    app.add_api_route(path, endpoint, methods=["POST"], status_code=status_code)


def elsewhere(session: Session, work: Callable[[Session], object]) -> None:
    """Run ``work`` and commit it as another client would: own thread, connection, context."""
    url = session.get_bind().url.set(drivername="postgresql+psycopg")
    failures: list[BaseException] = []

    def run() -> None:
        engine = create_engine(url, isolation_level="SERIALIZABLE", poolclass=NullPool)
        try:
            with Session(engine) as other:
                work(other)
                other.commit()
        except BaseException as exc:
            failures.append(exc)
        finally:
            engine.dispose()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert failures == []


def bump_hot(session: Session) -> None:
    session.execute(update(Counter).where(Counter.id == HOT).values(value=Counter.value + 1))


def conflict(session: Session) -> None:
    """Read the HOT row, let another client change it and commit, then write it.

    Under SERIALIZABLE (or REPEATABLE READ) the write fails with SQLSTATE 40001.
    """
    value = session.scalar(select(Counter.value).where(Counter.id == HOT))
    assert value is not None
    elsewhere(session, bump_hot)
    session.execute(update(Counter).where(Counter.id == HOT).values(value=value + 1))


class Attempts:
    """Counts the attempts of a route; the first ``failing`` of them run into a conflict."""

    def __init__(self, failing: int = 0) -> None:
        self.failing = failing
        self.count = 0

    def run(self, session: Session) -> dict[str, int]:
        """One attempt: write a note saying which attempt it is, and conflict if due."""
        self.count += 1
        attempt = self.count
        session.add(Note(text=f"attempt {attempt}"))
        session.flush()
        if attempt <= self.failing:
            conflict(session)
        return {"attempt": attempt}


class Meeting:
    """The first ``parties`` arrivals wait until all of them have arrived; later ones pass.

    Works for ``def`` routes (threads) and ``async def`` routes (one event loop).
    """

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self._arrived = 0
        self._lock = threading.Lock()
        self._threads = threading.Event()
        self._tasks: anyio.Event | None = None

    def _arrive(self) -> bool:
        """Count an arrival; whether it has to wait for others."""
        with self._lock:
            self._arrived += 1
            arrived = self._arrived
        if arrived == self.parties:
            self._threads.set()
            if self._tasks is not None:
                self._tasks.set()
        return arrived < self.parties

    def wait_sync(self) -> None:
        if self._arrive():
            assert self._threads.wait(WAIT), "the others never arrived"

    async def wait_async(self) -> None:
        if self._tasks is None:
            self._tasks = anyio.Event()
        if self._arrive():
            with anyio.fail_after(WAIT):
                await self._tasks.wait()


def two_step_route(
    app: FastAPI,
    db: AnyDatabase,
    path: str,
    first: Callable[[Session], Any],
    meeting: Meeting,
    second: Callable[[Session, Any], Any],
) -> None:
    """``POST path``: ``first``, then wait at ``meeting``, then ``second`` with first's result."""
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint() -> Any:
            result = await adb.session.run_sync(first)
            await meeting.wait_async()
            return await adb.session.run_sync(second, result)

        app.add_api_route(path, async_endpoint, methods=["POST"])
    else:
        sdb = db

        def sync_endpoint() -> Any:
            result = first(sdb.session)
            meeting.wait_sync()
            return second(sdb.session, result)

        app.add_api_route(path, sync_endpoint, methods=["POST"])


def read_counter(session: Session) -> int:
    value = session.scalar(select(Counter.value).where(Counter.id == 1))
    assert value is not None
    return value


def write_counter(session: Session, value: int) -> dict[str, int]:
    session.execute(update(Counter).where(Counter.id == 1).values(value=value + 1))
    return {"wrote": value + 1}


def lock(row: int) -> Callable[..., None]:
    def take(session: Session, _: object = None) -> None:
        session.execute(update(Counter).where(Counter.id == row).values(value=Counter.value + 1))

    return take


def table(db: AnyDatabase) -> Callable[[], dict[str, Any]]:
    """What a fresh connection sees: counters by id, and the notes' texts."""
    url = db.engine.url.set(drivername="postgresql+psycopg")

    def look() -> dict[str, Any]:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                counters = {
                    row.id: row.value for row in conn.execute(select(Counter.id, Counter.value))
                }
                notes = sorted(conn.scalars(select(Note.text)))
                return {"counters": counters, "notes": notes}
        finally:
            engine.dispose()

    return look


def checked_out(db: AnyDatabase) -> int:
    return db.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


def retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "middleware_sessions" and "again (attempt" in r.getMessage()
    ]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "middleware_sessions" and r.levelno == logging.WARNING
    ]


async def post_all(client: httpx.AsyncClient, paths: list[str]) -> list[httpx.Response]:
    """POST every path at once; the responses in the same order."""
    responses: list[httpx.Response | None] = [None] * len(paths)

    async def one(n: int, path: str) -> None:
        responses[n] = await client.post(path)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for n, path in enumerate(paths):
                tg.start_soon(one, n, path)
    return [r for r in responses if r is not None]


# --- the storm ---------------------------------------------------------------------------

STORM = 30  # concurrent read-modify-write requests on one counter row
MEET = 5  # of which the first this many read before any of them writes


async def test_a_serializable_storm_with_retries_ends_every_request_2xx_and_counts_each(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=STORM, retry_backoff_base=0.005, retry_backoff_cap=0.1)
    two_step_route(app, db, "/increment", read_counter, Meeting(MEET), write_counter)

    responses = await post_all(client(app), ["/increment"] * STORM)

    assert [r.status_code for r in responses] == [200] * STORM
    assert table(db)()["counters"][1] == STORM
    assert checked_out(db) == 0


async def test_a_serializable_storm_without_retries_counts_exactly_the_2xx(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db)
    two_step_route(app, db, "/increment", read_counter, Meeting(MEET), write_counter)

    responses = await post_all(client(app), ["/increment"] * STORM)

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 500}
    # The MEET requests that read the same value: one of them wins, the others fail.
    assert statuses.count(500) >= MEET - 1
    assert table(db)()["counters"][1] == statuses.count(200)


# --- deadlock ----------------------------------------------------------------------------


async def test_two_routes_that_deadlock_both_succeed_with_retries(
    make_db: Callable[..., AnyDatabase], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(engine_options=None)  # READ COMMITTED: deadlocks need no SERIALIZABLE
    app = app_for(db, retries=3)
    meeting = Meeting(2)  # each takes its first lock, then both go for the other row
    two_step_route(app, db, "/one-then-two", lock(1), meeting, lock(2))
    two_step_route(app, db, "/two-then-one", lock(2), meeting, lock(1))

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        responses = await post_all(client(app), ["/one-then-two", "/two-then-one"])

    assert [r.status_code for r in responses] == [200, 200]
    # Each row was locked (and incremented) by the attempt that committed of each route.
    assert table(db)()["counters"] == {1: 2, 2: 2, HOT: 0}
    assert ["40P01" in r.getMessage() for r in retry_records(caplog)] == [True]


# --- what each attempt sees and leaves ---------------------------------------------------


class NoteIn(BaseModel):
    text: str


async def test_each_attempt_reads_the_same_body_bytes(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts = Attempts(failing=2)
    bodies: list[bytes] = []

    async def raw_body(request: Request) -> bytes:
        body = await request.body()
        bodies.append(body)
        return body

    def work(session: Session, text: str) -> dict[str, Any]:
        session.add(Note(text=text))
        return attempts.run(session)

    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_notes(note: NoteIn, _: bytes = Depends(raw_body)) -> Any:
            return await adb.session.run_sync(work, note.text)

        app.add_api_route("/notes", async_notes, methods=["POST"])
    else:
        sdb = db

        def sync_notes(note: NoteIn, _: bytes = Depends(raw_body)) -> Any:
            return work(sdb.session, note.text)

        app.add_api_route("/notes", sync_notes, methods=["POST"])
    sent = b'{"text": "caf\xc3\xa9 \\u00e9 \\"quoted\\""}'

    response = await client(app).post(
        "/notes", content=sent, headers={"content-type": "application/json"}
    )

    assert response.json() == {"attempt": 3}
    assert bodies == [sent, sent, sent]
    assert 'café é "quoted"' in table(db)()["notes"]


async def test_a_route_that_never_reads_its_body_is_retried_too(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts = Attempts(failing=1)
    route(app, db, "/notes", attempts.run)

    response = await client(app).post("/notes", content=b"ignored by the route")

    assert response.json() == {"attempt": 2}


async def test_a_failed_attempt_leaves_no_row(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    route(app, db, "/notes", Attempts(failing=2).run)

    assert (await client(app).post("/notes")).json() == {"attempt": 3}
    assert table(db)()["notes"] == ["attempt 3"]


async def test_on_commit_hooks_and_background_tasks_run_once_for_the_attempt_that_committed(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts = Attempts(failing=2)
    hooks: list[int] = []
    tasks: list[int] = []

    def work(session: Session) -> dict[str, int]:
        attempt = attempts.count + 1
        db.on_commit(lambda: hooks.append(attempt))
        return attempts.run(session)

    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint(background: BackgroundTasks) -> Any:
            result = await adb.session.run_sync(work)
            background.add_task(tasks.append, result["attempt"])
            return result

        app.add_api_route("/notes", async_endpoint, methods=["POST"])
    else:
        sdb = db

        def sync_endpoint(background: BackgroundTasks) -> Any:
            result = work(sdb.session)
            background.add_task(tasks.append, result["attempt"])
            return result

        app.add_api_route("/notes", sync_endpoint, methods=["POST"])

    assert (await client(app).post("/notes")).json() == {"attempt": 3}
    assert hooks == [3]
    assert tasks == [3]


async def test_on_rollback_hooks_of_each_failed_attempt_run(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts = Attempts(failing=2)
    rolled_back: list[int] = []

    def work(session: Session) -> dict[str, int]:
        attempt = attempts.count + 1
        db.on_rollback(lambda: rolled_back.append(attempt))
        return attempts.run(session)

    route(app, db, "/notes", work)

    assert (await client(app).post("/notes")).json() == {"attempt": 3}
    assert rolled_back == [1, 2]


async def test_retried_requests_leave_no_connection_checked_out(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=1)
    route(app, db, "/ok", Attempts(failing=1).run)
    route(app, db, "/never", Attempts(failing=99).run)

    assert (await client(app).post("/ok")).status_code == 200
    assert (await client(app).post("/never")).status_code == 503
    assert checked_out(db) == 0


# --- where the failure comes from --------------------------------------------------------


async def test_a_conflict_at_commit_is_retried_before_the_status_is_sent(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts: list[int] = []

    def write_skew(session: Session) -> dict[str, int]:
        """Count the notes and add one, while another transaction does the same: the
        statements pass and the second COMMIT fails with 40001."""
        attempts.append(len(attempts) + 1)
        session.scalar(select(func.count()).select_from(Note))
        session.add(Note(text=f"attempt {len(attempts)}"))
        session.flush()
        if len(attempts) == 1:
            elsewhere(session, count_and_add)
        return {"attempt": len(attempts)}

    def count_and_add(other: Session) -> None:
        other.scalar(select(func.count()).select_from(Note))
        other.add(Note(text="the other transaction"))

    route(app, db, "/notes", write_skew, status_code=201)

    response = await client(app).post("/notes")

    assert (response.status_code, response.json()) == (201, {"attempt": 2})
    assert table(db)()["notes"] == ["attempt 2", "the other transaction"]


async def test_a_conflict_an_exception_handler_turned_into_a_response_is_retried(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)

    async def conflict_handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "conflict, try again"}, status_code=409)

    app.add_exception_handler(DBAPIError, conflict_handler)
    route(app, db, "/notes", Attempts(failing=1).run)

    response = await client(app).post("/notes")

    assert (response.status_code, response.json()) == (200, {"attempt": 2})


async def test_a_conflict_the_app_rolled_back_and_answered_is_retried(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)

    async def roll_back_and_answer(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(db, AsyncDatabase):
            await db.session.rollback()
        else:
            db.session.rollback()
        return JSONResponse({"detail": "conflict, try again"}, status_code=409)

    app.add_exception_handler(DBAPIError, roll_back_and_answer)
    route(app, db, "/notes", Attempts(failing=1).run)

    response = await client(app).post("/notes")

    assert (response.status_code, response.json()) == (200, {"attempt": 2})


# --- when a request is not run again -----------------------------------------------------


async def test_without_retries_a_conflict_is_a_500_as_before(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db)
    attempts = Attempts(failing=1)
    route(app, db, "/notes", attempts.run)

    assert (await client(app).post("/notes")).status_code == 500
    assert attempts.count == 1


async def test_when_retries_run_out_the_answer_is_503_with_retry_after_and_a_warning(
    make_db: Callable[..., AnyDatabase], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db()
    app = app_for(db, retries=2)
    attempts = Attempts(failing=99)
    route(app, db, "/notes", attempts.run)

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        response = await client(app).post("/notes")

    assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    assert attempts.count == 3
    assert table(db)()["notes"] == []
    [warning] = warnings_of(caplog)
    assert "POST /notes" in warning
    assert "40001" in warning
    assert "3 attempts" in warning


async def test_each_retry_logs_method_path_attempt_and_sqlstate(
    make_db: Callable[..., AnyDatabase], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    route(app, db, "/notes", Attempts(failing=2).run)

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        assert (await client(app).post("/notes")).status_code == 200

    messages = [r.getMessage() for r in retry_records(caplog)]
    assert len(messages) == 2
    for attempt, message in zip((2, 3), messages, strict=True):
        assert "POST /notes" in message
        assert f"attempt {attempt}" in message
        assert "SQLSTATE 40001" in message
    assert warnings_of(caplog) == []


async def test_a_body_over_the_limit_is_not_retried_and_the_log_says_why(
    make_db: Callable[..., AnyDatabase], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db()
    app = app_for(db, retries=3, retry_body_limit=16)
    attempts = Attempts(failing=1)

    async def read_body(request: Request) -> bytes:
        return await request.body()

    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint(_: bytes = Depends(read_body)) -> Any:
            return await adb.session.run_sync(attempts.run)

        app.add_api_route("/notes", async_endpoint, methods=["POST"])
    else:
        sdb = db

        def sync_endpoint(_: bytes = Depends(read_body)) -> Any:
            return attempts.run(sdb.session)

        app.add_api_route("/notes", sync_endpoint, methods=["POST"])

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        response = await client(app).post("/notes", content=b"x" * 17)

    assert response.status_code == 503
    assert attempts.count == 1
    [warning] = warnings_of(caplog)
    assert "retry_body_limit (16 bytes)" in warning


async def test_a_streaming_response_that_started_is_never_retried(
    make_db: Callable[..., AnyDatabase], client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts: list[int] = []

    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_chunks() -> AsyncIterator[bytes]:
            yield b"first chunk\n"
            await adb.session.run_sync(conflict)
            yield b"never sent\n"

        async def async_endpoint() -> StreamingResponse:
            attempts.append(1)
            return StreamingResponse(async_chunks())

        app.add_api_route("/stream", async_endpoint, methods=["POST"])
    else:
        sdb = db

        def sync_chunks() -> Iterator[bytes]:
            yield b"first chunk\n"
            conflict(sdb.session)
            yield b"never sent\n"

        def sync_endpoint() -> StreamingResponse:
            attempts.append(1)
            return StreamingResponse(sync_chunks())

        app.add_api_route("/stream", sync_endpoint, methods=["POST"])

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        response = await client(app).post("/stream")

    assert (response.status_code, response.content) == (200, b"first chunk\n")
    assert len(attempts) == 1
    assert retry_records(caplog) == []


# --- policy per route --------------------------------------------------------------------


async def test_a_route_policy_retries_under_a_middleware_that_does_not(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db)
    route(app, db, "/notes", Attempts(failing=2).run, retries=2)

    assert (await client(app).post("/notes")).json() == {"attempt": 3}


async def test_a_route_policy_of_0_retries_wins_over_the_middleware(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    db = make_db()
    app = app_for(db, retries=3)
    attempts = Attempts(failing=1)
    route(app, db, "/notes", attempts.run, retries=0)

    assert (await client(app).post("/notes")).status_code == 500
    assert attempts.count == 1


async def test_a_route_in_a_mounted_app_is_routed_afresh_on_each_attempt(
    make_db: Callable[..., AnyDatabase], client: Client
) -> None:
    """Routing writes into the scope (a mount extends root_path); each attempt starts clean."""
    db = make_db()
    app = app_for(db, retries=3)
    inner = FastAPI()
    route(inner, db, "/notes", Attempts(failing=2).run)
    app.mount("/api", inner)

    response = await client(app).post("/api/notes")

    assert (response.status_code, response.json()) == (200, {"attempt": 3})


def commit_on_the_request_session(session: Session) -> None:
    session.add(Note(text="committed by the route"))
    session.commit()


def commit_on_a_session_of_its_own(session: Session) -> None:
    with Session(session.get_bind()) as own:
        own.add(Note(text="committed by the route"))
        own.commit()


@pytest.mark.parametrize("commit", [commit_on_the_request_session, commit_on_a_session_of_its_own])
async def test_a_route_that_committed_work_itself_is_not_run_again(
    make_db: Callable[..., AnyDatabase],
    client: Client,
    caplog: pytest.LogCaptureFixture,
    commit: Callable[[Session], None],
) -> None:
    """Running it again would repeat work that is already durable: the old 500 instead."""
    db = make_db()
    app = app_for(db, retries=3)
    attempts = Attempts(failing=99)

    def commit_then_conflict(session: Session) -> Any:
        commit(session)
        return attempts.run(session)

    route(app, db, "/notes", commit_then_conflict)

    with caplog.at_level(logging.INFO, logger="middleware_sessions"):
        response = await client(app).post("/notes")

    assert response.status_code == 500
    assert attempts.count == 1
    assert table(db)()["notes"] == ["committed by the route"]
    [warning] = warnings_of(caplog)
    assert "already committed" in warning
