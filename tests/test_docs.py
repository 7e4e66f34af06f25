"""Every Python sample in the documentation runs, against MariaDB.

Each page's ```python blocks run in order in one namespace (so a page reads as one
script), inside one event loop, with top-level ``await`` allowed. URLs at the placeholder
host ``db.example.com`` are pointed at the test database. A page marked
``<!-- docs-test: pytest -->`` holds test code: its blocks are written to one test module
and run by pytest, and every test in it must pass.
"""

from __future__ import annotations

import ast
import asyncio
import re
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests._support import Server

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(r"mysql(\+\w+)?://[^\s\"'@]*@db\.example\.com(?::\d+)?/\w+")


def samples(page: Path) -> list[str]:
    return [textwrap.dedent(block) for block in FENCE.findall(page.read_text())]


def pointed_at(code: str, url: str) -> str:
    def swap(match: re.Match[str]) -> str:
        driver = match.group(1) or "+asyncmy"
        return str(
            make_url(url).set(drivername=f"mysql{driver}").render_as_string(hide_password=False)
        )

    return PLACEHOLDER.sub(swap, code)


def test_every_sample_is_found() -> None:
    """Every ```python fence of every page is extracted, so none escapes the run below."""
    assert len(PAGES) > 5
    for page in PAGES:
        assert len(samples(page)) == page.read_text().count("```python"), page.name
    assert sum(bool(samples(page)) for page in PAGES) >= 6


@pytest.mark.parametrize("page", [p for p in PAGES if samples(p)], ids=lambda p: p.name)
def test_samples_run(
    page: Path, shared: Server, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Python block of the page runs without error."""
    url = shared.url("asyncmy")
    monkeypatch.setenv("DATABASE_URL", url)
    blocks = [pointed_at(block, url) for block in samples(page)]
    if "<!-- docs-test: pytest -->" in page.read_text():
        pytester.makeini(
            "[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
        )
        pytester.makepyfile(test_page="\n\n".join(blocks))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--asyncgone-url={url}")
        tests = sum(len(re.findall(r"^(?:async )?def test_", block, re.M)) for block in blocks)
        assert tests >= 1
        result.assert_outcomes(passed=tests)
        return
    monkeypatch.chdir(ROOT)
    run_page(page.name, blocks)


def run_page(name: str, blocks: list[str]) -> None:
    """Run the blocks in order; top-level awaits share one event loop, which is not running
    between blocks, so a block may also call ``asyncio.run()`` itself."""
    namespace: dict[str, object] = {"__name__": f"docs_{name.removesuffix('.md')}"}
    loop = asyncio.new_event_loop()
    try:
        for number, block in enumerate(blocks, 1):
            code = compile(
                block,
                f"{name}[python block {number}]",
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            )
            result = eval(code, namespace)
            if asyncio.iscoroutine(result):
                loop.run_until_complete(result)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
