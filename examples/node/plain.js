// The same hello with Node's documented API only (no package): the master hands each
// connection over as the message {rr:'connection', listener:N} with a net.Socket; with
// balance = "shared" it hands its listening socket over once instead, as
// {rr:'listen', listener:N} with a net.Server, and the worker accepts on it itself.
// In a pool: rr-cluster run --worker-protocol node -- node examples/node/plain.js
//
// On drain the master sends {rr:'drain'} and closes the channel: Node emits
// 'disconnect'. The worker stops accepting on the shared listening sockets, and the
// process exits by itself once its last connection has closed (an idle keep-alive
// connection after server.keepAliveTimeout, 5 s), or is killed at the drain deadline.
const http = require('node:http');
const id = process.env.RR_CLUSTER_WORKER_ID;

const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', id);
  res.end(`Hello from worker ${id} (pid ${process.pid})\n`);
});
const shared = []; // the listening sockets received (shared mode)
const stopAccepting = () => { for (const listening of shared) listening.close(); };
process.on('message', (m, handle) => {
  if (!m) return;
  if (m.rr === 'connection') server.emit('connection', handle);
  if (m.rr === 'listen') {
    shared.push(handle);
    handle.on('connection', (socket) => server.emit('connection', socket));
  }
  if (m.rr === 'drain') stopAccepting();
});
process.on('disconnect', stopAccepting);
process.send({ rr: 'ready' });
