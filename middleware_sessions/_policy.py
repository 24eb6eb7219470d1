"""Per-route transaction policy, read by the middleware from the matched endpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

ATTRIBUTE = "__middleware_sessions_policy__"


@dataclass(frozen=True)
class Policy:
    commit_on: Callable[[int], bool] | None
    read_only: bool
    replica: bool = True
    retries: int | None = None


def check_retries(retries: object, who: str) -> None:
    """A clear error unless ``retries`` is a whole number, 0 or more."""
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(
            f"{who} must be a whole number of retries, not {retries!r}. "
            "It is how many times a request is run again after a serialization failure "
            "or a deadlock. Pass an int, e.g. retries=3 (0 turns retrying off)."
        )
    if retries < 0:
        raise ValueError(
            f"{who} is {retries}, which is negative. "
            "It is how many times a request may be run again. Pass 0 or more."
        )


# Set once any route asks for retries: until then the middleware of an app whose own
# retries=0 does not prepare any request for running again.
any_route_retries = False


def transaction_policy(
    *,
    commit_on: Callable[[int], bool] | None = None,
    read_only: bool = False,
    replica: bool = True,
    retries: int | None = None,
) -> Callable[[Endpoint], Endpoint]:
    """Override the middleware's ``commit_on`` or ``retries`` for one route.

    ``commit_on=...`` decides from the status, as the middleware's option does;
    ``read_only=True`` never commits (the transaction is rolled back after the
    response, so the status is not held up by a COMMIT round-trip); with a database
    that has ``replicas=[...]`` it also reads from a replica, unless ``replica=False``
    keeps it on the primary. ``retries=N`` runs the request again up to N times after
    a serialization failure or a deadlock (``retries=0``: never, whatever the
    middleware says). Works on ``def`` and ``async def`` endpoints, above or below
    the route decorator::

        @router.get("/report")
        @transaction_policy(read_only=True)
        async def report() -> Report: ...
    """
    global any_route_retries
    if read_only and commit_on is not None:
        raise ValueError(
            "transaction_policy() got both read_only=True and commit_on. "
            "A read-only route never commits, so commit_on would be ignored. "
            "Pass one of them."
        )
    if commit_on is not None and not callable(commit_on):
        raise TypeError(
            "transaction_policy()'s commit_on must be a callable taking the status code, "
            "e.g. commit_on=lambda status: status < 400."
        )
    if not read_only and commit_on is None and retries is None:
        raise TypeError(
            "transaction_policy() needs commit_on=<callable taking the status code>, "
            "read_only=True or retries=<int>."
        )
    if retries is not None:
        check_retries(retries, "transaction_policy()'s retries")
        any_route_retries = any_route_retries or retries > 0
    if not replica and not read_only:
        raise ValueError(
            "transaction_policy() got replica=False without read_only=True. "
            "Only read-only routes read from replicas; every other route uses the primary. "
            "Drop replica=False, or add read_only=True."
        )
    policy = Policy(commit_on=commit_on, read_only=read_only, replica=replica, retries=retries)

    def mark(endpoint: Endpoint) -> Endpoint:
        try:
            setattr(endpoint, ATTRIBUTE, policy)
        except AttributeError:
            raise TypeError(
                f"transaction_policy() cannot mark {endpoint!r}: it does not take attributes. "
                "Decorate a plain function (def or async def)."
            ) from None
        return endpoint

    return mark
