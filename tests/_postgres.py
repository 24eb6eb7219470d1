"""Throwaway PostgreSQL servers for tests and benchmarks.

Usage::

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer() as pg:
        engine = create_engine(pg.url("psycopg"))
        ...

Each :class:`PostgresServer` runs ``initdb`` into a fresh temporary directory,
listens on ``127.0.0.1`` on a free port (plus a unix socket inside the temporary
directory) and is tuned for speed, not durability (``fsync=off``).  The
superuser ``postgres`` and an application role (``app`` / ``app-secret-pw``,
owning database ``app``) both authenticate over TCP with SCRAM-SHA-256, so
password handling is exercised for real.

PostgreSQL refuses to run as root; when the current user is root the server
binaries are run as the ``postgres`` system user via ``runuser``.

A server is stopped and its directory removed by :meth:`PostgresServer.stop`,
by leaving the ``with`` block, by an ``atexit`` handler and, should the test
process be killed outright, by a small watchdog process that notices its
parent is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Final, Literal
from urllib.parse import quote

__all__ = [
    "BINARIES_NOT_FOUND",
    "Driver",
    "PostgresServer",
    "PostgresServerError",
    "ShutdownMode",
    "find_bindir",
    "skip_reason",
]

BINARIES_NOT_FOUND: Final = "PostgreSQL server binaries not found (install Debian's postgresql-15)"

Driver = Literal["asyncpg", "psycopg", "psycopg_async"]
ShutdownMode = Literal["smart", "fast", "immediate"]

_SCHEMES: Final[dict[str, str]] = {
    "asyncpg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
    "psycopg_async": "postgresql+psycopg_async",
}
_REQUIRED_BINARIES: Final = ("initdb", "pg_ctl", "postgres", "psql", "pg_isready")
_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_HOST: Final = "127.0.0.1"
_SUPERUSER: Final = "postgres"
_RUN_AS: Final = "postgres"  # system user that runs the server when we are root
_TIMEOUT: Final = 30  # seconds, for every step of startup and shutdown

# Speed over durability against OS crashes (the data directory is thrown away
# anyway).  synchronous_commit stays on: committed data must survive a server
# crash (``stop_server_only("immediate")``), as it would in production.
_DEFAULT_SETTINGS: Final[dict[str, str]] = {
    "listen_addresses": _HOST,
    "max_connections": "200",
    "shared_buffers": "32MB",
    "fsync": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "huge_pages": "off",
    "password_encryption": "scram-sha-256",
    "timezone": "UTC",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "unix_socket_permissions": "0700",
}

# Run with ``python -c`` next to every server.  Its stdin is a pipe from the
# test process: a byte followed by EOF means "stopped cleanly, nothing to do";
# a bare EOF means the test process died, so stop the server and clean up.
_WATCHDOG: Final = """
import json, shutil, subprocess, sys
if sys.stdin.buffer.read():
    sys.exit(0)
command, tempdir = json.loads(sys.argv[1])
try:
    subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, check=False)
finally:
    shutil.rmtree(tempdir, ignore_errors=True)
"""


class PostgresServerError(RuntimeError):
    """Starting, stopping or talking to the throwaway server failed."""


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin; prefer 15, then the newest.
    version = tuple(int(part) for part in re.findall(r"\d+", path.parent.name))
    return (version == (15,), *version)


@cache
def find_bindir() -> Path | None:
    """Directory holding ``initdb``, ``pg_ctl``, ``postgres``, ``psql`` and
    ``pg_isready``, or ``None``.

    Looks at ``$PG_BINDIR``, then ``pg_config --bindir``, then Debian's
    ``/usr/lib/postgresql/*/bin`` (version 15 first, then the newest).
    """
    candidates: list[Path] = []
    if env_bindir := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env_bindir))
    if pg_config := shutil.which("pg_config"):
        try:
            result = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            candidates.append(Path(result.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    return next((path for path in candidates if _has_binaries(path)), None)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _root_problem() -> str | None:
    if not _running_as_root():
        return None
    if shutil.which("runuser") is None:
        return "running as root but `runuser` is missing (needed to run PostgreSQL)"
    try:
        pwd.getpwnam(_RUN_AS)
    except KeyError:
        return f"running as root but there is no {_RUN_AS!r} system user"
    return None


def skip_reason() -> str | None:
    """Why a :class:`PostgresServer` cannot run here, or ``None`` if it can."""
    if find_bindir() is None:
        return BINARIES_NOT_FOUND
    return _root_problem()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_line(name: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "''")
    return f"{name} = '{escaped}'\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a postmaster that exited but was not reaped yet (zombie) is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


class PostgresServer:
    """A disposable PostgreSQL server on ``127.0.0.1``.

    The server is not started by the constructor; call :meth:`start` or use
    the instance as a context manager.
    """

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        user: str = "app",
        password: str = "app-secret-pw",
        database: str = "app",
        superuser_password: str = "postgres-secret-pw",
        settings: dict[str, str] | None = None,
    ) -> None:
        for identifier in (user, database):
            self._identifier(identifier)
        self.user: Final = user
        self.password: Final = password
        self.database: Final = database
        self.superuser: Final = _SUPERUSER
        self.superuser_password: Final = superuser_password
        self.host: Final = _HOST
        self._bindir = bindir
        self._settings = {**_DEFAULT_SETTINGS, **(settings or {})}
        # Streaming replication over the unix socket, for tests/_replica.py.
        self._replication = self._settings.get("wal_level") in ("replica", "logical")
        self._as_root = _running_as_root()
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._env["LC_ALL"] = "C"
        self._tempdir: Path | None = None
        self._port: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()

    # -- public API ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresServerError("server has not been started")
        return self._port

    @property
    def tempdir(self) -> Path:
        if self._tempdir is None:
            raise PostgresServerError("server has not been started")
        return self._tempdir

    @property
    def datadir(self) -> Path:
        return self.tempdir / "data"

    @property
    def log_path(self) -> Path:
        """The server log (stderr of the postmaster and its children)."""
        return self.tempdir / "postgres.log"

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def url(self, driver: Driver, database: str | None = None) -> str:
        """SQLAlchemy URL for the application role, e.g.
        ``postgresql+asyncpg://app:app-secret-pw@127.0.0.1:PORT/app``."""
        return self._url(driver, self.user, self.password, database or self.database)

    def superuser_url(self, driver: Driver, database: str = "postgres") -> str:
        """SQLAlchemy URL for the ``postgres`` superuser."""
        return self._url(driver, self.superuser, self.superuser_password, database)

    def dsn(self, database: str | None = None) -> str:
        """Plain libpq URL (``postgresql://...``) for the application role, for
        use with ``asyncpg.connect`` / ``psycopg.connect`` directly."""
        return self._url(None, self.user, self.password, database or self.database)

    def start(self) -> PostgresServer:
        """Create a new cluster, start it and create the application role and
        database.  Raises :class:`PostgresServerError` on failure."""
        if self._tempdir is not None:
            raise PostgresServerError("server already started")
        bindir = self._bindir or find_bindir()
        if bindir is None:
            raise PostgresServerError(BINARIES_NOT_FOUND)
        if reason := _root_problem():
            raise PostgresServerError(reason)
        self._bindir = bindir
        self._tempdir = Path(
            tempfile.mkdtemp(prefix="pytest-postgres-", dir="/tmp" if self._as_root else None)
        )
        atexit.register(self._atexit_stop)
        try:
            if self._as_root:
                shutil.chown(self._tempdir, _RUN_AS, _RUN_AS)
            self._start_watchdog()
            self._make_datadir()
            for attempt in range(3):
                self._port = _free_port()
                try:
                    self._pg_ctl_start()
                    break
                except PostgresServerError:
                    # Someone else grabbed the port between bind() and start.
                    if attempt == 2 or "could not bind" not in self._log_tail():
                        raise
            self._after_first_start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory.

        Idempotent; safe to call from ``atexit`` and after a failed start."""
        tempdir, self._tempdir = self._tempdir, None
        if tempdir is None:
            return
        self._port = None
        atexit.unregister(self._atexit_stop)
        try:
            self._shutdown("fast", datadir=tempdir / "data")
        finally:
            shutil.rmtree(tempdir, ignore_errors=True)
            self._stop_watchdog()

    def stop_server_only(self, mode: ShutdownMode = "fast") -> None:
        """Stop the server process but keep the data directory and port, so
        :meth:`start_again` can bring it back.  ``mode="immediate"`` simulates
        a crash.  Does nothing if the server is not running."""
        self._shutdown(mode, datadir=self.datadir)

    def start_again(self) -> None:
        """Start a server stopped by :meth:`stop_server_only` on the same port
        with the same data."""
        if self.running:
            raise PostgresServerError("server is already running")
        self._pg_ctl_start()

    def restart(self, mode: ShutdownMode = "fast") -> None:
        """:meth:`stop_server_only` followed by :meth:`start_again`."""
        self.stop_server_only(mode)
        self.start_again()

    def create_database(self, name: str) -> None:
        """Create a new, empty database owned by the application role."""
        self._psql(f"CREATE DATABASE {self._identifier(name)} OWNER {self._identifier(self.user)}")

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients first."""
        self._psql(f"DROP DATABASE IF EXISTS {self._identifier(name)} WITH (FORCE)")

    def terminate_connections(self, database: str | None = None) -> int:
        """Kill the backends of every client connection (of one database, if
        given), as a network failure would.  Returns how many were killed."""
        condition = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if database is not None:
            condition += f" AND datname = {self._literal(database)}"
        output = self.psql(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {condition}"
        )
        return int(output.strip())

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser; returns unaligned, tuples-only output."""
        return self._psql(sql, database=database)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._tempdir else "stopped"
        return f"<PostgresServer {state}>"

    # -- internals -------------------------------------------------------------

    def _make_datadir(self) -> None:
        """Create the data directory (a subclass may copy one instead)."""
        self._initdb()

    def _after_first_start(self) -> None:
        """Create the application role and database."""
        user = self._identifier(self.user)
        self._psql(
            f"CREATE ROLE {user} LOGIN PASSWORD {self._literal(self.password)}",
            f"CREATE DATABASE {self._identifier(self.database)} OWNER {user}",
        )

    @staticmethod
    def _identifier(name: str) -> str:
        """``name`` quoted for SQL, after checking it is a plain identifier."""
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
        return f'"{name}"'

    @staticmethod
    def _literal(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    def _url(self, driver: str | None, user: str, password: str, db: str) -> str:
        if driver is None:
            scheme = "postgresql"
        elif driver in _SCHEMES:
            scheme = _SCHEMES[driver]
        else:
            raise ValueError(f"unknown driver {driver!r}; use one of {list(_SCHEMES)}")
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{credentials}@{self.host}:{self.port}/{db}"

    def _binary(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    def _as_server_user(self, command: list[str]) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", _RUN_AS, "--", *command]
        return command

    def _run(
        self,
        command: list[str],
        *,
        timeout: float = _TIMEOUT + 15,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env={**self._env, **(env or {})},
                cwd=self._tempdir or "/",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise PostgresServerError(f"timed out after {timeout}s: {' '.join(command)}") from error

    def _check(self, what: str, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise self._error(what, result)

    def _error(self, what: str, result: subprocess.CompletedProcess[str]) -> PostgresServerError:
        output = (result.stdout + result.stderr).strip()
        return PostgresServerError(
            f"{what} failed (exit code {result.returncode}):\n{output}\n"
            f"--- last lines of the server log ---\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, PostgresServerError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _initdb(self) -> None:
        pwfile = self.tempdir / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self._as_root:
            shutil.chown(pwfile, _RUN_AS, _RUN_AS)
        pwfile.chmod(0o600)
        result = self._run(
            self._as_server_user(
                [
                    self._binary("initdb"),
                    f"--pgdata={self.datadir}",
                    f"--username={self.superuser}",
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            timeout=60,
        )
        pwfile.unlink()
        self._check("initdb", result)
        self.datadir.chmod(0o700)
        settings = {**self._settings, "unix_socket_directories": str(self.tempdir)}
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by tests/_postgres.py\n")
            conf.writelines(_conf_line(k, v) for k, v in settings.items())
        # Only what we need: the socket (trust) and 127.0.0.1 with passwords.
        hba = f"local all all trust\nhost all all {_HOST}/32 scram-sha-256\n"
        if self._replication:
            hba += "local replication all trust\n"
        (self.datadir / "pg_hba.conf").write_text(hba)

    def _pg_ctl_start(self) -> None:
        result = self._run(
            self._as_server_user(
                [
                    self._binary("pg_ctl"),
                    "start",
                    "--wait",
                    f"--timeout={_TIMEOUT}",
                    f"--pgdata={self.datadir}",
                    f"--log={self.log_path}",
                    f"--options=-p {self.port}",
                ]
            )
        )
        self._check("pg_ctl start", result)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _TIMEOUT
        command = [
            self._binary("pg_isready"),
            f"--host={self.host}",
            f"--port={self.port}",
            "--dbname=postgres",
            "--timeout=5",
        ]
        while True:
            result = self._run(command)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise self._error("waiting for the server (pg_isready)", result)
            time.sleep(0.05)

    def _postmaster_pid(self, datadir: Path | None = None) -> int | None:
        try:
            pidfile = (datadir or self.datadir) / "postmaster.pid"
            first_line = pidfile.read_text().split("\n", 1)[0]
            return int(first_line)
        except (OSError, ValueError, PostgresServerError):
            return None

    def _shutdown(self, mode: ShutdownMode, *, datadir: Path) -> None:
        pid = self._postmaster_pid(datadir)
        if pid is None or not _pid_alive(pid):
            return
        command = [
            self._binary("pg_ctl"),
            "stop",
            "--wait",
            f"--timeout={_TIMEOUT}",
            f"--mode={mode}",
            f"--pgdata={datadir}",
        ]
        try:
            stopped = self._run(self._as_server_user(command)).returncode == 0
        except PostgresServerError:  # pg_ctl itself hung
            stopped = False
        if not stopped and _pid_alive(pid):
            # Last resort; children exit on their own once the postmaster dies.
            os.kill(pid, signal.SIGKILL)

    def _start_watchdog(self) -> None:
        stop_command = self._as_server_user(
            [
                self._binary("pg_ctl"),
                "stop",
                "--mode=immediate",
                f"--pgdata={self.datadir}",
            ]
        )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, json.dumps([stop_command, str(self.tempdir)])],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self._env,
            cwd="/",
            start_new_session=True,  # survive Ctrl-C long enough to see EOF
        )

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        assert watchdog.stdin is not None
        try:
            with watchdog.stdin:  # a byte, then EOF: "stopped cleanly, just exit"
                watchdog.stdin.write(b"stopped")
            watchdog.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            watchdog.kill()
            watchdog.wait()

    def _atexit_stop(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a fork()ed child
            self.stop()

    def _psql(self, *commands: str, database: str = "postgres") -> str:
        command = [
            self._binary("psql"),
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set=ON_ERROR_STOP=1",
            f"--host={self.host}",
            f"--port={self.port}",
            f"--username={self.superuser}",
            f"--dbname={database}",
        ]
        for sql in commands:
            command += ["--command", sql]
        result = self._run(command, env={"PGPASSWORD": self.superuser_password})
        self._check("psql", result)
        return result.stdout
