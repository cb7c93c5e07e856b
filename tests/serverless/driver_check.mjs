// The real @neondatabase/serverless driver against neonctl's proxy, configured only through neonConfig.
// Usage: node driver_check.mjs SCENARIO   (env: NEON_URI = the proxy URI, NEON_CONFIG = JSON of neonConfig)
// Exits 0 when the scenario's assertions hold; prints the failure otherwise.
import assert from 'node:assert/strict';
import { neon, neonConfig, Pool, Client, NeonDbError } from '@neondatabase/serverless';
import ws from 'ws';

const uri = process.env.NEON_URI;
Object.assign(neonConfig, JSON.parse(process.env.NEON_CONFIG));
neonConfig.webSocketConstructor = ws;
const sql = neon(uri);

const wrongPassword = () => {
  const u = new URL(uri);
  u.password = 'not-the-password';
  return u.toString();
};

const scenarios = {
  async types() {
    const [row] = await sql`SELECT ${'text'}::text AS t, ${42}::int AS i, ${null}::int AS n, ${true}::boolean AS b,
      ${JSON.stringify({ a: [1, 2] })}::jsonb AS j, '2024-01-02T03:04:05Z'::timestamptz AS ts,
      ${Buffer.from([0, 1, 255])}::bytea AS by, 'zażółć 🐘'::text AS u`;
    assert.equal(row.t, 'text');
    assert.equal(row.i, 42);
    assert.equal(row.n, null);
    assert.equal(row.b, true);
    assert.deepEqual(row.j, { a: [1, 2] });
    assert.equal(row.ts.toISOString(), '2024-01-02T03:04:05.000Z');
    assert.deepEqual([...row.by], [0, 1, 255]);
    assert.equal(row.u, 'zażółć 🐘');
  },
  async parameterised() {
    const rows = await sql.query('SELECT $1::int + $2::int AS s, $3::text AS t', [2, 3, 'x']);
    assert.deepEqual(rows, [{ s: 5, t: 'x' }]);
  },
  async arraymode_fullresults() {
    const arr = await sql.query('SELECT 1 AS a, 2 AS b', [], { arrayMode: true });
    assert.deepEqual(arr, [[1, 2]]);
    const full = await sql.query('SELECT g FROM generate_series(1, 3) g', [], { fullResults: true });
    assert.equal(full.command, 'SELECT');
    assert.equal(full.rowCount, 3);
    assert.deepEqual(full.fields.map((f) => [f.name, f.dataTypeID]), [['g', 23]]);
    assert.deepEqual(full.rows, [{ g: 1 }, { g: 2 }, { g: 3 }]);
  },
  async transaction_commits_and_rolls_back() {
    await sql`DROP TABLE IF EXISTS sl_tx`;
    await sql`CREATE TABLE sl_tx (id int PRIMARY KEY)`;
    const res = await sql.transaction([sql`INSERT INTO sl_tx VALUES (1)`, sql`INSERT INTO sl_tx VALUES (2)`,
      sql`SELECT count(*)::int AS c FROM sl_tx`], { isolationLevel: 'Serializable' });
    assert.deepEqual(res[2], [{ c: 2 }]);
    await assert.rejects(sql.transaction([sql`INSERT INTO sl_tx VALUES (3)`, sql`INSERT INTO sl_tx VALUES (1)`]),
      (e) => e instanceof NeonDbError && e.code === '23505' && /duplicate key/.test(e.message)
        && e.constraint === 'sl_tx_pkey');
    const [{ c }] = await sql`SELECT count(*)::int AS c FROM sl_tx`;
    assert.equal(c, 2, 'the failed batch rolled back as a whole');
    await assert.rejects(sql.transaction([sql`INSERT INTO sl_tx VALUES (9)`], { readOnly: true }),
      (e) => e.code === '25006');
  },
  async error_sqlstate() {
    await assert.rejects(sql`SELECT * FROM no_such_table`,
      (e) => e instanceof NeonDbError && e.code === '42P01' && e.position === '15' && e.severity === 'ERROR');
    await assert.rejects(sql.query('SELECT $1::int', ['x']), (e) => e.code === '22P02');
  },
  async thousand_rows() {
    const rows = await sql`SELECT g, md5(g::text) AS h FROM generate_series(1, 1000) g`;
    assert.equal(rows.length, 1000);
    assert.equal(rows[999].g, 1000);
  },
  async pool_concurrent() {
    const pool = new Pool({ connectionString: uri, max: 5 });
    const res = await Promise.all(Array.from({ length: 20 }, (_, i) => pool.query('SELECT $1::int AS v', [i])));
    assert.deepEqual(res.map((r) => r.rows[0].v), Array.from({ length: 20 }, (_, i) => i));
    await pool.end();
  },
  async client_begin_rollback() {
    const client = new Client(uri);
    await client.connect();
    await client.query('DROP TABLE IF EXISTS sl_cl');
    await client.query('CREATE TABLE sl_cl (v text)');
    await client.query('BEGIN');
    await client.query('INSERT INTO sl_cl VALUES ($1)', ['gone']);
    assert.equal((await client.query('SELECT count(*)::int AS c FROM sl_cl')).rows[0].c, 1);
    await client.query('ROLLBACK');
    assert.equal((await client.query('SELECT count(*)::int AS c FROM sl_cl')).rows[0].c, 0);
    await client.end();
  },
  async wrong_password_http() {
    await assert.rejects(neon(wrongPassword())`SELECT 1`,
      (e) => e instanceof NeonDbError && e.code === '28P01');
  },
  async wrong_password_ws() {
    const client = new Client(wrongPassword());
    await assert.rejects(client.connect(), (e) => /password authentication failed/.test(e.message)
      && e.code === '28P01');
  },
};

const name = process.argv[2];
if (!scenarios[name]) {
  console.error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(', ')}`);
  process.exit(2);
}
try {
  await scenarios[name]();
  process.exit(0);
} catch (e) {
  console.error(`${name} failed: ${e.stack || e}`);
  process.exit(1);
}
