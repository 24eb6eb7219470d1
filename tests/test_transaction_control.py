"""After-commit hooks, per-route policy, rollback-only, and explicit control inside routes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, HTTPException
from sqlalchemy import event, select
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from middleware_sessions import (
    AsyncDatabase,
    Database,
    DBSessionMiddleware,
    MissingSessionError,
    transaction_policy,
)

from .helpers import (
    AnyDatabase,
    Client,
    Item,
    add_item,
    checked_out,
    committed_names,
    make_app,
    route,
)


def endpoint(db: AnyDatabase, work: Callable[[Session, str], Any]) -> Callable[..., Any]:
    """A def (sync database) or async def (async database) endpoint running ``work``."""
    if isinstance(db, AsyncDatabase):
        adb = db

        async def async_endpoint(name: str = "") -> Any:
            return await adb.session.run_sync(work, name)

        return async_endpoint
    sdb = db

    def sync_endpoint(name: str = "") -> Any:
        return work(sdb.session, name)

    return sync_endpoint


def count_commits(db: AnyDatabase) -> list[object]:
    """COMMITs the database receives, counted at the connection."""
    commits: list[object] = []
    engine = db.engine.sync_engine if isinstance(db, AsyncDatabase) else db.engine
    event.listen(engine, "commit", lambda conn: commits.append(conn))
    return commits


# --- after-commit hooks ---------------------------------------------------------------


async def test_on_commit_hooks_run_in_order_after_the_commit(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    calls: list[tuple[str, set[str]]] = []

    async def async_hook() -> None:
        calls.append(("async", await committed_names(db)))

    def sync_hook() -> None:
        calls.append(("sync", {"(sync hook ran)"}))

    def work(session: Session, name: str) -> Any:
        db.on_commit(async_hook)
        result = add_item(session, name)
        db.on_commit(sync_hook)
        return result

    app = make_app(db)
    route(app, db, "/items", work, status_code=201)

    assert (await client(app).post("/items", params={"name": "job"})).status_code == 201
    assert calls == [("async", {"job"}), ("sync", {"(sync hook ran)"})]


@pytest.mark.parametrize("status", [400, 409, 500])
async def test_on_commit_hooks_are_discarded_on_rollback(
    database: AnyDatabase, client: Client, status: int
) -> None:
    db = database
    calls: list[str] = []

    def work(session: Session, name: str) -> Any:
        db.on_commit(lambda: calls.append("commit"))
        db.on_rollback(lambda: calls.append("rollback"))
        add_item(session, name)
        raise HTTPException(status)

    app = make_app(db)
    route(app, db, "/items", work)

    assert (await client(app).post("/items", params={"name": "x"})).status_code == status
    assert calls == ["rollback"]


async def test_on_rollback_hooks_are_discarded_on_commit(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    calls: list[str] = []

    def work(session: Session, name: str) -> Any:
        db.on_rollback(lambda: calls.append("rollback"))
        db.on_commit(lambda: calls.append("commit"))
        return add_item(session, name)

    app = make_app(db)
    route(app, db, "/items", work)

    assert (await client(app).post("/items", params={"name": "x"})).status_code == 200
    assert calls == ["commit"]


async def test_hooks_of_a_failed_commit_do_not_run(database: AnyDatabase, client: Client) -> None:
    from .helpers import add_orphan

    db = database
    calls: list[str] = []

    def work(session: Session, name: str) -> Any:
        db.on_commit(lambda: calls.append("commit"))
        db.on_rollback(lambda: calls.append("rollback"))
        return add_orphan(session, name)

    app = make_app(db)
    route(app, db, "/items", work, status_code=201)

    assert (await client(app).post("/items", params={"name": "x"})).status_code == 500
    assert calls == ["rollback"]


async def test_a_failing_hook_is_logged_and_changes_nothing(
    database: AnyDatabase, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    db = database
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("mail server down")

    def work(session: Session, name: str) -> Any:
        db.on_commit(broken)
        db.on_commit(lambda: calls.append("next hook still runs"))
        return add_item(session, name)

    app = make_app(db)
    route(app, db, "/items", work, status_code=201)

    with caplog.at_level(logging.ERROR, logger="middleware_sessions"):
        response = await client(app).post("/items", params={"name": "kept"})

    assert response.status_code == 201
    assert await committed_names(db) == {"kept"}
    assert calls == ["next hook still runs"]
    [record] = caplog.records
    assert "POST /items" in record.getMessage()
    assert record.exc_info is not None
    assert checked_out(db) == 0


async def test_hook_registered_without_writes_runs_when_the_request_succeeds(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    calls: list[str] = []
    app = make_app(db)
    route(app, db, "/ping", lambda session, name: db.on_commit(lambda: calls.append("ran")))

    assert (await client(app).post("/ping")).status_code == 200
    assert calls == ["ran"]


async def test_hook_before_an_explicit_commit_runs_even_if_the_request_then_fails(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    calls: list[str] = []

    def work(session: Session, name: str) -> Any:
        db.on_commit(lambda: calls.append("first transaction"))
        add_item(session, name)
        session.commit()
        db.on_commit(lambda: calls.append("second transaction"))
        add_item(session, name + "-2")
        raise HTTPException(422)

    app = make_app(db)
    route(app, db, "/items", work)

    assert (await client(app).post("/items", params={"name": "early"})).status_code == 422
    assert await committed_names(db) == {"early"}
    assert calls == ["first transaction"]


async def test_savepoint_release_does_not_fire_on_commit_hooks_early(database: AnyDatabase) -> None:
    db = database
    calls: list[str] = []
    if isinstance(db, AsyncDatabase):
        async with db.session_scope() as session:
            db.on_commit(lambda: calls.append("commit"))
            async with session.begin_nested():
                session.add(Item(name="nested"))
            assert calls == []
    else:
        with db.session_scope() as sync_session:
            db.on_commit(lambda: calls.append("commit"))
            with sync_session.begin_nested():
                sync_session.add(Item(name="nested"))
            assert calls == []

    assert calls == ["commit"]


async def test_hooks_in_a_session_scope_follow_its_outcome(database: AnyDatabase) -> None:
    db = database
    calls: list[str] = []
    if isinstance(db, AsyncDatabase):
        async with db.session_scope():
            db.on_commit(lambda: calls.append("committed"))
        with pytest.raises(LookupError):
            async with db.session_scope():
                db.on_commit(lambda: calls.append("never"))
                db.on_rollback(lambda: calls.append("rolled back"))
                raise LookupError
    else:
        with db.session_scope():
            db.on_commit(lambda: calls.append("committed"))
        with pytest.raises(LookupError), db.session_scope():
            db.on_commit(lambda: calls.append("never"))
            db.on_rollback(lambda: calls.append("rolled back"))
            raise LookupError

    assert calls == ["committed", "rolled back"]


def test_async_hook_in_a_sync_scope_is_refused_loudly(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(f"sqlite:///{tmp_path}/h.db")

    async def async_hook() -> None:  # pragma: no cover - must not run
        raise AssertionError

    with caplog.at_level(logging.ERROR, logger="middleware_sessions"), db.session_scope():
        db.on_commit(async_hook)

    assert "cannot await" in caplog.text
    db.engine.dispose()


def test_hooks_need_a_request_or_scope(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/h.db")

    with pytest.raises(MissingSessionError):
        db.on_commit(lambda: None)
    with pytest.raises(MissingSessionError):
        db.rollback_only()


def test_a_hook_must_be_callable(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/h.db")

    with db.session_scope(), pytest.raises(TypeError, match="callable"):
        db.on_commit("send_email")  # type: ignore[arg-type]


# --- per-route policy -------------------------------------------------------------------


async def test_route_policy_can_commit_a_conflict_that_records_an_attempt(
    database: AnyDatabase, client: Client
) -> None:
    def record_attempt(session: Session, name: str) -> Any:
        add_item(session, name)
        raise HTTPException(409, "already taken, attempt recorded")

    router = APIRouter()
    router.add_api_route(
        "/attempts",
        transaction_policy(commit_on=lambda status: status < 400 or status == 409)(
            endpoint(database, record_attempt)
        ),
        methods=["POST"],
    )
    router.add_api_route("/other", endpoint(database, record_attempt), methods=["POST"])
    app = make_app(database)
    app.include_router(router, prefix="/v1")

    assert (await client(app).post("/v1/attempts", params={"name": "kept"})).status_code == 409
    assert (await client(app).post("/v1/other", params={"name": "dropped"})).status_code == 409
    assert await committed_names(database) == {"kept"}


async def test_policy_decorator_works_above_or_below_the_route_decorator(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    never = transaction_policy(commit_on=lambda status: False)

    if isinstance(db, AsyncDatabase):
        adb = db

        @never
        @app.post("/above")
        async def above() -> None:
            adb.session.add(Item(name="above"))

        @app.post("/below")
        @never
        async def below() -> None:
            adb.session.add(Item(name="below"))

    else:
        sdb = db

        @never
        @app.post("/above")
        def above_sync() -> None:
            sdb.session.add(Item(name="above"))

        @app.post("/below")
        @never
        def below_sync() -> None:
            sdb.session.add(Item(name="below"))

    assert (await client(app).post("/above")).status_code == 200
    assert (await client(app).post("/below")).status_code == 200
    assert await committed_names(db) == set()


async def test_read_only_route_sends_no_commit_and_keeps_nothing(
    database: AnyDatabase, client: Client
) -> None:
    def read(session: Session, name: str) -> Any:
        session.add(Item(name="sneaky write"))
        return list(session.scalars(select(Item.name)))

    app = make_app(database)
    app.add_api_route(
        "/report", transaction_policy(read_only=True)(endpoint(database, read)), methods=["GET"]
    )
    commits = count_commits(database)

    response = await client(app).get("/report")

    assert response.status_code == 200
    assert response.json() == ["sneaky write"]
    assert commits == []
    assert await committed_names(database) == set()
    assert checked_out(database) == 0


def test_policy_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="both"):
        transaction_policy(read_only=True, commit_on=lambda s: True)
    with pytest.raises(TypeError, match="needs commit_on"):
        transaction_policy()
    with pytest.raises(TypeError, match="cannot mark"):
        transaction_policy(read_only=True)("not a function")  # type: ignore[type-var]


# --- rollback-only ----------------------------------------------------------------------


async def test_rollback_only_discards_a_successful_request(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    calls: list[str] = []

    def preview(session: Session, name: str) -> Any:
        db.rollback_only()
        db.on_rollback(lambda: calls.append("rolled back"))
        return add_item(session, name)

    app = make_app(db)
    route(app, db, "/preview", preview, status_code=201)

    response = await client(app).post("/preview", params={"name": "dry-run"})

    assert response.status_code == 201
    assert response.json()["name"] == "dry-run"
    assert await committed_names(db) == set()
    assert calls == ["rolled back"]


async def test_rollback_only_in_a_scope_discards_the_scope(database: AnyDatabase) -> None:
    db = database
    if isinstance(db, AsyncDatabase):
        async with db.session_scope() as session:
            session.add(Item(name="dry-run"))
            db.rollback_only()
    else:
        with db.session_scope() as sync_session:
            sync_session.add(Item(name="dry-run"))
            db.rollback_only()

    assert await committed_names(db) == set()


# --- explicit control -------------------------------------------------------------------


async def test_savepoint_rolled_back_in_the_route_keeps_the_outer_work(
    database: AnyDatabase, client: Client
) -> None:
    def work(session: Session, name: str) -> Any:
        add_item(session, "outer")
        try:
            with session.begin_nested():
                add_item(session, "outer")  # duplicate: the savepoint rolls back
        except Exception:
            pass
        return add_item(session, "after")

    app = make_app(database)
    route(app, database, "/items", work, status_code=201)

    assert (await client(app).post("/items")).status_code == 201
    assert await committed_names(database) == {"outer", "after"}
    assert checked_out(database) == 0


def commit_then_add(session: Session, name: str) -> Any:
    session.add(Item(name="committed"))
    session.commit()
    session.add(Item(name="left over"))
    session.flush()


async def test_never_commit_mode_keeps_only_explicit_commits(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database, commit_on=None)
    route(app, database, "/explicit", commit_then_add)
    route(app, database, "/implicit", add_item)

    assert (await client(app).post("/explicit")).status_code == 200
    assert (await client(app).post("/implicit", params={"name": "implicit"})).status_code == 200

    assert await committed_names(database) == {"committed"}
    assert checked_out(database) == 0


def test_commit_on_must_be_callable_or_none() -> None:
    db = Database("sqlite://")
    with pytest.raises(TypeError, match="or None to never commit"):
        DBSessionMiddleware(FastAPI(), db=db, commit_on=400)  # type: ignore[arg-type]
    assert DBSessionMiddleware(FastAPI(), db=db, commit_on=None).commit_on is None


def failing_query_hook() -> None:
    """A hook whose query fails with its SQL text and a value in the error."""
    raise ProgrammingError(
        "UPDATE items SET name = 'S3NT1NEL-hook' WHERE id = 1",
        {"name": "S3NT1NEL-param"},
        ValueError('invalid input value "S3NT1NEL-orig"'),
    )


@pytest.mark.parametrize("redact_errors", [True, False])
async def test_a_failing_hooks_database_error_is_logged_without_data(
    tmp_path: Path, client: Client, caplog: pytest.LogCaptureFixture, redact_errors: bool
) -> None:
    db = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path}/hooks.db")
    app = make_app(db, redact_errors=redact_errors)

    @app.post("/hooked")
    async def hooked() -> None:
        db.on_commit(failing_query_hook)

    with caplog.at_level(logging.ERROR, logger="middleware_sessions"):
        assert (await client(app).post("/hooked")).status_code == 200

    [record] = [r for r in caplog.records if "transaction hook" in r.getMessage()]
    logged = logging.Formatter().format(record)
    assert "ProgrammingError" in logged
    assert ("S3NT1NEL" in logged) is not redact_errors
    await db.engine.dispose()
