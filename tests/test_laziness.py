"""A request that never touches db.session opens no session and no connection."""

from __future__ import annotations

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from middleware_sessions import AsyncDatabase

from .helpers import AnyDatabase, Client, Item, checked_out, make_app, route


def count_checkouts(db: AnyDatabase) -> list[object]:
    checkouts: list[object] = []
    engine = db.engine.sync_engine if isinstance(db, AsyncDatabase) else db.engine
    event.listen(engine.pool, "checkout", lambda *args: checkouts.append(args[0]))
    return checkouts


async def test_untouched_request_checks_out_no_connection(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    app.add_api_route("/health", lambda: {"ok": True})
    checkouts = count_checkouts(database)

    for _ in range(20):
        assert (await client(app).get("/health")).status_code == 200

    assert checkouts == []


async def test_untouched_error_request_checks_out_no_connection(
    database: AnyDatabase, client: Client
) -> None:
    app = make_app(database)
    checkouts = count_checkouts(database)

    assert (await client(app).get("/missing")).status_code == 404

    assert checkouts == []


async def test_touching_the_session_checks_out_exactly_one_connection(
    database: AnyDatabase, client: Client
) -> None:
    def read_twice(session: Session, name: str) -> int:
        session.scalars(select(Item)).all()
        session.scalars(select(Item)).all()
        return 1

    app = make_app(database)
    route(app, database, "/read", read_twice, method="GET")
    checkouts = count_checkouts(database)

    assert (await client(app).get("/read")).status_code == 200

    assert len(checkouts) == 1
    assert checked_out(database) == 0
