"""Where the database comes from, and the engine defaults we apply.

Everything here runs once, at construction. Error messages never include the
URL as given: it may carry a password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import StaticPool

ENV_VAR = "DATABASE_URL"

_SERVER_DIALECTS_WITHOUT_PRE_PING = frozenset({"sqlite"})


def resolve_url(url: str | URL | None, *, engine_given: bool, cls_name: str) -> URL | None:
    """Return the URL to build an engine from, or ``None`` when an engine was given."""
    if url is not None and engine_given:
        raise ValueError(
            f"{cls_name}() got both a URL and an engine. "
            "It can only use one database. "
            "Pass either url=... or engine=..., not both."
        )
    if engine_given:
        return None
    if url is None:
        url = os.environ.get(ENV_VAR) or None
        if url is None:
            raise ValueError(
                f"{cls_name}() was given no database. "
                f"There was no url argument, no engine argument and no {ENV_VAR} "
                "environment variable. "
                f"Pass url='dialect+driver://...' or engine=..., or set {ENV_VAR}."
            )
    return parse_url(url, cls_name=cls_name)


def parse_url(url: str | URL, *, cls_name: str) -> URL:
    """Parse ``url`` without ever echoing it back (it may hold a password)."""
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        raise ValueError(
            f"{cls_name}() expects the URL as a string or sqlalchemy.URL, "
            f"not {type(url).__name__}. Pass url='dialect+driver://...'."
        )
    try:
        parsed = make_url(url)
        # Reading the port parses it; a bad one raises only here.
        _ = parsed.port
    except (ArgumentError, ValueError):
        # Deliberately no chaining and no echo: the text may include a password.
        raise ValueError(
            f"{cls_name}() could not parse its database URL. "
            "A SQLAlchemy URL looks like 'postgresql+asyncpg://user:password@host:5432/name' "
            "or 'sqlite+aiosqlite:///./app.db'. "
            "Check the URL's format (and percent-encode special characters in the password)."
        ) from None
    return parsed


def safe_url(url: URL) -> str:
    """Render ``url`` with its password masked, for ``repr`` and messages."""
    return url.render_as_string(hide_password=True)


def check_driver(url: URL, *, want_async: bool, cls_name: str) -> None:
    """Raise unless the URL names a dialect we can use, of the right flavour, installed.

    A misspelt dialect or the wrong flavour is a ``ValueError``; a driver that is
    not installed is a ``ModuleNotFoundError`` naming the package to install.
    """
    if url.get_backend_name() == "postgres":
        raise ValueError(_postgres_hint(url, want_async=want_async, cls_name=cls_name))
    try:
        # Resolving the dialect imports SQLAlchemy's dialect module, not the driver.
        dialect = url.get_dialect(_is_async=want_async)
    except NoSuchModuleError:
        raise ValueError(
            f"{cls_name}() does not know the database dialect {url.drivername!r}. "
            "SQLAlchemy has no dialect registered under that name. "
            "Check the spelling of the URL's 'dialect+driver' part."
        ) from None
    if want_async and not dialect.is_async:
        raise ValueError(
            f"AsyncDatabase() was given the sync driver {url.drivername!r}. "
            "AsyncSession needs an asyncio driver. "
            "Use an async driver such as 'sqlite+aiosqlite', 'postgresql+asyncpg' or "
            "'postgresql+psycopg_async', or use Database() for sync code."
        )
    if not want_async and dialect.is_async:
        raise ValueError(
            f"Database() was given the async driver {url.drivername!r}. "
            "A sync Session cannot drive an asyncio driver. "
            "Use a sync driver such as 'sqlite' or 'postgresql+psycopg', "
            "or use AsyncDatabase() for async code."
        )
    try:
        # What create_engine() would do next; here the error can say what to install.
        dialect.import_dbapi()
    except NotImplementedError:
        pass  # a third-party dialect with the older dbapi() hook: create_engine() copes
    except ModuleNotFoundError as exc:
        module = (exc.name or dialect.driver).split(".")[0]
        raise ModuleNotFoundError(
            _missing_driver(url, module, cls_name=cls_name), name=exc.name
        ) from exc


# The package extra that installs each driver: pip install "middleware_sessions[<extra>]".
_EXTRAS = {"aiosqlite": "aiosqlite", "asyncpg": "asyncpg", "psycopg": "psycopg"}


def _missing_driver(url: URL, module: str, *, cls_name: str) -> str:
    extra = _EXTRAS.get(module)
    if extra is not None:
        how = f'pip install "middleware_sessions[{extra}]" (or pip install {module})'
    elif url.get_backend_name() == "postgresql":
        # e.g. plain 'postgresql://' on SQLAlchemy 2.0, whose default driver is psycopg2.
        how = (
            f"pip install {module}, or name a driver we support in the URL: "
            "'postgresql+psycopg://' (pip install \"middleware_sessions[psycopg]\") "
            "or 'postgresql+asyncpg://' (pip install \"middleware_sessions[asyncpg]\")"
        )
    else:
        how = f"pip install {module}"
    return (
        f"{cls_name}() needs the database driver {module!r} for {url.drivername!r} URLs, "
        "and it is not installed. "
        "SQLAlchemy imports the driver when it creates the engine. "
        f"Install it with {how}."
    )


def _postgres_hint(url: URL, *, want_async: bool, cls_name: str) -> str:
    driver = url.drivername.partition("+")[2] or ("asyncpg" if want_async else "psycopg")
    wanted = f"postgresql+{driver}"
    return (
        f"{cls_name}() was given a URL starting with '{url.drivername}://'. "
        "SQLAlchemy spells PostgreSQL's dialect 'postgresql'; the 'postgres://' form that "
        "some hosting providers hand out is not registered. "
        f"Start the URL with '{wanted}://' instead, "
        f"e.g. url.replace('{url.drivername}://', '{wanted}://', 1)."
    )


def check_engine(engine: object, *, want_async: bool, cls_name: str) -> None:
    """Raise ``ValueError`` unless ``engine`` is an engine of the right flavour."""
    if isinstance(engine, AsyncEngine if want_async else Engine):
        return
    if isinstance(engine, AsyncEngine):
        raise ValueError(
            "Database() was given an AsyncEngine. "
            "A sync Session cannot use an async engine. "
            "Use AsyncDatabase(engine=...) for it, or pass a sync Engine."
        )
    if isinstance(engine, Engine):
        raise ValueError(
            "AsyncDatabase() was given a sync Engine. "
            "AsyncSession needs an AsyncEngine. "
            "Use Database(engine=...) for it, or create the engine with create_async_engine()."
        )
    expected = "AsyncEngine" if want_async else "Engine"
    raise ValueError(
        f"{cls_name}() expects engine to be a sqlalchemy {expected}, not {type(engine).__name__}."
    )


def engine_kwargs(url: URL, options: Mapping[str, Any] | None, *, is_async: bool) -> dict[str, Any]:
    """Our defaults for an engine we create, with the user's options layered on top."""
    user = dict(options or {})
    kwargs: dict[str, Any] = {}
    backend = url.get_backend_name()
    if backend in _SERVER_DIALECTS_WITHOUT_PRE_PING:
        sizing = {"poolclass", "pool_size", "max_overflow", "pool_timeout"}
        if not is_async and url.database in (None, "", ":memory:") and not sizing & user.keys():
            # A sync in-memory database is per connection; requests run in many
            # threads, so share one connection or each thread sees its own empty DB.
            kwargs["poolclass"] = StaticPool
        if not is_async:
            connect_args = dict(user.pop("connect_args", None) or {})
            connect_args.setdefault("check_same_thread", False)
            kwargs["connect_args"] = connect_args
    else:
        kwargs["pool_pre_ping"] = True
    # Bound parameters can hold user data (passwords, tokens): keep them out of
    # exception messages and logs unless the user opts back in.
    kwargs["hide_parameters"] = True
    kwargs.update(user)
    return kwargs
