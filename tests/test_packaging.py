"""What a user of the built package and of the repository sees: metadata, license, make help, docs."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib.metadata import metadata
from pathlib import Path

import pytest

import middleware_sessions

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_long_description_links_only_absolute_urls_and_anchors() -> None:
    """The wheel carries no other file of the repository, so the README may not link one."""
    readme = (REPO_ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)", readme) + re.findall(r"^\[[^]]+\]:\s*(\S+)", readme)
    relative = [t for t in targets if not re.match(r"(https?://|#)", t)]
    assert relative == []


def test_installed_metadata_carries_the_readme_license_and_python_versions() -> None:
    meta = metadata("middleware_sessions")
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in meta.get_all("License-File", [])
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "**The promise:" in meta["Description"]
    versions = {
        c.rsplit(" :: ", 1)[1]
        for c in meta.get_all("Classifier", [])
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert versions == {"3.10", "3.11", "3.12", "3.13"}
    assert meta["Requires-Python"] == ">=3.10"


def test_extras_the_docs_install_exist() -> None:
    """Every ``[extra]`` a page tells the reader to install is one the package provides."""
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    named: set[str] = set()
    for page in pages:
        for line in page.read_text().splitlines():
            if "pip install" in line and ("middleware_sessions" in line or '".[' in line):
                named |= set(re.findall(r"\[([a-z]+)\]", line))
    assert named, "the pages name no extra"
    assert named <= set(metadata("middleware_sessions").get_all("Provides-Extra", []))


def test_license_file_is_mit_for_the_authors_in_the_metadata() -> None:
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "middleware_sessions developers" in text
    assert metadata("middleware_sessions")["Author"] == "middleware_sessions developers"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_every_documented_target() -> None:
    """``make help`` prints each target that has a ``##`` comment, with that comment."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    documented = dict(re.findall(r"^## (.+)\n([a-z][a-z-]*):", makefile, flags=re.MULTILINE))
    output = subprocess.run(
        ["make", "-s", "help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    listed = dict(re.findall(r"^  make (\S+)\s+(.+)$", output, flags=re.MULTILINE))
    assert listed == {target: doc for doc, target in documented.items()}
    assert {"test", "lint", "docs", "demo", "help"} <= set(listed)


def test_api_reference_page_covers_every_public_name() -> None:
    """docs/api.md renders each name of ``middleware_sessions.__all__`` from its docstring."""
    page = (REPO_ROOT / "docs" / "api.md").read_text()
    rendered = set(re.findall(r"^::: middleware_sessions\.(\w+)$", page, flags=re.MULTILINE))
    assert set(middleware_sessions.__all__) <= rendered


def test_docs_site_nav_lists_every_page() -> None:
    """Each page of docs/ is reachable from the site's navigation."""
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    in_nav = set(re.findall(r"^  - [^:]+: (\S+\.md)$", config, flags=re.MULTILINE))
    pages = {p.name for p in (REPO_ROOT / "docs").glob("*.md")}
    assert pages - in_nav == set(), "add these pages to the nav in mkdocs.yml"
    assert in_nav - pages == set(), "the nav in mkdocs.yml names pages that do not exist"
