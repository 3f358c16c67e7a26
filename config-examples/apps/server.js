// A Node http server for a pmx cluster: it serves on the socket pmx passes as fd 3
// (no Node cluster module needed), and drains on SIGTERM: stop accepting, finish
// in-flight requests, close idle keep-alive connections, exit.
const http = require("http");

const server = http.createServer((req, res) => {
  res.end(`hello from node pid ${process.pid} (instance ${process.env.PMX_INSTANCE})\n`);
});

if (process.env.LISTEN_FDS) {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT || 8000), "127.0.0.1");
}

process.on("SIGTERM", () => {
  server.close(() => process.exit(0)); // stops accepting; waits for in-flight requests
  server.closeIdleConnections(); // Node >= 18.2: idle keep-alive sockets go now
});
