'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { FakeMaster, RawHttp, get, sleep, waitFor, within, FIXTURES, PACKAGE } = require('../test-support/helpers.js');

const WORKER = path.join(FIXTURES, 'http-worker.js');

test('two workers: every connection is served by the worker it was dispatched to', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 2 });
  t.after(() => master.close());

  const served = [];
  for (let i = 0; i < 10; i++) {
    const res = await get(master.port);
    assert.equal(res.status, 200);
    const id = Number(res.headers['x-worker-id']);
    assert.equal(res.body, `Hello from worker ${id} (pid ${master.workers[id].pid})\n`);
    served.push(id);
  }
  assert.deepEqual(master.dispatched, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
  assert.deepEqual(served, master.dispatched);
});

test('ready once, then heartbeats carrying the open-connection count', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1, heartbeatMs: 50 });
  t.after(() => master.close());
  const worker = master.workers[0];

  const clients = [];
  for (let i = 0; i < 3; i++) {
    const c = await RawHttp.connect(master.port);
    clients.push(c);
    assert.equal((await c.request('/')).status, 200); // keep-alive: stays open
  }
  const withThree = await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 3, 2000,
    'heartbeat with active 3');
  for (const c of clients) c.close();
  const index = worker.messages.indexOf(withThree);
  await waitFor(() => worker.messages.slice(index).find((m) => m.msg.rr === 'heartbeat' && m.msg.active === 0),
    2000, 'heartbeat with active 0 after the clients closed');

  assert.equal(worker.rr('ready').length, 1);
  assert.equal(worker.messages[0].msg.rr, 'ready', 'nothing before ready');
  await waitFor(() => worker.rr('heartbeat').length >= 4, 2000, 'four heartbeats');
  const beats = worker.rr('heartbeat');
  for (const b of beats) assert.deepEqual(Object.keys(b.msg).sort(), ['active', 'rr']);
  // Every 50 ms (not the 1 s default): the typical gap is short, and none is a long
  // silence. The bounds leave room for timers late on a loaded machine.
  const gaps = beats.slice(1).map((b, i) => b.at - beats[i].at);
  const median = [...gaps].sort((a, b) => a - b)[Math.floor(gaps.length / 2)];
  assert.ok(median < 250, `gaps ${gaps}`);
  assert.ok(Math.max(...gaps) < 2000, `gaps ${gaps}`);
});

test('ready: false delays ready (and heartbeats) until ready() is called', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, heartbeatMs: 50, env: { TEST_READY_DELAY_MS: '300' }, waitReady: false,
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const ready = await worker.waitReady(5000);
  assert.ok(ready.at - worker.spawnedAt >= 300, `ready after ${ready.at - worker.spawnedAt} ms`);
  assert.equal(worker.messages[0].msg.rr, 'ready');
  assert.equal((await get(master.port)).status, 200);
});

test('user messages both ways; rr messages and handles never reach worker.on("message")', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1 });
  t.after(() => master.close());
  const worker = master.workers[0];

  await worker.send({ hello: 'world' });
  await get(master.port); // a connection handle in between
  await worker.send({ rr: 'something-newer' }); // rr namespace: not the application's
  await worker.send('a string');
  await get(master.port);
  await worker.send([1, 2, 3]);
  await worker.send(42);
  const res = await get(master.port, '/send?x=1');
  assert.equal(res.body, 'true');

  await waitFor(() => worker.user().length >= 5, 2000, 'echoes and the worker message');
  const user = worker.user();
  assert.deepEqual(user.filter((m) => m.echo !== undefined).map((m) => m.echo),
    [{ hello: 'world' }, 'a string', [1, 2, 3], 42]);
  assert.deepEqual(user.find((m) => m.from !== undefined), { from: 0, query: '?x=1' });
  // Nothing else came back: no connection, no rr message was echoed.
  assert.equal(user.length, 5);
});

test("Node's headersTimeout applies to handed-over connections", async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1, env: { TEST_HEADERS_TIMEOUT_MS: '300' } });
  t.after(() => master.close());
  const c = await RawHttp.connect(master.port);
  t.after(() => c.close());
  c.socket.write('GET / HTTP/1.1\r\nHost: x\r\n'); // never finishes its headers
  const res = await c.response(3000);
  assert.equal(res.status, 408);
  await within(2000, c.closed, 'closed after the 408');
});

test('send() outside a pool returns false; reserved values are refused', () => {
  const worker = require(PACKAGE);
  assert.equal(worker.isWorker, false);
  assert.equal(worker.send({ a: 1 }), false);
  assert.throws(() => worker.send({ rr: 'ready' }), TypeError);
  assert.throws(() => worker.send({ cmd: 'NODE_HANDLE_ACK' }), TypeError);
  assert.equal(typeof worker.id, 'number');
  assert.equal(worker.draining, false);
});

test('send() refuses a value whose JSON is longer than 64 KiB with a RangeError', () => {
  const worker = require(PACKAGE);
  // The master drops a line longer than 65536 bytes, its newline not counted
  // (crates/rr-cluster/src/channel.rs, next_line). {"s":"…"}: 8 bytes around the string.
  const fits = { s: 'x'.repeat(65536 - 8) };
  assert.equal(Buffer.byteLength(JSON.stringify(fits)), 65536);
  assert.equal(worker.send(fits), false); // outside a pool: nothing to send to
  assert.throws(() => worker.send({ s: 'x'.repeat(65536 - 7) }),
    /RangeError: send\(\): the message is 65537 bytes of JSON/);
  // Bytes, not characters: '€' is 3 bytes in UTF-8, and the quotes 2.
  assert.equal(worker.send('€'.repeat(21844)), false); // 3 * 21844 + 2 = 65534
  assert.throws(() => worker.send('€'.repeat(21845)), /RangeError: send\(\): the message is 65537 bytes/);
  // Reported before the callback could be.
  let called = false;
  assert.throws(() => worker.send({ s: 'x'.repeat(70000) }, () => { called = true; }), RangeError);
  assert.equal(called, false);
});

for (const first of ['app', 'package']) {
  test(`a connection fed both by serve() and by the application (${first} first) is served once`, async (t) => {
    const master = await FakeMaster.start({
      script: path.join(FIXTURES, 'double-feed-worker.js'), workers: 1,
      env: { TEST_FEED_FIRST: first, TEST_HEADERS_TIMEOUT_MS: '300' },
    });
    t.after(() => master.close());
    const worker = master.workers[0];
    const c = await RawHttp.connect(master.port);
    t.after(() => c.close());
    const one = await c.request('/');
    assert.equal(one.status, 200);
    assert.equal(one.body, 'served 1\n');
    // Past headersTimeout: a second parser on the socket would answer 408 by now.
    await sleep(700);
    assert.equal(c.buffer.length, 0, `unexpected bytes: ${c.buffer.toString('latin1')}`);
    const two = await c.request('/');
    assert.equal(two.status, 200);
    assert.equal(two.body, 'served 2\n');
    assert.equal(c.closedAt, null);
    assert.equal(worker.stderr.match(/a connection was emitted twice on a served server/g)?.length, 1,
      worker.stderr);
  });
}

test('end of file on the channel without drain: the worker finishes in-flight work and exits 0', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1 });
  t.after(() => master.close());
  const worker = master.workers[0];

  const slow = (async () => {
    const c = await RawHttp.connect(master.port);
    try {
      return await c.request('/slow?ms=400');
    } finally {
      c.close();
    }
  })();
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'the slow request open');
  const gone = Date.now();
  worker.child.disconnect(); // the master is gone
  const res = await slow;
  assert.equal(res.status, 200);
  assert.equal(res.body, 'slow done\n');
  assert.equal(res.headers.connection, 'close');
  const exit = await worker.waitExit(5000);
  assert.equal(exit.code, 0);
  assert.ok(exit.at - gone < 3000, `exited ${exit.at - gone} ms after the end of file`);
  assert.match(worker.stdout, /drain \{"reason":"disconnect"/);
});

test('outside a pool, serve() listens itself and SIGTERM drains and exits 0', async (t) => {
  const env = { ...process.env, TEST_LISTEN_PORT: '0' };
  for (const name of ['NODE_TEST_CONTEXT', 'NODE_CHANNEL_FD', 'RR_CLUSTER_PROTOCOL', 'RR_CLUSTER_WORKER_ID']) {
    delete env[name];
  }
  const child = spawn(process.execPath, [WORKER], { stdio: ['ignore', 'pipe', 'pipe'], env });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d) => { out += d; });
  const port = Number((await waitFor(() => /listening (\d+)/.exec(out), 5000, 'listening'))[1]);
  const res = await get(port);
  assert.equal(res.body, `Hello from worker 0 (pid ${child.pid})\n`);
  // A keep-alive connection: its request after the drain is answered with
  // Connection: close.
  const c = await RawHttp.connect(port);
  t.after(() => c.close());
  assert.equal((await c.request('/')).headers.connection, 'keep-alive');
  child.kill('SIGTERM');
  await waitFor(() => out.includes('drain {"reason":"signal"'), 3000, 'the drain');
  const late = await c.request('/');
  assert.equal(late.status, 200);
  assert.equal(late.headers.connection, 'close');
  const exit = await within(5000, exited, 'standalone exit');
  assert.deepEqual(exit, { code: 0, signal: null });
  assert.match(out, /drain \{"reason":"signal"/);
});
