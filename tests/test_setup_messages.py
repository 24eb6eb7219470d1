"""Setup mistakes get an error that says what to do, and never shows the password."""

from __future__ import annotations

import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.dialects import registry
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.exc import SADeprecationWarning

from middleware_sessions import AsyncDatabase, Database
from middleware_sessions.exceptions import BLOCKING_USE

PASSWORD = "pw-5ecret-9d2"


def everything_printed(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.mark.parametrize(
    ("cls", "url", "module"),
    [
        (AsyncDatabase, f"postgresql+asyncpg://app:{PASSWORD}@db.example/app", "asyncpg"),
        (Database, f"postgresql+psycopg://app:{PASSWORD}@db.example/app", "psycopg"),
        (AsyncDatabase, f"postgresql+psycopg://app:{PASSWORD}@db.example/app", "psycopg"),
        (AsyncDatabase, "sqlite+aiosqlite:///./app.db", "aiosqlite"),
    ],
    ids=["asyncpg", "psycopg", "psycopg-async", "aiosqlite"],
)
def test_missing_driver_names_the_extra_to_install(
    cls: type[Database] | type[AsyncDatabase],
    url: str,
    module: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # "not installed"

    with pytest.raises(ImportError) as info:
        cls(url)

    assert isinstance(info.value, ModuleNotFoundError)
    assert f'pip install "middleware_sessions[{module}]"' in str(info.value)
    assert f"pip install {module})" in str(info.value)
    assert PASSWORD not in everything_printed(info.value)


def test_missing_driver_without_an_extra_says_which_drivers_we_support(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg2", None)

    with pytest.raises(ModuleNotFoundError) as info:
        Database(f"postgresql+psycopg2://app:{PASSWORD}@db.example/app")

    message = str(info.value)
    assert "pip install psycopg2" in message
    assert "'postgresql+psycopg://'" in message
    assert PASSWORD not in everything_printed(info.value)


@pytest.mark.parametrize(
    ("cls", "scheme", "wanted"),
    [
        (Database, "postgres", "postgresql+psycopg"),
        (AsyncDatabase, "postgres", "postgresql+asyncpg"),
        (AsyncDatabase, "postgres+asyncpg", "postgresql+asyncpg"),
        (Database, "postgres+psycopg", "postgresql+psycopg"),
    ],
)
def test_postgres_scheme_points_to_postgresql(
    cls: type[Database] | type[AsyncDatabase], scheme: str, wanted: str
) -> None:
    with pytest.raises(ValueError, match="SQLAlchemy spells PostgreSQL's dialect") as info:
        cls(f"{scheme}://app:{PASSWORD}@db.example:5432/app")

    assert f"Start the URL with '{wanted}://'" in str(info.value)
    assert PASSWORD not in everything_printed(info.value)


def test_postgres_scheme_from_the_environment_gets_the_hint_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgres://app:{PASSWORD}@db.example/app")

    with pytest.raises(ValueError, match="'postgresql\\+asyncpg://'") as info:
        AsyncDatabase()

    assert PASSWORD not in everything_printed(info.value)


def test_missing_driver_of_another_dialect_names_its_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pymysql", None)

    with pytest.raises(ModuleNotFoundError, match="Install it with pip install pymysql") as info:
        Database(f"mysql+pymysql://app:{PASSWORD}@db.example/app")

    assert PASSWORD not in everything_printed(info.value)


class LegacyDialect(DefaultDialect):
    """A third-party dialect written before SQLAlchemy 2.0: ``dbapi()``, no ``import_dbapi()``."""

    name = "legacydb"

    @classmethod
    def dbapi(cls) -> Any:
        return sqlite3


def test_dialect_with_the_older_driver_hook_is_left_to_sqlalchemy() -> None:
    registry.register("legacydb", __name__, "LegacyDialect")

    with pytest.warns(SADeprecationWarning, match="import_dbapi"):
        db = Database("legacydb://")

    assert isinstance(db.engine.dialect, LegacyDialect)


def test_installed_driver_needs_no_hint(tmp_path: Path) -> None:
    db = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path}/ok.db")

    assert db.engine.dialect.driver == "aiosqlite"


def test_blocking_use_message_names_each_choice_and_the_fix() -> None:
    assert "plain 'def'" in BLOCKING_USE
    assert "AsyncDatabase" in BLOCKING_USE
    for choice in ("'warn' (the default)", "'raise' (an error)", "'ignore'"):
        assert choice in BLOCKING_USE
    assert not BLOCKING_USE.endswith("'raise' makes it an error.")
