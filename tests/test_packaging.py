"""What a newcomer and an installer get: the README's first-hour commands, the distribution's
metadata, the sdist installed and tested in a clean venv, and the documented commands run in a
clean clone.

The quick checks run everywhere. The slow ones build, create venvs and install from PyPI, so
they carry the ``packaging`` marker and run in tox's ``packaging`` env only
(``scripts/test -e packaging``, which installs ``build``); the everyday envs deselect them. A
clean clone holds the repository's last commit, not the working tree: commit first what they
should see.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import asyncgone
from tests._support import Server
from tests.integrations.test_examples import documented_commands, serve_as_documented
from tests.test_cli import check_demo

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "https://github.com/asyncgone/asyncgone"  # mkdocs.yml's repo_url
# The README sections whose console blocks are the first hour: see the demo, run the tests.
DEMO_SECTION, TESTS_SECTION = "See it", "Developing"
# Tracked files the sdist leaves out: CI's own entry point.
NOT_IN_SDIST = (".ci/",)
# Files an unpacked sdist must hold for its tests, docs build and tox envs to run.
SDIST_NEEDS = (
    "CHANGELOG.md",
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "tox.ini",
    "mkdocs.yml",
    "constraints/oldest.txt",
    "docs/index.md",
    "examples/starlette_app.py",
    "scripts/demo",
    "scripts/test",
    "tests/conftest.py",
    "asyncgone/py.typed",
)
# The tests run from the unpacked sdist against the installed package.
SDIST_TESTS = ("tests/test_public_api.py", "tests/test_config.py", "tests/test_url.py")

# Selected by the `packaging` marker: tox's everyday envs deselect it, its own env runs it.
slow = pytest.mark.packaging


def console_commands(markdown: str, section: str) -> list[str]:
    """The ``$ `` lines of the console blocks in the ``## section`` of a Markdown page."""
    body = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```console\n(.*?)^```", body, re.S | re.M)
    return [line[2:] for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def pythons_tox_runs() -> set[str]:
    """The Python versions tox.ini's environments run on (``python3.X`` or a ``py3X`` factor)."""
    tox = (ROOT / "tox.ini").read_text()
    found = set(re.findall(r"^base_python = python(3\.\d+)$", tox, re.M))
    found |= {f"3.{minor}" for minor in re.findall(r"\bpy3(\d+)\b", tox)}
    return found


def fresh_environment(**extra: str) -> dict[str, str]:
    """This process's environment as a shell outside tox and any virtualenv would have it."""
    inside = {sys.prefix, os.environ.get("VIRTUAL_ENV") or sys.prefix}
    path = [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and not any(entry.startswith(prefix) for prefix in inside)
    ]
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TOX", "VIRTUAL_ENV", "PYTHON", "PYTEST", "PIP_CONSTRAINT"))
    }
    return {**env, "PATH": os.pathsep.join(path), **extra}


def run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; echo what it printed (pytest shows it when the test fails)."""
    print(f"$ {shlex.join(argv)}  (in {cwd})")
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    print(result.stdout)
    return result


def test_the_readme_gives_one_command_for_the_demo_and_one_for_the_tests() -> None:
    """The README's "See it" shows one command and "Developing" another, each a script of
    this repository that a fresh clone can run as it is."""
    readme = (ROOT / "README.md").read_text()
    for section in (DEMO_SECTION, TESTS_SECTION):
        [command] = console_commands(readme, section)
        script = ROOT / shlex.split(command)[0]
        assert script.is_file(), (section, command)
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_the_version_has_one_source() -> None:
    """pyproject.toml reads the version from ``asyncgone.__version__``; the installed
    distribution carries that version."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=", pyproject, re.M)
    assert re.search(
        r'^\[tool\.hatch\.version\]\npath = "asyncgone/__init__\.py"$', pyproject, re.M
    )
    try:
        installed = importlib.metadata.version("asyncgone")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("asyncgone is not installed here, only imported from the tree")
    assert installed == asyncgone.__version__


def test_classifiers_name_the_pythons_tox_runs() -> None:
    """The Python classifiers and ``requires-python`` are the versions tox runs, no more."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject))
    assert declared == pythons_tox_runs()
    oldest = min(declared, key=lambda version: int(version.split(".")[1]))
    assert f'requires-python = ">={oldest}"' in pyproject


# -- the sdist -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist built from this tree, as ``python -m build --sdist`` builds it."""
    out = tmp_path_factory.mktemp("dist")
    result = run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
        cwd=ROOT,
        env=fresh_environment(),
    )
    assert result.returncode == 0, result.stdout
    [built] = out.glob("asyncgone-*.tar.gz")
    return built


def members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as archive:
        return {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}


def tracked_files() -> set[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    deleted = subprocess.run(
        ["git", "ls-files", "--deleted"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return set(listed) - set(deleted)


@slow
def test_the_sdist_holds_what_its_tests_docs_and_tox_need(sdist: Path) -> None:
    """Every tracked file but CI's own is in the sdist, scripts stay executable, and nothing
    generated (caches, venvs, tox envs) is."""
    inside = members(sdist)
    assert [name for name in SDIST_NEEDS if name not in inside] == []
    expected = {name for name in tracked_files() if not name.startswith(NOT_IN_SDIST)}
    assert sorted(expected - set(inside)) == []
    for script in ("scripts/demo", "scripts/test"):
        assert inside[script].mode & 0o111, f"{script} lost its executable bit"
    generated = re.compile(r"(^|/)(__pycache__|\.tox|\.venv[^/]*|\.mypy_cache|site)(/|$)")
    assert [name for name in inside if generated.search(name)] == []


@slow
def test_the_sdist_metadata(sdist: Path) -> None:
    """PKG-INFO: the version of ``asyncgone.__version__``, the license as an SPDX expression
    (core metadata 2.4), the project's URLs, Linux and the tested Pythons."""
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO")
        assert member is not None
        metadata = email.parser.Parser().parsestr(member.read().decode())
    major, minor = map(int, metadata["Metadata-Version"].split("."))
    assert (major, minor) >= (2, 4)
    assert metadata["Version"] == asyncgone.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = metadata.get_all("Classifier")
    # PEP 639: an expression replaces the License :: classifiers (PyPI refuses both).
    assert [c for c in classifiers if c.startswith("License ::")] == []
    assert [c for c in classifiers if c.startswith("Operating System ::")] == [
        "Operating System :: POSIX :: Linux"
    ]
    pythons = {c.rsplit(" ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c)}
    assert pythons == pythons_tox_runs()
    for framework in ("AnyIO", "AsyncIO", "FastAPI", "Pytest"):
        assert f"Framework :: {framework}" in classifiers
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Source", "Changelog", "Issues"}
    assert all(url.startswith(REPOSITORY) for url in urls.values()), urls
    assert f"repo_url: {REPOSITORY}\n" in (ROOT / "mkdocs.yml").read_text()


@slow
def test_the_oldest_hatchling_allowed_writes_the_license_expression(tmp_path: Path) -> None:
    """The build backend's declared floor, pinned, writes core metadata 2.4 with the SPDX
    license expression (older hatchling releases write none, or one 2.3 metadata lacks)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    [floor] = re.findall(r'^requires = \["hatchling>=([\d.]+)"\]$', pyproject, re.M)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"hatchling=={floor}\n")
    out = tmp_path / "dist"
    built = run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
        ROOT,
        fresh_environment(PIP_CONSTRAINT=str(constraints)),
    )
    assert built.returncode == 0, built.stdout
    assert f"hatchling=={floor}" in built.stdout
    [wheel] = out.glob("asyncgone-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    assert metadata["Metadata-Version"] == "2.4"
    assert metadata["License-Expression"] == "MIT"


@slow
def test_the_sdist_installed_in_a_clean_venv_passes_tests_from_its_tree(
    sdist: Path, tmp_path: Path
) -> None:
    """The sdist installs (building its wheel) into a new venv with the drivers and testing
    extras; tests from the unpacked sdist then pass against the installed package, which is
    the only asyncgone they can import: the tree's copy is removed."""
    import tomllib  # Python 3.11+; the packaging env runs on 3.13

    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    tree = tmp_path / sdist.name.removesuffix(".tar.gz")
    shutil.rmtree(tree / "asyncgone")
    groups = tomllib.loads((tree / "pyproject.toml").read_text())["dependency-groups"]
    runner = [req for req in groups["test"] if re.match(r"pytest(-asyncio)?\b", req)]
    env = fresh_environment()
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)], tmp_path, env).returncode == 0
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    install = run([*pip, f"{sdist}[aiomysql,asyncmy,testing]", *runner], tmp_path, env)
    assert install.returncode == 0, install.stdout

    where = run(
        [python, "-c", "import asyncgone; print(asyncgone.__file__, asyncgone.__version__)"],
        tree,
        env,
    )
    location, version = where.stdout.split()
    assert Path(location).is_relative_to(venv), location
    assert version == asyncgone.__version__
    tests = run([python, "-m", "pytest", "-p", "no:cacheprovider", *SDIST_TESTS], tree, env)
    assert tests.returncode == 0, tests.stdout
    assert re.search(r"\d+ passed", tests.stdout)


# -- a clean clone ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this repository's HEAD, as a newcomer gets it."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    target = tmp_path_factory.mktemp("clone") / "asyncgone"
    result = run(["git", "clone", "--quiet", str(ROOT), str(target)], ROOT, fresh_environment())
    assert result.returncode == 0, result.stdout
    head = run(["git", "log", "-1", "--format=%h %s"], target, fresh_environment())
    print(f"clean clone of {head.stdout.strip()}")
    return target


def run_readme_section(clone: Path, section: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the commands of the clone's README section, as written, in one shell."""
    commands = console_commands((clone / "README.md").read_text(), section)
    assert commands, f"no commands under '## {section}' in the README of HEAD"
    script = "\n".join(["set -euo pipefail", *commands])
    return run(["bash", "-c", script], clone, fresh_environment(**env))


@slow
def test_the_readme_demo_command_in_a_clean_clone(clone: Path) -> None:
    """The README's demo command, run in a clean clone, installs what it needs and shows the
    demo's table: every fault breaks plain SQLAlchemy, none breaks asyncgone."""
    result = run_readme_section(clone, DEMO_SECTION)
    assert result.returncode == 0, result.stdout
    check_demo(result.stdout)


@slow
def test_the_readme_test_command_in_a_clean_clone(clone: Path) -> None:
    """The README's test command, run in a clean clone, bootstraps tox and passes; its
    cheapest environment (lint) is enough to prove the bootstrap, chosen with $TOXENV so that
    the command runs exactly as written."""
    result = run_readme_section(clone, TESTS_SECTION, TOXENV="lint")
    assert result.returncode == 0, result.stdout
    assert re.search(r"^  lint: OK", result.stdout, re.M), result.stdout
    assert "congratulations" in result.stdout


@slow
def test_an_environment_without_its_python_is_skipped_and_named(clone: Path) -> None:
    """Locally, an env whose interpreter is missing (a Python 3.19, which does not exist) is
    skipped, the run succeeds and scripts/test names the env last; a run in which every env
    was skipped fails, as nothing was tested; with CI's setting, a missing one fails."""
    argv = ["scripts/test", "-e", "py319,lint", "--notest"]
    result = run(argv, clone, fresh_environment())
    assert result.returncode == 0, result.stdout
    assert re.search(r"^  py319: SKIP", result.stdout, re.M), result.stdout
    last = result.stdout.splitlines()[-1]
    assert last.startswith("scripts/test: skipped py319: no interpreter found"), result.stdout

    only = run(["scripts/test", "-e", "py319", "--notest"], clone, fresh_environment())
    assert only.returncode != 0, only.stdout
    assert (
        only.stdout.splitlines()[-1] == "scripts/test: nothing ran: no interpreter found for py319"
    )

    in_ci = run(argv, clone, fresh_environment(TOX_SKIP_MISSING_INTERPRETERS="false"))
    assert in_ci.returncode != 0, in_ci.stdout
    assert "scripts/test: skipped" not in in_ci.stdout


@pytest.fixture
def anyio_backend() -> str:
    """The servers run in their own processes; the test only waits on them."""
    return "asyncio"


@slow
@pytest.mark.anyio
async def test_the_frameworks_page_commands_in_a_clean_clone(
    clone: Path, disposable: Server, tmp_path: Path
) -> None:
    """In a clean clone and a new venv, the frameworks page's install line, then each of its
    commands: the servers serve their example (a note written and read back), the script
    runs. Only the URL is pointed at the test server, and a free port added."""
    page = clone / "docs" / "frameworks.md"
    [block] = re.findall(r"^```console\n(.*?)^```", page.read_text(), re.S | re.M)
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    venv = tmp_path / "venv"
    # An activated venv: its bin first on PATH.
    env = fresh_environment(
        VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{fresh_environment()['PATH']}"
    )
    created = await anyio.to_thread.run_sync(
        run, [sys.executable, "-m", "venv", str(venv)], tmp_path, env
    )
    assert created.returncode == 0, created.stdout
    url = disposable.url("asyncmy")
    serving = documented_commands(page)
    assert serving
    for command in commands:
        if command in serving:
            disposable.query("DROP TABLE IF EXISTS notes")
            await serve_as_documented(
                command, url, tmp_path / "server.log", bin_dir=venv / "bin", cwd=clone
            )
            continue
        argv = shlex.split(command)
        if argv[0].startswith("DATABASE_URL="):
            argv[0] = f"DATABASE_URL={url}"
        result = await anyio.to_thread.run_sync(run, ["env", *argv], clone, env)
        assert result.returncode == 0, (command, result.stdout)
