"""A throwaway PgBouncer in front of a throwaway PostgreSQL server.

Usage::

    with PgBouncer(postgres_server, pool_mode="transaction") as bouncer:
        engine = create_async_engine(bouncer.url("asyncpg"), ...)

PgBouncer runs in the foreground as a child process, on a free ``127.0.0.1``
port, from a temporary directory holding its ini file, its ``auth_file`` and its
log. Clients authenticate with SCRAM-SHA-256 against the ``auth_file`` (which
holds the plain passwords, so PgBouncer can log in to PostgreSQL with them too).
Like PostgreSQL, PgBouncer refuses to run as root: as root it runs as the
``postgres`` system user. It is stopped by :meth:`PgBouncer.stop`, by leaving
the ``with`` block, and, should the test process die, by the kernel
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final
from urllib.parse import quote

from .._postgres import Driver, PostgresServer

__all__ = ["PgBouncer", "find_pgbouncer", "pgbouncer_skip_reason"]

_HOST: Final = "127.0.0.1"
_RUN_AS: Final = "postgres"
_SCHEMES: Final = {
    "asyncpg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
    "psycopg_async": "postgresql+psycopg_async",
}
_PR_SET_PDEATHSIG: Final = 1


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` binary (Debian installs it in ``/usr/sbin``), or ``None``."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def pgbouncer_skip_reason() -> str | None:
    if find_pgbouncer() is None:
        return "pgbouncer not found (install Debian's pgbouncer: apt-get install pgbouncer)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Runs after the switch to the postgres user (which would clear the setting).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class PgBouncer:
    """PgBouncer for one :class:`PostgresServer`, in ``pool_mode`` (default: transaction)."""

    def __init__(
        self,
        server: PostgresServer,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 4,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.settings = {
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "max_client_conn": "500",
            "auth_type": "scram-sha-256",
            # Quiet: one line per connection would flood the log under load.
            "log_connections": "0",
            "log_disconnections": "0",
            **(settings or {}),
        }
        self.port = 0
        self.tempdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._as_root = os.geteuid() == 0

    @property
    def log_path(self) -> Path:
        assert self.tempdir is not None
        return self.tempdir / "pgbouncer.log"

    def url(self, driver: Driver, database: str | None = None) -> str:
        """SQLAlchemy URL of the application role, through PgBouncer."""
        s = self.server
        credentials = f"{quote(s.user, safe='')}:{quote(s.password, safe='')}"
        return f"{_SCHEMES[driver]}://{credentials}@{_HOST}:{self.port}/{database or s.database}"

    def start(self) -> PgBouncer:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError(pgbouncer_skip_reason())
        self.tempdir = Path(tempfile.mkdtemp(prefix="pytest-pgbouncer-"))
        try:
            for attempt in range(3):
                self.port = _free_port()
                self._write_config()
                self._launch(binary)
                if self._wait_ready():
                    return self
                self._terminate()
                if attempt == 2 or "Address already in use" not in self.log():
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log()}")
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        self._terminate()
        tempdir, self.tempdir = self.tempdir, None
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self) -> None:
        assert self.tempdir is not None
        s = self.server
        (self.tempdir / "userlist.txt").write_text(
            f'"{s.user}" "{s.password}"\n"{s.superuser}" "{s.superuser_password}"\n'
        )
        lines = [
            "[databases]",
            f"* = host={s.host} port={s.port}",
            "[pgbouncer]",
            f"listen_addr = {_HOST}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_file = {self.tempdir / 'userlist.txt'}",
            f"logfile = {self.log_path}",
            *(f"{name} = {value}" for name, value in self.settings.items()),
        ]
        (self.tempdir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        for path in (self.tempdir, *self.tempdir.iterdir()):
            path.chmod(0o700 if path.is_dir() else 0o600)
            if self._as_root:
                shutil.chown(path, _RUN_AS, _RUN_AS)

    def _launch(self, binary: str) -> None:
        assert self.tempdir is not None
        user: dict[str, int] = {}
        if self._as_root:
            entry = pwd.getpwnam(_RUN_AS)
            user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self.process = subprocess.Popen(
            [binary, "-q", str(self.tempdir / "pgbouncer.ini")],
            cwd=self.tempdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            **user,  # type: ignore[arg-type]
        )

    def _wait_ready(self, timeout: float = 15) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((_HOST, self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            # Up to 1.22, SIGTERM is an immediate shutdown (SIGINT would wait for clients).
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()
