"""One workload for asyncpg; prints its results as JSON. Connection from the PG* environment."""
import asyncio
import json
from datetime import date
from decimal import Decimal

import asyncpg


async def main():
    out = {}
    c = await asyncpg.connect(
        server_settings={
            "search_path": "public",
            "statement_timeout": "43210",
            "application_name": "compat-asyncpg",
        }
    )
    out["settings"] = list(
        await c.fetchrow(
            "SELECT current_setting('statement_timeout'), current_setting('search_path'),"
            " current_setting('application_name'), current_user"
        )
    )
    out["types"] = list(
        await c.fetchrow(
            "SELECT $1::int, $2::text, $3::numeric, $4::bool, $5::date, $6::bytea, $7::jsonb, NULL::int",
            42, "h\u00e9llo", Decimal("1.5"), True, date(2024, 1, 2), b"\x00\x01", '{"a": 1}',
        )
    )
    out["accounts"] = list(await c.fetchrow("SELECT count(*), min(id), max(id) FROM accounts"))
    try:
        await c.execute("SELECT 1/0")
    except asyncpg.PostgresError as e:
        out["error"] = [e.sqlstate, e.severity, e.message]
    stmt = await c.prepare("SELECT $1::int + 1")
    out["prepared"] = [await stmt.fetchval(i) for i in range(5)]
    await c.execute("CREATE TEMP TABLE t (id int, v text)")
    await c.copy_records_to_table("t", records=[(i, f"v{i}") for i in range(2000)])
    out["copy_in"] = list(await c.fetchrow("SELECT count(*), sum(id) FROM t"))
    await c.executemany("INSERT INTO t VALUES ($1, $2)", [(i, "many") for i in range(50)])
    out["executemany"] = await c.fetchval("SELECT count(*) FROM t WHERE v = 'many'")
    try:
        async with c.transaction():
            await c.execute("INSERT INTO t VALUES (-1, 'rolled back')")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    out["rolled_back"] = await c.fetchval("SELECT count(*) FROM t WHERE id = -1")
    async with c.transaction():
        out["cursor"] = [r[0] async for r in c.cursor("SELECT id FROM t ORDER BY id LIMIT 7", prefetch=3)]
    out["big_param"] = await c.fetchval("SELECT length($1::text)", "x" * (2 * 1024 * 1024))
    pid = c.get_server_pid()
    out["pid_in_pg_stat_activity"] = await c.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
    )
    got = asyncio.get_running_loop().create_future()
    await c.add_listener("compat", lambda _c, p, ch, payload: got.done() or got.set_result((p, ch, payload)))
    await c.execute("NOTIFY compat, 'asyncpg'")
    p, ch, payload = await asyncio.wait_for(got, 5)
    out["notify"] = [ch, payload, p == pid]
    await c.close()
    print(json.dumps(out, default=str, sort_keys=True))


asyncio.run(main())
