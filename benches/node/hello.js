// The handler of ../shared/bench/node-cluster.js (Node's own cluster module), run as
// an rr-cluster worker through the rr-cluster-worker package: the same Node app on
// both sides of the comparison, plus an x-worker-id header so the load generator can
// tell the workers apart.
//
//   rr-cluster run --worker-protocol node -- node benches/node/hello.js
'use strict';
const http = require('node:http');
const worker = require('../../js/rr-cluster-worker');

const id = String(worker.id);
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'x-worker-id': id });
  res.end('Hello World\n');
});
worker.serve(server);
