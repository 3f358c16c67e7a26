'use strict';
// pmx cluster preload: lets an unmodified Node app (`http.createServer(h).listen(3000)`,
// express, fastify, koa) run as one of N instances sharing one daemon-owned port.
//
// pmx puts `--require <this file>` in NODE_OPTIONS, so it also runs inside every other node
// process the app starts (npm, build tools, forked children). It must be inert there: it
// does nothing unless PMX_CLUSTER is exactly "1", and it never throws into the app.
//
// In a cluster child (the contract with the daemon is in ARCHITECTURE.md, "Preloads"):
// - a TCP listen on a port named in PMX_CLUSTER_SOCKETS ("inet/0.0.0.0/3000=3,...") serves
//   on that inherited fd instead of binding, so all instances share one socket that
//   outlives each of them; every other listen is left exactly as the app wrote it;
// - when such a server listens, it tells the daemon over Node's IPC channel: that is the
//   instance's readiness, and the fd of a self-bound socket for pidfd_getfd;
// - on SIGTERM/SIGINT, if the app has no handler of its own, it drains those servers and
//   exits 0, so a stop or reload drops no request (PM2's cluster gives apps the same);
// - PM2's 'shutdown' message becomes the SIGTERM the app may already handle.

if (process.env.PMX_CLUSTER === '1') {
  try {
    // A worker thread shares the main thread's fds and never gets signals: only the main
    // thread may adopt a socket or drain.
    if (require('worker_threads').isMainThread) install();
  } catch {} // never break the app: without the preload it still runs, just not clustered
}

function install() {
  const net = require('net');
  const fs = require('fs');

  const killTimeoutMs = Number(process.env.PMX_KILL_TIMEOUT_MS);
  const drainDeadlineMs = Math.floor((killTimeoutMs > 0 ? killTimeoutMs : 5000) * 0.9); // before SIGKILL
  const entries = parseSockets(process.env.PMX_CLUSTER_SOCKETS || '');
  const live = new Set(); // considered servers listening now
  const inflight = new Set(); // their responses not finished yet
  const kPlan = Symbol('pmx.plan'); // { adopted } of the server's latest considered listen
  let draining = false;
  let signalsInstalled = false;

  const originalListen = net.Server.prototype.listen;
  net.Server.prototype.listen = function listen(...args) {
    let plan = null;
    try {
      plan = planListen(args);
    } catch {} // a bug of ours must not change what the app asked for
    if (plan === null) {
      const result = originalListen.apply(this, args);
      if (this[kPlan]) this[kPlan] = null; // a later listen elsewhere is none of our business
      return result;
    }
    const { entry } = plan;
    // An adopted socket is bound already: host, port and exclusive no longer apply. The
    // first instance binds the port itself, and the daemon copies its socket.
    const result = entry
      ? originalListen.call(this, { fd: entry.fd, backlog: plan.backlog || undefined, signal: plan.signal },
        ...plan.cb)
      : originalListen.apply(this, args);
    // Node now owns the fd and closes it with the server; the number may then be reused for
    // anything, and a second handle on a live fd fails with EEXIST (epoll): so each entry
    // is adopted at most once per process.
    if (entry) entry.used = true;
    if (!(kPlan in this)) {
      // Prepended: the report must read address() before an app callback that closes the
      // server, and a response must learn it is the last before the app's handler sends it.
      this.prependListener('listening', onListening);
      this.prependListener('request', onRequest);
      this.on('close', onClose);
    }
    this[kPlan] = { adopted: Boolean(entry) };
    return result;
  };

  // The IPC channel exists only when the daemon started us with one (NODE_CHANNEL_FD).
  if (typeof process.send === 'function' && process.channel) {
    process.prependListener('message', onMessage);
    // Our listener must not keep the app alive (an app whose servers closed exits by
    // itself). unrefCounted() takes back just the reference our listener added, so an app's
    // own 'message' listener still keeps it alive as in plain Node; unref() would end
    // that counting for good.
    const channel = process.channel;
    if (typeof channel.unrefCounted === 'function') channel.unrefCounted();
    else if (typeof channel.unref === 'function') channel.unref();
  }

  // listen(port[, host][, backlog][, cb]) or listen({port, host, backlog, ...}[, cb]) on a
  // fixed TCP port gives a plan; anything else (path, fd, handle, port 0) gives null.
  // Follows Node's normalizeArgs() and the order of checks in Server.prototype.listen.
  function planListen(args) {
    const last = args[args.length - 1];
    let options = args[0];
    if (options === null || typeof options !== 'object') {
      if (typeof options === 'string' && !(Number(options) >= 0)) return null; // a pipe path
      options = { port: options, host: args.length > 1 && typeof args[1] === 'string' ? args[1] : undefined };
    }
    if (options._handle || options.handle || (typeof options.fd === 'number' && options.fd >= 0)) return null;
    const raw = options.port;
    if (typeof raw !== 'number' && (typeof raw !== 'string' || raw.trim() === '')) return null;
    const port = Number(raw);
    if (!Number.isInteger(port) || port <= 0 || port > 65535) return null;
    const host = typeof options.host === 'string' && options.host ? options.host : undefined;
    const backlog = options.backlog || toNumber(args.length > 1 && args[1])
      || toNumber(args.length > 2 && args[2]);
    const cb = typeof last === 'function' ? [last] : [];
    return { entry: pickEntry(port, host), backlog, signal: options.signal, cb };
  }

  function pickEntry(port, host) {
    const candidates = entries.filter((e) => e.port === port && !e.used && isSocket(e.fd));
    // No host: Node would bind "::", which takes both families. A literal names its family.
    let families = [];
    if (host === undefined) families = ['inet6', 'inet'];
    else if (net.isIPv4(host)) families = ['inet'];
    else if (net.isIPv6(host)) families = ['inet6'];
    return candidates.find((e) => e.host === host)
      || families.map((f) => candidates.find((e) => e.family === f)).find(Boolean)
      || candidates[0] || null;
  }

  function onListening() {
    const plan = this[kPlan];
    if (!plan) return;
    live.add(this);
    installSignals();
    try {
      if (typeof process.send !== 'function' || !process.connected) return;
      const address = this.address();
      const fd = this._handle && this._handle.fd;
      const family = address.family === 'IPv6' || address.family === 6 ? 'inet6' : 'inet'; // 6: Node < 18.4
      const msg = { pmx: 'listening', family, host: address.address, port: address.port,
        fd: typeof fd === 'number' ? fd : -1, adopted: plan.adopted };
      // With a callback a failed send goes to it, not to an 'error' event on process,
      // which would crash an app that does not listen for one.
      process.send(msg, () => {});
    } catch {
      // No report: the daemon's readiness timeout says more than a crash would.
    }
  }

  function onRequest(req, res) {
    try {
      if (draining) return askClose(res); // a request on a kept-alive connection
      inflight.add(res);
      res.on('close', onResponseClose);
    } catch {} // a request must never fail because of us
  }

  function onResponseClose() {
    inflight.delete(this);
    // It may have promised keep-alive before the drain: its connection is idle now.
    if (draining) setImmediate(closeIdle);
  }

  function onClose() {
    live.delete(this);
    // setImmediate: let the app's own 'close' listeners run before we leave.
    if (draining && live.size === 0) setImmediate(() => process.exit(0));
  }

  function installSignals() {
    if (signalsInstalled) return;
    signalsInstalled = true;
    // Prepended, so listenerCount() still counts an app listener added with once(), which
    // removes itself before it runs.
    for (const sig of ['SIGTERM', 'SIGINT']) process.prependListener(sig, onSignal);
  }

  function onSignal(sig) {
    if (process.listenerCount(sig) - 1 - signalExitListeners() > 0) return; // the app stops itself
    if (live.size > 0) return drain();
    // Nothing to drain: die by the signal as Node does by default, so the daemon sees it.
    process.removeListener(sig, onSignal);
    process.kill(process.pid, sig);
  }

  // signal-exit (under many tools: execa, write-file-atomic, ...) listens on every signal
  // and re-raises it only when its listeners are the only ones. Counted as the app's own,
  // each would wait for the other and only SIGKILL would stop the app. Its v4 and v3 both
  // publish how many listeners per signal they have installed.
  function signalExitListeners() {
    const emitters = [globalThis[Symbol.for('signal-exit emitter')], process.__signal_exit_emitter__];
    return emitters.reduce((n, e) => n + (e && typeof e.count === 'number' ? e.count : 0), 0);
  }

  function onMessage(msg) {
    // PM2 sends 'shutdown' where it cannot signal. As SIGTERM, it reaches the app's own
    // handler if it has one, else our drain, else Node's default death.
    if (msg === 'shutdown' && process.listenerCount('message') === 1) process.kill(process.pid, 'SIGTERM');
  }

  function drain() {
    if (draining) return;
    draining = true;
    setTimeout(() => process.exit(0), drainDeadlineMs).unref();
    for (const res of inflight) askClose(res);
    // Stops accepting; the shared socket stays open in the daemon and the other instances.
    // Since Node 19 close() also closes idle connections; on 18 closeIdle() does.
    for (const server of live) server.close();
    closeIdle();
  }

  function closeIdle() {
    for (const server of live) {
      // Node >= 18.2. It spares a connection whose response is unfinished, and one whose
      // first request is not read yet (Node counts it active from accept), so a fresh
      // connection racing the signal is still served.
      if (typeof server.closeIdleConnections === 'function') server.closeIdleConnections();
    }
  }

  function askClose(res) {
    try {
      if (!('shouldKeepAlive' in res)) return; // HTTP/1 only; HTTP/2 forbids the header
      res.shouldKeepAlive = false;
      if (!res.headersSent) res.setHeader('Connection', 'close');
    } catch {} // headers already out: closeIdle() ends the connection after the response
  }

  function isSocket(fd) {
    try {
      return fs.fstatSync(fd).isSocket();
    } catch {} // closed or never passed: binding normally beats failing the listen
    return false;
  }
}

// "FAMILY/HOST/PORT=FD,..."; HOST may contain ':' (inet6) but no '/' or '='.
// A malformed entry is skipped: a listen on its port then binds normally.
function parseSockets(text) {
  const entries = [];
  for (const item of text.split(',')) {
    const eq = item.lastIndexOf('=');
    const address = item.slice(0, eq);
    const first = address.indexOf('/');
    const last = address.lastIndexOf('/');
    const family = address.slice(0, first);
    const port = Number(address.slice(last + 1));
    const fd = item.slice(eq + 1);
    if (eq < 0 || first < 0 || first === last || (family !== 'inet' && family !== 'inet6')) continue;
    if (!/^\d+$/.test(address.slice(last + 1)) || port < 1 || port > 65535 || !/^\d+$/.test(fd)) continue;
    entries.push({ family, host: address.slice(first + 1, last), port, fd: Number(fd), used: false });
  }
  return entries;
}

// Node's own toNumber() from net.js, which it uses to find a positional backlog.
function toNumber(x) {
  return (x = Number(x)) >= 0 ? x : false;
}
