'use strict';

// Node's side of the wire as a non-Node master sees it: probe_raw_master.py (Python,
// standard library) plays the Rust master with raw sendmsg calls against
// examples/node/plain.js. These tests pin the behaviour the Rust master relies on.
// Skipped when python3 is not installed, unless RR_REQUIRE_TOOLS=1 (CI sets it): then
// a missing python3 fails.

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { execFile, spawnSync } = require('node:child_process');

const PROBE = path.join(__dirname, 'probe_raw_master.py');
const python = spawnSync('python3', ['--version']).status === 0 ? 'python3' : null;
const skip = python ? false : 'python3 is not installed';

if (!python && process.env.RR_REQUIRE_TOOLS === '1') {
  test('python3 is installed (RR_REQUIRE_TOOLS=1: these tests may not be skipped)', () => {
    assert.fail('python3 is not installed');
  });
}

function probe(args, ms) {
  return new Promise((resolve, reject) => {
    const env = { ...process.env, NODE: process.execPath };
    delete env.NODE_TEST_CONTEXT;
    execFile(python, [PROBE, ...args, '--json'], { env, timeout: ms, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`${err.message}\n${stderr}`));
        else resolve(JSON.parse(stdout));
      });
  });
}

test('one line + one descriptor per sendmsg, pipelined without waiting for ACKs', { skip }, async () => {
  const r = await probe(['load', '--connections', '500', '--window', '0', '--concurrency', '16'], 30000);
  assert.equal(r.errors, 0, JSON.stringify(r.first_errors));
  assert.equal(r.sent, 500);
  assert.equal(r.acks, 500);
  assert.equal(r.nacks, 0);
  assert.equal(r.exit_after_eof, 0, 'end of file on the channel: the idle worker exits');
});

test('a burst of handles sent back to back: one ACK each, every connection served', { skip }, async () => {
  const r = await probe(['burst', '--connections', '300'], 30000);
  assert.deepEqual({ acks: r.acks, nacks: r.nacks, errors: r.errors }, { acks: 300, nacks: 0, errors: 0 });
});

test('edge cases of the channel', { skip }, async () => {
  const r = await probe(['experiments', '--quick'], 40000);
  // Node removes both variables before the application runs, and makes the channel
  // close-on-exec, so the worker's own children do not inherit it.
  assert.deepEqual(r.worker_env_after_start, { NODE_CHANNEL_FD: null, NODE_CHANNEL_SERIALIZATION_MODE: null });
  assert.equal(r.channel_fd_cloexec_in_worker, true);
  // A NODE_HANDLE line without a descriptor: NACK, nothing delivered, no crash.
  assert.deepEqual(r.handle_line_without_fd, { acks: 0, nacks: 1, delivered: false, worker_alive: true });
  // A line split across two sendmsg, the descriptor on the first part: not lost.
  assert.deepEqual(r.line_split_fd_in_first_half, { acks: 1, nacks: 0, handle: 'Socket', served: true });
  // Connections of a Unix listener arrive as net.Socket too.
  assert.deepEqual(r.unix_socket_connection, { handle: 'Socket', served: true });
  // cmd NODE_* is Node's: swallowed; anything else is delivered.
  assert.deepEqual(r.user_messages_delivered, [{ cmd: 'NODEFOO', x: 2 }, { hello: 'world' }, 'a string']);
  assert.equal(r['8MiB_message'].delivered, true);
  // Two descriptors in one sendmsg: the second line gets a NACK and the second
  // descriptor is handed to the NEXT NODE_HANDLE line (mis-paired), whose own
  // descriptor then waits in libuv.
  assert.deepEqual(r.two_fds_in_one_sendmsg.after_the_two, { acks: 1, nacks: 1 });
  assert.deepEqual(r.two_fds_in_one_sendmsg.served, { first: true, second: true, third: false });
  assert.deepEqual(r.eof_idle_worker.exit_code, 0);
  // Nagle: net.Server sets TCP_NODELAY on what it accepts; a socket fed with
  // server.emit('connection') keeps what the master gave it, unless the package sets it.
  assert.deepEqual(r.tcp_nodelay_after_handover, { 'plain.js': false, 'app.js (package)': true });
  // A listening socket sent as net.Server: the worker accepts on it.
  assert.equal(r.listening_socket_as_net_server.replies.length, 3);
  // Fatal for the worker: an unknown handle type, a descriptor that is not a socket,
  // a line that is not JSON (a blank line), an unknown serialization mode.
  assert.equal(r.unknown_handle_type.exit_code, 1);
  assert.equal(r.regular_file_descriptor.exit_code, -6); // SIGABRT
  assert.equal(r.blank_line.exit_code, 1);
  assert.equal(r.serialization_mode_bogus.exit_code, 1);
  // Descriptor table full in the worker (MSG_CTRUNC): NACK per lost descriptor,
  // the worker lives on.
  const full = r.fd_table_full_rlimit_40;
  assert.equal(full.acks + full.nacks, full.sent);
  assert.ok(full.nacks > 0);
  assert.equal(full.served, full.acks);
  assert.equal(full.worker_alive, true);
});
