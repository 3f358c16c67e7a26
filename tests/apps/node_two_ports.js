// Two plain servers in one process: $PORT and $PORT2 (each answers "hello <pid>").
const http = require('node:http');

const handler = (req, res) => {
  res.end(`hello ${process.pid}\n`);
};

http.createServer(handler).listen(Number(process.env.PORT));
http.createServer(handler).listen(Number(process.env.PORT2));
