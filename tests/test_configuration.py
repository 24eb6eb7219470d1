"""Where the database comes from, the defaults, and errors that never show a password."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware

SECRET = "s3cr3t-pw"
SERVER_URL = f"postgresql+psycopg://app:{SECRET}@db.example:5432/app"
ASYNC_SERVER_URL = f"postgresql+asyncpg://app:{SECRET}@db.example:5432/app"

DatabaseClass = type[Database] | type[AsyncDatabase]
both = pytest.mark.parametrize("cls", [Database, AsyncDatabase])


def url_for(cls: DatabaseClass, path: Path) -> str:
    return f"sqlite:///{path}" if cls is Database else f"sqlite+aiosqlite:///{path}"


@both
def test_url_argument_builds_an_engine_that_the_database_owns(
    cls: DatabaseClass, tmp_path: Path
) -> None:
    db = cls(url_for(cls, tmp_path / "a.db"))

    assert db.engine.url.database == str(tmp_path / "a.db")
    assert db.owns_engine


@both
def test_database_url_environment_variable_is_the_fallback(
    cls: DatabaseClass, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", url_for(cls, tmp_path / "env.db"))

    assert cls().engine.url.database == str(tmp_path / "env.db")


@both
def test_url_argument_wins_over_the_environment(
    cls: DatabaseClass, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", url_for(cls, tmp_path / "env.db"))

    assert cls(url_for(cls, tmp_path / "arg.db")).engine.url.database == str(tmp_path / "arg.db")


def test_a_given_engine_is_used_as_is_and_not_owned(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/e.db")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/e.db")

    db, adb = Database(engine=engine), AsyncDatabase(engine=async_engine)

    assert db.engine is engine
    assert adb.engine is async_engine
    assert not db.owns_engine
    assert not adb.owns_engine


@both
def test_no_database_at_all_is_a_clear_value_error(
    cls: DatabaseClass, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)

    with pytest.raises(ValueError, match="DATABASE_URL") as info:
        cls()
    assert "url=" in str(info.value)


@both
def test_empty_database_url_variable_counts_as_missing(
    cls: DatabaseClass, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "")

    with pytest.raises(ValueError, match="no database"):
        cls()


def test_url_and_engine_together_is_a_value_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/e.db")

    with pytest.raises(ValueError, match="both a URL and an engine"):
        Database(f"sqlite:///{tmp_path}/e.db", engine=engine)


def test_engine_options_with_a_given_engine_is_a_value_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/e.db")

    with pytest.raises(ValueError, match="engine_options"):
        Database(engine=engine, engine_options={"echo": True})


@pytest.mark.parametrize(
    "url",
    [
        f"not a url {SECRET}",
        f"postgresql://app:{SECRET}@host:notaport/db",
        f"://app:{SECRET}@host/db",
    ],
)
@both
def test_unparseable_url_is_a_value_error_without_the_password(
    cls: DatabaseClass, url: str
) -> None:
    with pytest.raises(ValueError, match="could not parse") as info:
        cls(url)

    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_unknown_dialect_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError, match="does not know") as info:
        Database(f"nosuchdb://app:{SECRET}@host/db")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite:///x.db", ASYNC_SERVER_URL, "postgresql+psycopg_async://u@h/d"]
)
def test_async_driver_given_to_database_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="AsyncDatabase") as info:
        Database(url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", ["sqlite:///x.db", "sqlite://", "mysql+pymysql://u@h/d"])
def test_sync_driver_given_to_async_database_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="sync driver"):
        AsyncDatabase(url)


def test_psycopg_url_gives_an_async_database_its_async_variant() -> None:
    # SQLAlchemy picks psycopg's asyncio flavour for create_async_engine; so do we.
    adb = AsyncDatabase(f"postgresql+psycopg://app:{SECRET}@db.example/app")

    assert adb.engine.dialect.is_async


def test_async_engine_given_to_database_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="AsyncEngine"):
        Database(engine=create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/e.db"))  # type: ignore[arg-type]


def test_sync_engine_given_to_async_database_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync Engine"):
        AsyncDatabase(engine=create_engine(f"sqlite:///{tmp_path}/e.db"))  # type: ignore[arg-type]


def test_something_else_as_engine_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="expects engine"):
        Database(engine="sqlite://")  # type: ignore[arg-type]


def test_url_of_the_wrong_type_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"string or sqlalchemy\.URL"):
        Database(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "url"), [(Database, SERVER_URL), (AsyncDatabase, ASYNC_SERVER_URL)]
)
def test_repr_masks_the_password(cls: DatabaseClass, url: str) -> None:
    db = cls(url)

    assert SECRET not in repr(db)
    assert "***" in repr(db)
    assert SECRET not in repr(db.engine)


def test_repr_of_a_database_with_a_given_engine_masks_the_password() -> None:
    db = Database(engine=create_engine(SERVER_URL))

    assert SECRET not in repr(db)
    assert "engine=" in repr(db)


def test_server_databases_get_pre_ping() -> None:
    assert Database(SERVER_URL).engine.pool._pre_ping  # type: ignore[attr-defined]
    assert AsyncDatabase(ASYNC_SERVER_URL).engine.pool._pre_ping  # type: ignore[attr-defined]


def test_engine_options_are_passed_through_and_win(tmp_path: Path) -> None:
    db = Database(SERVER_URL, engine_options={"pool_size": 3, "pool_pre_ping": False})

    assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
    assert not db.engine.pool._pre_ping  # type: ignore[attr-defined]


def test_sync_sqlite_file_works_from_other_threads(tmp_path: Path) -> None:
    # One pooled connection, used from two different threads in turn.
    db = Database(
        f"sqlite:///{tmp_path}/t.db",
        engine_options={"pool_size": 1, "max_overflow": 0, "connect_args": {"timeout": 7}},
    )

    def use() -> int:
        with db.session_scope() as session:
            return int(session.execute(text("SELECT 1")).scalar_one())

    for _ in range(2):
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(use).result() == 1
    db.engine.dispose()


def test_sync_in_memory_sqlite_is_one_shared_database() -> None:
    db = Database("sqlite://")

    assert isinstance(db.engine.pool, StaticPool)


def test_session_options_are_passed_to_the_sessionmaker() -> None:
    db = Database(SERVER_URL, session_options={"autoflush": False})
    adb = AsyncDatabase(ASYNC_SERVER_URL, session_options={"expire_on_commit": True})

    assert db.sessionmaker.kw["autoflush"] is False
    assert adb.sessionmaker.kw["expire_on_commit"] is True


def test_async_sessions_do_not_expire_on_commit_by_default() -> None:
    adb = AsyncDatabase(ASYNC_SERVER_URL)

    assert adb.sessionmaker.kw["expire_on_commit"] is False
    assert adb.sessionmaker().sync_session.expire_on_commit is False


def test_sessionmaker_gives_independent_sessions() -> None:
    db, adb = Database(SERVER_URL), AsyncDatabase(ASYNC_SERVER_URL)

    assert isinstance(db.sessionmaker(), Session)
    assert db.sessionmaker() is not db.sessionmaker()
    assert isinstance(adb.sessionmaker(), AsyncSession)


def test_bound_parameters_stay_out_of_error_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(f"sqlite:///{tmp_path}/p.db")
    with pytest.raises(DBAPIError) as info, db.engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table WHERE token = :t"), {"t": SECRET})

    assert SECRET not in str(info.value)
    db.engine.dispose()


def test_middleware_rejects_something_that_is_not_a_database() -> None:
    with pytest.raises(TypeError, match="db=Database"):
        DBSessionMiddleware(app=None, db="sqlite://")  # type: ignore[arg-type]


def test_middleware_rejects_a_commit_on_that_is_not_callable() -> None:
    with pytest.raises(TypeError, match="commit_on"):
        DBSessionMiddleware(app=None, db=Database("sqlite://"), commit_on=400)  # type: ignore[arg-type]


def test_no_password_in_logs_when_the_server_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database(
        f"postgresql+psycopg://app:{SECRET}@127.0.0.1:9/app",
        engine_options={"connect_args": {"connect_timeout": 1}},
    )

    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(OperationalError) as info,
        db.session_scope() as session,
    ):
        session.connection()

    assert SECRET not in str(info.value)
    assert SECRET not in caplog.text
