"""The pytest plugin ``middleware_sessions.testing`` and ``db.override()``, as a user meets them.

Each test writes a small user project with ``pytester`` (an application module
with a model, a sync and an async FastAPI app, a ``conftest.py`` that names the
databases, test files whose routes commit) and runs pytest on it in a
subprocess, where the plugin is loaded through its ``pytest11`` entry point.
Afterwards the database is opened directly to prove that nothing was left behind.
The suites run in a shuffled order (seeded, so a failure can be replayed), and
each contains a test that fails after its route committed.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from middleware_sessions import AsyncDatabase, Database

from ._postgres import PostgresServer

pytest_plugins = ["pytester"]

# pytester drops every module first imported while its test runs, so a later test
# would import a second copy (SQLAlchemy then warns about re-registered functions).
# Import the dialects and drivers the outer tests use now, before any test runs.
for _module in (
    "sqlite3",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "psycopg",
):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)

ARGS = ("-p", "no:cacheprovider", "-W", "error", "-v")
TIMEOUT = 120

# The outer test's view of the user's table.
metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), unique=True, nullable=False),
)


def create_items_table(url: str, *rows: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        metadata.create_all(engine)
        if rows:
            with engine.begin() as connection:
                connection.execute(items.insert(), [{"name": name} for name in rows])
    finally:
        engine.dispose()


def stored_names(url: str) -> list[str]:
    """What is really in the table, read on a connection of our own."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return sorted(connection.scalars(select(items.c.name)))
    finally:
        engine.dispose()


def write_project(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


# --- The user's project ------------------------------------------------------------------

SHOP = '''
    """The application under test; the tests never change it."""
    import os

    from fastapi import BackgroundTasks, FastAPI, HTTPException
    from sqlalchemy import String, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
    from sqlalchemy.pool import NullPool

    from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware


    class Base(DeclarativeBase):
        pass


    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(100), unique=True)


    db = Database(os.environ["SHOP_SYNC_URL"])
    adb = AsyncDatabase(os.environ["SHOP_ASYNC_URL"])

    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)

    aapp = FastAPI()
    aapp.add_middleware(DBSessionMiddleware, db=adb)


    @app.post("/items", status_code=201)
    def add(name: str) -> str:
        db.session.add(Item(name=name))
        db.session.flush()
        return name


    @app.post("/items/commit", status_code=201)
    def add_and_commit(name: str) -> str:
        db.session.add(Item(name=name))
        db.session.commit()
        return name


    @app.post("/items/reject", status_code=201)
    def add_then_reject(name: str) -> str:
        db.session.add(Item(name=name))
        db.session.flush()
        raise HTTPException(409, "rejected")


    def write_later(name: str) -> None:
        db.session.add(Item(name=name))


    @app.post("/items/later", status_code=202)
    def add_later(name: str, tasks: BackgroundTasks) -> str:
        tasks.add_task(write_later, name)
        return name


    @app.get("/items")
    def names() -> list[str]:
        return sorted(db.session.scalars(select(Item.name)))


    @aapp.post("/items", status_code=201)
    async def async_add(name: str) -> str:
        adb.session.add(Item(name=name))
        await adb.session.flush()
        return name


    @aapp.post("/items/commit", status_code=201)
    async def async_add_and_commit(name: str) -> str:
        adb.session.add(Item(name=name))
        await adb.session.commit()
        return name


    @aapp.post("/items/reject", status_code=201)
    async def async_add_then_reject(name: str) -> str:
        adb.session.add(Item(name=name))
        await adb.session.flush()
        raise HTTPException(409, "rejected")


    async def async_write_later(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()


    @aapp.post("/items/later", status_code=202)
    async def async_add_later(name: str, tasks: BackgroundTasks) -> str:
        tasks.add_task(async_write_later, name)
        return name


    @aapp.get("/items")
    async def async_names() -> list[str]:
        return sorted(await adb.session.scalars(select(Item.name)))


    def committed_names() -> list[str]:
        """What another connection sees: only what was really committed."""
        engine = create_engine(os.environ["SHOP_SYNC_URL"], poolclass=NullPool)
        try:
            with engine.connect() as connection:
                return sorted(connection.scalars(select(Item.name)))
        finally:
            engine.dispose()
'''

ROOT_CONFTEST = """
    import os
    import random

    import pytest

    import shop


    @pytest.fixture
    def anyio_backend():
        # A new event loop for every test: the fixtures must cope (asyncpg's
        # pooled connections belong to the loop that opened them).
        return "asyncio"


    def pytest_collection_modifyitems(items):
        seed = os.environ.get("SHOP_SEED")
        if seed:
            random.Random(int(seed)).shuffle(items)
"""

SYNC_CONFTEST = """
    import pytest

    import shop


    @pytest.fixture
    def middleware_sessions_databases():
        return shop.db  # a single database is fine too
"""

ASYNC_CONFTEST = """
    import pytest

    import shop


    @pytest.fixture
    def middleware_sessions_databases():
        return [shop.adb]
"""

SYNC_TESTS_HEAD = """
    from fastapi.testclient import TestClient

    import shop
    from shop import Item, committed_names


    def check(client, expected):
        response = client.get("/items")
        assert response.status_code == 200
        assert response.json() == expected
        assert committed_names() == [], "something was really committed"


    def test_fails_after_writing(db_transaction):
        client = TestClient(shop.app)
        check(client, [])
        assert client.post("/items/commit", params={"name": "doomed"}).status_code == 201
        check(client, ["doomed"])
        assert False, "failing on purpose after the route committed"
"""

# How a test writes its row, committing in every way the application can.
SYNC_WRITES = {
    "middleware": """
        assert client.post("/items", params={"name": name}).status_code == 201
    """,
    "explicit_commit": """
        assert client.post("/items/commit", params={"name": name}).status_code == 201
    """,
    "background_task": """
        assert client.post("/items/later", params={"name": name}).status_code == 202
    """,
    "rejected_request": """
        assert client.post("/items", params={"name": name}).status_code == 201
        assert client.post("/items/reject", params={"name": "no"}).status_code == 409
    """,
    "session_scope": """
        with shop.db.session_scope() as session:
            session.add(Item(name=name))
    """,
    "sessionmaker": """
        with shop.db.sessionmaker() as session:
            session.add(Item(name=name))
            session.commit()
    """,
    "lifespan": """
        with TestClient(shop.app) as started:
            assert started.post("/items", params={"name": name}).status_code == 201
    """,
}

SYNC_TEST = """
    def test_LABEL(db_transaction):
        name = "LABEL"
        client = TestClient(shop.app)
        check(client, [])
        WRITE
        check(client, [name])
"""

ASYNC_TESTS_HEAD = """
    import httpx
    import pytest

    import shop
    from shop import Item, committed_names

    pytestmark = pytest.mark.anyio


    @pytest.fixture
    async def client():
        transport = httpx.ASGITransport(app=shop.aapp)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client


    async def check(client, expected):
        response = await client.get("/items")
        assert response.status_code == 200
        assert response.json() == expected
        assert committed_names() == [], "something was really committed"


    async def test_fails_after_writing(async_db_transaction, client):
        await check(client, [])
        response = await client.post("/items/commit", params={"name": "doomed"})
        assert response.status_code == 201
        await check(client, ["doomed"])
        assert False, "failing on purpose after the route committed"
"""

ASYNC_WRITES = {
    "middleware": """
        assert (await client.post("/items", params={"name": name})).status_code == 201
    """,
    "explicit_commit": """
        assert (await client.post("/items/commit", params={"name": name})).status_code == 201
    """,
    "background_task": """
        assert (await client.post("/items/later", params={"name": name})).status_code == 202
    """,
    "rejected_request": """
        assert (await client.post("/items", params={"name": name})).status_code == 201
        assert (await client.post("/items/reject", params={"name": "no"})).status_code == 409
    """,
    "session_scope": """
        async with shop.adb.session_scope() as session:
            session.add(Item(name=name))
    """,
    "sessionmaker": """
        async with shop.adb.sessionmaker() as session:
            session.add(Item(name=name))
            await session.commit()
    """,
}

ASYNC_TEST = """
    async def test_LABEL(async_db_transaction, client):
        name = "LABEL"
        await check(client, [])
        WRITE
        await check(client, [name])
"""

COPIES = 2  # each way of writing runs twice, so a leftover row would show up


def generated_tests(head: str, template: str, writes: dict[str, str]) -> tuple[str, list[str]]:
    """A test module, and its test names in file order (the failing test first)."""
    parts, names = [textwrap.dedent(head)], ["test_fails_after_writing"]
    for copy in range(COPIES):
        for kind, write in writes.items():
            label = f"{kind}_{copy}"
            body = textwrap.indent(textwrap.dedent(write).strip(), "    ").lstrip()
            test = textwrap.dedent(template).replace("LABEL", label).replace("WRITE", body)
            parts.append(test)
            names.append(f"test_{label}")
    return "\n\n".join(parts), names


def write_shop(root: Path) -> list[str]:
    """Write the user's project; return its tests' node ids in file order."""
    sync_tests, sync_names = generated_tests(SYNC_TESTS_HEAD, SYNC_TEST, SYNC_WRITES)
    async_tests, async_names = generated_tests(ASYNC_TESTS_HEAD, ASYNC_TEST, ASYNC_WRITES)
    write_project(
        root,
        {
            "shop.py": SHOP,
            "conftest.py": ROOT_CONFTEST,
            "aio/conftest.py": ASYNC_CONFTEST,
            "aio/test_async_shop.py": async_tests,
            "sync/conftest.py": SYNC_CONFTEST,
            "sync/test_sync_shop.py": sync_tests,
        },
    )
    return [f"aio/test_async_shop.py::{name}" for name in async_names] + [
        f"sync/test_sync_shop.py::{name}" for name in sync_names
    ]


def run_shop(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Run the user's suite in a shuffled order; check the outcome."""
    file_order = write_shop(pytester.path)
    monkeypatch.setenv("SHOP_SEED", str(seed))
    result = pytester.runpytest_subprocess(*ARGS, timeout=TIMEOUT)

    # Only the two tests that fail on purpose fail, with their own assertion; every
    # other test found the table empty, and no teardown failed.
    result.assert_outcomes(passed=len(file_order) - 2, failed=2)
    failures = re.findall(r"^FAILED (\S+)", result.stdout.str(), re.M)
    assert sorted(failures) == [
        "aio/test_async_shop.py::test_fails_after_writing",
        "sync/test_sync_shop.py::test_fails_after_writing",
    ]
    assert result.stdout.str().count("E       AssertionError: failing on purpose") == 2

    order = re.findall(r"^(\S+::test_\w+) (?:PASSED|FAILED)", result.stdout.str(), re.M)
    assert sorted(order) == sorted(file_order)
    assert order != file_order, "the seed did not shuffle the tests"
    # Some test ran after each failing one, and found the table empty.
    assert order[-1] not in failures


@pytest.mark.parametrize("seed", [1, 2])
def test_sqlite_tests_leave_nothing_behind(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    url = f"sqlite:///{pytester.path / 'shop.db'}"
    create_items_table(url)
    monkeypatch.setenv("SHOP_SYNC_URL", url)
    monkeypatch.setenv("SHOP_ASYNC_URL", url.replace("sqlite", "sqlite+aiosqlite", 1))

    run_shop(pytester, monkeypatch, seed)

    assert stored_names(url) == []


@pytest.mark.postgres
@pytest.mark.xfail(
    strict=False,
    reason=(
        "Open defect (2026-12-02): in fresh-clone CI runs, two psycopg connections of the "
        "user's sync Database are garbage-collected while open during the async half of "
        "the shuffled suite (ResourceWarning under -W error); cause not found yet"
    ),
)
def test_postgres_tests_leave_nothing_behind(
    postgres_server: PostgresServer, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"plugin_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    url = postgres_server.url("psycopg", database=name)
    create_items_table(url)
    monkeypatch.setenv("SHOP_SYNC_URL", url)
    monkeypatch.setenv("SHOP_ASYNC_URL", postgres_server.url("asyncpg", database=name))

    run_shop(pytester, monkeypatch, seed=3)

    assert stored_names(url) == []


# --- Without middleware_sessions_databases ------------------------------------------------

MISSING_FIXTURE = """
    import pytest


    def test_sync(db_transaction):
        pass


    @pytest.mark.anyio
    async def test_async(async_db_transaction):
        pass
"""

WRONG_KIND = """
    import pytest

    from middleware_sessions import AsyncDatabase


    @pytest.fixture
    def middleware_sessions_databases():
        return [AsyncDatabase("sqlite+aiosqlite:///never-opened.db")]


    def test_async_database_in_the_sync_fixture(db_transaction):
        pass
"""


def test_missing_or_wrong_databases_fixture_says_what_to_do(pytester: pytest.Pytester) -> None:
    write_project(
        pytester.path,
        {"test_missing.py": MISSING_FIXTURE, "test_wrong_kind.py": WRONG_KIND},
    )

    result = pytester.runpytest_inprocess(*ARGS)

    result.assert_outcomes(errors=3)
    errors = re.findall(r"^E +pytest\.UsageError: (.*)$", result.stdout.str(), re.M)
    assert len(errors) == 3
    missing = [e for e in errors if "Define a fixture named 'middleware_sessions_databases'" in e]
    assert len(missing) == 2  # for db_transaction and for async_db_transaction
    assert "Use the async_db_transaction fixture instead" in (set(errors) - set(missing)).pop()


# --- db.override() -----------------------------------------------------------------------

OVERRIDE_CONFTEST = '''
    import os

    import pytest

    import shop


    @pytest.fixture(scope="session")
    def anyio_backend():
        return "asyncio"


    @pytest.fixture(scope="session", autouse=True)
    async def test_databases(anyio_backend):
        """The app's databases point at the test databases for the whole session."""
        real_sync, real_async = shop.db.engine, shop.adb.engine
        with shop.db.override(os.environ["SHOP_SYNC_TEST_URL"]):
            async with shop.adb.override(url=os.environ["SHOP_ASYNC_TEST_URL"]):
                test_sync, test_async = shop.db.engine, shop.adb.engine
                yield
        # The real databases are back, and the engines made for the tests were disposed.
        assert shop.db.engine is real_sync
        assert shop.db.sessionmaker.kw["bind"] is real_sync
        assert shop.adb.engine is real_async
        assert shop.adb.sessionmaker.kw["bind"] is real_async
        assert test_sync.pool.checkedin() == 0
        assert test_async.sync_engine.pool.checkedin() == 0
'''

OVERRIDE_DATABASES = """
    import pytest

    import shop


    @pytest.fixture
    def middleware_sessions_databases():
        return [shop.db, shop.adb]  # async_db_transaction takes both kinds
"""

OVERRIDE_TESTS = """
    import httpx
    import pytest
    from fastapi.testclient import TestClient

    import shop


    @pytest.fixture
    async def aclient():
        transport = httpx.ASGITransport(app=shop.aapp)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client


    def sync_names():
        return TestClient(shop.app).get("/items").json()


    async def async_names(aclient):
        return (await aclient.get("/items")).json()


    def test_the_app_points_at_the_test_databases():
        assert shop.db.engine.url.database.endswith("sync-test.db")
        assert shop.adb.engine.url.database.endswith("async-test.db")


    @pytest.mark.anyio
    async def test_requests_commit_into_the_test_databases(aclient):
        assert TestClient(shop.app).post("/items", params={"name": "kept"}).status_code == 201
        assert (await aclient.post("/items", params={"name": "kept"})).status_code == 201
        assert sync_names() == ["kept"]
        assert await async_names(aclient) == ["kept"]


    @pytest.mark.anyio
    async def test_isolated_inside_the_override(async_db_transaction, aclient):
        assert TestClient(shop.app).post("/items", params={"name": "temp"}).status_code == 201
        assert (await aclient.post("/items/commit", params={"name": "temp"})).status_code == 201
        assert sync_names() == ["kept", "temp"]
        assert await async_names(aclient) == ["kept", "temp"]


    @pytest.mark.anyio
    async def test_the_isolated_rows_are_gone(aclient):
        assert sync_names() == ["kept"]
        assert await async_names(aclient) == ["kept"]
"""


def test_override_points_the_app_at_test_databases_for_the_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pytester.path / "real.db"
    urls = {name: f"sqlite:///{pytester.path / name}" for name in ("sync-test.db", "async-test.db")}
    create_items_table(f"sqlite:///{real}", "real-row")
    for url in urls.values():
        create_items_table(url)
    real_bytes = real.read_bytes()
    monkeypatch.setenv("SHOP_SYNC_URL", f"sqlite:///{real}")
    monkeypatch.setenv("SHOP_ASYNC_URL", f"sqlite+aiosqlite:///{real}")
    monkeypatch.setenv("SHOP_SYNC_TEST_URL", urls["sync-test.db"])
    monkeypatch.setenv(
        "SHOP_ASYNC_TEST_URL", urls["async-test.db"].replace("sqlite", "sqlite+aiosqlite", 1)
    )
    write_project(
        pytester.path,
        {
            "shop.py": SHOP,
            "conftest.py": OVERRIDE_CONFTEST,
            "tests/conftest.py": OVERRIDE_DATABASES,
            "tests/test_override.py": OVERRIDE_TESTS,
        },
    )

    result = pytester.runpytest_subprocess(*ARGS, timeout=TIMEOUT)

    result.assert_outcomes(passed=4)
    # The requests wrote into the test databases, and only what they kept.
    assert stored_names(urls["sync-test.db"]) == ["kept"]
    assert stored_names(urls["async-test.db"]) == ["kept"]
    # The application's own database was never written to.
    assert real.read_bytes() == real_bytes
    assert stored_names(f"sqlite:///{real}") == ["real-row"]


async def test_override_needs_a_target_and_the_right_kind_of_with(tmp_path: Path) -> None:
    sync_url = f"sqlite:///{tmp_path / 'sync.db'}"
    async_url = f"sqlite+aiosqlite:///{tmp_path / 'async.db'}"
    db, adb = Database(sync_url), AsyncDatabase(async_url)
    real_sync, real_async = db.engine, adb.engine

    for database in (db, adb):
        with pytest.raises(ValueError, match=r"override\(\) needs url=\.\.\. or engine=\.\.\."):
            database.override()

    # An engine created for the override has to be disposed with await.
    type_error = r"Use 'async with db\.override\(url\)' for an AsyncDatabase"
    with pytest.raises(TypeError, match=type_error), adb.override(url=async_url):
        pass
    assert adb.engine is real_async

    # An engine of the caller's own needs no await: plain 'with' is fine.
    other = create_async_engine(async_url)
    with adb.override(engine=other):
        assert adb.engine is other
        assert adb.sessionmaker.kw["bind"] is other
    assert adb.engine is real_async
    assert adb.sessionmaker.kw["bind"] is real_async
    await other.dispose()

    override = db.override(url=f"sqlite:///{tmp_path / 'other.db'}")
    with override:
        assert db.engine is not real_sync
        with pytest.raises(RuntimeError, match="already active"), override:
            pass
    assert db.engine is real_sync


# --- A whole suite inside one outer transaction ---------------------------------------------

WIDE_SYNC_CONFTEST = """
    import pytest
    from fastapi.testclient import TestClient

    import shop
    from middleware_sessions.testing import outer_transaction


    @pytest.fixture(scope="session", autouse=True)
    def whole_session():
        with outer_transaction(shop.db):
            yield


    @pytest.fixture(scope="session")
    def seeded():
        # Like an app's init_db(): a helper that commits, run once for the session.
        with shop.db.session_scope() as session:
            session.add(shop.Item(name="seed"))


    @pytest.fixture(scope="module")
    def client():
        with TestClient(shop.app) as client:
            yield client


    @pytest.fixture
    def middleware_sessions_databases():
        return [shop.db]
"""

WIDE_SYNC_TESTS = """
    import shop


    def test_sees_the_session_wide_data(seeded, client):
        assert client.get("/items").json() == ["seed"]


    def test_writes_a_row(client):
        assert client.post("/items/commit", params={"name": "kept"}).status_code == 201


    def test_sees_the_row_an_earlier_test_wrote(client):
        assert client.get("/items").json() == ["kept", "seed"]


    def test_isolated_inside(db_transaction, client):
        assert client.post("/items/commit", params={"name": "isolated"}).status_code == 201
        assert client.get("/items").json() == ["isolated", "kept", "seed"]


    def test_the_isolated_row_is_gone_and_nothing_was_committed(client):
        assert client.get("/items").json() == ["kept", "seed"]
        assert shop.committed_names() == []
"""

WIDE_ASYNC_CONFTEST = """
    import httpx
    import pytest

    import shop
    from middleware_sessions.testing import async_outer_transaction


    @pytest.fixture(scope="session")
    def anyio_backend():
        return "asyncio"


    @pytest.fixture(scope="session", autouse=True)
    async def whole_session(anyio_backend):
        async with async_outer_transaction(shop.adb):
            yield


    @pytest.fixture(scope="session")
    async def seeded(whole_session):
        async with shop.adb.session_scope() as session:
            session.add(shop.Item(name="seed"))


    @pytest.fixture(scope="session")
    async def client(whole_session):
        transport = httpx.ASGITransport(app=shop.aapp)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


    @pytest.fixture
    def middleware_sessions_databases():
        return [shop.adb]
"""

WIDE_ASYNC_TESTS = """
    import pytest

    import shop

    pytestmark = pytest.mark.anyio


    async def test_sees_the_session_wide_data(seeded, client):
        assert (await client.get("/items")).json() == ["seed"]


    async def test_writes_a_row(client):
        assert (await client.post("/items/commit", params={"name": "kept"})).status_code == 201


    async def test_sees_the_row_an_earlier_test_wrote(client):
        assert (await client.get("/items")).json() == ["kept", "seed"]


    async def test_isolated_inside(async_db_transaction, client):
        response = await client.post("/items/commit", params={"name": "isolated"})
        assert response.status_code == 201
        assert (await client.get("/items")).json() == ["isolated", "kept", "seed"]


    async def test_the_isolated_row_is_gone_and_nothing_was_committed(client):
        assert (await client.get("/items")).json() == ["kept", "seed"]
        assert shop.committed_names() == []
"""


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_suite_with_session_wide_fixtures_runs_inside_one_outer_transaction(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{pytester.path / 'shop.db'}"
        async_url = url.replace("sqlite", "sqlite+aiosqlite", 1)
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        name = f"wide_{uuid.uuid4().hex[:12]}"
        server.create_database(name)
        url = server.url("psycopg", database=name)
        async_url = server.url("asyncpg", database=name)
    create_items_table(url)
    monkeypatch.setenv("SHOP_SYNC_URL", url)
    monkeypatch.setenv("SHOP_ASYNC_URL", async_url)
    write_project(
        pytester.path,
        {
            "shop.py": SHOP,
            "sync/conftest.py": WIDE_SYNC_CONFTEST,
            "sync/test_wide.py": WIDE_SYNC_TESTS,
            "aio/conftest.py": WIDE_ASYNC_CONFTEST,
            "aio/test_wide_async.py": WIDE_ASYNC_TESTS,
        },
    )

    for folder in ("sync", "aio"):
        result = pytester.runpytest_subprocess(folder, *ARGS, timeout=TIMEOUT)
        result.assert_outcomes(passed=5)

    assert stored_names(url) == []
