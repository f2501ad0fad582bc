'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const tls = require('node:tls');
const { FakeMaster, RawHttp, sleep, waitFor, within, FIXTURES } = require('../test-support/helpers.js');

const WORKER = path.join(FIXTURES, 'http-worker.js');
const GRACE = 300;

test('drain: in-flight request completes, keep-alive gets Connection: close, idle closes after the grace, exit 0', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, heartbeatMs: 50, env: { TEST_IDLE_GRACE_MS: String(GRACE) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];

  // A: a slow request in flight when the drain comes.
  const a = await RawHttp.connect(master.port);
  const slow = a.request('/slow?ms=600');
  // B: keep-alive, one request done; it sends another one after the drain.
  const b = await RawHttp.connect(master.port);
  assert.equal((await b.request('/')).headers.connection, 'keep-alive');
  // C: keep-alive, one request done; then silent.
  const c = await RawHttp.connect(master.port);
  assert.equal((await c.request('/')).status, 200);
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 3, 2000, 'three connections open');

  const drainAt = await worker.drain(3000);

  await sleep(100);
  const late = await b.request('/');
  assert.equal(late.status, 200);
  assert.equal(late.headers.connection, 'close');
  assert.equal(late.body, `Hello from worker 0 (pid ${worker.pid})\n`);
  await within(2000, b.closed, 'B closed after its Connection: close response');

  const closedC = await within(3000, c.closed, 'idle C closed');
  assert.ok(closedC - drainAt >= GRACE - 20, `C closed ${closedC - drainAt} ms after the drain`);
  assert.ok(closedC - drainAt < GRACE + 1000, `C closed ${closedC - drainAt} ms after the drain`);

  const res = await slow;
  assert.equal(res.status, 200);
  assert.equal(res.body, 'slow done\n');
  assert.equal(res.headers.connection, 'close', 'headers written after the drain say close');

  const exit = await worker.waitExit(5000);
  assert.equal(exit.code, 0);
  assert.ok(exit.at - drainAt < 3000, `exit ${exit.at - drainAt} ms after the drain (deadline 3000)`);
  assert.match(worker.stdout, /drain \{"reason":"master","deadlineMs":3000\}/);
  a.close();
  b.close();
  c.close();
});

test('drain: a connection that never finishes does not keep the worker past the deadline', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: '100' } });
  t.after(() => master.close());
  const worker = master.workers[0];

  const a = await RawHttp.connect(master.port);
  t.after(() => a.close());
  const stuck = a.request('/slow?ms=20000', {}, 10000).catch((err) => err);
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'the request open');

  // The worker leaves a tenth of the deadline early (500 ms): room for a loaded
  // machine before the deadline, and far past the 100 ms idle grace.
  const drainAt = await worker.drain(5000);
  const exit = await worker.waitExit(8000);
  const took = exit.at - drainAt;
  assert.equal(exit.code, 0);
  assert.ok(took < 5000, `exited ${took} ms after a drain with a 5000 ms deadline`);
  assert.ok(took >= 2500, `exited ${took} ms after the drain: too early`);
  assert.match(worker.stderr, /drain deadline: exiting with 1 connection still open/);
  assert.ok((await stuck) instanceof Error, 'the stuck request got no response');
});

test('connections sent before the drain are still served after it', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1, dispatch: 'none' });
  t.after(() => master.close());
  const worker = master.workers[0];

  const client = await RawHttp.connect(master.port);
  t.after(() => client.close());
  const socket = await within(2000, (async () => {
    while (master.accepted.length === 0) await sleep(5);
    return master.accepted[0];
  })(), 'accept');
  // The connection, then the drain right behind it on the channel.
  const handed = worker.sendConnection(socket);
  const drainAt = await worker.drain(3000);
  await handed;
  const res = await client.request('/');
  assert.equal(res.status, 200);
  assert.equal(res.headers.connection, 'close');
  const exit = await worker.waitExit(3000);
  assert.equal(exit.code, 0);
  assert.ok(exit.at - drainAt < 3000);
});

test('after its own shutdown() the worker serves what the master sent before it read the suicide', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1, dispatch: 'none' });
  t.after(() => master.close());
  const worker = master.workers[0];
  const accepted = (n) => within(2000, (async () => {
    while (master.accepted.length < n) await sleep(5);
    return master.accepted[n - 1];
  })(), `accept ${n}`);

  const a = await RawHttp.connect(master.port);
  t.after(() => a.close());
  await worker.sendConnection(await accepted(1));
  const left = await a.request('/leave', { Connection: 'close' });
  assert.equal(left.status, 200);
  await worker.waitMessage((m) => m.rr === 'suicide', 2000, 'the suicide');
  // A connection the master had sent before it read the suicide, then its drain.
  const b = await RawHttp.connect(master.port);
  t.after(() => b.close());
  await worker.sendConnection(await accepted(2));
  const drainAt = await worker.drain(3000);
  const res = await b.request('/');
  assert.equal(res.status, 200);
  assert.equal(res.headers.connection, 'close');
  const exit = await worker.waitExit(3000);
  assert.equal(exit.code, 0);
  assert.ok(exit.at - drainAt < 3000);
});

test('drain: the idle grace counts from when a connection went idle, not from the drain', async (t) => {
  const grace = 1500;
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(grace) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  // Its head (keep-alive) goes out before the drain; it ends well after the grace.
  const a = await RawHttp.connect(master.port);
  t.after(() => a.close());
  const streamed = a.request(`/stream?ms=${2 * grace}`);
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'the request open');
  await worker.drain(10000);
  const res = await streamed;
  assert.equal(res.status, 200);
  assert.equal(res.body, 'start\nend\n');
  assert.equal(res.headers.connection, 'keep-alive', 'its head went out before the drain');
  // The client's next request, a moment later (within the grace from the end of the
  // response, past the grace from the drain), is served.
  await sleep(200);
  const next = await a.request('/');
  assert.equal(next.status, 200);
  assert.equal(next.headers.connection, 'close');
  assert.equal((await worker.waitExit(5000)).code, 0);
});

test('drain: a connection whose answer came before the rest of its body is closed after the grace, not at the deadline', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const a = await RawHttp.connect(master.port);
  t.after(() => a.close());
  // Answered at once (the handler does not read the body), 4 of its 10 body bytes sent.
  a.socket.write('POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n1234');
  const res = await a.response();
  assert.equal(res.status, 200);
  assert.equal(res.headers.connection, 'keep-alive');
  const drainAt = await worker.drain(10000);
  // The rest of the body, after the drain: traffic, then silence.
  await sleep(100);
  a.socket.write('567890');
  const closedAt = await within(5000, a.closed, 'A closed after the grace');
  assert.ok(closedAt - drainAt < 100 + GRACE + 2000, `closed ${closedAt - drainAt} ms after the drain (deadline 10000)`);
  assert.ok(closedAt - drainAt >= 100 + GRACE - 20, `closed ${closedAt - drainAt} ms after the drain: not a grace after its last bytes`);
  assert.equal((await worker.waitExit(5000)).code, 0);
});

test('drain: an idle sweep never cuts a response that is ended but not yet flushed', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const bytes = 16 << 20;
  // A slow reader: it reads nothing until the sweeps have run.
  const big = await RawHttp.connect(master.port);
  t.after(() => big.close());
  // An idle keep-alive connection, closed by the sweep: the sign that sweeps ran.
  const idle = await RawHttp.connect(master.port);
  t.after(() => idle.close());
  assert.equal((await idle.request('/')).status, 200);
  big.socket.pause();
  await worker.drain(10000);
  const answer = big.request(`/big?bytes=${bytes}`, {}, 10000);
  await within(3000, idle.closed, 'the idle connection swept');
  big.socket.resume();
  const res = await answer;
  assert.equal(res.status, 200);
  assert.equal(res.body.length, bytes, 'the whole body');
  assert.equal((await worker.waitExit(5000)).code, 0);
});

test('drain: an upgraded connection is not swept: it is the application\'s to end', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const up = await RawHttp.connect(master.port);
  t.after(() => up.close());
  up.socket.write('GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n');
  await waitFor(() => up.buffer.includes('\r\n\r\n'), 2000, 'the 101');
  assert.match(up.buffer.toString('latin1'), /^HTTP\/1\.1 101 /);
  up.buffer = Buffer.alloc(0);
  // An idle keep-alive connection, closed by the sweep: the sign that sweeps ran.
  const idle = await RawHttp.connect(master.port);
  t.after(() => idle.close());
  assert.equal((await idle.request('/')).status, 200);
  await worker.drain(5000);
  await within(3000, idle.closed, 'the idle connection swept');
  up.socket.write('ping');
  await waitFor(() => up.buffer.length >= 4, 2000, 'the echo');
  assert.equal(up.buffer.toString(), 'ping');
  assert.equal(up.closedAt, null, 'the upgraded connection is open');
  up.close();
  assert.equal((await worker.waitExit(5000)).code, 0);
});

test('drain over TLS: a response in flight is not cut, an idle connection is closed after the grace', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE), TEST_TLS: '1' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const connect = () => within(5000, new Promise((resolve, reject) => {
    const socket = tls.connect({ port: master.port, host: '127.0.0.1', rejectUnauthorized: false },
      () => resolve(new RawHttp(socket)));
    socket.once('error', reject);
  }), 'TLS connect');
  const slow = await connect();
  t.after(() => slow.close());
  const idle = await connect();
  t.after(() => idle.close());
  assert.equal((await idle.request('/')).status, 200);
  // Longer than the grace, sending nothing meanwhile.
  const answer = slow.request(`/slow?ms=${4 * GRACE}`);
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 2, 2000, 'both open');
  await worker.drain(5000);
  await within(3000, idle.closed, 'the idle connection swept');
  const res = await answer;
  assert.equal(res.status, 200);
  assert.equal(res.body, 'slow done\n');
  assert.equal((await worker.waitExit(5000)).code, 0);
});


test('drain: pipelined requests are all answered; only the last response says Connection: close', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const c = await RawHttp.connect(master.port);
  t.after(() => c.close());
  assert.equal((await c.request('/')).status, 200);
  // A in flight, B pipelined behind it; both heads are written after the drain.
  c.socket.write('GET /slow?ms=500 HTTP/1.1\r\nHost: x\r\n\r\nGET /slow?ms=700 HTTP/1.1\r\nHost: x\r\n\r\n');
  await sleep(150);
  await worker.drain(5000);
  const a = await c.response(3000);
  assert.equal(a.status, 200);
  assert.equal(a.body, 'slow done\n');
  assert.equal(a.headers.connection, 'keep-alive', 'a response with another one behind it');
  const b = await c.response(3000);
  assert.equal(b.status, 200);
  assert.equal(b.body, 'slow done\n');
  assert.equal(b.headers.connection, 'close');
  await within(2000, c.closed, 'closed after the last response');
  assert.equal((await worker.waitExit(3000)).code, 0);
});

test('drain: a signal during the master\'s drain does not cut it short; a second one exits at once', async (t) => {
  const master = await FakeMaster.start({ script: WORKER, workers: 1, heartbeatMs: 50 });
  t.after(() => master.close());
  const worker = master.workers[0];
  const c = await RawHttp.connect(master.port);
  t.after(() => c.close());
  const slow = c.request('/slow?ms=600');
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'the request open');
  await worker.drain(5000);
  if (worker.alive) worker.child.kill('SIGTERM');
  const res = await slow;
  assert.equal(res.status, 200);
  assert.equal(res.body, 'slow done\n');
  assert.equal(res.headers.connection, 'close');
  assert.equal((await worker.waitExit(3000)).code, 0);

  // Two signals: the first drains, the second leaves at once.
  const second = await FakeMaster.start({ script: WORKER, workers: 1, heartbeatMs: 50 });
  t.after(() => second.close());
  const w = second.workers[0];
  const d = await RawHttp.connect(second.port);
  t.after(() => d.close());
  const stuck = d.request('/slow?ms=10000', {}, 8000).catch((err) => err);
  await w.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'the request open');
  await w.drain(8000);
  if (w.alive) w.child.kill('SIGTERM');
  await sleep(300);
  assert.equal(w.alive, true, 'the first signal after the drain does not exit');
  const at = Date.now();
  if (w.alive) w.child.kill('SIGTERM');
  // At once: well before the drain's deadline (some 7 s away), with room for a
  // loaded machine.
  const exit = await w.waitExit(8000);
  assert.equal(exit.code, 143);
  assert.ok(exit.at - at < 3000, `exited ${exit.at - at} ms after the second signal`);
  assert.ok((await stuck) instanceof Error);
});

test('drain: a connection that takes no new property is still closed after the grace, not at the deadline', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE), TEST_SEAL_SOCKETS: '1' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const a = await RawHttp.connect(master.port);
  t.after(() => a.close());
  assert.equal((await a.request('/')).status, 200);
  const drainAt = await worker.drain(10000);
  const closedAt = await within(5000, a.closed, 'the idle connection closed');
  assert.ok(closedAt - drainAt < GRACE + 2000, `closed ${closedAt - drainAt} ms after the drain (deadline 10000)`);
  const exit = await worker.waitExit(5000);
  assert.equal(exit.code, 0, worker.stderr);
});

test('drain: a response that takes no new property is answered with Connection: close, without a throw', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: String(GRACE) },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const a = await RawHttp.connect(master.port);
  t.after(() => a.close());
  const answer = a.request('/sealed-slow?ms=400');
  await worker.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'the request open');
  await worker.drain(10000);
  const res = await answer;
  assert.equal(res.status, 200);
  assert.equal(res.body, 'sealed done\n');
  assert.equal(res.headers.connection, 'close');
  const exit = await worker.waitExit(5000);
  assert.equal(exit.code, 0, worker.stderr);
  assert.doesNotMatch(worker.stderr, /TypeError/);
});
