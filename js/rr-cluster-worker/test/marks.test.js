'use strict';

// What the package keeps on the sockets and responses of a served server: numbers and
// marks only, never a reference that outlives a request, and nothing that throws on an
// object the application made non-extensible. In this process (outside a pool): the
// served servers do not listen (ready: false); a front server feeds them its sockets.

const test = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const net = require('node:net');
const v8 = require('node:v8');
const vm = require('node:vm');
const { RawHttp, within, PACKAGE } = require('../test-support/helpers.js');

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc');

const worker = require(PACKAGE);
const OPTIONS = { ready: false, handleSignals: false, handleErrors: false };

async function front(feed, options = {}) {
  const server = net.createServer(options, feed);
  await within(2000, new Promise((resolve) => server.listen(0, '127.0.0.1', resolve)), 'listen');
  return server;
}

test('a keep-alive connection idle after its responses keeps none of them, nor their requests', async (t) => {
  const refs = [];
  const app = http.createServer((req, res) => {
    // What an application may hang on a request: large, and gone once answered.
    req.big = Buffer.alloc(4 << 20);
    refs.push(new WeakRef(req), new WeakRef(res));
    res.end('ok');
  });
  worker.serve(app, { ...OPTIONS, listener: 0 });
  const feeder = await front((socket) => app.emit('connection', socket));
  t.after(() => feeder.close());
  const c = await RawHttp.connect(feeder.address().port);
  t.after(() => c.close());

  assert.equal((await c.request('/')).body, 'ok');
  // Pipelined: the second waits behind the first one's response.
  c.socket.write('GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n');
  assert.equal((await c.response()).body, 'ok');
  assert.equal((await c.response()).body, 'ok');
  assert.equal(refs.length, 6);

  let alive = refs.length;
  for (let i = 0; i < 20 && alive > 0; i++) {
    await new Promise((resolve) => setImmediate(resolve));
    gc();
    alive = refs.filter((r) => r.deref() !== undefined).length;
  }
  assert.equal(alive, 0, `${alive} of the requests and responses are still reachable`);
  assert.equal(c.closedAt, null, 'the connection stays open (keep-alive)');
  // Still served after that.
  assert.equal((await c.request('/')).body, 'ok');
});

test('a connection that takes no new property is served (not tracked), without a throw', async (t) => {
  const plain = net.createServer((socket) => socket.end('pong\n'));
  worker.serve(plain, { ...OPTIONS, listener: 1 });
  const errors = [];
  const feeder = await front((socket) => {
    Object.preventExtensions(socket);
    try {
      plain.emit('connection', socket);
    } catch (err) {
      errors.push(err);
      socket.destroy();
    }
  }, { allowHalfOpen: true }); // else Node itself sets a property on the socket at its end
  t.after(() => feeder.close());
  const reply = await within(3000, new Promise((resolve, reject) => {
    let data = '';
    const s = net.connect(feeder.address().port, '127.0.0.1');
    s.setEncoding('utf8');
    s.on('data', (d) => { data += d; });
    s.on('end', () => resolve(data));
    s.on('error', reject);
  }), 'the reply');
  assert.deepEqual(errors, []);
  assert.equal(reply, 'pong\n');
});
