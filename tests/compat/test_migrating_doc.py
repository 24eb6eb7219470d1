"""docs/migrating.md's tables of differences name a test for each row; those tests exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "migrating.md"


def _rows() -> list[tuple[str, str]]:
    """(test file, test name) for every table row, the file as the page's section implies."""
    rows: list[tuple[str, str]] = []
    default = ""
    for line in PAGE.read_text().splitlines():
        if line.startswith("## From fastapi-sqlalchemy"):
            default = "tests/compat/test_fastapi_sqlalchemy.py"
        elif line.startswith("## From fastapi-async-sqlalchemy"):
            default = "tests/compat/test_fastapi_async_sqlalchemy.py"
        if not line.startswith("| ") or line.startswith(("| Behaviour", "|---")):
            continue
        cell = line.rstrip(" |").rsplit("|", 1)[1].strip().strip("`")
        path, _, name = cell.rpartition("::")
        if not path:
            path = default
        elif not path.startswith("tests/"):
            path = f"tests/compat/{path}"
        rows.append((path, name))
    return rows


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_row_of_the_tables_of_differences_names_a_test_that_exists() -> None:
    rows = _rows()
    assert len(rows) >= 20
    missing = [f"{path}::{name}" for path, name in rows if name not in _tests_in(ROOT / path)]
    assert missing == []


def test_the_tables_cover_every_behaviour_the_issue_lists() -> None:
    text = PAGE.read_text().lower()
    for behaviour in (
        "commit policy",
        "background tasks and streaming",
        "outlives its request",
        "gather",
        "exception types",
        "warnings",
        "redaction",
        "503",
    ):
        assert len(re.findall(re.escape(behaviour), text)) >= 2, behaviour
