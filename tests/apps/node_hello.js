// A plain Node hello server, as Node's docs write one: nothing pmx-specific.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.end(`hello ${process.pid}\n`);
});

server.listen(process.env.PORT || 18731);
