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
//   exits 0, so a stop or reload drops no request (PM2's cluster gives apps the same):
//   stop accepting, answer every request with `Connection: close`, and close a kept-alive
//   connection only once its client has been silent for IDLE_GRACE_MS (see drain());
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
  // During the drain, a kept-alive connection with no request in flight is closed once it
  // has been silent this long (since the drain began or since its last response). A
  // client sends its next request microseconds after reading a response; closing a
  // connection that is idle only in between resets that request (the client sees
  // ECONNRESET, not a `Connection: close` it could act on). A client silent for 500 ms is
  // not in such a sequence, and one that sends just as we close races exactly as it does
  // with any server's keep-alive timeout (Node's 5 s, nginx's 75 s). Short, because an
  // idle pooled connection holds the instance's exit (and so a rolling reload) that long.
  const IDLE_GRACE_MS = 500;
  // Node calls listen() again on an inherited socket, which on Linux just sets the backlog
  // of that one socket the daemon and every instance share: Node's default (511) would
  // shrink the daemon's (supervisor/sockets.py, 4096) for all of them, for as long as the
  // port lives. The kernel caps it at net.core.somaxconn. An app that asks for a backlog
  // gets it, as it would on its own socket.
  const SHARED_BACKLOG = 4096;
  const entries = parseSockets(process.env.PMX_CLUSTER_SOCKETS || '');
  const live = new Set(); // considered servers listening now
  const connections = new Set(); // their accepted sockets, until each closes
  const inflight = new Set(); // their responses not finished yet
  const kPlan = Symbol('pmx.plan'); // { adopted } of the server's latest considered listen
  const kBusy = Symbol('pmx.busy'); // on a socket: its responses not finished yet
  const kActive = Symbol('pmx.active'); // on a socket, in the drain: { at, bytesRead } when last seen active
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
    // first instance binds the port itself, and the daemon copies its socket. For an fd,
    // Node takes the backlog from the second argument only, not from the options.
    const result = entry
      ? originalListen.call(this, { fd: entry.fd, signal: plan.signal }, plan.backlog || SHARED_BACKLOG,
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
      // An https server's requests come on the TLS socket ('secureConnection'), not on
      // the TCP one ('connection'): both are counted, the drain tells them apart.
      this.prependListener('connection', onConnection);
      this.prependListener('secureConnection', onConnection);
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

  function onConnection(socket) {
    try {
      if (!this[kPlan]) return;
      connections.add(socket);
      socket.on('close', onConnectionClose);
    } catch {}
  }

  function onConnectionClose() {
    connections.delete(this);
  }

  function onRequest(req, res) {
    try {
      if (draining) askClose(res); // a request on a kept-alive connection
      inflight.add(res);
      const socket = req.socket;
      if (socket) socket[kBusy] = (socket[kBusy] || 0) + 1;
      res.on('close', onResponseClose);
    } catch {} // a request must never fail because of us
  }

  function onResponseClose() {
    inflight.delete(this);
    try {
      const socket = this.req && this.req.socket; // HTTP/2's may throw once its session is gone
      if (!socket) return;
      socket[kBusy] -= 1;
      // It may have promised keep-alive before the drain: its client's next request may be
      // on its way now, so the connection's silence counts from here.
      if (draining) markActive(socket, performance.now());
    } catch {}
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

  // The drain: stop accepting; every response from now on says `Connection: close`, so an
  // active kept-alive connection ends cleanly after its next response (its client reads
  // the close and reconnects, to another instance); a connection silent for
  // IDLE_GRACE_MS is closed (sweep()). Each server emits 'close' once its listening handle
  // and its last connection are gone; when all have, onClose() exits 0. The deadline
  // exits anyway, before the daemon's SIGKILL.
  function drain() {
    if (draining) return;
    draining = true;
    setTimeout(() => process.exit(0), drainDeadlineMs).unref();
    for (const res of inflight) askClose(res);
    const now = performance.now();
    for (const socket of connections) markActive(socket, now);
    for (const server of live) stopAccepting(server);
    setTimeout(sweep, IDLE_GRACE_MS).unref();
  }

  // Closes the server's listening handle (the shared socket stays open in the daemon and
  // the other instances) and leaves its connections open. server.close() is the one call
  // that does this for every kind of server on Node 18-22 and keeps each one's own
  // bookkeeping (http's timeout checker, http2's sessions, an app's own override). But
  // since Node 19, http(s).Server.close() first calls this.closeIdleConnections(), which
  // destroys every connection that is between two requests, also one whose next request
  // is already on the wire: that client gets a reset. So the method is shadowed on the
  // instance for the call; Node 18's close() never calls it, and net/tls servers have none.
  function stopAccepting(server) {
    const own = Object.getOwnPropertyDescriptor(server, 'closeIdleConnections');
    let shadowed = false;
    try {
      if (typeof server.closeIdleConnections === 'function') {
        Object.defineProperty(server, 'closeIdleConnections',
          { value: function closeIdleConnections() {}, configurable: true, writable: true });
        shadowed = true;
      }
    } catch {} // a frozen property: close() as is beats not closing
    try {
      server.close();
    } catch {} // an app's own close() that throws: the deadline still ends the drain
    if (!shadowed) return;
    try {
      if (own) Object.defineProperty(server, 'closeIdleConnections', own);
      else delete server.closeIdleConnections;
    } catch {}
  }

  function markActive(socket, now) {
    socket[kActive] = { at: now, bytesRead: socket.bytesRead };
  }

  // Closes each HTTP/1 connection that has had no response in progress and read no byte
  // for IDLE_GRACE_MS, then runs again when the next one could be. bytesRead (counted even
  // while Node's parser consumes the socket) shows a request that is arriving but not
  // parsed yet. Only a socket Node's http serves has a `parser`: it is cleared on upgrade
  // (WebSocket), and HTTP/2 sessions, plain TCP servers and the TCP socket under a TLS one
  // never get one. Those are left to end by themselves or at the deadline.
  function sweep() {
    const now = performance.now();
    let next = Infinity;
    for (const socket of connections) {
      try {
        if (!socket.parser || socket.destroyed) continue;
        const active = socket[kActive];
        // _httpMessage: a response Node's http has not finished on it, also one answered
        // without a 'request' event ('checkContinue'...); Node's closeIdleConnections()
        // spares the same.
        const busy = socket[kBusy] > 0 || Boolean(socket._httpMessage);
        if (!active || busy || socket.bytesRead !== active.bytesRead) {
          markActive(socket, now);
        } else if (now - active.at >= IDLE_GRACE_MS) {
          socket.destroy();
          continue;
        }
        next = Math.min(next, socket[kActive].at + IDLE_GRACE_MS);
      } catch {}
    }
    if (next !== Infinity) setTimeout(sweep, Math.max(1, Math.ceil(next - now))).unref();
  }

  function askClose(res) {
    try {
      if (!('shouldKeepAlive' in res)) return; // HTTP/1 only; HTTP/2 forbids the header
      res.shouldKeepAlive = false;
      if (!res.headersSent) res.setHeader('Connection', 'close');
    } catch {} // headers already out: sweep() ends the connection once it is idle
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
