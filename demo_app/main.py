"""The ASGI app: ``uvicorn demo_app.main:app`` (or ``--factory demo_app.main:create_app``)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware_sessions import DBSessionMiddleware

from .database import create_tables, db
from .ledger import LedgerError
from .routes import router

logger = logging.getLogger("uvicorn.error")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    logger.info("demo_app: using %r", db)  # the repr masks any password
    await create_tables(db)
    yield
    # The middleware disposes of db's engine at shutdown.


async def ledger_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LedgerError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


class WorkerPidHeader:
    """Adds ``X-Worker-Pid`` to every response: which worker process answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.pid = str(os.getpid())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Worker-Pid", self.pid)
            await send(message)

        await self.app(scope, receive, send_with_pid)


def create_app() -> FastAPI:
    app = FastAPI(
        title="middleware_sessions demo: a ledger",
        description="Accounts and transfers in integer cents. Every 2xx is committed.",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.add_exception_handler(LedgerError, ledger_error)
    # A transfer that loses a serialization race (DATABASE_ISOLATION=serializable)
    # or a deadlock is run again, whole, before the client hears anything.
    app.add_middleware(DBSessionMiddleware, db=db, retries=10)
    app.add_middleware(WorkerPidHeader)
    return app


app = create_app()
