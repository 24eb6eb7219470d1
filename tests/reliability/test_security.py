"""Error responses and logs: no SQL text, no bound values, no credentials; a generic 500.

Unredacted, the tracebacks a server logs for a failed request would carry
SQLAlchemy's rendering of the statement (``[SQL: ...]``; the parameters
themselves are hidden, ``hide_parameters=True``) and PostgreSQL's and the
drivers' messages, which quote values ("Key (token)=(...) already exists",
"invalid input for query argument $1: '...'"). The middleware redacts them:
the driver's primary message, its names and the SQLSTATE stay, values go.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .._postgres import PostgresServer
from .conftest import FLAVOURS, InProcess, PgDatabase
from .faultapp import committed_keys
from .security import CREDENTIALS, problems_in_body, problems_in_log
from .uvicorn_load import fault_server

pytestmark = pytest.mark.postgres

FAILING_MODES = ["crash", "commit", "dup", "badvalue"]


async def failing_requests(client: httpx.AsyncClient) -> list[httpx.Response]:
    """One request per way of failing, plus work after the response that fails to commit."""
    responses = []
    for mode in FAILING_MODES:
        params = {"key": f"secret-{mode}", "mode": mode}
        # uvicorn closes the connection after an exception; don't race it.
        responses.append(
            await client.post("/writes", params=params, headers={"Connection": "close"})
        )
    params = {"key": "secret-late", "chunks": 2, "sleep": 0, "late": "commit"}
    responses.append(await client.get("/stream", params=params))
    return responses


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_error_responses_are_generic(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """Every failure mode answers a bare 500 "Internal Server Error", nothing more."""
    subject = in_process(flavour)
    responses = await failing_requests(subject.client)

    failed = responses[:-1]
    figures.update(requests=len(responses), statuses={"500": len(failed)})
    assert [r.status_code for r in failed] == [500] * len(FAILING_MODES)
    assert [p for r in failed for p in problems_in_body(r)] == []
    # The streamed response had started (200) before its late work failed to commit.
    assert responses[-1].status_code == 200
    assert committed_keys(pg_database.sync_url) == {"secret-late"}


async def test_a_wrong_password_appears_in_no_response_and_no_log(
    postgres_server: PostgresServer, pg_database: PgDatabase, tmp_path: Path
) -> None:
    """The database refuses the app's password: 500s, and the password is nowhere."""
    wrong = "wrong-secret-pw"
    url = pg_database.url("asyncpg").replace(postgres_server.password, wrong)
    server = fault_server(tmp_path, url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            responses = await failing_requests(client)
    finally:
        server.stop()
    log = server.log()

    assert "SQLSTATE 28P01" in log  # invalid_password: the failure did happen, and was logged
    assert wrong not in log
    assert not any(c in log for c in CREDENTIALS)
    assert {r.status_code for r in responses} == {500}
    assert all(wrong not in r.text and problems_in_body(r) == [] for r in responses)


async def test_server_log_holds_no_credentials(
    pg_database: PgDatabase, tmp_path: Path, figures: dict[str, Any]
) -> None:
    """Under uvicorn, every failure mode: the log names no password."""
    server = fault_server(tmp_path, pg_database.url("asyncpg")).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            responses = await failing_requests(client)
    finally:
        server.stop()
    log = server.log()

    strict = problems_in_log(log, strict=True)
    figures.update(requests=len(responses), log_problems_if_strict=sorted(set(strict)))
    assert problems_in_log(log, strict=False) == []
    assert "Could not commit the database work done after the response" in log


async def test_server_log_holds_no_sql_text_and_no_bound_values(
    pg_database: PgDatabase, tmp_path: Path
) -> None:
    """Under uvicorn, every failure mode: the log holds no statement and no value.

    The middleware redacts database errors that leave the app, and its own log
    lines, to the driver's primary message (names kept, values replaced) and SQLSTATE.
    """
    server = fault_server(tmp_path, pg_database.url("asyncpg")).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await failing_requests(client)
    finally:
        server.stop()
    log = server.log()

    assert problems_in_log(log, strict=True) == []
    # What went wrong is still there: the constraint, the SQLSTATE.
    assert 'violates unique constraint "writes_token_key" [SQLSTATE 23505]' in log
