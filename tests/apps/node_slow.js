// Answers "hello <pid>" DELAY_MS after each request arrives, so requests are in flight
// when a signal comes. LOG_REQUESTS=1 prints "request" as each one arrives.
const http = require('node:http');

const server = http.createServer((req, res) => {
  if (process.env.LOG_REQUESTS === '1') console.log('request');
  setTimeout(() => res.end(`hello ${process.pid}\n`), Number(process.env.DELAY_MS || 300));
});
server.listen(Number(process.env.PORT));
