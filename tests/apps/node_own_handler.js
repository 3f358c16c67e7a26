// A server whose app handles SIGTERM itself: it logs and keeps serving (until SIGKILL).
// ONCE=1 registers the handler with process.once() instead of process.on().
const http = require('node:http');

process[process.env.ONCE === '1' ? 'once' : 'on']('SIGTERM', () => {
  console.log('got SIGTERM, staying up');
});

const server = http.createServer((req, res) => {
  res.end(`hello ${process.pid}\n`);
});
server.listen(Number(process.env.PORT));
