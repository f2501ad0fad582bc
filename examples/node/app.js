// An HTTP hello served by an rr-cluster pool (Node dialect), with rr-cluster-worker.
// In a pool:  rr-cluster run --worker-protocol node -- node examples/node/app.js
// Standalone: node examples/node/app.js   (listens on $PORT, default 3000)
const http = require('node:http');
const worker = require('../../js/rr-cluster-worker');

const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', String(worker.id));
  res.end(`Hello from worker ${worker.id} (pid ${process.pid})\n`);
});
worker.serve(server);
