"""Fixtures that run ``demo_app`` under a real uvicorn, on SQLite and on PostgreSQL.

Each test gets an empty database and a server on a free loopback port, started
as ``python -m demo_app`` in its own process group and always stopped (the whole
group, workers included) when the test ends, whether it passed or not.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from .._postgres import PostgresServer

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
_database_names = (f"demo{n}" for n in itertools.count())


@dataclass(frozen=True)
class LedgerDatabase:
    """One empty database: ``url`` for the server, ``sync_url`` for looking inside."""

    backend: str
    url: str
    sync_url: str

    def query(self, sql: str) -> list[Any]:
        """Rows of ``sql``, read straight from the database."""
        with self._connect() as conn:
            return list(conn.execute(sa.text(sql)).all())

    def insert(self, sql: str, rows: list[dict[str, Any]]) -> None:
        """Run ``sql`` once per row, in one committed transaction."""
        with self._connect() as conn, conn.begin():
            conn.execute(sa.text(sql), rows)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sa.Connection]:
        engine = sa.create_engine(self.sync_url)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()


BACKENDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


def _make_database(request: pytest.FixtureRequest, directory: Path) -> LedgerDatabase:
    """An empty database: an SQLite file in ``directory``, or one on the test server."""
    if request.param == "sqlite":
        path = directory / "ledger.db"
        return LedgerDatabase("sqlite", f"sqlite+aiosqlite:///{path}", f"sqlite:///{path}")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = next(_database_names)
    server.create_database(name)
    request.addfinalizer(lambda: server.drop_database(name))
    return LedgerDatabase(
        "postgres", server.url("asyncpg", database=name), server.url("psycopg", database=name)
    )


@pytest.fixture(params=BACKENDS)
def ledger_db(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerDatabase:
    """An empty database, on SQLite and on PostgreSQL."""
    return _make_database(request, tmp_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PortTaken(Exception):
    pass


class DemoServer:
    """``python -m demo_app`` in a subprocess (its own process group), on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        database_url: str | None,
        *,
        workers: int = 1,
        command: Sequence[str] = ("-m", "demo_app"),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.extra_env = dict(env or {})  # e.g. DATABASE_REPLICA_URLS
        self.database_url = database_url
        self.workers = workers
        self.command = command
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def start(self) -> DemoServer:
        """Start on a free port and wait until ``/health`` answers."""
        assert self.process is None, "already running"
        for attempt in range(3):
            try:
                self._launch()
                return self
            except PortTaken:
                # Another process took the free port before the server bound it.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        port = _free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if self.database_url is not None:
            env["DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        command = [sys.executable, *self.command, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", str(self.workers)]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group: kill the workers with it
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            if b"address already in use" in self.log_path.read_bytes()[log_start:]:
                with self.log_path.open("r+b") as log:
                    log.truncate(log_start)  # not an error of the app's
                raise PortTaken from None
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"demo_app exited at startup:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"demo_app did not answer within {STARTUP_TIMEOUT}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the server and its workers: a crash, no shutdown of any kind."""
        self._stop(graceful=False)

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), then SIGKILL for whatever is left."""
        self._stop(graceful=True)

    def _stop(self, *, graceful: bool) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if graceful and process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=15)
        finally:
            # The group id is the pid of the process we started; this also reaps
            # workers orphaned by a killed supervisor.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def assert_no_errors_logged(self) -> None:
        """No 500, no failed background commit: nothing went wrong behind a status."""
        log = self.log()
        assert "Traceback" not in log, log
        assert "ERROR" not in log, log

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=30, **kwargs)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., DemoServer]]:
    """Start demo servers; every one is stopped when the test ends."""
    servers: list[DemoServer] = []

    def start(database_url: str | None, **options: Any) -> DemoServer:
        server = DemoServer(tmp_path, database_url, **options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        server.assert_no_errors_logged()


@pytest.fixture(scope="module", params=BACKENDS)
def shared_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> LedgerDatabase:
    """An empty database per backend for a whole module."""
    return _make_database(request, tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def server(
    shared_db: LedgerDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DemoServer]:
    """One server per backend for a whole module: its tests must not assume an empty ledger."""
    server = DemoServer(tmp_path_factory.mktemp("server"), shared_db.url)
    try:
        yield server.start()
    finally:
        server.stop()
    server.assert_no_errors_logged()
