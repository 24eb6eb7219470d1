"""Database errors leave the app saying what is wrong, and never the data.

The errors newcomers hit, on SQLite, PostgreSQL with psycopg (sync) and
PostgreSQL with asyncpg (async), through a real app: the error the server logs
names the table, column or constraint (and the SQLSTATE), and a sentinel value
written by the test appears in no log record, no exception of the chain and no
response.
"""

from __future__ import annotations

import logging
import socket
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import (
    CheckConstraint,
    Enum,
    ForeignKey,
    String,
    UniqueConstraint,
    make_url,
    text,
)
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware_sessions import AsyncDatabase, Database
from middleware_sessions._diagnostics import redact

from ._postgres import PostgresServer
from .helpers import AnyDatabase, add_item_with_parent, make_app, route

# aiosqlite's DEBUG trace prints every call it runs, parameters included: switching
# it on means asking for the data. Every other logger, ours and SQLAlchemy's
# included, is read at DEBUG.
TRACE_LOGGERS = frozenset({"aiosqlite"})
if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

PG_ERROR_LINES = ("DETAIL:", "HINT:", "CONTEXT:", "LINE 1:", "[SQL:", "[parameters:")


class Schema(DeclarativeBase):
    pass


class Team(Schema):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)


class Account(Schema):
    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("email", name="accounts_email_key"),
        CheckConstraint("age >= 0", name="age_not_negative"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    nickname: Mapped[str | None] = mapped_column(String(200), nullable=False)
    age: Mapped[int] = mapped_column(default=30)
    mood: Mapped[str] = mapped_column(
        Enum("calm", "busy", name="mood", validate_strings=True), default="calm"
    )
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id", name="accounts_team_fk"), default=None
    )


# A team id that exists nowhere: PostgreSQL's DETAIL line would quote it.
MISSING_TEAM = 918_273_645


def add_account(session: Session, email: str, **fields: Any) -> None:
    session.add(Account(email=email, **{"nickname": email, **fields}))
    session.flush()


def duplicate_email(session: Session, sentinel: str) -> None:
    add_account(session, sentinel)
    add_account(session, sentinel)


def missing_team(session: Session, sentinel: str) -> None:
    add_account(session, sentinel, team_id=MISSING_TEAM)


def orphan_item(session: Session, sentinel: str) -> None:
    # A deferred foreign key: the flush passes, the middleware's COMMIT fails.
    add_item_with_parent(session, sentinel, MISSING_TEAM)


def missing_nickname(session: Session, sentinel: str) -> None:
    add_account(session, sentinel, nickname=None)


def negative_age(session: Session, sentinel: str) -> None:
    add_account(session, sentinel, age=-1)


def missing_table(session: Session, sentinel: str) -> None:
    session.execute(text("SELECT * FROM no_such_table WHERE note = :v"), {"v": sentinel})


def missing_column(session: Session, sentinel: str) -> None:
    session.execute(text("SELECT no_such_column FROM accounts WHERE email = :v"), {"v": sentinel})


def misspelt_keyword(session: Session, sentinel: str) -> None:
    session.execute(text(f"SELEC '{sentinel}'"))  # a literal in the SQL text


def unterminated_literal(session: Session, sentinel: str) -> None:
    session.execute(text(f"SELECT '{sentinel}"))  # the literal is the bad token


def unknown_mood(session: Session, sentinel: str) -> None:
    add_account(session, "e", mood=sentinel)  # refused by SQLAlchemy, before the driver


def text_for_an_integer(session: Session, sentinel: str) -> None:
    session.execute(
        text("INSERT INTO accounts (id, email, nickname, age) VALUES (:v, 'e', 'n', 1)"),
        {"v": sentinel},
    )


@dataclass(frozen=True)
class Case:
    """A mistake and what each backend's logged error must say about it."""

    work: Callable[[Session, str], None]
    sqlite: tuple[str, ...]
    psycopg: tuple[str, ...]
    asyncpg: tuple[str, ...]


def pg(*phrases: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return phrases, phrases


CASES = {
    "missing table": Case(
        missing_table,
        ("no such table: no_such_table",),
        *pg('relation "no_such_table" does not exist', "[SQLSTATE 42P01]"),
    ),
    "missing column": Case(
        missing_column,
        ("no such column: no_such_column",),
        *pg('column "no_such_column" does not exist', "[SQLSTATE 42703]"),
    ),
    "unique violation": Case(
        duplicate_email,
        ("UNIQUE constraint failed: accounts.email",),
        *pg('violates unique constraint "accounts_email_key"', "[SQLSTATE 23505]"),
    ),
    "foreign-key violation": Case(
        missing_team,
        ("FOREIGN KEY constraint failed",),
        *pg('violates foreign key constraint "accounts_team_fk"', "[SQLSTATE 23503]"),
    ),
    "foreign-key violation at commit": Case(
        orphan_item,
        ("FOREIGN KEY constraint failed",),
        *pg('violates foreign key constraint "items_parent_id_fkey"', "[SQLSTATE 23503]"),
    ),
    "not-null violation": Case(
        missing_nickname,
        ("NOT NULL constraint failed: accounts.nickname",),
        *pg('null value in column "nickname" of relation "accounts"', "[SQLSTATE 23502]"),
    ),
    "check violation": Case(
        negative_age,
        ("CHECK constraint failed: age_not_negative",),
        *pg('violates check constraint "age_not_negative"', "[SQLSTATE 23514]"),
    ),
    "syntax error": Case(
        misspelt_keyword,
        ('near "SELEC": syntax error',),
        *pg('syntax error at or near "SELEC"', "[SQLSTATE 42601]"),
    ),
    "unterminated string": Case(
        unterminated_literal,
        ('unrecognized token: "\u2026"',),
        *pg('unterminated quoted string at or near "\u2026"', "[SQLSTATE 42601]"),
    ),
    "value outside an Enum": Case(
        unknown_mood,
        *[("(builtins.LookupError) '\u2026' is not among the defined enum values",)] * 3,
    ),
    "bad input type": Case(
        text_for_an_integer,
        ("datatype mismatch",),
        ('invalid input syntax for type integer: "\u2026"', "[SQLSTATE 22P02]"),
        ("invalid input for query argument $1: \u2026 ('str' object cannot be interpreted",),
    ),
}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception linked to it, as a traceback printer walks them."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) not in seen:
            seen.add(id(current))
            yield current
            pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
            pending.extend(getattr(current, "exceptions", ()))


@dataclass
class Served:
    """What a server shows for one request: its log, the escaped errors, the response."""

    response: httpx.Response
    escaped: list[BaseException]
    log: str

    def everywhere(self) -> str:
        texts = [self.log, self.response.text, str(self.response.headers)]
        for exc in self.escaped:
            texts.append("".join(traceback.format_exception(exc)))
            texts.extend(text for e in chain(exc) for text in (str(e), repr(e)))
        return "\n".join(texts)


async def serve_one(
    app: FastAPI, caplog: pytest.LogCaptureFixture, method: str = "POST", path: str = "/fail"
) -> Served:
    """One request through ``app``, logged the way uvicorn logs an escaped exception."""
    escaped: list[BaseException] = []

    async def server(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await asgi(scope, receive, send)
        except Exception as exc:
            escaped.append(exc)
            logging.getLogger("uvicorn.error").error(
                "Exception in ASGI application\n", exc_info=exc
            )
            raise

    asgi: ASGIApp = app
    transport = httpx.ASGITransport(app=server, raise_app_exceptions=False)
    with caplog.at_level(logging.DEBUG):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.request(method, path)
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    log = "\n".join(
        formatter.format(record) for record in caplog.records if record.name not in TRACE_LOGGERS
    )
    return Served(response, escaped, log)


async def create_tables(db: AnyDatabase) -> None:
    if isinstance(db, AsyncDatabase):
        async with db.engine.begin() as conn:
            await conn.run_sync(Schema.metadata.create_all)
    else:
        Schema.metadata.create_all(db.engine)
        db.engine.dispose()


def driver_of(db: AnyDatabase) -> str:
    dialect = db.engine.dialect
    return "sqlite" if dialect.name == "sqlite" else dialect.driver


@pytest.fixture
def sentinel() -> str:
    return f"S3NT1NEL-{uuid.uuid4().hex}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_logged_error_names_the_mistake_and_never_the_data(
    database: AnyDatabase, case: Case, sentinel: str, caplog: pytest.LogCaptureFixture
) -> None:
    await create_tables(database)
    app = make_app(database)
    route(app, database, "/fail", lambda session, _: case.work(session, sentinel))

    served = await serve_one(app, caplog)

    assert served.response.status_code == 500
    assert served.response.text == "Internal Server Error"
    [error] = served.escaped
    assert isinstance(error, StatementError)  # the type is kept, for handlers and tests
    logged = "".join(traceback.format_exception(error))
    for phrase in getattr(case, driver_of(database)):
        assert phrase in logged
    everywhere = served.everywhere()
    assert sentinel not in everywhere
    assert str(MISSING_TEAM) not in everywhere
    assert [line for line in PG_ERROR_LINES if line in everywhere] == []


@pytest.mark.parametrize("work", [text_for_an_integer, unterminated_literal])
async def test_value_holding_quotes_is_cut_whole(
    database: AnyDatabase,
    work: Callable[[Session, str], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A value that closes the driver's quotes itself leaves no piece behind."""
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    await create_tables(database)
    app = make_app(database)
    route(app, database, "/fail", lambda session, _: work(session, f'{first}" or "{second}'))

    served = await serve_one(app, caplog)

    assert served.response.status_code == 500
    everywhere = served.everywhere()
    assert first not in everywhere
    assert second not in everywhere


class SignupFailed(Exception):
    """An app's own error, raised from the database error it caught."""


def wrap_the_error(session: Session, sentinel: str) -> None:
    try:
        duplicate_email(session, sentinel)
    except DBAPIError as exc:
        raise SignupFailed("could not sign up") from exc


def wrap_in_a_group(session: Session, sentinel: str) -> None:
    failed: list[Exception] = [ValueError("and another")]
    try:
        duplicate_email(session, sentinel)
    except DBAPIError as exc:
        failed.append(exc)
    raise ExceptionGroup("signup", failed)  # as a task group would: no cause, no context


@pytest.mark.parametrize("work", [wrap_the_error, wrap_in_a_group], ids=["cause", "group"])
async def test_database_error_wrapped_by_the_app_is_redacted_too(
    database: AnyDatabase,
    work: Callable[[Session, str], None],
    sentinel: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await create_tables(database)
    app = make_app(database)
    route(app, database, "/fail", lambda session, _: work(session, sentinel))

    served = await serve_one(app, caplog)

    assert served.response.status_code == 500
    assert "accounts" in served.log  # the constraint (PostgreSQL) or table (SQLite) is named
    assert sentinel not in served.everywhere()
    assert "[SQL:" not in served.everywhere()


def fail_while_handling_another_error(session: Session, sentinel: str) -> None:
    try:
        raise LookupError("no cached account")
    except LookupError:
        duplicate_email(session, sentinel)


async def test_redacted_error_keeps_the_error_it_was_raised_while_handling(
    database: AnyDatabase, sentinel: str, caplog: pytest.LogCaptureFixture
) -> None:
    if isinstance(database, AsyncDatabase):
        pytest.skip("SQLAlchemy's greenlet bridge drops this context, redacted or not")
    await create_tables(database)
    app = make_app(database)
    route(
        app,
        database,
        "/fail",
        lambda session, _: fail_while_handling_another_error(session, sentinel),
    )

    served = await serve_one(app, caplog)

    assert "LookupError: no cached account" in served.log
    assert "During handling of the above exception, another exception occurred" in served.log
    assert sentinel not in served.everywhere()


async def test_commit_failing_after_the_response_started_is_logged_without_the_data(
    database: AnyDatabase, sentinel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A background task's work fails to commit: the middleware's own ERROR line is clean."""
    app = make_app(database)

    async def write() -> None:
        # The foreign key is checked at COMMIT, which the middleware runs after the task.
        if isinstance(database, AsyncDatabase):
            await database.session.run_sync(add_item_with_parent, sentinel, MISSING_TEAM)
        else:
            add_item_with_parent(database.session, sentinel, MISSING_TEAM)

    @app.post("/late")
    async def late() -> Response:
        return Response("accepted", background=BackgroundTask(write))

    served = await serve_one(app, caplog, path="/late")

    assert served.response.status_code == 200
    assert "Could not commit the database work done after the response" in served.log
    if driver_of(database) == "sqlite":
        assert "FOREIGN KEY constraint failed" in served.log
    else:
        assert 'violates foreign key constraint "items_parent_id_fkey"' in served.log
    assert sentinel not in served.everywhere()
    assert str(MISSING_TEAM) not in served.everywhere()


async def test_redact_errors_false_keeps_the_driver_message_whole(
    database: AnyDatabase, sentinel: str, caplog: pytest.LogCaptureFixture
) -> None:
    await create_tables(database)
    app = make_app(database, redact_errors=False)
    route(app, database, "/fail", lambda session, _: duplicate_email(session, sentinel))

    served = await serve_one(app, caplog)

    assert "[SQL: INSERT INTO accounts" in served.log
    if driver_of(database) != "sqlite":
        assert sentinel in served.log  # PostgreSQL's DETAIL line, as the driver wrote it
    assert served.response.text == "Internal Server Error"  # responses stay generic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nobody listens there once the socket is closed


CONNECTION_CASES = {
    # case: (how to spoil the URL, what the psycopg error says, what asyncpg's says)
    "connection refused": ("port", "Connection refused", "Connect call failed"),
    "wrong password": (
        "password",
        'password authentication failed for user "app"',
        'password authentication failed for user "app"',
    ),
    "unknown database": (
        "database",
        'database "no_such_database" does not exist',
        'database "no_such_database" does not exist',
    ),
}


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("case", CONNECTION_CASES, ids=CONNECTION_CASES.keys())
async def test_connection_error_says_what_is_wrong_and_never_the_password(
    postgres_server: PostgresServer,
    flavour: str,
    case: str,
    sentinel: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spoil, psycopg_says, asyncpg_says = CONNECTION_CASES[case]
    url = make_url(postgres_server.url("psycopg" if flavour == "sync" else "asyncpg"))
    if spoil == "port":
        url = url.set(port=free_port())
    elif spoil == "password":
        url = url.set(password=sentinel)
    else:
        url = url.set(database="no_such_database")
    password = url.password
    assert password is not None
    db: AnyDatabase = Database(url) if flavour == "sync" else AsyncDatabase(url)
    app = make_app(db)
    route(app, db, "/fail", lambda session, _: session.execute(text("SELECT 1")))

    try:
        served = await serve_one(app, caplog)
    finally:
        await dispose(db)

    assert served.response.status_code == 500
    [error] = served.escaped
    assert (psycopg_says if flavour == "sync" else asyncpg_says) in str(error)
    everywhere = served.everywhere() + repr(db)
    assert password not in everywhere
    assert postgres_server.password not in everywhere


async def test_sqlite_file_that_cannot_be_opened_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(f"sqlite:///{tmp_path}/missing-directory/app.db")
    app = make_app(db)
    route(app, db, "/fail", lambda session, _: session.execute(text("SELECT 1")))

    served = await serve_one(app, caplog)

    [error] = served.escaped
    assert "unable to open database file" in str(error)


async def dispose(db: AnyDatabase) -> None:
    if isinstance(db, AsyncDatabase):
        await db.engine.dispose()
    else:
        db.engine.dispose()


@pytest.mark.postgres
def test_redacting_twice_changes_nothing(postgres_server: PostgresServer) -> None:
    """The middleware may meet one error twice (at the commit, then leaving the app).

    psycopg's own complaints carry no SQLSTATE: read again once the statement is
    gone, one would pass for a connection failure and come back whole.
    """
    db = Database(postgres_server.url("psycopg"))
    with pytest.raises(DBAPIError) as info, db.session_scope() as session:
        session.execute(text("SELECT :v"), {"v": {"k": 1}})  # psycopg cannot adapt a dict
    db.engine.dispose()

    once = str(redact(info.value))
    twice = str(redact(info.value))

    assert once == twice
    assert "cannot adapt type 'dict'" in twice


def test_unpaired_quote_hides_the_rest_of_the_message(sentinel: str) -> None:
    error = StatementError("", "SELECT 1", None, ValueError(f"bad value '{sentinel} for id"))

    assert str(redact(error)) == "(builtins.ValueError) bad value '\u2026"


def test_statement_error_without_an_original_keeps_its_message_without_values(
    sentinel: str,
) -> None:
    error = StatementError(f"no value for '{sentinel}'", "SELECT 1", None, None)

    assert str(redact(error)) == "no value for '\u2026'"
