"""``DBSessionMiddleware``: one lazily created session per HTTP request."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._context import Holder
from ._database import AsyncDatabase, Database
from ._diagnostics import describe_discarded, is_concurrent_use, redact
from ._hooks import run_async as run_hooks
from ._hooks import take_ready
from ._policy import ATTRIBUTE as POLICY_ATTRIBUTE
from ._policy import Policy
from .exceptions import CONCURRENT_USE, INSTALLED_TWICE, ConcurrentSessionError

logger = logging.getLogger("middleware_sessions")


def commit_below_400(status: int) -> bool:
    """The default ``commit_on`` policy: commit for 1xx, 2xx and 3xx responses."""
    return status < 400


# Up to about 3 s in all, then the last attempt's error is logged.
_BUSY_RETRY_DELAYS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5)


async def _nothing() -> None:
    return None


def _wraps_twin(app: object, db: object) -> bool:
    """Whether a DBSessionMiddleware for ``db`` sits inside ``app``'s middleware chain."""
    for _ in range(100):
        if isinstance(app, DBSessionMiddleware) and app.db is db:
            return True
        app = getattr(app, "app", None)
        if app is None:
            return False
    return False


class _CommitFailed(BaseException):
    """Carries a failed commit out of the app, past handlers that catch ``Exception``.

    Starlette's exception wrappers would turn an ``Exception`` raised from ``send``
    after the start message went through them into "Caught handled exception, but
    response already started". The middleware swaps this back for the real error.
    """


class DBSessionMiddleware:
    """Give each HTTP request its own ``db.session``, settled before the status is sent.

    When the app sends ``http.response.start``, the transaction is committed if
    ``commit_on(status)`` holds (default: status < 400) and rolled back otherwise;
    only then is the message forwarded. A failed commit is rolled back and re-raised,
    so the client gets a 500. The session is closed when the request ends, always.
    A request that finds no free connection within ``pool_timeout`` gets a 503 with
    ``Retry-After``. Database errors leaving the app are stripped of SQL text and
    quoted values (``redact_errors=False`` keeps them whole).
    Websocket and lifespan traffic pass through; an engine the database created is
    disposed at lifespan shutdown.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        db: Database | AsyncDatabase,
        commit_on: Callable[[int], bool] | None = commit_below_400,
        redact_errors: bool = True,
    ) -> None:
        if not isinstance(db, (Database, AsyncDatabase)):
            raise TypeError(
                f"DBSessionMiddleware needs db=Database(...) or db=AsyncDatabase(...), "
                f"not {type(db).__name__}. "
                "Create one with AsyncDatabase('sqlite+aiosqlite:///./app.db') and pass it as db=."
            )
        if commit_on is not None and not callable(commit_on):
            raise TypeError(
                "DBSessionMiddleware's commit_on must be a callable taking the status code, "
                "e.g. commit_on=lambda status: status < 400."
            )
        self.app = app
        self.db = db
        self.commit_on = commit_on
        self.redact_errors = redact_errors
        self._var: ContextVar[Holder[Any] | None] = db._var
        # Installed twice for one database? Then the inner one does the work.
        self._outer_twin = _wraps_twin(app, db)
        if self._outer_twin:
            warnings.warn(INSTALLED_TWICE.format(db=db), RuntimeWarning, stacklevel=2)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._outer_twin:
            if scope["type"] == "lifespan" and self.db.owns_engine and not self._outer_twin:
                send = self._dispose_at_shutdown(send)
            await self.app(scope, receive, send)
            return

        holder: Holder[Any] = Holder()
        # Never commit automatically: what explicit commits leave is rolled back.
        holder.rollback_only = self.commit_on is None
        var = self._var
        token = var.set(holder)

        def send_wrapper(message: Message) -> Awaitable[None]:
            # A plain function handing back send()'s awaitable: requests that never
            # touch the database pay no extra coroutine per message.
            if holder.error is not None:
                return _nothing()  # the start was replaced by an error; nothing may follow
            if message["type"] == "http.response.start":
                if holder.session is not None:
                    return self._start(holder, scope, message, send)
                holder.started = True
            return send(message)

        app_failed = True
        try:
            try:
                await self.app(scope, receive, send_wrapper)
                app_failed = False
            except BaseException as exc:
                if holder.error is None:
                    if is_concurrent_use(exc):
                        holder.poisoned = True
                        where = f"{scope.get('method')} {scope.get('path')}"
                        raise ConcurrentSessionError(CONCURRENT_USE.format(where=where)) from exc
                    if isinstance(exc, PoolTimeout) and not holder.started:
                        await self._busy(scope, send)
                        return
                    self._redacted(exc)
                    raise
            if holder.error is not None:
                # Raised outside the except block, so the framework logs the real
                # error and sends its 500 (the start message never went out).
                raise holder.error
        finally:
            var.reset(token)
            session = holder.close()
            if session is not None:
                await self._finish(session, holder, scope, app_failed=app_failed)

    async def _start(self, holder: Holder[Any], scope: Scope, message: Message, send: Send) -> None:
        """Settle the transaction, then forward the start message."""
        session = holder.session
        if session is not None and session.in_transaction():
            # Don't send the status until the data it reports is settled.
            try:
                commit = self._decide(scope, message["status"], holder)
                if commit is False and logger.isEnabledFor(logging.DEBUG):
                    self._log_discarded(session, scope, message["status"])
                if commit is not None:
                    # Cancelled already? Then don't start: the finally rolls back.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    # A COMMIT once sent must finish, so its status tells the truth;
                    # a cancellation that arrives meanwhile is delivered afterwards.
                    with anyio.CancelScope(shield=True):
                        await self.db._lifecycle.settle(session, commit)
            except Exception as exc:
                holder.error = self._redacted(exc)
                raise _CommitFailed from exc
        holder.started = True
        await send(message)

    async def _finish(
        self, session: Any, holder: Holder[Any], scope: Scope, *, app_failed: bool
    ) -> None:
        """Settle what is left, close (shielded from cancellation), then run the hooks."""
        commit = holder.started and not app_failed and not holder.rollback_only
        with anyio.CancelScope(shield=True):
            await self._end(session, scope, commit=commit, discard=holder.poisoned)
        hooks = take_ready(self.db._sync_session(session))
        if hooks:
            await run_hooks(hooks, f"{scope.get('method')} {scope.get('path')}")

    def _decide(self, scope: Scope, status: int, holder: Holder[Any]) -> bool | None:
        """Commit (True), roll back now (False), or leave it to the end (None)."""
        if holder.rollback_only:
            return False
        policy: Policy | None = getattr(scope.get("endpoint"), POLICY_ATTRIBUTE, None)
        if policy is None:
            return self.commit_on(status) if self.commit_on is not None else False
        if policy.commit_on is not None:
            return policy.commit_on(status)
        # Read-only: nothing to make durable, so don't hold the status for a round-trip.
        holder.rollback_only = True
        return None

    def _redacted(self, exc: BaseException) -> BaseException:
        return redact(exc) if self.redact_errors else exc

    async def _busy(self, scope: Scope, send: Send) -> None:
        """Answer 503 for a request that found no free connection within ``pool_timeout``."""
        logger.warning(
            "No database connection was free within pool_timeout for %s %s; answered 503. "
            "Raise pool_size/max_overflow, or shorten slow transactions.",
            scope.get("method"),
            scope.get("path"),
        )
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b"Service Unavailable"})

    def _log_discarded(self, session: Any, scope: Scope, status: int) -> None:
        logger.debug(
            "Rolled back %s %s (status %s), discarding: %s.",
            scope.get("method"),
            scope.get("path"),
            status,
            describe_discarded(self.db._sync_session(session)),
        )

    async def _end(self, session: Any, scope: Scope, *, commit: bool, discard: bool) -> None:
        """Settle work done after the response started, then close the session.

        A session two tasks used at once is discarded instead: another task may still
        be mid-statement on its connection, which must not go back to the pool.
        """
        lifecycle = self.db._lifecycle
        end = lifecycle.discard if discard else functools.partial(lifecycle.end, commit=commit)
        try:
            for delay in _BUSY_RETRY_DELAYS:
                try:
                    await end(session)
                    return
                except Exception as exc:
                    # A task the request spawned may still be using the session: give it a
                    # moment to finish rather than leave the connection checked out.
                    if not is_concurrent_use(exc):
                        raise
                    await anyio.sleep(delay)
            await end(session)
        except Exception as error:
            # The status is already on the wire; all that is left is to say so.
            if commit:
                message = (
                    "Could not commit the database work done after the response to %s %s "
                    "had started (streaming body or background task); it was rolled back."
                )
            else:
                message = "Closing the database session of %s %s failed."
            self._redacted(error)
            logger.error(message, scope.get("method"), scope.get("path"), exc_info=True)

    def _dispose_at_shutdown(self, send: Send) -> Send:
        async def send_wrapper(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    await self.db._lifecycle.dispose()
                except Exception:
                    logger.error(
                        "Disposing of the database engine at shutdown failed.", exc_info=True
                    )
            await send(message)

        return send_wrapper
