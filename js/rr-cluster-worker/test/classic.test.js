'use strict';

// The package loaded without serve(): the application feeds the master's connections
// to its server itself (process.on('message')) and uses the package for its messages
// or its ready(). The connections, and so the exit, are the application's.

const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const path = require('node:path');
const fs = require('node:fs');
const { FakeMaster, RawHttp, get, refused, sleep, waitFor, within, FIXTURES } = require('../test-support/helpers.js');

const CLASSIC = path.join(FIXTURES, 'classic-worker.js');

// Whether a socket listens on 127.0.0.1:port, without connecting to it (/proc/net/tcp:
// local address, then state, 0A for LISTEN).
function listenerOpen(port) {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  return fs.readFileSync('/proc/net/tcp', 'utf8').split('\n')
    .some((line) => { const f = line.trim().split(/\s+/); return f[1] === local && f[3] === '0A'; });
}

async function sharedListener() {
  const listener = net.createServer();
  await within(2000, new Promise((resolve) => listener.listen(0, '127.0.0.1', resolve)), 'listen');
  listener.on('connection', () => assert.fail('the master accepted a connection'));
  return listener;
}

for (const ready of ['process', 'package']) {
  test(`without serve() (ready by ${ready}): the drain does not cut the application's requests`, async (t) => {
    const master = await FakeMaster.start({ script: CLASSIC, workers: 1, env: { TEST_READY: ready } });
    t.after(() => master.close());
    const worker = master.workers[0];
    const c = await RawHttp.connect(master.port);
    t.after(() => c.close());
    const slow = c.request('/slow?ms=500', { Connection: 'close' });
    await waitFor(() => worker.stdout.includes('request /slow'), 2000, 'the request in the handler');

    const drainAt = await worker.drain(5000);
    const res = await slow;
    assert.equal(res.status, 200);
    assert.equal(res.body, 'slow done\n');
    // The process ends by itself once the application's last connection has closed.
    const exit = await worker.waitExit(3000);
    assert.equal(exit.code, 0, worker.stderr);
    assert.ok(exit.at - drainAt >= 300, `exited ${exit.at - drainAt} ms after the drain`);
    assert.match(worker.stdout, /drain \{"reason":"master","deadlineMs":5000\}/);
  });
}

test('without serve(): a shared listening socket nobody accepts on is closed, with a warning and a suicide', async (t) => {
  const master = await FakeMaster.start({ script: CLASSIC, workers: 1, dispatch: 'none' });
  t.after(() => master.close());
  const worker = master.workers[0];
  const listener = await sharedListener();
  const { port } = listener.address();
  await worker.sendListen(listener);
  listener.close();

  const suicide = await worker.waitMessage((m) => m.rr === 'suicide', 3000, 'the suicide');
  assert.match(suicide.msg.reason, /^shared listener 0: nothing in the worker accepts on it/);
  // No copy accepts any more: a client is refused, not left hanging.
  await refused(port);
  await waitFor(() => /shared listener 0: nothing accepts on the listening socket/.test(worker.stderr), 2000,
    'the warning');
  // The master answers the suicide with its drain; the worker then ends by itself.
  await worker.drain(3000);
  assert.equal((await worker.waitExit(3000)).code, 0);
  assert.equal(worker.stderr.match(/nothing accepts/g).length, 1, worker.stderr);
  assert.equal(worker.rr('suicide').length, 1);
});

// TEST_HANDLE_LISTEN of classic-worker.js: how the application takes the socket.
const TAKERS = [
  ['1', 'a \'connection\' listener on the handle'],
  ['takeover', 'its own server\'s listen(handle)'],
  ['late', 'a \'connection\' listener 30 ms later'],
  ['late-takeover', 'listen(handle) 30 ms later'],
];
for (const [mode, how] of TAKERS) {
  test(`without serve(): a shared listening socket the application takes (${how}) is left to it`, async (t) => {
    const master = await FakeMaster.start({
      script: CLASSIC, workers: 1, dispatch: 'none',
      env: { TEST_HANDLE_LISTEN: mode, TEST_LATE_MS: '30', TEST_READY: 'package' },
    });
    t.after(() => master.close());
    const worker = master.workers[0];
    const listener = await sharedListener();
    const { port } = listener.address();
    await worker.sendListen(listener);
    const sentAt = Date.now();
    listener.close();

    // At once: taken late, this connection is accepted before the application takes
    // the socket, held, then handed over to it.
    const early = await get(port);
    assert.equal(early.status, 200);
    assert.equal(early.body, `classic ${worker.pid}\n`);
    if (mode.includes('takeover')) {
      // Held or not, set up as the server's own connections: an http server's options
      // (allowHalfOpen, noDelay), socket.server, counted in its connections.
      assert.equal(early.headers['x-socket'], 'halfOpen=true noDelay=true server=true connections=1');
    }
    const res = await get(port);
    assert.equal(res.status, 200);
    // A heartbeat written well after the listening socket was judged (twice): no
    // suicide before it.
    await waitFor(() => worker.messages.some((m) => m.msg.rr === 'heartbeat' && m.at >= sentAt + 300), 3000,
      'a heartbeat');
    assert.equal(worker.rr('suicide').length, 0);
    assert.doesNotMatch(worker.stderr, /nothing accepts/);
    assert.equal((await get(port)).status, 200);
    await worker.drain(3000);
    assert.equal((await worker.waitExit(3000)).code, 0, worker.stderr);
    await refused(port);
  });
}

test('without serve(): a shared listening socket whose server cannot be told is never closed on a guess', async (t) => {
  const master = await FakeMaster.start({
    script: CLASSIC, workers: 1, dispatch: 'none', env: { TEST_HANDLE_LISTEN: 'opaque', TEST_READY: 'package' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  const listener = await sharedListener();
  const { port } = listener.address();
  await worker.sendListen(listener);
  const sentAt = Date.now();
  listener.close();
  await waitFor(() => worker.messages.some((m) => m.msg.rr === 'heartbeat' && m.at >= sentAt + 300), 3000,
    'a heartbeat');
  assert.equal(worker.rr('suicide').length, 0);
  assert.doesNotMatch(worker.stderr, /nothing accepts/);
  // Still listening (nothing connects: with its owner hidden, Node could not accept).
  assert.ok(listenerOpen(port), 'the listening socket was closed');
  await worker.drain(3000);
  assert.equal((await worker.waitExit(3000)).code, 0, worker.stderr);
});

test('without serve(): a drain while a shared listening socket is held serves what it held (serve() came meanwhile)', async (t) => {
  const master = await FakeMaster.start({
    script: CLASSIC, workers: 1, dispatch: 'none', env: { TEST_HANDLE_LISTEN: 'serve-at-drain', TEST_READY: 'package' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  await worker.waitReady();
  const listener = await sharedListener();
  const { port } = listener.address();
  await worker.sendListen(listener);
  listener.close();
  const c = await RawHttp.connect(port);
  t.after(() => c.close());
  const answer = c.request('/slow?ms=300', { Connection: 'close' });
  answer.catch(() => {}); // awaited below
  // Held (accepted, nobody serves it yet): then the drain, within the hold.
  await waitFor(() => worker.stdout.includes('held 1'), 2000, 'the connection held');
  const drainAt = await worker.drain(5000);
  // The held socket stops accepting at the drain.
  await refused(port);
  const res = await answer.catch((e) => { throw new Error(`${e.message}: ${worker.stdout} | ${worker.stderr}`); });
  assert.equal(res.status, 200);
  assert.equal(res.body, 'slow done\n');
  const exit = await worker.waitExit(3000);
  assert.equal(exit.code, 0, worker.stderr);
  assert.ok(exit.at - drainAt >= 200, `exited ${exit.at - drainAt} ms after the drain, before the response`);
  assert.equal(worker.rr('suicide').length, 0);
});

test('without serve(): an accept error on a held shared listening socket is reported, not thrown', async (t) => {
  const master = await FakeMaster.start({
    script: CLASSIC, workers: 1, dispatch: 'none', env: { TEST_HANDLE_LISTEN: 'accept-error', TEST_READY: 'package' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];
  await worker.waitReady();
  const listener = await sharedListener();
  await worker.sendListen(listener);
  listener.close();
  // Nothing claims it: closed, with the usual suicide, the process still up.
  await worker.waitMessage((m) => m.rr === 'suicide', 3000, 'the suicide');
  await waitFor(() => /shared listener 0: Error: accept EMFILE/.test(worker.stderr), 2000, 'the accept error reported');
  assert.ok(worker.alive, worker.stderr);
  await worker.drain(3000);
  assert.equal((await worker.waitExit(3000)).code, 0, worker.stderr);
  assert.doesNotMatch(worker.stderr, /Unhandled 'error' event/);
});
