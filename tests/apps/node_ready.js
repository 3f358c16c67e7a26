// A Node hello that tells PM2 (and pmx) it is ready, READY_DELAY_MS after it listens:
// the way PM2's docs show `wait_ready` apps.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.end(`hello ${process.pid}\n`);
});

server.listen(process.env.PORT || 3000, () => {
  setTimeout(() => process.send('ready'), Number(process.env.READY_DELAY_MS || 0));
});
