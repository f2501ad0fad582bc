'use strict';

// rr-cluster-worker: makes a Node.js program a worker of an rr-cluster master that
// speaks the Node dialect (`rr-cluster run --worker-protocol node -- node app.js`).
//
// The master starts this process with an IPC channel (NODE_CHANNEL_FD, JSON
// serialization), so Node itself provides process.send() and process.on('message').
// Over that channel (see README.md):
//   master -> worker  {rr:'connection', listener:N} + a net.Socket (one per connection)
//                     {rr:'listen', listener:N} + a net.Server ("shared" balance mode)
//                     {rr:'drain', deadline_ms:D}, then end of file
//                     anything else: a user message
//   worker -> master  {rr:'ready'} once, {rr:'heartbeat', active:N} every heartbeat period,
//                     {rr:'suicide', reason:'...'} before going down on its own,
//                     anything else: a user message
// Zero dependencies; Node >= 18.

const { EventEmitter } = require('node:events');
const http = require('node:http');
const https = require('node:https');
const net = require('node:net');
const { inspect } = require('node:util');

const DEFAULT_HEARTBEAT_MS = 1000;
const DEFAULT_IDLE_GRACE_MS = 2000;
const DEFAULT_SHUTDOWN_TIMEOUT_MS = 10000;
const DEFAULT_PORT = 3000;
const SWEEP_INTERVAL_MS = 100;
const MAX_PENDING_MESSAGES = 1000;
// The master's limit on a line from the worker, its newline not counted
// (MAX_LINE in crates/rr-cluster/src/node.rs): it drops a longer one.
const MAX_LINE_BYTES = 64 * 1024;
// The backlog rr-cluster's master listens with (BACKLOG in
// crates/rr-cluster/src/master/listen.rs); the kernel caps it at somaxconn. The Node
// dialect does not carry it, so shared listening sockets are given this one back.
const SHARED_BACKLOG = 4096;
// Without serve(), how long a received listening socket that nothing accepts on yet is
// given before it is closed, for an application that takes it a little late (in a
// timer, after an await). The connections it accepts meanwhile are held, then handed
// over (or closed): short, since they wait, and a sibling could have taken them.
const LATE_CLAIM_MS = 50;
// How often a held socket is looked at for a claim that sends no event (a takeover).
const CLAIM_POLL_MS = 5;
const SINGLETON = Symbol.for('rr-cluster-worker');
// Once draining, on each socket: when it last went idle (its last response flushed, or
// the drain's start), and how many bytes it had read then (more since: a request is
// arriving).
const IDLE_SINCE = Symbol('rr-cluster idle since');
const READ_AT_IDLE = Symbol('rr-cluster bytes read when idle');
// On a socket: the served server it was emitted on as a 'connection' (a second emit is
// dropped), how many requests came on it, and the response of the last one while it
// waits behind another (pipelining; cleared once it is done). Numbers, not references:
// a socket idle in keep-alive must keep no response, request or what the application
// hung on them.
const EMITTED_ON = Symbol('rr-cluster emitted on');
const REQUESTS = Symbol('rr-cluster requests');
const QUEUED_RESPONSE = Symbol('rr-cluster queued response');
// On a response: watched by the drain (see #watchResponse).
const WATCHED = Symbol('rr-cluster watched');
const REQUEST_EVENTS = new Set(['request', 'checkContinue', 'checkExpectation']);

// Sets one of this package's marks on an object the application may have passed: one
// that takes no new property (Object.preventExtensions, seal, freeze) is left
// untouched, not made to throw (it is then not tracked).
function mark(object, key, value) {
  return Reflect.set(object, key, value);
}

// The idle state of a socket that takes no new property: kept here instead, so that it
// is swept like the others.
const idleOf = new WeakMap();

function stampIdle(socket, at = Date.now()) {
  if (mark(socket, IDLE_SINCE, at) && mark(socket, READ_AT_IDLE, socket.bytesRead)) return;
  idleOf.set(socket, { since: at, read: socket.bytesRead });
}

// [when it went idle, bytes read then] (undefined: not stamped).
function idleState(socket) {
  const kept = idleOf.get(socket);
  return kept ? [kept.since, kept.read] : [socket[IDLE_SINCE], socket[READ_AT_IDLE]];
}

// What Node's own onconnection (lib/net.js) gives a connection the server accepts:
// the server's socket options.
function applyServerOptions(server, socket) {
  socket.allowHalfOpen = Boolean(server.allowHalfOpen);
  if (server.noDelay) socket.setNoDelay(true);
  if (server.keepAlive) socket.setKeepAlive(true, (server.keepAliveInitialDelay || 0) * 1000);
}

// A connection `from` accepted (and counts), handed to the server that took its
// listening handle over: as if that server had accepted it (its options, its count,
// socket.server), which is what Node does with the connections it accepts for it.
function handOver(from, to, socket) {
  if (to.maxConnections && to._connections >= to.maxConnections) {
    socket.destroy();
    return;
  }
  applyServerOptions(to, socket);
  if (socket._server === from && typeof from._connections === 'number' &&
      typeof to._connections === 'number') {
    from._connections--;
    to._connections++;
    socket.server = to;
    socket._server = to;
    if (typeof from._emitCloseIfDrained === 'function') from._emitCloseIfDrained();
  }
  to.emit('connection', socket);
}

function noop() {}

function parseCount(text, fallback) {
  if (text === undefined || text === '') return fallback;
  const n = Number(text);
  return Number.isSafeInteger(n) && n >= 0 ? n : fallback;
}

function parseListeners(text) {
  if (!text) return [];
  try {
    const list = JSON.parse(text);
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

// A value this package owns on the wire: the master reads `rr` objects as protocol
// messages, and Node reads a `cmd` starting with NODE_ as its own.
function isReserved(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) &&
    (Object.prototype.hasOwnProperty.call(value, 'rr') ||
     (typeof value.cmd === 'string' && value.cmd.startsWith('NODE_')));
}

function oneLine(err) {
  const text = err instanceof Error ? `${err.name}: ${err.message}` : inspect(err);
  return text.replace(/\s+/g, ' ').slice(0, 500);
}

// Node turns a received listening socket into a net.Server with server.listen(handle),
// which calls listen(2) again with Node's default backlog, 511: that lowers the backlog
// of the socket the master and every worker share, for the whole pool. listen(2) on a
// listening socket only sets its backlog: call it again with the master's. (Node has no
// public way to pass a backlog to that conversion; a connection that came in between
// was queued as usual.)
function restoreBacklog(server, listener) {
  const handle = server._handle;
  if (!handle || typeof handle.listen !== 'function') return;
  const err = handle.listen(SHARED_BACKLOG);
  if (typeof err === 'number' && err < 0) {
    process.stderr.write(`rr-cluster-worker: shared listener ${listener}: cannot restore the ` +
      `backlog to ${SHARED_BACKLOG} (error ${err}); it stays at Node's 511 for the whole pool\n`);
  }
}

// The server a listening handle delivers its connections to: Node keeps it on the
// handle under its internal owner_symbol, and another server's listen(handle) takes
// the handle over (its connections then go to that server, never to the one the handle
// came with). undefined when it cannot be read.
function handleOwner(server) {
  const handle = server._handle;
  if (handle === null || typeof handle !== 'object') return undefined;
  const owner = Object.getOwnPropertySymbols(handle).find((s) => s.description === 'owner_symbol');
  return owner === undefined ? undefined : handle[owner];
}

// Whether something other than `holder` accepts on a received listening socket: a
// 'connection' listener, or another server that took its handle over. When that cannot
// be told (no handle: the application closed it; an owner Node no longer keeps where we
// look), yes: such a socket is never closed on a guess.
function acceptedElsewhere(server, holder) {
  if (server.listeners('connection').some((fn) => fn !== holder)) return true;
  const owner = handleOwner(server);
  return owner === undefined || owner !== server;
}

function isHttpServer(server) {
  return server instanceof http.Server || server instanceof https.Server;
}

// A server that never calls listen() never gets Node's connection tracking (it is set
// up by a 'listening' listener): without it headersTimeout/requestTimeout are not
// enforced. Run that listener ourselves.
function enableConnectionTracking(server) {
  for (const fn of server.listeners('listening')) {
    if (fn.name === 'setupConnectionsTracking') {
      fn.call(server);
      return true;
    }
  }
  return false;
}

class RRClusterWorker extends EventEmitter {
  #env = process.env;
  #entries = [];           // one per serve() call
  #open = new Set();       // sockets of every served server, until 'close'
  #attached = false;       // listening on the IPC channel
  #readyScheduled = false;
  #manualReady = false;
  #isReady = false;
  #heartbeat = null;
  #draining = false;
  #signalled = false;      // a SIGTERM/SIGINT came: the next one exits at once
  // After our own suicide: the master may have sent connections before it read it, and
  // its drain notice comes after them. No exit before that notice (or the channel's
  // end, or the deadline).
  #awaitingMaster = false;
  #drainInfo = null;
  #deadlineAt = 0;
  #forceTimer = null;
  #exiting = false;
  #exitCode = 0;
  #crashed = false;
  #hooksPending = 0;
  #pending = [];           // user messages received before a 'message' listener existed
  #processHandlers = false;
  #shutdownTimeoutMs = DEFAULT_SHUTDOWN_TIMEOUT_MS;
  #warnedListeners = new Set();
  #warnedDuplicate = false;
  #warnedUnclaimed = false;
  #sharedClaimed = false;  // a listening socket received was taken (by serve() or the application)
  #holds = new Set();      // settle() of each received listening socket held (no exit meanwhile)

  constructor() {
    super();
    const env = this.#env;
    const isWorker = typeof process.send === 'function' && env.RR_CLUSTER_PROTOCOL === 'node' &&
      env.RR_CLUSTER_WORKER_ID !== undefined;
    const info = {
      // True when started by an rr-cluster master with the Node dialect.
      isWorker,
      // The worker's slot, 0..N-1 (0 outside a pool).
      id: parseCount(env.RR_CLUSTER_WORKER_ID, 0),
      // How many reloads the pool went through when this worker started (0 outside a pool).
      generation: parseCount(env.RR_CLUSTER_GENERATION, 0),
      // Heartbeat period in ms.
      heartbeatMs: Math.max(1, parseCount(env.RR_CLUSTER_HEARTBEAT_MS, DEFAULT_HEARTBEAT_MS)),
      // The master's listeners, [{kind, address}]; a connection's `listener` indexes it.
      listenerInfo: Object.freeze(parseListeners(env.RR_CLUSTER_LISTENERS)),
    };
    for (const [name, value] of Object.entries(info)) {
      Object.defineProperty(this, name, { value, enumerable: true });
    }
    if (this.isWorker) {
      // A process this worker forks with an IPC channel must not take its parent for a
      // master (Node already removes NODE_CHANNEL_FD; the other variables stay readable).
      delete env.RR_CLUSTER_PROTOCOL;
    }
    // So that `const { serve, send } = require('rr-cluster-worker')` works too.
    for (const name of ['serve', 'ready', 'send', 'shutdown']) this[name] = this[name].bind(this);
    this.on('newListener', (event) => {
      if (event !== 'message') return;
      this.#attach();
      process.nextTick(() => this.#flushPending());
    });
  }

  /** True from the start of the drain on. */
  get draining() {
    return this.#draining;
  }

  /** Number of connections open in the served servers. */
  get active() {
    return this.#open.size;
  }

  /**
   * Serves `server` (an http, https or net server that is not listening) with the
   * connections the master hands over; outside a pool, listens on `options.port`.
   * Returns `server`.
   */
  serve(server, options = {}) {
    if (!server || typeof server.emit !== 'function' || typeof server.listeners !== 'function') {
      throw new TypeError('serve(server): server must be an http, https or net server');
    }
    if (options === null || typeof options !== 'object') {
      throw new TypeError('serve(server, options): options must be an object');
    }
    if (this.#entries.some((e) => e.server === server)) {
      throw new Error('serve(): this server is already served');
    }
    if (!this.isWorker && this.#env.RR_CLUSTER_CHANNEL_FD !== undefined) {
      throw new Error('rr-cluster-worker: this process was started by rr-cluster with its binary ' +
        'protocol; start the pool with `--worker-protocol node` (or `[worker] protocol = "node"`)');
    }
    if (this.isWorker && server.listening) {
      throw new Error('serve(): the server is listening; in an rr-cluster pool the master owns the ' +
        'listening sockets, so do not call listen()');
    }
    const listener = options.listener;
    if (listener !== undefined && !(Number.isSafeInteger(listener) && listener >= 0)) {
      throw new TypeError('serve(): options.listener must be a listener index (integer >= 0)');
    }
    if (this.#entries.some((e) => e.listener === listener)) {
      throw new Error(listener === undefined ?
        'serve(): a server without options.listener is already served' :
        `serve(): a server is already served for listener ${listener}`);
    }
    if (options.onDrain !== undefined && typeof options.onDrain !== 'function') {
      throw new TypeError('serve(): options.onDrain must be a function');
    }
    const idleGraceMs = options.idleGraceMs ?? DEFAULT_IDLE_GRACE_MS;
    if (!(Number.isFinite(idleGraceMs) && idleGraceMs >= 0)) {
      throw new TypeError('serve(): options.idleGraceMs must be a number of ms >= 0');
    }
    if (options.shutdownTimeoutMs !== undefined) {
      if (!(Number.isFinite(options.shutdownTimeoutMs) && options.shutdownTimeoutMs > 0)) {
        throw new TypeError('serve(): options.shutdownTimeoutMs must be a number of ms > 0');
      }
      this.#shutdownTimeoutMs = options.shutdownTimeoutMs;
    }

    const entry = {
      server,
      listener,
      idleGraceMs,
      onDrain: options.onDrain,
      port: options.port ?? parseCount(this.#env.PORT, DEFAULT_PORT),
      host: options.host,
      http: isHttpServer(server),
      shared: [],          // net.Servers received in shared mode
      sockets: new Set(),
      // The sockets HTTP is served on: the accepted ones, or for https the TLS sockets
      // over them (where Node keeps the parser and the open response).
      httpSockets: new Set(),
      sweeper: null,
    };
    this.#entries.push(entry);

    this.#hookEmit(entry);
    server.on('connection', (socket) => this.#track(entry, socket));
    if (server instanceof https.Server) {
      server.on('secureConnection', (socket) => this.#trackHttp(entry, socket));
    }
    // Until the drain, only #hookEmit's bookkeeping runs per request (see #startDrain).
    if (entry.http && this.isWorker) enableConnectionTracking(server);

    if (options.handleErrors !== false || options.handleSignals !== false) {
      this.#installProcessHandlers(options.handleErrors !== false, options.handleSignals !== false);
    }
    if (this.isWorker) this.#attach();

    if (options.ready === false) this.#manualReady = true;
    if (!this.#readyScheduled) {
      this.#readyScheduled = true;
      process.nextTick(() => {
        if (!this.#manualReady) this.ready();
      });
    }
    if (this.#isReady && !this.isWorker) this.#listen(entry);
    return server;
  }

  /**
   * Tells the master this worker takes connections (once; later calls do nothing).
   * Called automatically after serve() unless it was given `ready: false`.
   * Outside a pool, starts listening instead.
   */
  ready() {
    if (this.#isReady || this.#draining) return;
    this.#isReady = true;
    if (!this.isWorker) {
      for (const entry of this.#entries) this.#listen(entry);
      return;
    }
    this.#attach();
    this.#write({ rr: 'ready' });
    this.#heartbeat = setInterval(() => {
      this.#write({ rr: 'heartbeat', active: this.#open.size });
    }, this.heartbeatMs);
    this.#heartbeat.unref();
  }

  /**
   * Sends a user message (any JSON value; objects with an `rr` key or a NODE_ `cmd`
   * are reserved) to the master. Returns false when there is no master to send to, or
   * when the channel's write queue is long; `callback(err)` runs once it is written.
   * Throws a RangeError for a value whose JSON text is longer than 64 KiB (65536 bytes,
   * the newline after it not counted): the master would drop it.
   */
  send(value, callback) {
    if (isReserved(value)) {
      throw new TypeError('send(): objects with an `rr` key or a NODE_ `cmd` are reserved for the protocol');
    }
    if (callback !== undefined && typeof callback !== 'function') {
      throw new TypeError('send(value, callback): callback must be a function');
    }
    // What Node writes: the JSON text and a newline, which the master's limit does not
    // count. (A value JSON cannot represent is left to process.send to refuse.) A UTF-16
    // unit is at most 3 bytes of UTF-8: only a text over 21845 units is measured.
    const json = JSON.stringify(value);
    if (typeof json === 'string' && json.length * 3 > MAX_LINE_BYTES) {
      const bytes = Buffer.byteLength(json);
      if (bytes > MAX_LINE_BYTES) {
        throw new RangeError(`send(): the message is ${bytes} bytes of JSON; the master ` +
          `drops lines longer than ${MAX_LINE_BYTES} bytes`);
      }
    }
    return this.#write(value, callback);
  }

  /**
   * Leaves the pool on the worker's own decision: announces it (the master starts a
   * replacement at once), drains, exits with status 0.
   */
  shutdown(reason = 'shutdown') {
    if (this.#draining) return;
    this.#suicide(String(reason));
    this.#startDrain('shutdown', this.#shutdownTimeoutMs);
  }

  // Announces the worker's end; the drain ends no earlier than the master's answer.
  #suicide(reason) {
    this.#awaitingMaster = this.isWorker && process.connected && this.#isReady;
    this.#write({ rr: 'suicide', reason });
  }

  // --- the channel -----------------------------------------------------------------

  #attach() {
    if (this.#attached || !this.isWorker) return;
    this.#attached = true;
    process.on('message', (msg, handle) => this.#onMessage(msg, handle));
    process.on('disconnect', () => {
      this.#awaitingMaster = false;
      if (!this.#draining) this.#startDrain('disconnect', this.#shutdownTimeoutMs);
      else setImmediate(() => this.#maybeExit());
    });
  }

  #write(msg, callback) {
    if (!this.isWorker || !process.connected) {
      if (callback) process.nextTick(callback, new Error('rr-cluster-worker: no channel to the master'));
      return false;
    }
    // With a callback, a failed write is reported there instead of as an 'error' event
    // on process (which would be fatal).
    return process.send(msg, callback ?? noop);
  }

  #onMessage(msg, handle) {
    if (msg !== null && typeof msg === 'object' && typeof msg.rr === 'string') {
      switch (msg.rr) {
        case 'connection':
          if (handle) this.#onConnection(msg.listener, handle);
          return;
        case 'listen':
          if (handle) this.#onListen(msg.listener, handle);
          return;
        case 'drain': {
          const d = msg.deadline_ms;
          this.#awaitingMaster = false;
          this.#startDrain('master', Number.isFinite(d) && d >= 0 ? d : this.#shutdownTimeoutMs);
          // Connections sent before the notice may still be landing.
          setImmediate(() => this.#maybeExit());
          return;
        }
        default:
          return; // an rr message this version does not know: not the application's
      }
    }
    if (this.listenerCount('message') > 0) {
      this.emit('message', msg, handle);
    } else if (this.#pending.length < MAX_PENDING_MESSAGES) {
      this.#pending.push([msg, handle]);
    }
  }

  #flushPending() {
    while (this.#pending.length > 0 && this.listenerCount('message') > 0) {
      const [msg, handle] = this.#pending.shift();
      this.emit('message', msg, handle);
    }
  }

  #entryFor(listener) {
    return this.#entries.find((e) => e.listener === listener) ??
      this.#entries.find((e) => e.listener === undefined);
  }

  #onConnection(listener, socket) {
    if (this.#entries.length === 0) return; // the application handles process 'message' itself
    const entry = this.#entryFor(listener);
    if (!entry) {
      this.#warnListener(listener);
      socket.destroy();
      return;
    }
    // Served even while draining: the master sent it before the drain.
    this.#feed(entry, socket);
  }

  // What net.Server does for a connection it accepts itself, then 'connection'.
  #feed(entry, socket) {
    const server = entry.server;
    // A socket received over IPC has the defaults; an accepted one the server's options.
    applyServerOptions(server, socket);
    server.emit('connection', socket);
  }

  #onListen(listener, server) {
    // First, whatever becomes of this copy: the backlog is the pool's.
    restoreBacklog(server, listener);
    if (this.#entries.length === 0) {
      // The application may accept on it itself, in its own process.on('message'):
      // judged once every listener of this message has run (Node accepts nothing on
      // the socket before the next poll).
      setImmediate(() => this.#onUnclaimedListen(listener, server));
      return;
    }
    this.#adoptListen(listener, server);
  }

  // A listening socket received while no server was served: unless the application
  // took it (a 'connection' listener on it, or its own server's listen(handle)), it
  // would accept connections nobody serves. Not taken yet: it gets LATE_CLAIM_MS more,
  // holding what it accepts meanwhile, and is settled at the first sign of a claim (a
  // 'connection' listener, a takeover, serve()), at the drain, or once that time is up.
  #onUnclaimedListen(listener, server) {
    if (acceptedElsewhere(server, null)) {
      this.#sharedClaimed = true;
      return;
    }
    if (this.#entries.length > 0) {
      this.#adoptListen(listener, server);
      return;
    }
    const held = new Map(); // socket -> its 'close' listener
    let timer = null;
    let settled = false;
    const startedAt = Date.now();
    // An accept error (EMFILE...) while nobody listens for it would be thrown.
    const onError = (err) => {
      process.stderr.write(`rr-cluster-worker: shared listener ${listener}: ${oneLine(err)}\n`);
    };
    const settle = () => {
      if (settled) return;
      settled = true;
      this.#holds.delete(settle);
      clearInterval(timer);
      server.removeListener('connection', holder);
      server.removeListener('newListener', onNewListener);
      server.removeListener('error', onError);
      const sockets = [];
      for (const [socket, onClose] of held) {
        socket.removeListener('error', noop);
        socket.removeListener('close', onClose);
        if (!socket.destroyed) sockets.push(socket);
      }
      held.clear();
      if (acceptedElsewhere(server, null)) {
        this.#sharedClaimed = true;
        // Handed over in order: to the application's listeners, or to the server that
        // took the handle over (what Node does with a connection it accepts for it).
        const owner = handleOwner(server);
        if (server.listenerCount('connection') > 0) {
          for (const socket of sockets) server.emit('connection', socket);
        } else if (owner && typeof owner.emit === 'function') {
          for (const socket of sockets) handOver(server, owner, socket);
        } else {
          for (const socket of sockets) socket.destroy();
        }
      } else if (this.#entries.length > 0) {
        // serve() came meanwhile. During the drain, the connections accepted before it
        // are served (as those the master sent before it), and the socket is closed.
        const entry = this.#entryFor(listener);
        if (this.#draining && entry) {
          server.close();
          for (const socket of sockets) this.#feed(entry, socket);
        } else {
          const adopted = this.#adoptListen(listener, server);
          for (const socket of sockets) {
            if (adopted) server.emit('connection', socket);
            else socket.destroy();
          }
        }
      } else {
        for (const socket of sockets) socket.destroy();
        this.#closeUnclaimed(listener, server);
      }
      setImmediate(() => this.#maybeExit());
    };
    const holder = (socket) => {
      // The application's own listener came: it gets this socket itself, after us.
      if (acceptedElsewhere(server, holder)) {
        settle();
        return;
      }
      const onClose = () => held.delete(socket); // the client left before the hand-over
      held.set(socket, onClose);
      socket.on('error', noop);
      socket.once('close', onClose);
    };
    // The application's 'connection' listener: settled once it is added.
    const onNewListener = (event) => {
      if (event === 'connection') process.nextTick(settle);
    };
    server.on('connection', holder);
    server.on('error', onError);
    server.on('newListener', onNewListener);
    this.#holds.add(settle);
    if (this.#draining) {
      settle();
      return;
    }
    // A takeover (server.listen(handle)) or serve() sends no event: looked for a few
    // times within the hold.
    timer = setInterval(() => {
      if (Date.now() - startedAt >= LATE_CLAIM_MS || this.#entries.length > 0 ||
          handleOwner(server) !== server) {
        settle();
      }
    }, CLAIM_POLL_MS);
  }

  #closeUnclaimed(listener, server) {
    server.close();
    // A pool in shared mode gives this worker no connection otherwise: leave it, so
    // that the master sees and logs why (it drains this worker and starts another).
    const leave = !this.#sharedClaimed && !this.#draining;
    if (!this.#warnedUnclaimed) {
      this.#warnedUnclaimed = true;
      process.stderr.write(`rr-cluster-worker: shared listener ${listener}: nothing accepts on ` +
        'the listening socket (no serve(), no \'connection\' listener on the {rr:\'listen\'} ' +
        `handle, no server.listen(handle)); closed it${leave ? ', leaving the pool' : ''}\n`);
    }
    if (leave) {
      this.#suicide(`shared listener ${listener}: nothing in the worker accepts on it ` +
        '(call serve(server), or handle {rr:\'listen\'} messages)');
    }
  }

  #adoptListen(listener, server) {
    const entry = this.#entryFor(listener);
    if (!entry || this.#draining) {
      if (!entry) this.#warnListener(listener);
      server.close();
      return false;
    }
    this.#sharedClaimed = true;
    entry.shared.push(server);
    server.on('connection', (socket) => {
      if (!this.#draining) this.#feed(entry, socket);
      else socket.destroy();
    });
    server.on('error', (err) => {
      process.stderr.write(`rr-cluster-worker: shared listener ${listener}: ${oneLine(err)}\n`);
    });
    return true;
  }

  // The served server's emit, for two things every socket and request pass through:
  // - a socket emitted as a 'connection' a second time (an application that still feeds
  //   the master's connections itself, in its own process.on('message'), besides
  //   serve()) would get a second HTTP parser on the same bytes: the duplicate is
  //   dropped, whichever of the two came first;
  // - the last request on each connection, for the drain's Connection: close.
  #hookEmit(entry) {
    const server = entry.server;
    const emit = server.emit;
    const worker = this;
    server.emit = function emitServed(event, first, second) {
      if (event === 'connection') {
        if (first !== null && typeof first === 'object') {
          if (first[EMITTED_ON] === this) {
            worker.#warnDuplicate();
            return true;
          }
          // One that takes no new property is not tracked: served as often as it comes.
          // The marks requests update are set here too, so that a socket's shape does
          // not change with every request.
          if (Object.isExtensible(first)) {
            mark(first, EMITTED_ON, this);
            mark(first, REQUESTS, 0);
            mark(first, QUEUED_RESPONSE, null);
          }
        }
      } else if (entry.http && REQUEST_EVENTS.has(event) && first && second) {
        const socket = first.socket;
        if (socket) {
          const seq = worker.#countRequest(socket, second);
          if (worker.#draining) worker.#watchResponse(second, socket, seq);
        }
      }
      return Reflect.apply(emit, this, arguments);
    };
  }

  // Numbers the request of `res` on its socket, and returns its number (undefined on a
  // socket that is not tracked). Node gives a request the socket at once (it becomes
  // the socket's _httpMessage) unless another response is still open on it: then it
  // waits in a queue the drain cannot see, so the socket points to it until it is done
  // (only with pipelining). The response itself is not marked: a property added to
  // every response would change the shape of Node's own hot objects (a few µs per
  // request, measured).
  #countRequest(socket, res) {
    const seq = (socket[REQUESTS] ?? 0) + 1;
    if (!mark(socket, REQUESTS, seq)) return undefined; // not tracked: see #watchResponse
    if (socket._httpMessage === res || !mark(socket, QUEUED_RESPONSE, res)) return seq;
    res.once('finish', () => {
      if (socket[QUEUED_RESPONSE] === res) mark(socket, QUEUED_RESPONSE, null);
    });
    return seq;
  }

  #warnDuplicate() {
    if (this.#warnedDuplicate) return;
    this.#warnedDuplicate = true;
    process.stderr.write('rr-cluster-worker: a connection was emitted twice on a served server: ' +
      'serve() already feeds it the master\'s connections, remove the application\'s own ' +
      'process.on(\'message\') code that emits them; the second emit is ignored\n');
  }

  #warnListener(listener) {
    if (this.#warnedListeners.has(listener)) return;
    this.#warnedListeners.add(listener);
    process.stderr.write(`rr-cluster-worker: no server for listener ${listener}; ` +
      'its connections are closed (pass options.listener to serve())\n');
  }

  #track(entry, socket) {
    if (this.#open.has(socket)) return;
    this.#open.add(socket);
    entry.sockets.add(socket);
    if (entry.http && !(entry.server instanceof https.Server)) {
      entry.httpSockets.add(socket);
      // Sent before the drain, landing after it: idle from now, for the whole grace.
      if (this.#draining) stampIdle(socket);
    }
    socket.once('close', () => {
      this.#open.delete(socket);
      entry.sockets.delete(socket);
      entry.httpSockets.delete(socket);
      this.#maybeExit();
    });
  }

  // https: the TLS socket over an accepted one (see #track).
  #trackHttp(entry, socket) {
    entry.httpSockets.add(socket);
    // The marks its requests update, set now (see #hookEmit): its shape then does not
    // change at its first request.
    if (Object.isExtensible(socket) && !Object.prototype.hasOwnProperty.call(socket, REQUESTS)) {
      mark(socket, REQUESTS, 0);
      mark(socket, QUEUED_RESPONSE, null);
    }
    if (this.#draining) stampIdle(socket);
    socket.once('close', () => entry.httpSockets.delete(socket));
  }

  #listen(entry) {
    if (entry.server.listening) return;
    if (entry.host !== undefined) entry.server.listen(entry.port, entry.host);
    else entry.server.listen(entry.port);
  }

  // --- drain and exit -----------------------------------------------------------------

  #startDrain(reason, deadlineMs, exitCode = 0) {
    if (exitCode !== 0) this.#exitCode = exitCode;
    const deadlineAt = Date.now() + deadlineMs;
    if (this.#draining) {
      // The master's deadline is the one it enforces: it replaces our own guess.
      if (reason === 'master' || deadlineAt < this.#deadlineAt) this.#armForceExit(deadlineMs);
      return;
    }
    this.#draining = true;
    this.#drainInfo = { reason, deadlineMs };
    this.#armForceExit(deadlineMs);
    // Listening sockets held for a late claim: settled now (no more accepts; what they
    // accepted before the drain is handed over, or served).
    for (const settle of [...this.#holds]) settle();

    for (const entry of this.#entries) {
      // Stop taking connections: the shared listening sockets first.
      for (const shared of entry.shared) shared.close();
      if (entry.server.listening) {
        // net.Server's close: http's own would also close idle keep-alive connections
        // at once, without the grace.
        if (entry.http) net.Server.prototype.close.call(entry.server);
        else entry.server.close();
      }
      if (entry.http) {
        // From now on the last response of each connection says Connection: close:
        // those of requests that arrive later (see #hookEmit), and those in flight
        // whose head is not written yet (a socket's current response is its
        // _httpMessage, which Node clears once the response is done; pipelined
        // requests wait behind it, the last one asked for is QUEUED_RESPONSE).
        const now = Date.now();
        for (const socket of entry.httpSockets) {
          const current = socket._httpMessage;
          const queued = socket[QUEUED_RESPONSE];
          // The last response asked for has the socket's last request number; one
          // before a pipelined request none that can still be its last.
          if (queued && queued !== current && !queued.writableFinished) {
            if (current) this.#watchResponse(current, socket, -1);
            this.#watchResponse(queued, socket, socket[REQUESTS]);
          } else if (current) {
            this.#watchResponse(current, socket, socket[REQUESTS]);
          }
          if (!current) stampIdle(socket, now);
        }
        // From the drain on (not only once a grace has passed), so that bytes that
        // arrive on an idle connection restart its grace from about when they came.
        entry.sweeper = setInterval(() => this.#sweep(entry), SWEEP_INTERVAL_MS);
        entry.sweeper.unref();
      }
    }

    const info = { ...this.#drainInfo };
    this.emit('drain', info);
    for (const entry of this.#entries) {
      if (!entry.onDrain) continue;
      this.#hooksPending++;
      Promise.resolve()
        .then(() => entry.onDrain(info))
        .catch((err) => process.stderr.write(`rr-cluster-worker: onDrain failed: ${inspect(err)}\n`))
        .finally(() => {
          this.#hooksPending--;
          this.#maybeExit();
        });
    }
    // Let connections already queued on the channel land before judging "nothing open".
    setImmediate(() => this.#maybeExit());
  }

  // During the drain, for each response: Connection: close if it is still the last one
  // asked for on its connection when its head is written (a response before a
  // pipelined request keeps the connection open: closing after it would lose the
  // answers queued behind it). And the socket is idle again once its response is
  // flushed ('finish'): the grace counts from then, for a client that may send its
  // next request at once.
  #watchResponse(res, socket, seq) {
    if (res[WATCHED]) return;
    mark(res, WATCHED, true);
    res.once('finish', () => stampIdle(socket));
    if (res.headersSent) return;
    if (!Object.isExtensible(res)) {
      // Its writeHead cannot be wrapped: if it is the last one asked for now, it says
      // Connection: close at once (a request pipelined after it later would then find
      // the connection closing; rare enough).
      if (socket[REQUESTS] === seq) {
        try {
          res.setHeader('Connection', 'close');
        } catch {
          // frozen: left as it is
        }
      }
      return;
    }
    // Every head goes through writeHead: explicit, or implicit (write(), end(),
    // flushHeaders()). Headers passed to it still win over this one. `seq`: the number
    // of its request on the socket (-1: one before a pipelined request).
    const writeHead = res.writeHead;
    res.writeHead = function writeHeadDraining(...args) {
      // The last request asked for on the socket (on one that is not tracked, every
      // response is taken for the last).
      if (!this.headersSent && socket[REQUESTS] === seq) {
        this.setHeader('Connection', 'close');
      }
      return Reflect.apply(writeHead, this, args);
    };
  }

  // Closes the sockets idle for the whole grace. Not server.closeIdleConnections():
  // it also destroys a socket whose response is ended but not yet flushed (cutting it
  // short), and one that went idle a moment ago.
  #sweep(entry) {
    const now = Date.now();
    for (const socket of entry.httpSockets) {
      // Upgraded (WebSocket): no longer HTTP's, the application's to end.
      if (!socket.parser) continue;
      // A response is open on it (Node clears _httpMessage once it is flushed).
      if (socket._httpMessage) continue;
      // Bytes arrived since it went idle (a request on its way, or the rest of a body
      // its answer did not wait for): traffic, so the grace begins again from now.
      const [since, readAtIdle] = idleState(socket);
      if (socket.bytesRead !== readAtIdle) {
        stampIdle(socket, now);
        continue;
      }
      if (now - (since ?? now) < entry.idleGraceMs) continue;
      if (socket.writableLength > 0) continue;
      socket.destroy();
    }
  }

  // Without a served server the connections are the application's: so is the exit.
  #ownsExit() {
    return this.#entries.length > 0;
  }

  #armForceExit(deadlineMs) {
    if (!this.#ownsExit()) return;
    // Leave before the master's SIGKILL: a tenth of the deadline, 20 ms to 1 s.
    const margin = Math.min(1000, Math.max(20, Math.floor(deadlineMs / 10)));
    this.#deadlineAt = Date.now() + deadlineMs;
    if (this.#forceTimer) clearTimeout(this.#forceTimer);
    this.#forceTimer = setTimeout(() => {
      const open = this.#open.size;
      if (open > 0) {
        process.stderr.write(`rr-cluster-worker: drain deadline: exiting with ${open} ` +
          `connection${open === 1 ? '' : 's'} still open\n`);
      }
      this.#exit();
    }, Math.max(0, deadlineMs - margin));
    this.#forceTimer.unref();
  }

  #maybeExit() {
    if (!this.#draining || this.#exiting || this.#awaitingMaster || !this.#ownsExit()) return;
    if (this.#open.size > 0 || this.#hooksPending > 0 || this.#holds.size > 0) return;
    this.#exit();
  }

  #exit() {
    if (this.#exiting) return;
    this.#exiting = true;
    process.exit(this.#exitCode);
  }

  // --- errors and signals ---------------------------------------------------------------

  #installProcessHandlers(errors, signals) {
    if (this.#processHandlers) return;
    this.#processHandlers = true;
    if (errors) {
      // Unhandled rejections reach this handler too in Node's default mode
      // (--unhandled-rejections=throw), with origin 'unhandledRejection'.
      process.on('uncaughtException', (err, origin) => this.#onFatal(err, origin));
    }
    if (signals) {
      for (const signal of ['SIGTERM', 'SIGINT']) {
        process.on(signal, () => {
          if (this.#signalled) {
            // A second signal: leave now, as Node would have on the first.
            process.exit(128 + (signal === 'SIGTERM' ? 15 : 2));
          }
          this.#signalled = true;
          // Already draining (the master's drain, shutdown(), a crash): that drain goes
          // on, within this deadline at the latest.
          if (!this.#draining) this.#suicide(signal);
          this.#startDrain('signal', this.#shutdownTimeoutMs);
        });
      }
    }
  }

  #onFatal(err, origin) {
    // What Node prints for an uncaught error, then what happens next.
    const what = origin === 'unhandledRejection' ? 'unhandled rejection' : 'uncaught exception';
    process.stderr.write(`${inspect(err)}\n\nNode.js ${process.version}\n`);
    if (this.#crashed) return;
    this.#crashed = true;
    process.stderr.write(`rr-cluster-worker: ${what} in worker ${this.id} (pid ${process.pid}); ` +
      'draining, then exiting with status 1\n');
    // Announced before anything closes, so the master replaces this worker at once.
    this.#suicide(`${what}: ${oneLine(err)}`);
    this.#startDrain('crash', this.#shutdownTimeoutMs, 1);
  }
}

function instance() {
  // One per process, even when several copies of this package are installed: two
  // would both answer the master.
  if (!globalThis[SINGLETON]) {
    Object.defineProperty(globalThis, SINGLETON, { value: new RRClusterWorker() });
  }
  return globalThis[SINGLETON];
}

module.exports = instance();
