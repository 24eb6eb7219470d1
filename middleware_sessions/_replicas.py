"""Read replicas: which server a read-only request reads from.

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

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import URL, Engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session
from starlette.types import Message, Receive, Scope

from ._config import check_driver, check_engine, engine_kwargs, parse_url, safe_url
from ._flavour import Flavour
from ._policy import ATTRIBUTE as POLICY_ATTRIBUTE
from ._policy import Policy
from ._tokens import UNVERIFIED, Tokens, track_writes
from .exceptions import REPLICA_WRITE, ReadOnlySessionError

logger = logging.getLogger("middleware_sessions")

DEFAULT_MAX_LAG: Final = 5.0
DEFAULT_WAIT: Final = 0.1
DEFAULT_COOKIE: Final = "db_lsn"
QUARANTINE: Final = 2.0  # seconds a replica found unfit is skipped
_RECHECK: Final = 1.0  # seconds a probe result is trusted at most
_WAIT_STEP: Final = 0.002  # seconds between two looks at the replay position

_PROBE: Final = text(
    "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, "
    "CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()), "
    "1e9) END::float8"
)
_ROUTE: Final = "middleware_sessions.replica_route"


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
                self.skip(replica, "lost its connection")

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
                measured_at = time.monotonic()  # before: the age is never underestimated
                lsn, lag = conn.execute(_PROBE).one()
        except Exception:  # refused, reset, timed out, or failing: unfit either way
            self.skip(replica, "is unreachable")
            return None
        if lsn is None:
            self.skip(replica, "is not in recovery (not a streaming replica)")
            return None
        if lag > self.max_lag:
            self.skip(replica, f"lags {lag:.1f}s behind (max_replica_lag={self.max_lag:g})")
            return None
        replica.health = health = _Health(measured_at, int(lsn), float(lag))
        return health

    def skip(self, replica: Replica, why: str) -> None:
        """Skip ``replica`` for the quarantine; say so once, not once per request."""
        now = time.monotonic()
        if replica.skip_until <= now:
            logger.warning(
                "Replica %s %s; its reads go elsewhere for %gs.", replica.name, why, self.quarantine
            )
        replica.skip_until = now + self.quarantine
        replica.health = None


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


# -- A database's replicas ---------------------------------------------------------------

REPLICA_OPTIONS: Final = frozenset(
    {
        "replicas",
        "replica_engines",
        "max_replica_lag",
        "replica_wait",
        "replica_cookie",
        "replica_secret",
    }
)


@dataclass(frozen=True)
class Replicas:
    """What a database with replicas adds to its binding."""

    set: ReplicaSet
    sessionmaker: Any  # routed sessions; their default bind is the primary
    tokens: Tokens | None
    owned_engines: tuple[Any, ...]  # engines created here, disposed at shutdown

    def session_for(self, scope: Scope, flavour: Flavour[Any]) -> Any:
        """A routed session if the request's route is read-only on replicas, else ``None``."""
        endpoint = scope.get("endpoint")
        policy: Policy | None = getattr(endpoint, POLICY_ATTRIBUTE, None)
        if policy is None or not policy.read_only or not policy.replica:
            return None
        session = self.sessionmaker(close_resets_only=False)
        tokens = self.tokens
        token = None if tokens is None else tokens.from_headers(scope.get("headers", ()))
        where = f"@transaction_policy(read_only=True) on {scope.get('method')} {scope.get('path')}"
        bind_route(flavour.sync_session(session), Route(self.set, token, where))
        return session


def build_replicas(
    flavour: Flavour[Any],
    cls_name: str,
    primary: Any,
    primary_factory: Any,
    engine_options: Mapping[str, Any] | None,
    session_options: Mapping[str, Any],
    options: Mapping[str, Any],
) -> Replicas | None:
    """Validate the replica options and build the replicas; ``None`` when there are none."""
    for name in options.keys() - REPLICA_OPTIONS:
        raise TypeError(f"{cls_name}() got an unexpected keyword argument {name!r}")
    urls = [parse_url(url, cls_name=cls_name) for url in options.get("replicas") or ()]
    given = list(options.get("replica_engines") or ())
    if not urls and not given:
        return None
    max_lag = _seconds(cls_name, "max_replica_lag", options.get("max_replica_lag", DEFAULT_MAX_LAG))
    wait = _seconds(cls_name, "replica_wait", options.get("replica_wait", DEFAULT_WAIT))
    cookie = options.get("replica_cookie", DEFAULT_COOKIE)
    tokens = None
    if cookie is not None:
        tokens = Tokens(cookie, options.get("replica_secret"), max_age=max(1, math.ceil(max_lag)))
    _check_postgres(cls_name, "the primary", getattr(primary, "sync_engine", primary).url)
    for url in urls:
        check_driver(url, want_async=flavour.is_async, cls_name=cls_name)
        _check_postgres(cls_name, "replicas=[...]", url)
    for engine in given:
        check_engine(engine, want_async=flavour.is_async, cls_name=cls_name)
        _check_postgres(cls_name, "replica_engines=[...]", engine.url)
    owned = tuple(
        flavour.create_engine(url, engine_kwargs(url, engine_options, is_async=flavour.is_async))
        for url in urls
    )
    engines = [*owned, *given]
    names = [safe_url(engine.url) for engine in engines]
    replica_set = ReplicaSet(
        [getattr(e, "sync_engine", e) for e in engines],
        names,
        max_lag=max_lag,
        wait=wait,
        quarantine=QUARANTINE,
    )
    routed_options = dict(session_options)
    if flavour.is_async:
        async_class = routed_options.get("class_", AsyncSession)
        base = routed_options.get("sync_session_class") or async_class.sync_session_class
        routed_options["sync_session_class"] = routed_class(base)
        primary_class = primary_factory.kw["sync_session_class"]
    else:
        routed_options["class_"] = routed_class(routed_options.get("class_", Session))
        primary_class = primary_factory.class_
    if tokens is not None:
        track_writes(primary_class)
    return Replicas(replica_set, flavour.sessionmaker(primary, routed_options), tokens, owned)


def _seconds(cls_name: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"{cls_name}() got {name}={value!r}. It is a number of seconds. "
            f"Pass a number >= 0, e.g. {name}=1.0."
        )
    return float(value)


def _check_postgres(cls_name: str, what: str, url: URL) -> None:
    if url.get_backend_name() != "postgresql":
        raise ValueError(
            f"{cls_name}() got read replicas, but {what} is not PostgreSQL "
            f"({url.get_backend_name()!r}). "
            "Replicas are chosen by their WAL replay position, which only PostgreSQL "
            "streaming replication gives. Use PostgreSQL URLs for the primary and replicas."
        )


def failed_replica(session: Session, exc: BaseException) -> Replica | None:
    """The replica whose lost connection made a read-only request fail, if that is what happened."""
    route = route_of(session)
    if route is None or route.chosen is None:
        return None
    if isinstance(exc, OSError):  # some drivers let a refused or reset connect through as is
        return route.chosen
    if not isinstance(exc, DBAPIError):
        return None
    # Not an error the server reported about the statement (those would repeat on the
    # primary, or must stand: a write refused by the replica): a connection that failed.
    code = getattr(exc.orig, "sqlstate", None)
    if exc.connection_invalidated or code is None or code[:2] == "08" or code[:3] == "57P":
        return route.chosen
    return None


class Replay:
    """A ``receive`` that remembers a bodiless request, so it can be run again on the primary."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._seen: list[Message] | None = []  # None once a body (or a disconnect) was read
        self._again: list[Message] = []

    async def receive(self) -> Message:
        if self._again:
            return self._again.pop(0)
        message = await self._receive()
        if self._seen is not None:
            if message["type"] == "http.request" and not message.get("body"):
                self._seen.append(message)
            else:
                self._seen = None
        return message

    def rewind(self) -> bool:
        """Start over for a second run; ``False`` if the app read a body (not replayable)."""
        if self._seen is None:
            return False
        self._again = list(self._seen)
        return True
