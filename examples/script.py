"""A plain script: one managed session, the URL from $DATABASE_URL, no warnings at exit.

DATABASE_URL=mysql+asyncmy://root@127.0.0.1:3306/test python examples/script.py
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

import asyncgone


async def main() -> None:
    # The engine is made from $DATABASE_URL and disposed when the block exits.
    async with asyncgone.managed_session() as session:
        version = (await session.execute(text("SELECT VERSION()"))).scalar_one()
        await session.execute(text("CREATE TEMPORARY TABLE script_runs (at DATETIME)"))
        await session.execute(text("INSERT INTO script_runs VALUES (NOW()), (NOW())"))
        runs = (await session.execute(text("SELECT COUNT(*) FROM script_runs"))).scalar_one()
    # Committed here. A failure above would have rolled back and re-raised the error.
    print(f"server {version}; {runs} rows written and read back in one transaction")


if __name__ == "__main__":
    asyncio.run(main())
