/**
 * A listener (one service port) and the life of one client connection through it:
 *
 *   accept -> (queue while listener or backends are at maxconn, bounded in time)
 *          -> connect to the picked backend (connect timeout; on failure the next backend, bounded
 *             by `retries`) -> PROXY header -> splice both ways -> close, accounting, log line.
 *
 * Splicing is common/relay.ts: backend to client through a ReadPump (reads into reused buffers,
 * large ones while data streams), client to backend by `pipe()`. Either way a slow reader stops
 * the other side's reads (backpressure, memory bounded per connection). Both sockets are
 * half-open capable: a FIN from one side is passed on as a FIN and the other direction keeps
 * flowing until it ends too. An error or reset on one side destroys the other; no byte either
 * way for `idleTimeoutMs` closes both.
 * The client is not read from before its backend is connected (the kernel holds what it sends).
 */
import net from 'node:net';
import type { Logger } from '../common/log.ts';
import { ReadPump, relay } from '../common/relay.ts';
import type { Backend } from './backend.ts';
import type { ListenerConfig, PoolConfig } from './config.ts';
import { splitHostPort } from './config.ts';
import type { LbMetrics } from './metrics.ts';
import type { Pool } from './pool.ts';
import { buildProxyHeader } from './proxy-header.ts';

export interface ListenerDeps {
  metrics: LbMetrics;
  log: Logger;
  /** The pool by name now (it may change on reload). */
  pool(name: string): Pool | undefined;
  closeLogSample(): number;
  /** Size of each of the two buffers a streaming backend -> client connection reads into. */
  relayBufferBytes(): number;
  /** Every spliced or pending connection, for a graceful stop. */
  live: Set<Conn>;
}

export interface Conn {
  client: net.Socket;
  server: net.Socket | null;
  destroy(): void;
  /** Adds the bytes moved since the last call to pairgate_lb_bytes_total (called periodically and at close). */
  account(): void;
}

let nextId = 1;
/** Stream buffer per socket and direction: fewer pause/resume turns on bulk transfers, still bounded. */
const SOCKET_HWM = 256 * 1024;

interface Connected {
  socket: net.Socket;
  /** Reads the backend's bytes (its socket's `onread`) for the splice. */
  pump: ReadPump;
}

function connectBackend(b: Backend, pool: PoolConfig, bulkBufferBytes: number): Promise<Connected | { error: string }> {
  return new Promise((resolve) => {
    let done = false;
    const pump = new ReadPump({ bulkBufferBytes });
    const s = net.connect({
      onread: pump.onread,
      host: b.host,
      port: b.port,
      allowHalfOpen: true,
      noDelay: true,
      highWaterMark: SOCKET_HWM,
      keepAlive: pool.keepaliveMs > 0,
      keepAliveInitialDelay: pool.keepaliveMs,
      // Passed on to the stream (not in @types/node 20's NetConnectOpts).
    } as net.NetConnectOpts);
    // Inline handlers guarded by `done` rather than named ones removed again: no per-connection
    // function names to set (tsx's keepNames) and fewer listener-list changes. The error handler
    // stays for the socket's life: after the connect it only keeps an error emitted before the
    // splice adds its own from being unhandled.
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      s.destroy();
      resolve({ error: 'connect-timeout' });
    }, pool.connectTimeoutMs);
    s.on('error', (err: NodeJS.ErrnoException) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ error: err.code ?? err.message });
    });
    s.once('connect', () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve({ socket: s, pump });
    });
  });
}

/** Runs in the check phase before the next poll: schedules the uncork for the one after it. */
function uncorkAfterNextPoll(s: net.Socket): void {
  setImmediate(uncork, s);
}
function uncork(s: net.Socket): void {
  s.uncork();
}

/**
 * One client connection from accept to close. A class with its state in fields, so that a
 * connection makes no closures beyond its event handlers (GC, and tsx's keepNames sets a name
 * on every named closure made).
 */
class Connection implements Conn {
  server: net.Socket | null = null;
  /** The backend whose slot this client holds now (null when none). */
  backend: Backend | null = null;
  /** The backend it was spliced to (null before). */
  spliced: Backend | null = null;
  closed = false;
  cancelQueue: (() => void) | null = null;
  holdsListenerSlot = false;
  queuedMs = 0;
  endReason = '';
  /** Sockets closed since the splice; both closed ends the connection. */
  closedSockets = 0;
  private countedIn = 0;
  private countedOut = 0;
  readonly id = nextId++;
  readonly start = Date.now();
  readonly clientAddress: string;
  readonly clientPort: number;

  constructor(
    readonly client: net.Socket,
    private readonly metrics: LbMetrics,
  ) {
    this.clientAddress = client.remoteAddress ?? '';
    this.clientPort = client.remotePort ?? 0;
  }

  destroy(): void {
    this.endReason ||= 'stop';
    this.client.destroy();
    this.server?.destroy();
  }

  account(): void {
    if (!this.spliced) return;
    const inNow = this.client.bytesRead;
    const outNow = this.server?.bytesRead ?? 0;
    if (inNow > this.countedIn) this.metrics.bytes.inc({ direction: 'in' }, inNow - this.countedIn);
    if (outNow > this.countedOut) this.metrics.bytes.inc({ direction: 'out' }, outNow - this.countedOut);
    this.countedIn = inNow;
    this.countedOut = outNow;
  }
}

export class Listener {
  server: net.Server;
  active = 0;
  total = 0;
  host: string;
  port: number;
  /** Bound to one address (not a wildcard, not a name): the PROXY header's destination is known. */
  private readonly specificHost: boolean;

  constructor(
    public config: ListenerConfig,
    private readonly deps: ListenerDeps,
  ) {
    const hp = splitHostPort(config.listen);
    this.host = hp.host;
    this.port = hp.port;
    this.specificHost = net.isIP(hp.host) !== 0 && hp.host !== '0.0.0.0' && !/^[0:]+$/.test(hp.host);
    this.server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true, highWaterMark: SOCKET_HWM }, (c) => this.accept(c));
    this.server.on('error', (err) => this.deps.log.error({ listener: config.name, err: err.message }, 'listener error'));
  }

  get name(): string {
    return this.config.name;
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error) => reject(new Error(`listener ${this.name}: cannot listen on ${this.config.listen}: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
      this.server.once('error', onError);
      this.server.listen({ host: this.host, port: this.port, backlog: this.config.backlog }, () => {
        this.server.off('error', onError);
        const a = this.server.address() as net.AddressInfo;
        this.port = a.port;
        resolve();
      });
    });
  }

  /** Stops accepting; connections already in flight are left alone. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      if (!this.server.listening) return resolve();
      // server.close() would wait for every connection: resolve once the port is released.
      this.server.close();
      setImmediate(resolve);
    });
  }

  private readonly perBackend = new Map<string, { inc(): void; dec(): void }>();

  /** Metric children per backend, looked up once (label hashing per connection is not free). */
  private children(b: Backend): { inc(): void; dec(): void } {
    let c = this.perBackend.get(b.id);
    if (!c) {
      const labels = { listener: this.name, backend: b.id };
      const gauge = this.deps.metrics.connections.labels(labels);
      const total = this.deps.metrics.connectionsTotal.labels(labels);
      c = {
        inc: () => {
          gauge.inc();
          total.inc();
        },
        dec: () => gauge.dec(),
      };
      this.perBackend.set(b.id, c);
    }
    return c;
  }

  hasSlot(): boolean {
    return this.config.maxconn === 0 || this.active < this.config.maxconn;
  }

  private accept(client: net.Socket): void {
    const pool = this.deps.pool(this.config.pool);
    const c = new Connection(client, this.deps.metrics);
    this.deps.live.add(c);

    client.on('error', (err: NodeJS.ErrnoException) => {
      c.endReason ||= `client-${err.code ?? 'error'}`;
      c.server?.destroy();
    });
    client.on('close', (hadError: boolean) => {
      // Gone before its backend was connected (queued or connecting): give back what it held.
      if (!c.server) return this.finish(c);
      if (hadError) c.server.destroy();
      if (++c.closedSockets === 2) this.finish(c);
    });

    if (!pool) return this.refuse(c, 'no-pool');
    client.setNoDelay(true);
    if (pool.config.keepaliveMs > 0) client.setKeepAlive(true, pool.config.keepaliveMs);

    const first = this.hasSlot() ? pool.pick(c.clientAddress) : null;
    if (first) return this.begin(c, pool, first);
    if (this.hasSlot() && !pool.serviceable()) return this.refuse(c, 'no-backend');
    const q = pool.enqueue(this, c.clientAddress, (b, reason) => {
      c.cancelQueue = null;
      if (c.closed) {
        // Client left while queued but the slot was handed over: give it back.
        if (b) pool.dispatch();
        return;
      }
      if (!b) return this.refuse(c, reason ?? 'queue-timeout');
      c.queuedMs = Date.now() - c.start;
      this.begin(c, pool, b);
    });
    if (!q) return this.refuse(c, 'queue-full');
    c.cancelQueue = () => q.cancel();
  }

  private begin(c: Connection, pool: Pool, b: Backend): void {
    // Slots taken synchronously so that a burst cannot overshoot maxconn.
    this.active++;
    c.holdsListenerSlot = true;
    b.acquire();
    c.backend = b;
    void this.connectWithRetries(c.client, pool, b, c.clientAddress, (next) => {
      if (c.closed) return;
      c.backend?.release();
      c.backend = next;
      next?.acquire();
    }).then((r) => {
      if (c.closed || c.client.destroyed) {
        r?.socket.destroy();
        this.finish(c);
        return;
      }
      if (!r) return this.refuse(c, 'connect-failed');
      c.server = r.socket;
      c.spliced = c.backend;
      this.total++;
      this.splice(c, r.socket, r.pump, pool.config, c.backend!);
    });
  }

  private refuse(c: Connection, reason: string): void {
    this.deps.metrics.rejected.inc({ listener: this.name, reason });
    this.deps.log.warn({ listener: this.name, client: c.clientAddress, reason }, 'client refused');
    c.endReason = reason;
    c.client.destroy();
    this.finish(c);
  }

  private finish(c: Connection): void {
    if (c.closed) return;
    c.closed = true;
    c.cancelQueue?.();
    this.deps.live.delete(c);
    if (c.holdsListenerSlot) this.active--;
    if (c.backend) c.backend.release();
    const spliced = c.spliced;
    if (spliced) {
      this.children(spliced).dec();
      c.account();
      const sample = this.deps.closeLogSample();
      if (sample > 0 && (sample >= 1 || Math.random() < sample)) {
        this.deps.log.info(
          {
            cid: c.id,
            listener: this.name,
            backend: spliced.id,
            client: `${c.clientAddress}:${c.clientPort}`,
            bytesIn: c.client.bytesRead,
            bytesOut: c.server?.bytesRead ?? 0,
            queuedMs: c.queuedMs,
            durationMs: Date.now() - c.start,
            reason: c.endReason || 'closed',
          },
          'connection closed',
        );
      }
    }
    if (c.holdsListenerSlot || c.backend) this.deps.pool(this.config.pool)?.dispatch();
    c.backend = null;
  }

  /**
   * Connects to `first` (its slot already held), then to other backends on failure, at most
   * 1 + retries attempts; `moved` moves the slot to the next backend tried (null: none).
   */
  private async connectWithRetries(
    client: net.Socket,
    pool: Pool,
    first: Backend,
    clientAddress: string,
    moved: (b: Backend | null) => void,
  ): Promise<Connected | null> {
    const tried = new Set<Backend>();
    let b: Backend | null = first;
    for (let attempt = 0; b && attempt <= pool.config.retries; attempt++) {
      tried.add(b);
      const r = await connectBackend(b, pool.config, this.deps.relayBufferBytes());
      if ('socket' in r) return r;
      this.deps.metrics.connectFailures.inc({ backend: b.id });
      this.deps.log.warn({ backend: b.id, listener: this.name, error: r.error, attempt: attempt + 1 }, 'backend connect failed');
      b = client.destroyed || attempt === pool.config.retries ? null : pool.pick(clientAddress, tried);
      moved(b);
    }
    return null;
  }

  private splice(c: Connection, server: net.Socket, pump: ReadPump, pool: PoolConfig, backend: Backend): void {
    const client = c.client;
    this.children(backend).inc();
    backend.total++;
    const header = buildProxyHeader(pool.proxyProtocol, { address: c.clientAddress, port: c.clientPort }, this.localEndpoint(client));
    // The client's error and close handlers (accept) destroy the backend on an error and count
    // the client's close.
    server.on('error', (err: NodeJS.ErrnoException) => {
      c.endReason ||= `backend-${err.code ?? 'error'}`;
      client.destroy();
    });
    server.on('close', (hadError: boolean) => {
      if (hadError) client.destroy();
      if (++c.closedSockets === 2) this.finish(c);
    });
    if (pool.idleTimeoutMs > 0) {
      client.setTimeout(pool.idleTimeoutMs, () => this.idle(c));
      server.setTimeout(pool.idleTimeoutMs, () => this.idle(c));
    }
    if (header.length) {
      // The header and the client's first bytes in one write: with a client that speaks first
      // (implicit TLS on 465/993/995, a pipelining MTA) they are in the kernel by now, and one
      // segment wakes the backend once instead of twice. relay() resumes the client, whose
      // bytes are read in the next poll of the event loop and written into the corked socket;
      // the immediate after that poll sends it all. A client that waits for the greeting
      // (SMTP, IMAP, POP3) has nothing to read: the header goes alone, one loop turn later.
      server.cork();
      server.write(header);
      relay(client, server, { bPump: pump });
      setImmediate(uncorkAfterNextPoll, server);
      return;
    }
    relay(client, server, { bPump: pump });
  }

  private idle(c: Connection): void {
    c.endReason ||= 'idle-timeout';
    c.client.destroy();
    c.server?.destroy();
  }

  /**
   * The address the client reached: the listener's own when it is bound to one address (no
   * getsockname per connection), else the socket's.
   */
  private localEndpoint(client: net.Socket): { address: string; port: number } {
    if (this.specificHost) return { address: this.host, port: this.port };
    return { address: client.localAddress ?? '', port: client.localPort ?? 0 };
  }
}
