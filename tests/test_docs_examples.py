"""Every example in README.md and docs/*.md runs as written.

The pages are read as a newcomer reads them, and their code is run without a
hand-kept copy that could drift. The rules for writing a page:

- A ``python`` block whose first line is ``# NAME.py`` is a file: it is saved
  under that name in a fresh project folder (one per page). If the page has
  ``test_*.py`` files, pytest runs in that folder and every test must pass (none
  skipped). A file named in a console block's ``$ uvicorn NAME:app`` is served.
- Every other ``python`` block is a snippet: the page's snippets run in order in
  one namespace (like one interactive session), in that project folder, with
  ``-W error``. Tracebacks point at the page's own lines.
- A block that is not a program (a signature listing, output) is fenced as
  ``text``, never ``python``.
- The rare block that cannot run here starts with the visible line
  ``# not run by the docs tests: <reason>``; such blocks are counted below and
  kept few.
- Console blocks: a server command (``uvicorn NAME:app``, ``python -m demo_app``,
  ``make demo``; the first one of its block, the others being alternatives)
  starts a real server on a free loopback port, and each ``$ curl ...`` line
  after it on the page is sent to that server; its output must match the lines
  shown under it (``...`` stands for anything). Other commands (installs,
  ``make test``) are not run.
- The files that are not tests pass ``mypy --strict``, as a user's strict
  project would check them.
- A docs page is read as the site shows it: a ``--8<-- "FILE:section"`` line
  includes that part of FILE (so the README's Quickstart file is on the Testing
  page too). A served example is checked on the page that writes it.
"""

from __future__ import annotations

import contextlib
import http
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "demo_app" / "README.md"]
PAGES += sorted((REPO_ROOT / "docs").glob("*.md"))

# Pages whose owners have not yet made their blocks runnable, with the reason. Some are
# still on their way to main; an entry whose page does not exist changes nothing.
NOT_YET_CHECKED: dict[str, str] = {}

NOT_RUN = "# not run by the docs tests:"
# Every block that may skip the tests, as (page, first line of the block). Keep it short.
ALLOWED_NOT_RUN: set[tuple[str, str]] = set()

SUBPROCESS_TIMEOUT = 300
STARTUP_TIMEOUT = 60.0


# --- Reading a page --------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: Path  # the page it is shown on
    language: str
    origin: Path  # the file it is written in: the page, or a file the page includes
    line: int  # the origin's line number of the block's first line of code
    text: str

    @property
    def file_name(self) -> str | None:
        """``NAME.py`` when the block's first line is ``# NAME.py``."""
        match = re.fullmatch(r"# ([\w/.-]+\.py)", self.text.split("\n", 1)[0].strip())
        return match[1] if match else None

    @property
    def not_run(self) -> bool:
        return self.text.startswith(NOT_RUN)

    def where(self) -> str:
        return f"{relative(self.origin)}:{self.line}"


def relative(page: Path) -> str:
    return page.relative_to(REPO_ROOT).as_posix()


# What the docs site's Markdown does: `--8<-- "FILE"` or `--8<-- "FILE:section"` on a line
# of its own includes that file (or the lines between its `[start:section]` and
# `[end:section]` markers), indented as the line is.
INCLUDE = re.compile(r'( *)-+8<-+\s+"([^"]+)"\s*$')
SECTION = re.compile(r"-+8<-+\s+\[\s*(start|end)\s*:\s*([-\w]+)\s*\]")


def page_lines(path: Path, section: str = "", indent: str = "") -> list[tuple[Path, int, str]]:
    """The lines of a page as the site shows them, each with the file and line it comes from."""
    numbered = list(enumerate(path.read_text().split("\n"), 1))
    if section:
        marks = {
            (m[1], m[2]): i for i, (_, line) in enumerate(numbered) if (m := SECTION.search(line))
        }
        start, end = marks.get(("start", section)), marks.get(("end", section))
        assert start is not None, f"{relative(path)} has no [start:{section}]"
        assert end is not None, f"{relative(path)} has no [end:{section}]"
        numbered = numbered[start + 1 : end]
    lines: list[tuple[Path, int, str]] = []
    for number, line in numbered:
        if SECTION.search(line):
            continue
        if include := INCLUDE.match(line):
            name, _, part = include[2].partition(":")
            lines += page_lines(REPO_ROOT / name, part, indent + include[1])
        else:
            lines.append((path, number, indent + line if line.strip() else ""))
    return lines


def read_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, as the site shows it, in order."""
    blocks: list[Block] = []
    lines = page_lines(page)
    index = 0
    while index < len(lines):
        opening = re.match(r"( *)(`{3,}|~{3,})\s*([\w+-]*)", lines[index][2])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.groups()
        body: list[str] = []
        index += 1
        assert index < len(lines), f"{relative(page)}: unclosed code fence at the end"
        origin, start, _ = lines[index]
        while index < len(lines) and not lines[index][2].strip().startswith(fence):
            line = lines[index][2]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        assert index < len(lines), f"{relative(origin)}:{start - 1}: unclosed code fence"
        index += 1
        blocks.append(Block(page, language, origin, start, "\n".join(body) + "\n"))
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in read_blocks(page) if b.language == "python" and not b.not_run]


def files_of(page: Path) -> dict[str, Block]:
    files: dict[str, Block] = {}
    for block in python_blocks(page):
        name = block.file_name
        if name is None:
            continue
        assert name not in files, (
            f"{block.where()}: {name} is already a file at {files[name].where()}; "
            "a page names each file once."
        )
        files[name] = block
    return files


def checked(pages: list[Path]) -> list[Path]:
    return [page for page in pages if relative(page) not in NOT_YET_CHECKED]


def page_param(page: Path) -> object:
    return pytest.param(page, id=relative(page))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty folder for one page's files, databases and servers."""
    return tmp_path


def write_files(page: Path, folder: Path) -> None:
    for name, block in files_of(page).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text)


def environment(folder: Path) -> dict[str, str]:
    """The test's environment, minus anything that would point an example elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO_ROOT)])
    return env


# --- Snippets --------------------------------------------------------------------------------

# Runs the snippets in one namespace; padding each with blank lines keeps the page's
# line numbers, so a traceback shows the page's own line.
RUN_SNIPPETS = textwrap.dedent(
    """
    import json, sys
    namespace = {"__name__": "__main__"}
    for block in json.load(sys.stdin):
        source = "\\n" * (block["line"] - 1) + block["text"]
        exec(compile(source, block["path"], "exec"), namespace)
    """
)


def run_snippets(page: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    snippets = [
        {"path": str(b.origin), "line": b.line, "text": b.text}
        for b in python_blocks(page)
        if b.file_name is None
    ]
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", RUN_SNIPPETS],
        input=json.dumps(snippets),
        cwd=folder,
        env=environment(folder),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


# --- Console blocks: servers and curl ----------------------------------------------------------


@dataclass
class Curl:
    where: str
    command: str
    expected: str


@dataclass
class Session:
    """A server command and the curl lines sent to it."""

    where: str
    argv: list[str]
    curls: list[Curl] = field(default_factory=list)


def server_command(words: list[str], files: dict[str, Block]) -> list[str] | None:
    """The argv that serves what ``words`` serve, on a port given later; ``None`` if no server."""
    if words[:1] == ["uvicorn"] and len(words) >= 2:
        module = words[1].split(":")[0]
        in_repository = (REPO_ROOT / f"{module.replace('.', '/')}.py").exists()
        assert f"{module}.py" in files or in_repository, (
            f"'uvicorn {words[1]}' serves {module}.py, which is neither on the page nor here"
        )
        return [sys.executable, "-m", "uvicorn", words[1]]
    if words[:3] == ["python", "-m", "demo_app"] or words[:2] == ["make", "demo"]:
        return [sys.executable, "-m", "demo_app"]
    return None


def console_sessions(page: Path) -> list[Session]:
    files = files_of(page)
    sessions: list[Session] = []
    for block in read_blocks(page):
        if block.language != "console":
            continue
        # Join continued lines; keep each command's line number.
        commands: list[tuple[int, str, list[str]]] = []
        lines = block.text.rstrip("\n").split("\n")
        index = 0
        while index < len(lines):
            line = lines[index]
            number = block.line + index
            index += 1
            if not line.startswith("$ "):
                if commands:
                    commands[-1][2].append(line)
                continue
            command = line[2:]
            while command.endswith("\\") and index < len(lines):
                command = command[:-1] + " " + lines[index].strip()
                index += 1
            commands.append((number, command, []))
        started = False
        for number, command, output in commands:
            words = shlex.split(command, comments=True)
            where = f"{relative(block.origin)}:{number}"
            argv = server_command(words, files)
            if argv is not None and not started:
                sessions.append(Session(where, argv))
                started = True
            elif words[:1] == ["curl"]:
                assert sessions, f"{where}: a curl line before any server command"
                sessions[-1].curls.append(Curl(where, command, "\n".join(output)))
    return sessions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PortTaken(Exception):
    """Another process bound the free port before the server did."""


def start_server(argv: list[str], folder: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start the server on a free loopback port and wait until it answers."""
    port = free_port()
    log_path = folder / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder,
            env=environment(folder),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            log_text = log_path.read_text()
            if "address already in use" in log_text:
                raise PortTaken(log_text)
            raise AssertionError(f"the server exited:\n{log_text}")
        if time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"no answer within {STARTUP_TIMEOUT}s:\n{log_path.read_text()}")
        try:
            httpx.get(base_url, timeout=5)
            return process, base_url, log_path
        except httpx.TransportError:
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl+C, as the reader stops it; SIGKILL if it does not end."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def serve(argv: list[str], folder: Path) -> Iterator[str]:
    """Run a server on a free loopback port until the block ends; yield its base URL."""
    for attempt in range(3):
        try:
            process, base_url, log_path = start_server(argv, folder)
            break
        except PortTaken:
            if attempt == 2:
                raise
    try:
        yield base_url
    finally:
        stop(process)
    log = log_path.read_text()
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


def send_curl(curl: Curl, base_url: str) -> httpx.Response:
    """Send what the curl line sends (the options the pages use) to ``base_url``."""
    words = shlex.split(curl.command, comments=True)[1:]
    method, url, headers, data = None, None, {}, None
    while words:
        word = words.pop(0)
        if word in ("-s", "-i"):
            continue
        if word == "-X":
            method = words.pop(0)
        elif word == "-H":
            name, value = words.pop(0).split(":", 1)
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = words.pop(0)
        else:
            assert not word.startswith("-"), f"{curl.where}: curl option {word} is not understood"
            url = word
    assert url is not None, f"{curl.where}: no URL"
    path = re.sub(r"^(https?://)?(localhost|127\.0\.0\.1)(:\d+)?", "", url)
    method = method or ("POST" if data is not None else "GET")
    return httpx.request(method, base_url + path, headers=headers, content=data, timeout=30)


def curl_output(curl: Curl, response: httpx.Response) -> str:
    """What curl prints for ``response`` (with ``-i``: status line and headers first)."""
    if "-i" not in shlex.split(curl.command, comments=True):
        return response.text
    phrase = http.HTTPStatus(response.status_code).phrase
    head = [f"HTTP/1.1 {response.status_code} {phrase}"]
    head += [f"{name}: {value}" for name, value in response.headers.items()]
    return "\n".join(head) + "\n\n" + response.text


def matches(expected: str, actual: str) -> bool:
    """``expected`` with ``...`` standing for anything, equals ``actual``.

    JSON output is compared as JSON: the order of an object's keys is not part of
    what a page promises (pydantic and SQLModel don't keep it stable).
    """
    with contextlib.suppress(ValueError):
        return bool(json.loads(expected) == json.loads(actual))
    pattern = ".*?".join(re.escape(piece) for piece in expected.strip().split("..."))
    return re.fullmatch(pattern, actual.strip(), flags=re.DOTALL) is not None


# --- The tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [page_param(p) for p in checked(PAGES)])
def test_python_snippets_run_in_order(page: Path, project: Path) -> None:
    """A page's snippets run, in order, in one namespace, beside the page's files."""
    write_files(page, project)
    result = run_snippets(page, project)
    assert result.returncode == 0, result.stderr


TESTED_PAGES = [p for p in checked(PAGES) if any(n.startswith("test_") for n in files_of(p))]


@pytest.mark.parametrize("page", [page_param(p) for p in TESTED_PAGES])
def test_test_files_pass_under_pytest(page: Path, project: Path) -> None:
    """The page's ``conftest.py`` and ``test_*.py`` files pass as written, none skipped."""
    write_files(page, project)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error", "-v"],
        cwd=project,
        env=environment(project),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shown = sum(
        len(re.findall(r"^(?:async )?def test_", block.text, flags=re.MULTILINE))
        for name, block in files_of(page).items()
        if Path(name).name.startswith("test_")
    )
    summary = result.stdout.strip().rsplit("\n", 1)[-1]
    assert re.fullmatch(rf"=+ {shown} passed in .*", summary), result.stdout


def own_sessions(page: Path) -> list[Session]:
    """The page's server sessions written in it (an included one is checked where it's written)."""
    return [s for s in console_sessions(page) if s.where.startswith(f"{relative(page)}:")]


SERVED_PAGES = [p for p in checked(PAGES) if own_sessions(p)]


@pytest.mark.parametrize("page", [page_param(p) for p in SERVED_PAGES])
def test_served_examples_answer_as_shown(page: Path, project: Path) -> None:
    """Each server the page starts answers its curl lines exactly as the page shows."""
    write_files(page, project)
    for session in own_sessions(page):
        folder = project / session.where.replace("/", "_").replace(":", "_")
        folder.mkdir()
        write_files(page, folder)
        with serve(session.argv, folder) as base_url:
            for curl in session.curls:
                response = send_curl(curl, base_url)
                output = curl_output(curl, response)
                assert matches(curl.expected, output), (
                    f"{curl.where}: $ {curl.command}\nshown:\n{curl.expected}\ngot:\n{output}"
                )


def quickstart() -> tuple[Block, Session]:
    """The README's Quickstart: the file it says to save, and the command that serves it."""
    readme = REPO_ROOT / "README.md"
    session = next(s for s in console_sessions(readme) if s.argv[2:3] == ["uvicorn"])
    module = session.argv[3].split(":")[0]
    return files_of(readme)[f"{module}.py"], session


def test_quickstart_serves_created_then_read_items(project: Path) -> None:
    """The Quickstart, saved under its name and served by uvicorn: POST is 201, then GET 200."""
    block, session = quickstart()
    assert block.file_name is not None
    (project / block.file_name).write_text(block.text)
    with serve(session.argv, project) as base_url:
        created = httpx.post(f"{base_url}/items", json={"name": "apple"}, timeout=30)
        assert created.status_code == 201, created.text
        read = httpx.get(f"{base_url}/items/{created.json()['id']}", timeout=30)
        assert read.status_code == 200, read.text
        assert read.json() == created.json()
    # The server was stopped: its port answers no more.
    with pytest.raises(httpx.TransportError):
        httpx.get(base_url, timeout=5)


def test_application_files_type_check_under_mypy_strict(tmp_path: Path) -> None:
    """The apps the pages show pass ``mypy --strict``: ``db.session`` is typed as the
    session class given (SQLModel's ``.exec()`` included), with no casts."""
    shown: dict[str, Block] = {}
    for page in checked(PAGES):
        for name, block in files_of(page).items():
            if not Path(name).name.startswith(("test_", "conftest")):
                assert shown.setdefault(name, block).text == block.text, (
                    f"{block.where()} and {shown[name].where()} show two different {name}"
                )
    for name, block in shown.items():
        (tmp_path / name).write_text(block.text)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *sorted(shown)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_listed_blocks_skip_the_tests() -> None:
    """A block marked as not run is one of the few listed here, with its reason."""
    marked = {
        (relative(b.origin), b.text.split("\n", 1)[0])
        for page in PAGES
        for b in read_blocks(page)
        if b.language == "python" and b.not_run
    }
    assert marked == ALLOWED_NOT_RUN
    assert all(len(first) > len(NOT_RUN) + 3 for _, first in marked), "say why it is not run"


@pytest.mark.parametrize("page", [page_param(p) for p in checked(PAGES)])
def test_code_blocks_name_their_language(page: Path) -> None:
    """Every code block says what it is, so none escapes the rules by having no language."""
    unnamed = [b.where() for b in read_blocks(page) if not b.language]
    assert unnamed == []
