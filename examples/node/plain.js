// The same hello with Node's documented API only (no package): the master hands each
// connection over as the message {rr:'connection', listener:N} with a net.Socket.
// In a pool: rr-cluster run --worker-protocol node -- node examples/node/plain.js
//
// On drain the master closes the channel: Node emits 'disconnect', and the process
// exits by itself once its last connection has closed (an idle keep-alive connection
// after server.keepAliveTimeout, 5 s), or is killed at the drain deadline.
const http = require('node:http');
const id = process.env.RR_CLUSTER_WORKER_ID;

const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', id);
  res.end(`Hello from worker ${id} (pid ${process.pid})\n`);
});
process.on('message', (m, socket) => { if (m && m.rr === 'connection') server.emit('connection', socket); });
process.send({ rr: 'ready' });
