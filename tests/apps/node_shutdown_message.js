// PM2's graceful shutdown for apps that cannot get signals: the 'shutdown' message.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.end(`hello ${process.pid}\n`);
});
server.listen(process.env.PORT || 3000);

process.on('message', (message) => {
  if (message === 'shutdown') {
    console.log('got the shutdown message');
    server.close(() => process.exit(0));
  }
});
