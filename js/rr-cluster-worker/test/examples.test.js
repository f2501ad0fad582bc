'use strict';

// examples/node: app.js (with the package) and plain.js (Node's documented API only).

const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const path = require('node:path');
const { FakeMaster, get, refused, within, ROOT } = require('../test-support/helpers.js');

for (const name of ['app.js', 'plain.js']) {
  test(`examples/node/${name}: two workers answer as dispatched, then drain and exit 0`, async (t) => {
    const master = await FakeMaster.start({ script: path.join(ROOT, 'examples', 'node', name), workers: 2 });
    t.after(() => master.close());

    for (let i = 0; i < 6; i++) {
      const res = await get(master.port);
      const id = master.dispatched[i];
      assert.equal(res.status, 200);
      assert.equal(res.headers['x-worker-id'], String(id));
      assert.equal(res.body, `Hello from worker ${id} (pid ${master.workers[id].pid})\n`);
    }
    assert.deepEqual(master.dispatched, [0, 1, 0, 1, 0, 1]);

    // Nothing open any more: both leave at once (plain.js by itself: the closed
    // channel was the last thing keeping it alive), long before the 10 s deadline.
    for (const w of master.workers) {
      const drainAt = await w.drain(10000);
      const exit = await w.waitExit(10000);
      assert.equal(exit.code, 0, `${name} worker ${w.slot}: ${w.stderr}`);
      assert.ok(exit.at - drainAt < 3000, `${name} worker ${w.slot} left ${exit.at - drainAt} ms after the drain`);
    }
  });
}

for (const name of ['app.js', 'plain.js']) {
  test(`examples/node/${name}: shared mode: accepts on the listening socket, stops at the drain`, async (t) => {
    const master = await FakeMaster.start({
      script: path.join(ROOT, 'examples', 'node', name), workers: 1, dispatch: 'none',
    });
    t.after(() => master.close());
    const worker = master.workers[0];
    const listener = net.createServer();
    await within(2000, new Promise((resolve) => listener.listen(0, '127.0.0.1', resolve)), 'listen');
    const { port } = listener.address();
    listener.on('connection', () => assert.fail('the master accepted a connection'));
    await worker.sendListen(listener);
    listener.close();

    for (let i = 0; i < 3; i++) {
      const res = await within(3000, get(port), `${name}: a connection accepted by the worker`);
      assert.equal(res.status, 200);
      assert.equal(res.body, `Hello from worker 0 (pid ${worker.pid})\n`);
    }
    // At once: long before the 10 s deadline.
    const drainAt = await worker.drain(10000);
    const exit = await worker.waitExit(10000);
    assert.equal(exit.code, 0, `${name}: ${worker.stderr}`);
    assert.ok(exit.at - drainAt < 3000, `${name} left ${exit.at - drainAt} ms after the drain`);
    await refused(port);
  });
}
