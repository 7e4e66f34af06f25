"""Scenario 7: managed_session() from a plain script with only $DATABASE_URL set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import asyncio

from sqlalchemy import text

import asyncgone


async def main() -> None:
    async with asyncgone.managed_session() as session:
        print((await session.execute(text("SELECT 40 + 2"))).scalar_one())


asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_script_runs_and_exits_without_warnings(url: str, loop: str) -> None:
    """The script prints its result, exits 0, and the interpreter reports nothing at exit
    (no "Event loop is closed", no garbage-collected connection, no ResourceWarning)."""
    script = (
        SCRIPT if loop == "asyncio" else SCRIPT.replace("asyncio.run(", "__import__('uvloop').run(")
    )
    # -W error turns every warning into an error, ResourceWarning included; anything left
    # for the garbage collector at exit is reported on stderr. (Not -X dev: its asyncio
    # debug mode logs slow callbacks, which a busy machine produces for unrelated reasons.)
    env = {**os.environ, "DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "42\n", "")
