"""A rollback that fails is logged: in one line when the connection is gone, else with its traceback."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from middleware_sessions._flavour import rollback


class FailingRollback(Session):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def rollback(self) -> None:
        raise self.error


def lost(invalidated: bool) -> OperationalError:
    return OperationalError(
        "SELECT 1",
        None,
        ConnectionError("server closed the connection"),
        connection_invalidated=invalidated,
    )


@pytest.mark.parametrize("invalidated", [True, False])
def test_a_failed_rollback_is_logged_with_a_traceback_only_when_it_says_more(
    caplog: pytest.LogCaptureFixture, invalidated: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="middleware_sessions"):
        rollback(FailingRollback(lost(invalidated)))  # logged, not raised

    [record] = caplog.records
    assert "Rolling back a database session failed" in record.getMessage()
    if invalidated:
        assert record.exc_info is None
        assert "connection was lost" in record.getMessage()
        assert "server closed the connection" in record.getMessage()
    else:
        assert record.exc_info is not None
