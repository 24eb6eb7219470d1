"""Read-your-writes: the primary's WAL position after a write, carried in a signed cookie.

After a request that wrote has committed, the middleware reads the primary's WAL
insert position and sets it in a cookie; the client's later read-only requests
present it, and a replica serves them only once it has replayed that far.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import event, text
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.sql.elements import TextClause

# Above any real LSN: a token that cannot be verified sends the read to the primary.
UNVERIFIED: Final = 1 << 64
# What the cookie holds when the position could not be read: never verifies.
PRIMARY_ONLY: Final = "primary"

# At or after the end of the commit record of the transaction just committed on this
# session's connection, even with synchronous_commit=off: the insert position, not the
# flushed one (a replica receives it once the primary has flushed it). Right after a
# record that filled its page, the insert position points past the next page's header
# (24 bytes; 40 on a segment's first page), where no record ends: a replica's replay
# position would stop 24 or 40 bytes short of it until the next write. Those cases map
# back to the page boundary, where the last record did end.
_INSERT_LSN: Final = text(
    "SELECT CASE WHEN pos % seg = 40 THEN pos - 40 WHEN pos % page = 24 THEN pos - 24 "
    "ELSE pos END FROM (SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS pos, "
    "current_setting('wal_block_size')::bigint AS page, "
    "pg_size_bytes(current_setting('wal_segment_size')) AS seg) AS insert_position"
)
_WROTE: Final = "middleware_sessions.wrote"
_COOKIE_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Tokens:
    """Signs and checks read-your-writes tokens: ``<lsn hex>.<HMAC-SHA256, 16 bytes>``.

    With no ``secret`` a random one is made per process: a token signed by another
    process cannot be checked, so its request reads from the primary (correct, just
    not offloaded). Give every worker the same secret to share tokens.
    """

    def __init__(self, cookie: str, secret: str | bytes | None, max_age: int) -> None:
        if not _COOKIE_NAME.fullmatch(cookie):
            raise ValueError(
                f"replica_cookie={cookie!r} is not a valid cookie name. "
                "Cookie names are letters, digits and !#$%&'*+-.^_`|~ only. "
                "Pick a plain name such as 'db_lsn', or None to set no cookie."
            )
        self.cookie: Final = cookie
        self.max_age: Final = max_age
        key = secrets.token_bytes(32) if secret is None else secret
        self._key = key.encode() if isinstance(key, str) else bytes(key)
        self._prefix = cookie.encode() + b"\0"
        self._wanted = cookie.encode() + b"="

    def sign(self, lsn: int) -> str:
        """The token for ``lsn``."""
        body = f"{lsn:x}"
        return f"{body}.{self._mac(body)}"

    def read(self, value: str) -> int:
        """The LSN in a token, or ``UNVERIFIED`` if the token is malformed or not ours."""
        body, _, mac = value.partition(".")
        if not 0 < len(body) <= 16 or not hmac.compare_digest(mac, self._mac(body)):
            return UNVERIFIED
        try:
            return int(body, 16)
        except ValueError:
            return UNVERIFIED

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, self._prefix + body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()

    def from_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> int | None:
        """The LSN in an ASGI request's ``cookie`` headers; ``None`` without the cookie."""
        wanted = self._wanted
        for name, value in headers:
            if name != b"cookie" or wanted not in value:
                continue
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(wanted):
                    return self.read(part[len(wanted) :].decode("latin-1"))
        return None

    def header(self, value: str) -> tuple[bytes, bytes]:
        """The ``set-cookie`` header carrying ``value`` (a token, or ``PRIMARY_ONLY``)."""
        cookie = f"{self.cookie}={value}; Max-Age={self.max_age}; Path=/; HttpOnly; SameSite=Lax"
        return (b"set-cookie", cookie.encode("latin-1"))


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
    """The primary's WAL insert position, read through ``session`` (sync; run it off the loop).

    Call it once the transaction has committed: the position is then at or after
    that commit's record, which is what a replica must have replayed to show it.
    """
    session.info.pop(_WROTE, None)
    if session.in_transaction():  # left open (rolled back at the end): read it in there
        lsn: int = session.execute(_INSERT_LSN).scalar_one()
        return lsn
    # One round trip: no BEGIN and no COMMIT around the SELECT. The commit that ends
    # this autocommit transaction sends nothing and gives the connection back, so
    # work done after the response gets a real transaction again.
    connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    try:
        lsn = connection.execute(_INSERT_LSN).scalar_one()
    finally:
        session.commit()
    return lsn
