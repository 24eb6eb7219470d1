"""Database errors that leave the app: what went wrong, without the data.

A driver's message says what went wrong and often quotes the data as well:
PostgreSQL's ``DETAIL`` line repeats the row ("Key (email)=(...) already
exists"), data exceptions quote the input ("invalid input syntax for type
integer: "..."") and SQLAlchemy appends the statement. What a log gets instead
is built from the driver's structured fields: the primary message, the SQLSTATE
(or SQLite's error name) and the schema names the server reported. Inside the
message a quoted string stays only when it is known to be a name; anything else
becomes a placeholder.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.exc import DBAPIError, StatementError

PLACEHOLDER = "\u2026"  # an ellipsis, where a value was

# SQLSTATE classes whose messages quote names (of relations, columns, constraints,
# roles, databases) and never values: 08 connection, 23 integrity constraint,
# 28 authorization, 3D catalog, 3F schema, 42 syntax or access rule (but see
# 42601), 55 object state. Class 22 (data exception) quotes the input itself.
_NAMES_ONLY_CLASSES = frozenset({"08", "23", "28", "3D", "3F", "42", "55"})
# "syntax error at or near "<token>"": the token is a piece of the statement.
_SYNTAX_ERROR = "42601"

_QUOTE = re.compile("[\"']")
# A string as repr() writes it: quotes inside are escaped.
_PYTHON_STRING = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
# A keyword or identifier, as opposed to a string or number literal.
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_ARGUMENT = re.compile(
    r"invalid input for query argument (\$\d+(?: in element #\d+ of executemany\(\) sequence)?):"
)
_DONE = "_middleware_sessions_redacted"
_DIAG_NAMES = ("schema_name", "table_name", "column_name", "constraint_name", "datatype_name")
_ASYNCPG_NAMES = ("schema_name", "table_name", "column_name", "constraint_name", "data_type_name")


def redact(exc: BaseException) -> BaseException:
    """Cut SQL text, parameters and quoted values out of database errors, in place.

    Every SQLAlchemy ``StatementError`` in ``exc``'s chain (``__cause__``,
    ``__context__``, exception groups) keeps its type, ``orig`` and the driver's
    primary message with its names and SQLSTATE; the statement, the parameters,
    the driver's ``DETAIL``/``HINT`` lines and quoted values go. The driver's
    own exception stays reachable as ``exc.orig`` but leaves the printed chain.
    """
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StatementError):
            _redact_statement_error(current)
        pending.extend(_linked(current))
    return exc


def _linked(exc: BaseException) -> Iterator[BaseException]:
    if exc.__cause__ is not None:
        yield exc.__cause__
    if exc.__context__ is not None:
        yield exc.__context__
    # Exception groups (task groups), without needing Python 3.11's class.
    grouped = getattr(exc, "exceptions", None)
    if isinstance(grouped, (tuple, list)):
        yield from (e for e in grouped if isinstance(e, BaseException))


def _redact_statement_error(exc: StatementError) -> None:
    if getattr(exc, _DONE, False):
        return  # describe() reads the statement, which is gone now
    setattr(exc, _DONE, True)
    orig = exc.orig
    exc.args = (describe(exc),)
    exc.statement = None
    exc.params = None
    if orig is None:
        return
    # The driver's exceptions print their whole message (DETAIL lines, the
    # statement's LINE); take them out of the chain, keep what they were raised in.
    inner = _driver_chain(orig)
    if any(exc.__cause__ is e for e in inner):
        exc.__cause__ = None
    if any(exc.__context__ is e for e in inner):
        # A Python error from SQLAlchemy's own processing was raised while handling
        # its internals (a KeyError holding the value): nothing of it is worth a log.
        exc.__context__ = _handled_before(inner) if isinstance(exc, DBAPIError) else None
        exc.__suppress_context__ = exc.__cause__ is not None


def _handled_before(inner: list[BaseException]) -> BaseException | None:
    """The exception the app was handling when the driver failed, if any."""
    internal = {type(e).__module__.split(".")[0] for e in inner} - {"sqlalchemy", "builtins"}
    outer = inner[-1].__context__
    while outer is not None and (
        any(outer is e for e in inner)
        or (
            type(outer).__module__.split(".")[0] in internal
            and not isinstance(outer, StatementError)
        )
    ):
        outer = outer.__context__
    return outer


def describe(exc: StatementError) -> str:
    """``(driver.ErrorClass) primary message [SQLSTATE xxxxx]``, with values replaced."""
    orig = exc.orig
    if orig is None:
        return _scrub(
            _first_line(str(exc.args[0]) if exc.args else ""), _keep_type_names, escaped=True
        )
    driver = _driver_chain(orig)[-1]
    sqlstate = _sqlstate(orig, driver)
    # The driver's own class: asyncpg's "UniqueViolationError" says more than
    # the adapter's "IntegrityError" that SQLAlchemy wraps around it.
    label = f"{type(driver).__module__}.{type(driver).__name__}"
    if sqlstate:
        code = f" [SQLSTATE {sqlstate}]"
    elif errorname := getattr(orig, "sqlite_errorname", None):
        code = f" [{errorname}]"
    else:
        code = ""
    return f"({label}) {_message(exc, orig, driver, sqlstate)}{code}"


def _message(exc: StatementError, orig: BaseException, driver: BaseException, sqlstate: str) -> str:
    names = _names(driver)
    primary = _primary(driver)
    if primary is None:
        text = str(driver)
        if (match := _ARGUMENT.match(text)) and driver.__cause__ is not None:
            # asyncpg, before sending: "...argument $1: <repr of the value> (<why>)".
            why = _scrub(_first_line(str(driver.__cause__)), _keep_type_names, escaped=True)
            return f"invalid input for query argument {match.group(1)}: {PLACEHOLDER} ({why})"
        connecting = exc.statement is None and type(orig).__module__ != "sqlite3"
        if isinstance(exc, DBAPIError) and connecting and not sqlstate:
            # No statement ran: connecting (or the connection) failed. The client
            # library reports hosts, ports, users and databases, never data.
            return text
        primary = _first_line(text)
    if sqlstate[:2] in _NAMES_ONLY_CLASSES and sqlstate != _SYNTAX_ERROR:
        return primary
    statement_tokens = sqlstate == _SYNTAX_ERROR or not sqlstate
    if isinstance(exc, DBAPIError) and statement_tokens:
        # Pieces of the statement (SQLite's 'near "...": syntax error') or type names
        # in a client library's complaint: a keyword or identifier stays, a literal goes.
        return _scrub(primary, lambda quoted: quoted in names or _is_word(quoted))
    # Python's own errors (SQLAlchemy's type processing) quote with repr().
    python = not isinstance(exc, DBAPIError)
    keep = lambda quoted: quoted in names or _keep_type_names(quoted)  # noqa: E731
    return _scrub(primary, keep, escaped=python)


def _scrub(text: str, keep: Callable[[str], bool], *, escaped: bool = False) -> str:
    """Replace each quoted string that ``keep`` rejects with a quoted placeholder.

    Python's messages quote with ``repr()`` (``escaped``), where a quote inside a
    string is escaped, so each string ends where it says. A database server quotes
    without escaping: a rejected value may itself hold quotes, so the cut runs to
    the last quote of its kind, losing more than needed rather than part of a value.
    An unpaired quote opens a value that runs to the end.
    """
    parts = []
    pos = 0
    while (match := _QUOTE.search(text, pos)) is not None:
        quote, start = match.group(), match.start()
        if escaped:
            literal = _PYTHON_STRING.match(text, start)
            end = literal.end() - 1 if literal else -1
        else:
            end = text.find(quote, start + 1)
        if end == -1:
            parts.append(f"{text[pos:start]}{quote}{PLACEHOLDER}")
            pos = len(text)
            break
        if keep(text[start + 1 : end]):
            parts.append(text[pos : end + 1])
            pos = end + 1
        else:
            parts.append(f"{text[pos:start]}{quote}{PLACEHOLDER}{quote}")
            pos = end + 1 if escaped else text.rfind(quote) + 1
    parts.append(text[pos:])
    return "".join(parts)


def _is_word(quoted: str) -> bool:
    return _WORD.fullmatch(quoted) is not None


def _keep_type_names(quoted: str) -> bool:
    """Python's type names ("'str' object cannot be interpreted as an integer")."""
    return isinstance(getattr(builtins, quoted, None), type)


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def _driver_chain(orig: BaseException) -> list[BaseException]:
    """``orig``, then the driver's own exception when SQLAlchemy's adapter wraps it (asyncpg)."""
    chain = [orig]
    if type(orig).__module__.startswith("sqlalchemy."):
        wrapped = getattr(orig, "orig", None) or orig.__cause__
        if isinstance(wrapped, BaseException):
            chain.append(wrapped)
    return chain


def _sqlstate(orig: BaseException, driver: BaseException) -> str:
    for source in (driver, orig):
        state = getattr(source, "sqlstate", None) or getattr(source, "pgcode", None)
        if isinstance(state, str) and state:
            return state
    return ""


def _primary(driver: BaseException) -> str | None:
    """The server's primary message, without DETAIL, HINT, CONTEXT or the statement."""
    diag: Any = getattr(driver, "diag", None)  # psycopg
    if diag is not None:
        primary = getattr(diag, "message_primary", None)
    elif type(driver).__module__.startswith("asyncpg"):
        primary = getattr(driver, "message", None)
    else:
        return None
    return primary if isinstance(primary, str) and primary else None


def _names(driver: BaseException) -> frozenset[str]:
    """The schema names the server attached to the error (psycopg's diag, asyncpg's fields)."""
    diag: Any = getattr(driver, "diag", None)
    source, fields = (diag, _DIAG_NAMES) if diag is not None else (driver, _ASYNCPG_NAMES)
    values = (getattr(source, field, None) for field in fields)
    return frozenset(value for value in values if isinstance(value, str) and value)
