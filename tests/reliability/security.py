"""What an error response or a log line must never show: SQL, bound values, credentials."""

from __future__ import annotations

import re

import httpx

from .._postgres import PostgresServer

_server = PostgresServer()  # not started: only its default credentials are read
CREDENTIALS = (_server.password, _server.superuser_password)

# Rendered SQL, as SQLAlchemy puts it in exception messages.
SQL_TEXT = re.compile(r"\[SQL: |INSERT INTO writes|UPDATE counters|RETURNING writes")
# Values the fault app binds as parameters, and server messages that echo values.
# (Tracebacks quote source lines too: ``f"token-{key}"`` is code, not a value.)
BOUND_VALUES = re.compile(
    r"token-[A-Za-z0-9]|DETAIL:\s+Key \(|invalid input for query argument \$\d+: '"
)
# Anything that tells a client which database or driver sits behind the API.
INTERNALS = re.compile(r"Traceback|sqlalchemy|asyncpg|psycopg|postgres", re.IGNORECASE)

GENERIC_500 = "Internal Server Error"


def problems_in_text(text: str, *, sql: bool = True, values: bool = True) -> list[str]:
    problems = [f"credential {c[:3]}..." for c in CREDENTIALS if c in text]
    if sql and (match := SQL_TEXT.search(text)):
        problems.append(f"SQL text: {match.group()!r}")
    if values and (match := BOUND_VALUES.search(text)):
        problems.append(f"bound value: {match.group()!r}")
    return problems


def problems_in_body(response: httpx.Response) -> list[str]:
    """An error response: no SQL, no values, no internals; a 500 says only that."""
    text = response.text
    problems = problems_in_text(text)
    if match := INTERNALS.search(text):
        problems.append(f"internals: {match.group()!r}")
    if response.status_code == 500 and text != GENERIC_500:
        problems.append(f"500 body is not generic: {text[:80]!r}")
    return problems


def problems_in_log(log: str, *, strict: bool) -> list[str]:
    """A server log: never credentials; with ``strict``, no SQL text and no bound values either.

    Not strict is all an app gets with ``DBSessionMiddleware(redact_errors=False)``:
    SQLAlchemy's tracebacks carry the statement (parameters hidden,
    ``hide_parameters=True``), and the server's DETAIL lines echo values.
    """
    return problems_in_text(log, sql=strict, values=strict)
