"""The service the fault tests drive, in-process or under uvicorn.

Every write is one row of ``writes`` with a unique ``key`` chosen by the client,
so after any amount of chaos the database can be compared with what the clients
were told: every 2xx key present, no key of a refused or failed request.

``POST /writes?key=K&mode=M&sleep=S`` inserts the row and flushes it, then, if
``sleep`` is given, waits that long *inside the database* (``pg_sleep``), then:

============ ===================================================================
``mode``     outcome
============ ===================================================================
``ok``       201; the row is committed
``reject``   409 (``HTTPException``) after the flush: rolled back
``crash``    an exception after the flush (500): rolled back
``commit``   the row points at a missing parent; the deferred foreign key fails
             at COMMIT, so the middleware turns the 201 into a 500: rolled back
``dup``      a second row with the same ``token`` (unique): fails at the flush
``badvalue`` a query given a value of the wrong type (500)
============ ===================================================================

``GET /stream?key=K&chunks=N&sleep=S`` writes the row, then streams ``N`` chunks
``S`` seconds apart (the row is committed before the first byte); with
``late=M`` it writes ``K-late`` in mode ``M`` after the first chunk.
``POST /upload?key=K`` writes the row, then reads the request body.
``GET /stats`` reports sessions opened and closed (counted with SQLAlchemy
session events), open transactions, pooled connections in use and the RSS.

Under uvicorn: ``uvicorn --factory tests.reliability.faultapp:create_app`` with
``DATABASE_URL`` and, optionally, ``RELIABILITY_FLAVOUR`` (``async``, the
default, or ``sync``) and ``RELIABILITY_ENGINE_OPTIONS`` (JSON).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import ForeignKey, String, create_engine, event, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware

AnyDatabase = Database | AsyncDatabase

MISSING_PARENT = 424_242  # no parent has this id: COMMIT fails on the deferred foreign key


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "parents"
    id: Mapped[int] = mapped_column(primary_key=True)


class Write(Base):
    __tablename__ = "writes"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    # Unique too: "dup" inserts a second row with the same token.
    token: Mapped[str] = mapped_column(String(200), unique=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("parents.id", deferrable=True, initially="DEFERRED"), default=None
    )


class Counter(Base):
    """One row that tests lock from another connection."""

    __tablename__ = "counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


# A COMMIT that takes SLOW_COMMIT seconds inside the server: a deferred trigger
# sleeps for rows whose key starts with "slow-commit". It ignores cancel requests,
# like a COMMIT that is past the point of no return when the client gives up.
SLOW_COMMIT = 0.3
_SLOW_COMMIT_DDL = (
    "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
    f"BEGIN BEGIN PERFORM pg_sleep({SLOW_COMMIT}); "
    "EXCEPTION WHEN query_canceled THEN NULL; END; "
    "RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON writes "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
    "WHEN (NEW.key LIKE 'slow-commit%') EXECUTE FUNCTION slow_commit()",
)


def create_schema(sync_url: str) -> None:
    """Create the tables (and the counter row) on a fresh database."""
    engine = create_engine(sync_url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO counters (id, value) VALUES (1, 0)"))
            for ddl in _SLOW_COMMIT_DDL:
                conn.execute(text(ddl))
    finally:
        engine.dispose()


def committed_keys(sync_url: str) -> set[str]:
    """Keys a brand-new connection sees: what the database really holds."""
    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(select(Write.key)))
    finally:
        engine.dispose()


class SessionTracker:
    """Counts sessions opened and closed, and transactions begun and ended.

    The database's sessions are of a private ``Session`` subclass, so the
    counters see this database's sessions only.
    """

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.transactions = 0
        self._lock = threading.Lock()
        tracker = self

        class TrackedSession(Session):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._tracked_open = True
                with tracker._lock:
                    tracker.opened += 1

            def close(self) -> None:
                try:
                    super().close()
                finally:
                    if self._tracked_open:
                        self._tracked_open = False
                        with tracker._lock:
                            tracker.closed += 1

        self.session_class = TrackedSession
        event.listen(TrackedSession, "after_transaction_create", self._on_begin)
        event.listen(TrackedSession, "after_transaction_end", self._on_end)

    def _on_begin(self, _session: Session, transaction: Any) -> None:
        if transaction.parent is None:
            with self._lock:
                self.transactions += 1

    def _on_end(self, _session: Session, transaction: Any) -> None:
        if transaction.parent is None:
            with self._lock:
                self.transactions -= 1

    def session_options(self, flavour: str) -> dict[str, Any]:
        if flavour == "async":
            return {"sync_session_class": self.session_class}
        return {"class_": self.session_class}

    @property
    def open(self) -> int:
        """Sessions created and not closed yet."""
        return self.opened - self.closed


def make_database(
    url: str, flavour: str, engine_options: dict[str, Any] | None = None
) -> tuple[AnyDatabase, SessionTracker]:
    """A ``Database`` (``flavour="sync"``) or ``AsyncDatabase`` whose sessions are counted."""
    tracker = SessionTracker()
    cls = AsyncDatabase if flavour == "async" else Database
    db = cls(url, engine_options=engine_options, session_options=tracker.session_options(flavour))
    return db, tracker


def checked_out(db: AnyDatabase) -> int:
    return db.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - not Linux


Work = Callable[[Session, dict[str, Any]], Any]


def write(session: Session, params: dict[str, Any]) -> dict[str, Any]:
    """The body of ``POST /writes``: see the module docstring."""
    key, mode = params["key"], params.get("mode", "ok")
    parent = MISSING_PARENT if mode == "commit" else None
    session.add(Write(key=key, token=f"token-{key}", parent_id=parent))
    session.info.setdefault("keys", []).append(key)  # for session event listeners
    session.flush()
    if params.get("sleep"):
        session.execute(text("SELECT pg_sleep(:s)"), {"s": float(params["sleep"])})
    if mode == "reject":
        raise HTTPException(409, "refused after the write")
    if mode == "crash":
        raise RuntimeError("the route failed after the write")
    if mode == "dup":
        session.add(Write(key=f"{key}-again", token=f"token-{key}"))
        session.flush()
    if mode == "badvalue":
        # A value of the wrong type: the error message quotes it.
        session.execute(text("SELECT CAST(:v AS integer)"), {"v": f"token-{key}"})
    return {"key": key}


def add_work_route(
    app: FastAPI, db: AnyDatabase, path: str, work: Work, *, status_code: int = 201
) -> None:
    """``POST path`` running ``work(session, query_params)`` on the request's session.

    A ``def`` route with ``Database`` (in the threadpool), an ``async def`` route
    calling ``db.session.run_sync`` with ``AsyncDatabase``.
    """
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint(request: Request) -> Any:
            return await adb.session.run_sync(work, dict(request.query_params))

        endpoint: Callable[..., Any] = async_endpoint
    else:
        sdb = db

        def sync_endpoint(request: Request) -> Any:
            return work(sdb.session, dict(request.query_params))

        endpoint = sync_endpoint
    app.add_api_route(path, endpoint, methods=["POST"], status_code=status_code)


async def run_work(db: AnyDatabase, work: Work, params: dict[str, Any]) -> Any:
    """``work(session, params)`` from async code: a sync session works in a thread."""
    if isinstance(db, AsyncDatabase):
        return await db.session.run_sync(work, params)
    sdb = db
    return await anyio.to_thread.run_sync(lambda: work(sdb.session, params))


def build_app(db: AnyDatabase, tracker: SessionTracker, **middleware_options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db, **middleware_options)
    add_work_route(app, db, "/writes", write)

    @app.get("/stream")
    async def stream(
        key: str, chunks: int = 3, sleep: float = 0.05, late: str = ""
    ) -> StreamingResponse:
        await run_work(db, write, {"key": key})

        async def body() -> AsyncIterator[bytes]:
            for n in range(chunks):
                yield f"chunk {n}\n".encode()
                if late and n == 0:
                    # Work after the response started, settled when the app returns.
                    await run_work(db, write, {"key": f"{key}-late", "mode": late})
                await anyio.sleep(sleep)

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/upload", status_code=201)
    async def upload(key: str, request: Request) -> dict[str, Any]:
        await run_work(db, write, {"key": key})
        body = await request.body()
        return {"key": key, "size": len(body)}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return {
            "pid": os.getpid(),
            "sessions_opened": tracker.opened,
            "sessions_open": tracker.open,
            "transactions_open": tracker.transactions,
            "checked_out": checked_out(db),
            "rss": rss_bytes(),
        }

    return app


def create_app() -> FastAPI:
    """The uvicorn factory: the database from ``DATABASE_URL``."""
    flavour = os.environ.get("RELIABILITY_FLAVOUR", "async")
    options = json.loads(os.environ.get("RELIABILITY_ENGINE_OPTIONS", "{}"))
    db, tracker = make_database(os.environ["DATABASE_URL"], flavour, options)
    return build_app(db, tracker)
