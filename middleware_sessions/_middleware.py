"""``DBSessionMiddleware``: one lazily created session per HTTP request."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _policy, _retry
from ._context import Holder
from ._database import AsyncDatabase, Database
from ._diagnostics import describe_discarded, is_concurrent_use, redact
from ._hooks import run_async as run_hooks
from ._hooks import take_ready
from ._policy import ATTRIBUTE as POLICY_ATTRIBUTE
from ._policy import Policy
from ._replicas import Replay, failed_replica, route_of
from ._retry import Conflict
from ._tokens import PRIMARY_ONLY, Tokens, insert_lsn, wrote
from .exceptions import CONCURRENT_USE, INSTALLED_TWICE, ConcurrentSessionError

logger = logging.getLogger("middleware_sessions")


def _commit_below_400(status: int) -> bool:
    """The default ``commit_on``: commit for 1xx, 2xx and 3xx responses."""
    return status < 400


# A task the request spawned may still be using the session when the request ends:
# wait for it this long in all (about 3 s), then give up and log.
_CONCURRENT_USE_RETRY_DELAYS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5)


class _CommitFailed(BaseException):
    """Carries a failed commit out of the app, past handlers that catch ``Exception``.

    Starlette's exception wrappers would turn an ``Exception`` raised from ``send``
    after the start message went through them into "Caught handled exception, but
    response already started". The middleware swaps this back for the real error.
    """


def _only_commit_failed(exc: BaseException) -> bool:
    """``_CommitFailed``, possibly wrapped in exception groups by task groups."""
    if isinstance(exc, _CommitFailed):
        return True
    inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())  # a BaseExceptionGroup
    return bool(inner) and all(_only_commit_failed(e) for e in inner)


def _wraps_twin(app: object, db: object) -> bool:
    """Whether a DBSessionMiddleware for ``db`` sits inside ``app``'s middleware chain.

    Walked once, when the middleware stack is built; the inner twin then does the work.
    """
    seen: set[int] = set()
    while app is not None and id(app) not in seen:
        if isinstance(app, DBSessionMiddleware) and app.db is db:
            return True
        seen.add(id(app))
        app = getattr(app, "app", None)
    return False


class DBSessionMiddleware:
    """Give each HTTP request its own ``db.session``, settled before the status is sent.

    When the app sends ``http.response.start``, the transaction is committed if
    ``commit_on(status)`` holds (default: status < 400) and rolled back otherwise;
    only then is the message forwarded. A failed commit is rolled back and re-raised,
    so the client gets a 500. ``commit_on=None`` never commits: only the app's own
    ``db.session.commit()`` calls write, and whatever is left is rolled back, work after
    the response included. The session is closed when the request ends, always.
    A request that finds no free connection within ``pool_timeout`` gets a 503 with
    ``Retry-After``. Database errors leaving the app are stripped of SQL text and
    values (``redact_errors=False`` keeps them whole). Websocket and lifespan traffic
    pass through; an engine the database created is disposed at lifespan shutdown.

    ``retries=N`` runs a request again, whole, up to N times when its transaction
    fails with a serialization failure or a deadlock before any of its response was
    forwarded (``@transaction_policy(retries=...)`` overrides it per route). The body
    is kept for that up to ``retry_body_limit`` bytes; between attempts the wait is
    random, up to ``retry_backoff_base * 2 ** (retry - 1)`` seconds and at most
    ``retry_backoff_cap``. When the retries run out, the answer is 503 with ``Retry-After``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        db: Database[Any] | AsyncDatabase[Any],
        commit_on: Callable[[int], bool] | None = _commit_below_400,
        redact_errors: bool = True,
        retries: int = 0,
        retry_body_limit: int = _retry.DEFAULT_BODY_LIMIT,
        retry_backoff_base: float = _retry.DEFAULT_BACKOFF_BASE,
        retry_backoff_cap: float = _retry.DEFAULT_BACKOFF_CAP,
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
                "e.g. commit_on=lambda status: status < 400, or None to never commit."
            )
        self.app = app
        self.db = db
        self.commit_on = commit_on
        self.redact_errors = redact_errors
        self._var = db._var
        self.retries = retries
        self._retry_settings = _retry.Settings(
            retries, retry_body_limit, retry_backoff_base, retry_backoff_cap
        )
        # Installed twice for one database? Then the inner one does the work.
        self._outer_twin = _wraps_twin(app, db)
        if self._outer_twin:
            warnings.warn(INSTALLED_TWICE.format(db=db), RuntimeWarning, stacklevel=2)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._outer_twin:
            if scope["type"] == "lifespan" and not self._outer_twin:
                send = self._dispose_at_shutdown(send)
            await self.app(scope, receive, send)
            return

        binding = self.db._binding
        if (self.retries or _policy.any_route_retries) and binding.replicas is None:
            await self._run_retrying(scope, receive, send)
            return
        if binding.replicas is None:
            request = _Request(self, scope, send)
        else:
            replay = Replay(receive)
            request = _ReplicaRequest(self, scope, send, replay)
            receive = replay.receive
        await self._run(request, receive)

    async def _run(self, request: _Request, receive: Receive) -> None:
        """The app, on a session of the request's own (again, for a failed replica read)."""
        var = self._var
        token = var.set(request)
        app_failed = True
        try:
            while True:
                try:
                    await self.app(request.scope, receive, request.send)
                    app_failed = False
                except _CommitFailed:
                    pass  # the real error is raised below, outside this handler
                except Conflict:
                    raise
                except BaseException as exc:
                    if request.ends_in_conflict(exc):
                        raise Conflict from None
                    if not (request.error is not None and _only_commit_failed(exc)):
                        if isinstance(request, _ReplicaRequest) and await request.read_again(exc):
                            continue  # on the primary, this time
                        if await request.answered(exc):
                            return
                        raise
                break
            if request.error is not None:
                # Raised here, so the framework logs the database error itself and
                # sends its 500 (the start message never went out).
                raise request.error
        finally:
            var.reset(token)
            # Holder.empty(), inlined: this runs for every request.
            session, request.session, request.open = request.session, None, False
            if session is not None:
                await request.finish(session, app_failed=app_failed)

    async def _run_retrying(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, and again after a conflict, while nothing of it was forwarded.

        Each attempt starts from the scope as it came in (routing writes into it) and
        gets a fresh session and the body from its first byte. A failed attempt leaves
        nothing: its transaction was rolled back, its start message never forwarded,
        and its background tasks never ran (they follow the response).
        """
        settings = self._retry_settings
        body = _retry.Body(
            receive,
            settings.body_limit,
            wanted=lambda: _retry.retries_for(scope, settings.retries) > 0,
        )
        pristine = _retry.Pristine(scope)
        attempt = 1
        while True:
            request = _Attempt(self, scope, send, settings.retries)
            token = _retry.CURRENT.set(request.marker)
            try:
                await self._run(request, body.receive())
            except Conflict:
                pass
            finally:
                _retry.CURRENT.reset(token)
            sqlstate = request.conflict
            if sqlstate is None:
                return
            # The route's policy is known now: routing ran in the attempt.
            if attempt > _retry.retries_for(scope, settings.retries) or body.problem:
                _retry.log_gave_up(scope, attempt, sqlstate, body.problem)
                await _retry.send_unavailable(send)
                return
            delay = settings.delay(attempt)
            attempt += 1
            _retry.log_retry(scope, attempt, sqlstate, delay)
            await anyio.sleep(delay)
            pristine.restore()

    def decide(self, scope: Scope, status: int, holder: Holder) -> bool | None:
        """At the response start: commit (True), roll back (False), or wait for the end (None)."""
        if holder.rollback_only:
            return False
        policy: Policy | None = getattr(scope.get("endpoint"), POLICY_ATTRIBUTE, None)
        if policy is not None:
            if policy.read_only:
                # Nothing to make durable: don't hold the status for a round-trip.
                return None
            if policy.commit_on is not None:
                return policy.commit_on(status)
        if self.commit_on is None:
            return False
        return self.commit_on(status)

    def commits_after_start(self, scope: Scope) -> bool:
        """Whether work done after the response started may be committed at the end."""
        if self.commit_on is None:
            return False
        policy: Policy | None = getattr(scope.get("endpoint"), POLICY_ATTRIBUTE, None)
        return policy is None or not policy.read_only

    def redact_in_place(self, exc: BaseException) -> BaseException:
        """Strip SQL text and values from a database error (unless ``redact_errors=False``)."""
        return redact(exc) if self.redact_errors else exc

    def _dispose_at_shutdown(self, send: Send) -> Send:
        async def send_wrapper(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                binding = self.db._binding
                engines = [binding.engine] if binding.owns_engine else []
                if binding.replicas is not None:
                    engines += binding.replicas.owned_engines
                for engine in engines:
                    try:
                        await self.db._flavour.dispose(engine)
                    except Exception:
                        logger.error(
                            "Disposing of the database engine at shutdown failed.", exc_info=True
                        )
            await send(message)

        return send_wrapper


async def _refuse(message: Message) -> None:
    raise _CommitFailed  # the start was replaced by an error; nothing may follow


async def _refuse_conflict(message: Message) -> None:
    raise Conflict  # the attempt is over and runs again; nothing of it may go out


class _Request(Holder):
    """One HTTP request: its session slot, and its transaction from first use to close.

    The middleware stays a dispatcher; everything that belongs to one request lives
    here (as Starlette's ``GZipMiddleware`` hands each request to a responder). It is
    also the holder the database's ``ContextVar`` points at, so a request costs one
    slotted object: about 4,500 instructions less than a holder plus a request object
    (callgrind, benchmarks/instructions.py).
    """

    # The start message went out; the commit at the start failed (and what it raised);
    # two tasks used the session at once, so its connection may still be busy.
    __slots__ = ("_send", "error", "middleware", "poisoned", "scope", "started")

    def __init__(self, middleware: DBSessionMiddleware, scope: Scope, send: Send) -> None:
        self.session = None
        self.open = True
        self.rollback_only = False
        self.middleware = middleware
        self.scope = scope
        self._send = send
        self.started = False
        self.error: BaseException | None = None
        self.poisoned = False
        self.never_commits = middleware.commit_on is None  # nor do its per-task sessions
        self.tasks = None

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function handing back send()'s awaitable: requests that never touch
        # the database pay no extra coroutine per message.
        if message["type"] == "http.response.start":
            if self.session is not None:
                return self._start(message)
            self.started = True
        return self._send(message)

    async def _start(self, message: Message) -> None:
        """Settle the transaction, then forward the start message."""
        session = self.session
        if session.in_transaction():
            middleware = self.middleware
            # Don't send the status until the data it reports is settled.
            try:
                commit = middleware.decide(self.scope, message["status"], self)
                if commit is False and logger.isEnabledFor(logging.DEBUG):
                    self._log_discarded(session, message["status"])
                if commit is not None:
                    # Cancelled already? Then don't start: the finally rolls back.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    # A COMMIT once sent must finish, so its status tells the truth;
                    # a cancellation that arrives meanwhile is delivered afterwards.
                    with anyio.CancelScope(shield=True):
                        await middleware.db._flavour.settle(session, commit)
            except Exception as exc:
                self.error = middleware.redact_in_place(exc)
                self._send = _refuse
                raise _CommitFailed from exc
        self.started = True
        await self._send(message)

    def ends_in_conflict(self, exc: BaseException) -> bool:
        """Whether ``exc`` ends an attempt that runs again: never for a plain request."""
        return False

    async def answered(self, exc: BaseException) -> bool:
        """Deal with an exception escaping the app: True if a response was sent instead.

        Raises a clearer error in place of ``exc`` where there is one to give.
        """
        if is_concurrent_use(exc):
            self.poisoned = True
            scope = self.scope
            where = f"{scope.get('method')} {scope.get('path')}"
            cause = self.middleware.redact_in_place(exc)  # it is printed with ours
            raise ConcurrentSessionError(CONCURRENT_USE.format(where=where)) from cause
        if isinstance(exc, PoolTimeout) and not self.started:
            await self._answer_503()
            return True
        self.middleware.redact_in_place(exc)
        return False

    async def finish(self, session: Any, *, app_failed: bool) -> None:
        """Settle what is left, close (shielded from cancellation), then run the hooks."""
        middleware = self.middleware
        commit = (
            self.started
            and not app_failed
            and not self.rollback_only
            and middleware.commits_after_start(self.scope)
        )
        flavour = middleware.db._flavour
        try:
            with anyio.CancelScope(shield=True):
                await self._close(session, commit=commit)
        finally:
            hooks = take_ready(flavour.sync_session(session))
        if hooks:
            await run_hooks(hooks, self._where(), middleware.redact_in_place)

    async def _close(self, session: Any, *, commit: bool) -> None:
        """Settle work done after the response started, then close the session.

        A session two tasks used at once is discarded instead: another task may still
        be mid-statement on its connection, which must not go back to the pool.
        """
        flavour = self.middleware.db._flavour
        try:
            for delay in (*_CONCURRENT_USE_RETRY_DELAYS, None):
                try:
                    await flavour.finish(session, commit=commit, discard_connection=self.poisoned)
                    return
                except Exception as exc:
                    # A task the request spawned may still be using the session: give it a
                    # moment to finish rather than leave the connection checked out.
                    if delay is None or not is_concurrent_use(exc):
                        raise
                    await anyio.sleep(delay)
        except Exception as error:
            # The status is already on the wire; all that is left is to say so.
            if commit:
                message = (
                    "Could not commit the database work done after the response to %s "
                    "had started (streaming body or background task); it was rolled back."
                )
            else:
                message = "Closing the database session of %s failed."
            self.middleware.redact_in_place(error)
            logger.error(message, self._where(), exc_info=True)

    async def _answer_503(self) -> None:
        """Answer 503 for a request that found no free connection within ``pool_timeout``."""
        logger.warning(
            "No database connection was free within pool_timeout for %s; answered 503. "
            "Raise pool_size/max_overflow, or shorten slow transactions.",
            self._where(),
        )
        await _retry.send_unavailable(self._send)

    def _log_discarded(self, session: Any, status: int) -> None:
        sync_session = self.middleware.db._flavour.sync_session(session)
        logger.debug(
            "Rolled back %s (status %s), discarding: %s.",
            self._where(),
            status,
            describe_discarded(sync_session),
        )

    def _where(self) -> str:
        return f"{self.scope.get('method')} {self.scope.get('path')}"


class _Attempt(_Request):
    """One run of a request that may run again after a serialization failure or a deadlock.

    The listeners of ``_retry`` report to its ``marker``: a conflict on this database's
    engine (raised, or turned into a response by the app), and any commit of work of
    its own, after which it must not run again.
    """

    __slots__ = ("_retries", "conflict", "marker")

    def __init__(
        self, middleware: DBSessionMiddleware, scope: Scope, send: Send, retries: int
    ) -> None:
        super().__init__(middleware, scope, send)
        self._retries = retries  # the middleware's; the route's policy may say otherwise
        # Set once the attempt is over and runs again: the SQLSTATE that ended it.
        self.conflict: str | None = None
        self.marker = _retry.Attempt(middleware.db.engine, outer=_retry.CURRENT.get())
        _retry.watch(self.marker)

    async def _start(self, message: Message) -> None:
        """Run the request again instead of forwarding a response made of a conflict,
        or a start whose COMMIT failed with one."""
        if self.marker.conflict is not None:
            session = self.session
            status = message["status"]
            if not (
                session.in_transaction()
                and self.middleware.decide(self.scope, status, self) is True
            ):
                await self._run_again()
        try:
            await super()._start(message)
        except _CommitFailed as failed:
            # Our own COMMIT, so this database's conflict, whether or not the listener saw
            # it (a sync COMMIT runs in a worker thread, outside this context).
            if self.marker.conflict is None:
                self.marker.conflict = _retry.conflict_of(failed.__cause__)
            if self._retryable() is None:
                raise
            self.error = None  # the COMMIT lost a serialization race: not an error, a retry
            await self._run_again()

    def ends_in_conflict(self, exc: BaseException) -> bool:
        if self.conflict is not None:
            return True  # the Conflict, wrapped by a task group or swallowed by the app
        if not isinstance(exc, Exception) or _retry.conflict_of(exc) is None:
            return False  # a cancellation or another error is never run again
        sqlstate = self._retryable()
        self.conflict = sqlstate
        return sqlstate is not None

    def _retryable(self) -> str | None:
        """The SQLSTATE of this database's conflict, if the request may run again."""
        sqlstate = self.marker.conflict
        if sqlstate is None or self.started:
            return None
        if _retry.retries_for(self.scope, self._retries) == 0:
            return None
        if self.marker.committed:
            # Running it again would repeat work that is already durable.
            _retry.log_committed_already(self.scope, sqlstate)
            return None
        return sqlstate

    async def _run_again(self) -> None:
        """Roll back and leave the app, the start unsent: the dispatcher runs it again.

        Does nothing where the request may not run again (the normal path goes on).
        """
        sqlstate = self._retryable()
        if sqlstate is None:
            return
        session = self.session
        if session is not None and session.in_transaction():
            with anyio.CancelScope(shield=True):
                await self.middleware.db._flavour.settle(session, False)
        self.conflict = sqlstate
        self._send = _refuse_conflict
        raise Conflict


class _ReplicaRequest(_Request):
    """A request to a database with read replicas.

    Its session reads from a replica when its route is read-only (``route_scope``); a
    replica that fails it is replaced by the primary and the request run again; the
    start of a response to a request that wrote carries a read-your-writes cookie.
    """

    __slots__ = ("_forward", "replay")

    def __init__(
        self, middleware: DBSessionMiddleware, scope: Scope, send: Send, replay: Replay
    ) -> None:
        super().__init__(middleware, scope, send)
        self.route_scope = scope
        self.replay: Replay | None = replay
        self._forward = send
        self._send = self._send_with_token

    async def _send_with_token(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.session is not None:
            replicas = self.middleware.db._binding.replicas
            if replicas is not None and replicas.tokens is not None:
                message = await self._with_token(replicas.tokens, self.session, message)
        await self._forward(message)

    async def _with_token(self, tokens: Tokens, session: Any, message: Message) -> Message:
        """The start message with a read-your-writes cookie, if the request wrote."""
        flavour = self.middleware.db._flavour
        sync_session = flavour.sync_session(session)
        if not wrote(sync_session) or route_of(sync_session) is not None:
            return message
        try:
            with anyio.CancelScope(shield=True):
                value = tokens.sign(await flavour.run(session, insert_lsn))
        except Exception:
            # Committed, but where to? The cookie then sends reads to the primary.
            logger.warning(
                "Could not read the primary's WAL position after %s; this client reads "
                "from the primary until its %s cookie expires.",
                self._where(),
                tokens.cookie,
                exc_info=True,
            )
            value = PRIMARY_ONLY
        headers = [*message.get("headers", ()), tokens.header(value)]
        return {**message, "headers": headers}

    async def read_again(self, exc: BaseException) -> bool:
        """Get ready to run a read-only request again on the primary if its replica failed it.

        Only before anything was sent, and only a request without a body (one that can
        be replayed). True if the app should be called again.
        """
        session, replay = self.session, self.replay
        if session is None or self.started or replay is None:
            return False
        replicas = self.middleware.db._binding.replicas
        flavour = self.middleware.db._flavour
        replica = failed_replica(flavour.sync_session(session), exc)
        if replicas is None or replica is None or not replay.rewind():
            return False
        replicas.set.skip(replica, "failed a read")
        logger.warning(
            "Reading from replica %s failed for %s; reading from the primary instead.",
            replica.name,
            self._where(),
        )
        with anyio.CancelScope(shield=True):
            try:
                await flavour.finish(session, commit=False, discard_connection=True)
            except Exception:
                logger.debug("Discarding the failed replica session raised.", exc_info=True)
        # No route scope any more: the next db.session is on the primary. Once only.
        self.session = None
        self.route_scope = None
        self.replay = None
        return True
