// A server that also loads what behaves on signals like the signal-exit package (v4),
// which many tools pull in: it publishes how many listeners it installed per signal and
// re-raises a signal only when its own listeners are the only ones left.
// CLOSE=1 closes the server once listening and keeps the process alive with a timer.
const http = require('node:http');

const emitter = { count: 1 };
Object.defineProperty(globalThis, Symbol.for('signal-exit emitter'), { value: emitter });
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, function listener() {
    if (process.listeners(sig).length === emitter.count) {
      process.removeListener(sig, listener);
      process.kill(process.pid, sig);
    }
  });
}

const server = http.createServer((req, res) => {
  res.end(`hello ${process.pid}\n`);
});
server.listen(Number(process.env.PORT), () => {
  if (process.env.CLOSE === '1') {
    server.close(() => console.log('closed'));
    setInterval(() => {}, 60_000);
  }
});
