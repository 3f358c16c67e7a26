// Calls server.listen() with the JSON array in $LISTEN_ARGS plus a callback that sends
// {app: "listening", address} over the IPC channel, so a test sees what listen() did.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.end(`hello ${process.pid}\n`);
});
server.on('error', (err) => process.send({ app: 'error', code: err.code }));
server.listen(...JSON.parse(process.env.LISTEN_ARGS), () => {
  process.send({ app: 'listening', address: server.address() });
});
