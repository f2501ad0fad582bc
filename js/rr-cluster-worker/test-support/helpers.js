'use strict';

// Test helpers: a fake rr-cluster master (Node dialect) and a raw HTTP/1.1 client.
//
// The fake master does with Node's own API what the Rust master does on the wire:
// it spawns the worker with an IPC channel (Node sets NODE_CHANNEL_FD itself), accepts
// on 127.0.0.1:0 with pauseOnConnect, and hands each socket over with
// child.send({rr:'connection', listener}, socket), which writes
// {"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"rr":"connection","listener":0}} and
// the descriptor in one sendmsg. Every wait is bounded; a worker is killed (by its pid,
// through ChildProcess.kill) only while it is known to be alive.

const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');

const PACKAGE = path.resolve(__dirname, '..');
const ROOT = path.resolve(PACKAGE, '..', '..');
const FIXTURES = path.join(__dirname, 'fixtures');

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Resolves with `promise`, or rejects after `ms` with a message naming `what`. */
function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `predicate` every 10 ms until it returns a truthy value (returned), at most `ms`. */
async function waitFor(predicate, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = predicate();
    if (value) return value;
    if (Date.now() >= deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(10);
  }
}

class FakeWorker {
  constructor(master, slot, script, env) {
    this.master = master;
    this.slot = slot;
    this.messages = []; // {msg, at}
    this.stdout = '';
    this.stderr = '';
    this.spawnedAt = Date.now();
    const childEnv = { ...process.env };
    // Not a cluster worker, not a test-runner child, no inherited channel.
    for (const name of ['NODE_UNIQUE_ID', 'NODE_CHANNEL_FD', 'NODE_TEST_CONTEXT']) delete childEnv[name];
    Object.assign(childEnv, {
      RR_CLUSTER_PROTOCOL: 'node',
      RR_CLUSTER_WORKER_ID: String(slot),
      RR_CLUSTER_GENERATION: String(master.generation),
      RR_CLUSTER_HEARTBEAT_MS: String(master.heartbeatMs),
      RR_CLUSTER_LISTENERS: JSON.stringify([{ kind: 'tcp', address: `127.0.0.1:${master.port}` }]),
    }, env);
    this.child = spawn(process.execPath, [script], {
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      serialization: 'json',
      env: childEnv,
    });
    this.pid = this.child.pid;
    this.child.stdout.setEncoding('utf8').on('data', (d) => { this.stdout += d; });
    this.child.stderr.setEncoding('utf8').on('data', (d) => { this.stderr += d; });
    this.child.on('message', (msg) => this.messages.push({ msg, at: Date.now() }));
    this.child.on('error', () => {}); // a send to a worker that just went away
    this.exited = new Promise((resolve) => {
      this.child.on('exit', (code, signal) => resolve({ code, signal, at: Date.now() }));
    });
  }

  get alive() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  get ready() {
    return this.messages.some((m) => m.msg && m.msg.rr === 'ready');
  }

  /** The messages with `rr` equal to `kind`, in order. */
  rr(kind) {
    return this.messages.filter((m) => m.msg && m.msg.rr === kind);
  }

  /** User messages: everything that is neither an rr message nor Node's own. */
  user() {
    return this.messages.filter((m) => !(m.msg && typeof m.msg === 'object' && 'rr' in m.msg))
      .map((m) => m.msg);
  }

  waitMessage(predicate, ms, what) {
    return waitFor(() => this.messages.find((m) => predicate(m.msg)), ms, `worker ${this.slot}: ${what}`);
  }

  waitReady(ms = 5000) {
    return this.waitMessage((m) => m && m.rr === 'ready', ms, 'ready');
  }

  /** Sends a message, optionally with a handle; resolves once written. */
  send(msg, handle) {
    return within(5000, new Promise((resolve, reject) => {
      this.child.send(msg, handle, (err) => (err ? reject(err) : resolve()));
    }), `worker ${this.slot}: send`);
  }

  sendConnection(socket, listener = 0) {
    // Node would add a "key" field (and bookkeeping with the net.Server) for a socket
    // that came from a net.Server; the Rust master sends none, so detach it first.
    socket.server = null;
    return this.send({ rr: 'connection', listener }, socket);
  }

  sendListen(server, listener = 0) {
    return this.send({ rr: 'listen', listener }, server);
  }

  /** {rr:'drain'}, then the master closes its end, as the Rust master does. */
  async drain(deadlineMs) {
    this.draining = true;
    const at = Date.now();
    await this.send({ rr: 'drain', deadline_ms: deadlineMs });
    if (this.child.connected) this.child.disconnect();
    return at;
  }

  /** The exit, at most `ms` away. */
  waitExit(ms = 5000) {
    return within(ms, this.exited, `worker ${this.slot} (pid ${this.pid}) exit`);
  }

  kill() {
    if (this.alive) this.child.kill('SIGKILL');
  }
}

class FakeMaster {
  /**
   * options: script, workers (count), heartbeatMs, generation, env (extra environment),
   * dispatch ('round-robin' | 'none': the test hands connections over itself).
   */
  static async start(options) {
    const master = new FakeMaster(options);
    await within(5000, new Promise((resolve, reject) => {
      master.server.once('error', reject);
      master.server.listen(0, '127.0.0.1', resolve);
    }), 'fake master listen');
    master.port = master.server.address().port;
    for (let slot = 0; slot < (options.workers ?? 1); slot++) {
      master.workers.push(new FakeWorker(master, slot, options.script, options.env ?? {}));
    }
    if (options.waitReady !== false) {
      await Promise.all(master.workers.map((w) => w.waitReady()));
    }
    return master;
  }

  constructor(options) {
    this.heartbeatMs = options.heartbeatMs ?? 100;
    this.generation = options.generation ?? 0;
    this.workers = [];
    this.dispatched = []; // slot of each connection handed over, in order
    this.next = 0;
    this.accepted = []; // sockets accepted while dispatch is 'none'
    this.server = net.createServer({ pauseOnConnect: true });
    this.server.on('connection', (socket) => {
      if (options.dispatch === 'none') {
        this.accepted.push(socket);
        return;
      }
      const candidates = this.workers.filter((w) => w.ready && !w.draining && w.alive);
      if (candidates.length === 0) {
        socket.destroy();
        return;
      }
      const worker = candidates[this.next++ % candidates.length];
      this.dispatched.push(worker.slot);
      worker.sendConnection(socket).catch(() => socket.destroy());
    });
  }

  async close() {
    for (const w of this.workers) w.kill();
    await Promise.all(this.workers.map((w) => within(5000, w.exited, `worker ${w.slot} exit`)));
    this.server.close();
  }
}

/** One HTTP/1.1 client connection, for requests one after the other. */
class RawHttp {
  static connect(port) {
    return within(5000, new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(new RawHttp(socket)));
      socket.once('error', reject);
    }), 'connect');
  }

  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.waiter = null;
    this.closedAt = null;
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.closedAt = Date.now();
        resolve(this.closedAt);
        this.#poke();
      });
    });
    socket.on('error', () => {});
    socket.on('data', (data) => {
      this.buffer = Buffer.concat([this.buffer, data]);
      this.#poke();
    });
  }

  #poke() {
    if (this.waiter) this.waiter();
  }

  /** Sends a GET and resolves with {status, headers, body}; rejects on close or timeout. */
  request(pathname = '/', headers = {}, ms = 5000) {
    const lines = [`GET ${pathname} HTTP/1.1`, 'Host: 127.0.0.1'];
    for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`);
    this.socket.write(`${lines.join('\r\n')}\r\n\r\n`);
    return this.response(ms);
  }

  response(ms = 5000) {
    return within(ms, new Promise((resolve, reject) => {
      const check = () => {
        const end = this.buffer.indexOf('\r\n\r\n');
        if (end >= 0) {
          const head = this.buffer.subarray(0, end).toString('latin1').split('\r\n');
          const status = Number(head[0].split(' ')[1]);
          const headers = {};
          for (const line of head.slice(1)) {
            const i = line.indexOf(':');
            headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
          }
          const length = Number(headers['content-length'] ?? 0);
          if (this.buffer.length >= end + 4 + length) {
            const body = this.buffer.subarray(end + 4, end + 4 + length).toString('utf8');
            this.buffer = this.buffer.subarray(end + 4 + length);
            this.waiter = null;
            resolve({ status, headers, body });
            return;
          }
        }
        if (this.closedAt !== null) {
          this.waiter = null;
          reject(new Error(`connection closed before a full response (${this.buffer.length} bytes)`));
        }
      };
      this.waiter = check;
      check();
    }), 'HTTP response');
  }

  close() {
    this.socket.destroy();
  }
}

/** Resolves once a connection to `port` is refused (nothing listens any more), at most `ms`. */
async function refused(port, ms = 3000) {
  const deadline = Date.now() + ms;
  const attempt = () => within(1000, new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(false); });
    s.on('error', (err) => resolve(err.code === 'ECONNREFUSED'));
  }), `connect to ${port}`);
  while (!(await attempt())) {
    if (Date.now() >= deadline) throw new Error(`timed out after ${ms} ms: connections to ${port} refused`);
    await sleep(20);
  }
}

/** GET on a fresh connection with Connection: close. */
async function get(port, pathname = '/') {
  const c = await RawHttp.connect(port);
  try {
    return await c.request(pathname, { Connection: 'close' });
  } finally {
    c.close();
  }
}

module.exports = { FakeMaster, FakeWorker, RawHttp, get, refused, sleep, waitFor, within, PACKAGE, ROOT, FIXTURES };
