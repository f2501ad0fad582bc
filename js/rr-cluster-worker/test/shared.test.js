'use strict';

// The "shared" balance mode: the master sends its listening socket once
// ({rr:'listen', listener:N} + a net.Server) and the workers accept on it themselves.

const test = require('node:test');
const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { FakeMaster, RawHttp, get, refused, within, FIXTURES } = require('../test-support/helpers.js');

const WORKER = path.join(FIXTURES, 'http-worker.js');

test('shared mode: workers accept on the listening socket; drain closes it first', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 2, dispatch: 'none', heartbeatMs: 50, env: { TEST_IDLE_GRACE_MS: '100' },
  });
  t.after(() => master.close());
  const listener = net.createServer();
  await within(2000, new Promise((resolve) => listener.listen(0, '127.0.0.1', resolve)), 'listen');
  const { port } = listener.address();
  listener.on('connection', () => assert.fail('the master accepted a connection'));

  for (const w of master.workers) await w.sendListen(listener);
  // Written: the descriptors are in flight or received; the master's own copy can go.
  listener.close();

  const pids = new Set();
  for (let i = 0; i < 20; i++) {
    const res = await get(port);
    assert.equal(res.status, 200);
    const id = Number(res.headers['x-worker-id']);
    assert.equal(res.body, `Hello from worker ${id} (pid ${master.workers[id].pid})\n`);
    pids.add(res.headers['x-worker-pid']);
  }
  assert.ok(pids.size >= 1);

  // Connections the workers accepted themselves count in their heartbeats.
  const open = await RawHttp.connect(port);
  t.after(() => open.close());
  const res = await open.request('/');
  const owner = master.workers[Number(res.headers['x-worker-id'])];
  await owner.waitMessage((m) => m.rr === 'heartbeat' && m.active === 1, 2000, 'active 1');

  const slow = open.request('/slow?ms=400');
  await new Promise((resolve) => setTimeout(resolve, 50));
  const drains = await Promise.all(master.workers.map((w) => w.drain(3000)));
  // Every copy of the listening socket is closed: nobody accepts any more.
  await refused(port, 2000);
  const done = await slow;
  assert.equal(done.body, 'slow done\n');
  assert.equal(done.headers.connection, 'close');
  for (const [i, w] of master.workers.entries()) {
    const exit = await w.waitExit(3000);
    assert.equal(exit.code, 0);
    assert.ok(exit.at - drains[i] < 3000);
  }
});

// The backlog of a listening socket, as `ss` reports it (Send-Q of a LISTEN socket:
// sk_max_ack_backlog); null without ss.
function listenBacklog(port) {
  const out = spawnSync('ss', ['-Hltn', `sport = :${port}`], { encoding: 'utf8', timeout: 5000 });
  if (out.error || out.status !== 0) return null;
  const line = out.stdout.split('\n').find((l) => l.startsWith('LISTEN'));
  return line ? Number(line.trim().split(/\s+/)[2]) : NaN;
}

test('shared mode: adopting the listening socket keeps the master\'s backlog', async (t) => {
  if (listenBacklog(1) === null) {
    t.skip('needs ss (iproute2)');
    return;
  }
  // What the kernel gives a listen(fd, 4096), the master's backlog: at most somaxconn.
  const somaxconn = Number(fs.readFileSync('/proc/sys/net/core/somaxconn', 'utf8'));
  const expected = Math.min(4096, somaxconn);
  const master = await FakeMaster.start({ script: WORKER, workers: 1, dispatch: 'none' });
  t.after(() => master.close());
  const listener = net.createServer();
  await within(2000, new Promise((resolve) => {
    listener.listen({ port: 0, host: '127.0.0.1', backlog: 4096 }, resolve);
  }), 'listen');
  const { port } = listener.address();
  listener.on('connection', () => assert.fail('the master accepted a connection'));
  assert.equal(listenBacklog(port), expected);

  await master.workers[0].sendListen(listener);
  listener.close();
  // Served: the worker has adopted the socket (Node listened on it again then).
  const res = await get(port);
  assert.equal(res.status, 200);
  // Not Node's default of 511 for the whole pool.
  assert.equal(listenBacklog(port), expected);
});
