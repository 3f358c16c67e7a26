// Listens on $PORT, closes the server as soon as it listens, then prints "closed".
// STAY=1 keeps the process alive with a timer. ECHO=1 listens for IPC messages and
// answers each with {echo: message}, as an app that speaks to its parent would.
const http = require('node:http');

if (process.env.ECHO === '1') {
  process.on('message', (message) => process.send({ echo: message }));
}
if (process.env.STAY === '1') {
  setInterval(() => {}, 60_000);
}

const server = http.createServer((req, res) => res.end('never\n'));
server.listen(Number(process.env.PORT), () => {
  server.close(() => console.log('closed'));
});
