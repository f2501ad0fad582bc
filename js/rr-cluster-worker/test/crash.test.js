'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { FakeMaster, RawHttp, get, FIXTURES } = require('../test-support/helpers.js');

const WORKER = path.join(FIXTURES, 'http-worker.js');

test('uncaught exception: suicide reaches the master before the exit; drain; exit status 1', async (t) => {
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: '100' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];

  // A keep-alive connection stays open across the crash: the drain must close it.
  const idle = await RawHttp.connect(master.port);
  t.after(() => idle.close());
  assert.equal((await idle.request('/')).status, 200);

  assert.equal((await get(master.port, '/throw')).body, 'bye\n');
  const suicide = await worker.waitMessage((m) => m.rr === 'suicide', 3000, 'suicide');
  assert.equal(worker.alive, true, 'still alive when the suicide arrived');
  assert.match(suicide.msg.reason, /^uncaught exception: Error: boom from the test/);
  // As the Rust master does: no more connections to it, and a drain.
  const drainAt = await worker.drain(2000);

  const exit = await worker.waitExit(3000);
  assert.equal(exit.code, 1);
  assert.ok(suicide.at <= exit.at);
  assert.ok(exit.at - drainAt < 2000, `exit ${exit.at - drainAt} ms after the drain`);
  assert.match(worker.stderr, /Error: boom from the test\n\s+at /, 'the error and its stack on stderr');
  assert.match(worker.stderr, /Node\.js v\d+/);
  assert.match(worker.stdout, /drain \{"reason":"crash"/);
  await idle.closed;
});

test('unhandled rejection: suicide, then the worker drains and exits 1 on its own', async (t) => {
  // This master never answers the suicide: the worker's own shutdown timeout bounds it.
  const master = await FakeMaster.start({
    script: WORKER, workers: 1, env: { TEST_IDLE_GRACE_MS: '100', TEST_SHUTDOWN_MS: '1500' },
  });
  t.after(() => master.close());
  const worker = master.workers[0];

  const slow = (async () => {
    const c = await RawHttp.connect(master.port);
    try {
      return await c.request('/slow?ms=300');
    } finally {
      c.close();
    }
  })();
  assert.equal((await get(master.port, '/reject')).body, 'bye\n');
  const suicide = await worker.waitMessage((m) => m.rr === 'suicide', 3000, 'suicide');
  assert.match(suicide.msg.reason, /^unhandled rejection: Error: rejected in the test/);
  const res = await slow;
  assert.equal(res.body, 'slow done\n', 'the request in flight still completed');
  assert.equal(res.headers.connection, 'close');
  // Bounded by its own 1.5 s shutdown timeout (the master never drains it), with room
  // for a loaded machine; without that bound it would never exit.
  const exit = await worker.waitExit(5000);
  assert.equal(exit.code, 1);
  assert.ok(suicide.at <= exit.at);
  assert.ok(exit.at - suicide.at < 3000, `exit ${exit.at - suicide.at} ms after the suicide`);
  assert.match(worker.stderr, /Error: rejected in the test/);
});
