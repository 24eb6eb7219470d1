"""Read replicas: which server a read-only request reads from, and read-your-writes tokens.

A read-only request's session chooses its server lazily, the first time it needs a
connection (``get_bind``), so a request that never queries probes nothing. The
choice is plain sync code: it runs in the route's thread for a ``Session`` and in
SQLAlchemy's greenlet for an ``AsyncSession``, so both flavours share every line.

Replicas are taken in turn (round-robin); one that is unreachable, not in recovery
or lagging beyond ``max_lag`` is skipped for ``quarantine`` seconds. Health is
measured by one query on the replica and trusted while it still proves the bound
(lag grows by at most one second per second), and at most ``_RECHECK`` seconds.
A token (the primary's WAL position after a request that wrote) is honoured by a
replica that has replayed past it, after waiting up to ``wait`` seconds; else the
request reads from the primary.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.sql.elements import TextClause

from .exceptions import REPLICA_WRITE, ReadOnlySessionError

logger = logging.getLogger("middleware_sessions")

# Above any real LSN: a token that cannot be verified sends the read to the primary.
UNVERIFIED: Final = 1 << 64
_RECHECK: Final = 1.0  # seconds a probe result is trusted at most
_WAIT_STEP: Final = 0.002  # seconds between two looks at the replay position

_PROBE: Final = text(
    "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, "
    "CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), "
    "1e9) END::float8"
)
# At or after the end of the commit record of the transaction just committed on this
# connection, even with synchronous_commit=off (the insert position, not the flushed one).
_INSERT_LSN: Final = text("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
_ROUTE: Final = "middleware_sessions.replica_route"
_WROTE: Final = "middleware_sessions.wrote"


def lsn_text(lsn: int) -> str:
    """``23803720`` -> ``'0/16B3748'``, PostgreSQL's notation."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class _Health:
    checked: float  # time.monotonic() of the probe
    lsn: int  # replay position
    lag: float  # seconds, as the replica measures it


@dataclass(eq=False)
class Replica:
    """One replica's engine, what we last measured, and until when it is skipped."""

    engine: Engine
    name: str
    health: _Health | None = None
    skip_until: float = 0.0


class ReplicaSet:
    """The replicas of one database, and the choice of one for a read-only request."""

    def __init__(
        self,
        engines: Sequence[Engine],
        names: Sequence[str],
        *,
        max_lag: float,
        wait: float,
        quarantine: float,
    ) -> None:
        self.replicas: Final = tuple(Replica(e, n) for e, n in zip(engines, names, strict=True))
        self.max_lag: Final = max_lag
        self.wait: Final = wait
        self.quarantine: Final = quarantine
        self._turn = itertools.count()
        for replica in self.replicas:
            # A connection lost in the middle of a request: skip that replica for a while.
            event.listen(replica.engine, "handle_error", self._on_error(replica))

    def _on_error(self, replica: Replica) -> Any:
        def on_error(context: Any) -> None:
            if context.is_disconnect:
                self._skip(replica, "lost its connection")

        return on_error

    def choose(self, token: int | None) -> Replica | None:
        """A replica fit to serve a read after ``token`` (a WAL position), or ``None``.

        May probe replicas (one query each) and wait up to ``wait`` seconds for one to
        replay past the token. ``None`` means: read from the primary.
        """
        if token is not None and token >= UNVERIFIED:
            return None
        count = len(self.replicas)
        first = next(self._turn)
        behind: list[Replica] = []
        for offset in range(count):
            replica = self.replicas[(first + offset) % count]
            now = time.monotonic()
            if replica.skip_until > now:
                continue
            health = replica.health
            if health is None or not self._trusted(health, now):
                health = self._probe(replica)
                if health is None:
                    continue
            if token is None or health.lsn >= token:
                return replica
            behind.append(replica)
        # Fresh enough but not past the token yet: give the most advanced one a moment.
        if behind and self.wait > 0:
            replica = max(behind, key=lambda r: r.health.lsn if r.health else 0)
            assert token is not None
            health = self._probe(replica, until=token)
            if health is not None and health.lsn >= token:
                return replica
        return None

    def _trusted(self, health: _Health, now: float) -> bool:
        age = now - health.checked
        return age < _RECHECK and health.lag + age <= self.max_lag

    def _probe(self, replica: Replica, until: int | None = None) -> _Health | None:
        """Measure ``replica`` (after waiting for it to reach ``until``); skip it if unfit."""
        try:
            with replica.engine.connect() as conn:
                if until is not None:
                    # Wait on the server: the same code for a thread and a greenlet, and
                    # no sleeping on an event loop. Both literals are made here from numbers.
                    steps = max(1, round(self.wait / _WAIT_STEP))
                    conn.exec_driver_sql(
                        "DO $$ BEGIN FOR i IN 1.." + str(steps) + " LOOP "
                        f"EXIT WHEN pg_last_wal_replay_lsn() >= '{lsn_text(until)}'::pg_lsn; "
                        f"PERFORM pg_sleep({_WAIT_STEP}); END LOOP; END $$"
                    )
                lsn, lag = conn.execute(_PROBE).one()
        except DBAPIError:
            self._skip(replica, "is unreachable")
            return None
        if lsn is None:
            self._skip(replica, "is not in recovery (not a streaming replica)")
            return None
        if lag > self.max_lag:
            self._skip(replica, f"lags {lag:.1f}s behind (max_replica_lag={self.max_lag:g})")
            return None
        replica.health = health = _Health(time.monotonic(), int(lsn), float(lag))
        return health

    def _skip(self, replica: Replica, why: str) -> None:
        now = time.monotonic()
        if replica.skip_until <= now:
            logger.warning(
                "Replica %s %s; its reads go elsewhere for %gs.", replica.name, why, self.quarantine
            )
        replica.skip_until = now + self.quarantine
        replica.health = None


# -- Read-your-writes tokens -------------------------------------------------------------


class Tokens:
    """Signs and checks read-your-writes tokens: ``<lsn hex>.<HMAC-SHA256, 16 bytes>``.

    With no ``secret`` a random one is made per process: a token signed by another
    process cannot be checked, so its request reads from the primary (correct, just
    not offloaded). Give every worker the same secret to share tokens.
    """

    def __init__(self, cookie: str, secret: str | bytes | None) -> None:
        self.cookie: Final = cookie
        if secret is None:
            key = secrets.token_bytes(32)
        else:
            key = secret.encode() if isinstance(secret, str) else bytes(secret)
        self._key = key
        self._prefix = cookie.encode() + b"\0"

    def sign(self, lsn: int) -> str:
        """The token for ``lsn``."""
        body = f"{lsn:x}"
        return f"{body}.{self._mac(body)}"

    def read(self, value: str) -> int:
        """The LSN in a token, or ``UNVERIFIED`` if the token is malformed or not ours."""
        body, _, mac = value.partition(".")
        if len(body) > 16 or not hmac.compare_digest(mac, self._mac(body)):
            return UNVERIFIED
        try:
            return int(body, 16)
        except ValueError:
            return UNVERIFIED

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, self._prefix + body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()

    def from_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> int | None:
        """The token in an ASGI request's ``cookie`` headers, if any."""
        wanted = self.cookie.encode() + b"="
        for name, value in headers:
            if name != b"cookie" or wanted not in value:
                continue
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(wanted):
                    return self.read(part[len(wanted) :].decode("latin-1"))
        return None

    def header(self, lsn: int, max_age: int) -> tuple[bytes, bytes]:
        """The ``set-cookie`` header carrying the token for ``lsn``."""
        value = f"{self.cookie}={self.sign(lsn)}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax"
        return (b"set-cookie", value.encode("latin-1"))


# -- Sessions ----------------------------------------------------------------------------


@dataclass(eq=False)
class Route:
    """Where one read-only request's session reads from; chosen at its first connection."""

    replicas: ReplicaSet
    token: int | None
    policy: str  # how the route was marked, for error messages
    chosen: Replica | None = None
    decided: bool = False

    def engine(self) -> Engine | None:
        if not self.decided:
            self.chosen = self.replicas.choose(self.token)
            self.decided = True
        return None if self.chosen is None else self.chosen.engine


def routed_class(base: type[Session]) -> type[Session]:
    """A subclass of ``base`` whose sessions read from the replica their ``Route`` picks.

    Its sessions refuse ORM writes (a replica cannot take them, and a read-only
    request never writes, wherever it reads from).
    """

    def get_bind(self: Session, mapper: Any = None, **kw: Any) -> Any:
        route: Route | None = self.info.get(_ROUTE)
        if route is not None and kw.get("bind") is None:
            engine = route.engine()
            if engine is not None:
                return engine
        return base.get_bind(self, mapper, **kw)

    cls: type[Session] = type(base.__name__, (base,), {"get_bind": get_bind})
    event.listen(cls, "before_flush", _refuse_flush)
    event.listen(cls, "do_orm_execute", _refuse_dml)
    return cls


def bind_route(session: Session, route: Route) -> None:
    """Make ``session`` (of a ``routed_class``) read where ``route`` says."""
    session.info[_ROUTE] = route


def route_of(session: Session) -> Route | None:
    """The session's ``Route``, if it was made for a read-only request."""
    return session.info.get(_ROUTE)


def _refuse(session: Session, what: str) -> None:
    route: Route | None = session.info.get(_ROUTE)
    if route is not None:
        raise ReadOnlySessionError(REPLICA_WRITE.format(what=what, policy=route.policy))


def _refuse_flush(session: Session, _context: Any, _instances: Any) -> None:
    _refuse(session, "flush changes to objects")


def _refuse_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        _refuse(state.session, "run an INSERT, UPDATE or DELETE")


def track_writes(cls: type[Session]) -> None:
    """Mark sessions of ``cls`` that may have written, so only they read the WAL position."""
    event.listen(cls, "after_flush", _wrote_flush)
    event.listen(cls, "do_orm_execute", _wrote_statement)


def _wrote_flush(session: Session, _context: Any) -> None:
    session.info[_WROTE] = True


def _wrote_statement(state: ORMExecuteState) -> None:
    if state.is_select:
        return
    statement = state.statement
    if isinstance(statement, TextClause) and statement.text.lstrip()[:6].lower() == "select":
        return
    state.session.info[_WROTE] = True


def wrote(session: Session) -> bool:
    """Whether ``session`` flushed or executed something other than a SELECT."""
    return bool(session.info.get(_WROTE))


def insert_lsn(session: Session) -> int:
    """The primary's WAL insert position, read after the commit (sync; run it off the loop).

    Call it once the transaction has committed: the position is then at or after
    that commit's record, which is what a replica must have replayed to show it.
    """
    session.info.pop(_WROTE, None)
    lsn: int = session.execute(_INSERT_LSN).scalar_one()
    return lsn
