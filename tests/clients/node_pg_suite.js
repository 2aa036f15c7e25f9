// One workload for node-postgres; prints its results as JSON. Connection from the PG* environment.
const { Client } = require('pg');

async function main() {
  const out = {};
  const c = new Client({
    options: '-c search_path=public',
    statement_timeout: 43210,
    application_name: 'compat-node-pg',
  });
  await c.connect();
  const q = async (text, values, rowMode = 'array') => (await c.query({ text, values, rowMode })).rows;
  out.settings = (await q("SELECT current_setting('statement_timeout'), current_setting('search_path'), current_setting('application_name'), current_user"))[0];
  out.types = (await q('SELECT $1::int, $2::text, $3::numeric, $4::bool, $5::date::text, $6::bytea, $7::jsonb, NULL::int',
    [42, 'h\u00e9llo', '1.5', true, '2024-01-02', Buffer.from([0, 1]), { a: 1 }]))[0]
    .map((v) => (Buffer.isBuffer(v) ? v.toString('hex') : v));
  out.accounts = (await q('SELECT count(*), min(id), max(id) FROM accounts'))[0];
  try {
    await c.query('SELECT 1/0');
  } catch (e) {
    out.error = [e.code, e.severity, e.message];
  }
  await c.query('CREATE TEMP TABLE t (id int, v text)');
  for (let i = 0; i < 20; i++) await c.query({ name: 'ins', text: 'INSERT INTO t VALUES ($1, $2)', values: [i, 'v' + i] });
  out.prepared = (await q('SELECT count(*), sum(id) FROM t'))[0];
  await c.query('BEGIN');
  await c.query("INSERT INTO t VALUES (-1, 'rolled back')");
  await c.query('ROLLBACK');
  out.rolled_back = (await q('SELECT count(*) FROM t WHERE id = -1'))[0];
  out.big_param = (await q('SELECT length($1::text)', ['x'.repeat(2 * 1024 * 1024)]))[0];
  const notices = [];
  c.on('notice', (n) => notices.push([n.severity, n.message]));
  await c.query("DO $$BEGIN RAISE NOTICE 'hello %', 1; END$$");
  out.notices = notices;
  const pid = c.processID;
  out.pid_in_pg_stat_activity = (await q('SELECT count(*) FROM pg_stat_activity WHERE pid = $1', [pid]))[0];
  const got = new Promise((resolve) => c.on('notification', resolve));
  await c.query('LISTEN compat');
  await c.query("NOTIFY compat, 'node'");
  const n = await Promise.race([got, new Promise((_, rej) => setTimeout(() => rej(new Error('no notification')), 5000))]);
  out.notify = [n.channel, n.payload, n.processId === pid];
  await c.end();
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
