"""A throwaway PostgreSQL primary with a streaming replica, for the read-replica tests.

Usage::

    with Replication() as (primary, replica):
        ...                                  # both are PostgresServer objects
        replica.pause_replay()               # the replica stops applying WAL
        replica.resume_replay()
        replica.set_apply_delay(0.5)         # recovery_min_apply_delay, in seconds
        replica.stop_server_only()           # and replica.start_again()
        replica.catch_up()                   # wait until it has replayed all the primary wrote

The primary is a :class:`~tests._postgres.PostgresServer` with ``wal_level=replica``;
the replica is made with ``pg_basebackup -R`` over the primary's unix socket (a
physical replication slot keeps the WAL it still needs while it is stopped), runs
in hot standby on its own port of ``127.0.0.1`` and has the same roles and
passwords, so ``replica.url(...)`` connects as the application role.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from ._postgres import Driver, PostgresServer, PostgresServerError, find_bindir, skip_reason

__all__ = [
    "PRIMARY_SETTINGS",
    "ReplicaServer",
    "Replication",
    "lsn_to_int",
    "replication_skip_reason",
]

PRIMARY_SETTINGS: Final[dict[str, str]] = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    # Small WAL segments are enough; checkpoints stay cheap.
    "max_wal_size": "256MB",
}
_REPLICA_SETTINGS: Final[dict[str, str]] = {
    "hot_standby": "on",
    # Queries on the replica are never cancelled because the primary vacuumed
    # rows they still see.
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "100ms",
}
_TEST_CONF: Final = "replica_tests.conf"  # rewritten by set_apply_delay()
_POLL: Final = 0.01
_TIMEOUT: Final = 30.0


def replication_skip_reason() -> str | None:
    """Why a primary + replica cannot run here, or ``None`` if they can."""
    reason = skip_reason()
    if reason is not None:
        return reason
    bindir = find_bindir()
    assert bindir is not None
    if not (bindir / "pg_basebackup").exists():
        return f"pg_basebackup not found in {bindir} (needed to start a streaming replica)"
    return None


class ReplicaServer(PostgresServer):
    """A hot standby streaming from ``primary``, copied from it with ``pg_basebackup -R``."""

    def __init__(self, primary: PostgresServer, *, slot: str = "replica_1") -> None:
        super().__init__(
            primary._bindir,
            user=primary.user,
            password=primary.password,
            database=primary.database,
            superuser_password=primary.superuser_password,
            settings={**PRIMARY_SETTINGS, **_REPLICA_SETTINGS},
        )
        self.primary: Final = primary
        self.slot: Final = self._identifier(slot).strip('"')

    # -- what tests use ----------------------------------------------------------

    def pause_replay(self) -> None:
        """Stop applying WAL (it is still received); returns once replay is paused."""
        self.psql("SELECT pg_wal_replay_pause()")
        self._wait_for("paused", "SELECT pg_get_wal_replay_pause_state()", nudge=True)

    def resume_replay(self) -> None:
        """Apply WAL again."""
        self.psql("SELECT pg_wal_replay_resume()")
        self._wait_for("not paused", "SELECT pg_get_wal_replay_pause_state()")

    def set_apply_delay(self, seconds: float) -> None:
        """Delay applying each commit by ``seconds`` (``recovery_min_apply_delay``)."""
        value = f"{round(seconds * 1000)}ms"
        path = self.datadir / _TEST_CONF
        path.write_text(f"recovery_min_apply_delay = '{value}'\n")
        self._chown(path)
        self.psql("SELECT pg_reload_conf()")
        expected = "0" if seconds == 0 else value
        self._wait_for(expected, "SHOW recovery_min_apply_delay")

    def replay_lsn(self) -> int:
        """The end of the last WAL record the replica applied, as a number."""
        return lsn_to_int(self.psql("SELECT pg_last_wal_replay_lsn()").strip())

    def catch_up(self, timeout: float = _TIMEOUT) -> None:
        """Wait until the replica has applied everything the primary wrote so far."""
        # The write position: past every commit psql made (they are synchronous), and
        # never past the end of a record (the insert position can be, by a page header).
        target = lsn_to_int(self.primary.psql("SELECT pg_current_wal_lsn()").strip())
        deadline = time.monotonic() + timeout
        while self.replay_lsn() < target:
            if time.monotonic() > deadline:
                raise PostgresServerError(f"the replica did not catch up within {timeout}s")
            time.sleep(_POLL)

    # -- how it is made ------------------------------------------------------------

    def _make_datadir(self) -> None:
        result = self._run(
            self._as_server_user(
                [
                    self._binary("pg_basebackup"),
                    f"--pgdata={self.datadir}",
                    f"--host={self.primary.tempdir}",
                    f"--port={self.primary.port}",
                    f"--username={self.primary.superuser}",
                    "--write-recovery-conf",
                    "--wal-method=stream",
                    "--checkpoint=fast",
                    "--create-slot",
                    f"--slot={self.slot}",
                    "--no-sync",
                ]
            ),
            timeout=120,
        )
        self._check("pg_basebackup", result)
        self.datadir.chmod(0o700)
        settings = {**self._settings, "unix_socket_directories": str(self.tempdir)}
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by tests/_replica.py\n")
            conf.writelines(f"{k} = '{v}'\n" for k, v in settings.items())
            conf.write(f"include_if_exists = '{_TEST_CONF}'\n")

    def _after_first_start(self) -> None:
        # Roles and databases come from the primary; wait until WAL streams.
        self._wait_for("t", "SELECT pg_is_in_recovery()")
        self._wait_for(
            "t", "SELECT count(*) > 0 FROM pg_stat_wal_receiver WHERE status = 'streaming'"
        )

    def stop(self) -> None:
        super().stop()
        if self.primary.running:  # let the primary recycle the WAL the slot kept
            self.primary.psql(
                f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                f"WHERE slot_name = '{self.slot}' AND NOT active"
            )

    def _chown(self, path: Path) -> None:
        if self._as_root:
            shutil.chown(path, "postgres", "postgres")

    def _wait_for(self, expected: str, sql: str, *, nudge: bool = False) -> None:
        deadline = time.monotonic() + _TIMEOUT
        while (got := self.psql(sql).strip()) != expected:
            if time.monotonic() > deadline:
                raise PostgresServerError(f"{sql!r} gave {got!r}, expected {expected!r}")
            if nudge:
                # Recovery pauses at the next record it applies: give it one.
                self.primary.psql("SELECT pg_switch_wal()")
            time.sleep(_POLL)


class Replication:
    """A primary and one streaming replica, started together, stopped together."""

    def __init__(self) -> None:
        self.primary = PostgresServer(settings=PRIMARY_SETTINGS)
        self.replica = ReplicaServer(self.primary)
        self.database = self.primary.database  # what url() and replica_url() point at

    def url(self, driver: Driver) -> str:
        """The primary's SQLAlchemy URL for ``self.database``."""
        return self.primary.url(driver, database=self.database)

    def replica_url(self, driver: Driver) -> str:
        """The replica's SQLAlchemy URL for ``self.database``."""
        return self.replica.url(driver, database=self.database)

    def start(self) -> Replication:
        self.primary.start()
        try:
            self.replica.start()
        except BaseException:
            self.primary.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.replica.stop()
        finally:
            self.primary.stop()

    def create_database(self, name: str) -> None:
        """A new database on the primary, once the replica has it too."""
        self.primary.create_database(name)
        self.replica.catch_up()

    def __enter__(self) -> tuple[PostgresServer, ReplicaServer]:
        self.start()
        return self.primary, self.replica

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def lsn_to_int(text: str) -> int:
    """``'0/16B3748'`` -> ``23803720``."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)
