"""One workload for psycopg 3; prints its results as JSON. Connection from the PG* environment."""
import json
from datetime import date
from decimal import Decimal

import psycopg
from psycopg.types.json import Jsonb

out = {}
with psycopg.connect(
    options="-c search_path=public -c statement_timeout=43210",
    application_name="compat-psycopg",
) as c:
    out["settings"] = c.execute(
        "SELECT current_setting('statement_timeout'), current_setting('search_path'),"
        " current_setting('application_name'), current_user"
    ).fetchone()
    out["types"] = c.execute(
        "SELECT %s::int, %s::text, %s::numeric, %s::bool, %s::date, %s::bytea, %s::jsonb, NULL::int",
        (42, "h\u00e9llo", Decimal("1.5"), True, date(2024, 1, 2), b"\x00\x01", Jsonb({"a": 1})),
    ).fetchone()
    out["accounts"] = c.execute("SELECT count(*), min(id), max(id) FROM accounts").fetchone()
    try:
        c.execute("SELECT 1/0")
    except psycopg.Error as e:
        out["error"] = [e.sqlstate, e.diag.severity, e.diag.message_primary]
    c.rollback()
    c.execute("CREATE TEMP TABLE t (id int, v text)")
    with c.cursor() as cur:
        with cur.copy("COPY t FROM STDIN") as cp:
            for i in range(2000):
                cp.write_row((i, f"v{i}"))
        out["copy_in"] = cur.execute("SELECT count(*), sum(id) FROM t").fetchone()
        rows = []
        with cur.copy("COPY (SELECT * FROM t ORDER BY id LIMIT 5) TO STDOUT") as cp:
            for row in cp.rows():
                rows.append(row)
        out["copy_out"] = rows
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, "many") for i in range(50)])
        out["executemany"] = cur.execute("SELECT count(*) FROM t WHERE v = 'many'").fetchone()
        big = "x" * (2 * 1024 * 1024)
        out["big_param"] = cur.execute("SELECT length(%s::text)", (big,)).fetchone()
    c.commit()
    notices = []
    c.add_notice_handler(lambda d: notices.append([d.severity, d.message_primary]))
    c.execute("DO $$BEGIN RAISE NOTICE 'hello %', 1; END$$")
    out["notices"] = notices
    with c.pipeline():
        cur1 = c.execute("SELECT 1")
        cur2 = c.execute("SELECT %s::text", ("piped",))
    out["pipeline"] = [cur1.fetchone(), cur2.fetchone()]
    c.commit()

with psycopg.connect(autocommit=True) as c:
    pid = c.info.backend_pid
    out["pid_in_pg_stat_activity"] = c.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    out["pg_backend_pid_matches"] = c.execute("SELECT pg_backend_pid() = %s", (pid,)).fetchone()
    c.execute("LISTEN compat")
    c.execute("NOTIFY compat, 'psycopg'")
    n = next(c.notifies(timeout=5))
    out["notify"] = [n.channel, n.payload, n.pid == pid]

print(json.dumps(out, default=str, sort_keys=True))
