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
    const finish = (r: Connected | { error: string }) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.off('connect', onConnect);
      s.off('error', onError);
      if ('error' in r) s.destroy();
      resolve(r);
    };
    // Stays for the socket's life: the splice adds its own handler; this one only keeps an error
    // emitted between connect and splice from being unhandled.
    s.on('error', () => {});
    const onConnect = () => finish({ socket: s, pump });
    const onError = (err: NodeJS.ErrnoException) => finish({ error: err.code ?? err.message });
    const timer = setTimeout(() => finish({ error: 'connect-timeout' }), pool.connectTimeoutMs);
    s.once('connect', onConnect);
    s.once('error', onError);
  });
}

export class Listener {
  server: net.Server;
  active = 0;
  total = 0;
  host: string;
  port: number;

  constructor(
    public config: ListenerConfig,
    private readonly deps: ListenerDeps,
  ) {
    const hp = splitHostPort(config.listen);
    this.host = hp.host;
    this.port = hp.port;
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
    const { metrics, log } = this.deps;
    const pool = this.deps.pool(this.config.pool);
    const clientAddress = client.remoteAddress ?? '';
    const clientPort = client.remotePort ?? 0;
    const start = Date.now();
    let server: net.Socket | null = null;
    /** The backend whose slot this client holds now (null when none). */
    let backend: Backend | null = null;
    let spliced: Backend | null = null;
    let closed = false;
    let cancelQueue: (() => void) | null = null;
    let holdsListenerSlot = false;
    let queuedMs = 0;
    let endReason = '';
    let countedIn = 0;
    let countedOut = 0;
    const id = nextId++;

    const conn: Conn = {
      client,
      get server() {
        return server;
      },
      destroy: () => {
        endReason ||= 'stop';
        client.destroy();
        server?.destroy();
      },
      account: () => {
        if (!spliced) return;
        const inNow = client.bytesRead;
        const outNow = server?.bytesRead ?? 0;
        if (inNow > countedIn) metrics.bytes.inc({ direction: 'in' }, inNow - countedIn);
        if (outNow > countedOut) metrics.bytes.inc({ direction: 'out' }, outNow - countedOut);
        countedIn = inNow;
        countedOut = outNow;
      },
    };
    this.deps.live.add(conn);

    const finish = () => {
      if (closed) return;
      closed = true;
      cancelQueue?.();
      this.deps.live.delete(conn);
      if (holdsListenerSlot) this.active--;
      if (backend) backend.release();
      if (spliced) {
        this.children(spliced).dec();
        conn.account();
        const bytesIn = client.bytesRead;
        const bytesOut = server?.bytesRead ?? 0;
        const sample = this.deps.closeLogSample();
        if (sample > 0 && (sample >= 1 || Math.random() < sample)) {
          log.info(
            {
              cid: id,
              listener: this.name,
              backend: spliced.id,
              client: `${clientAddress}:${clientPort}`,
              bytesIn,
              bytesOut,
              queuedMs,
              durationMs: Date.now() - start,
              reason: endReason || 'closed',
            },
            'connection closed',
          );
        }
      }
      if (holdsListenerSlot || backend) this.deps.pool(this.config.pool)?.dispatch();
      backend = null;
    };

    const refuse = (reason: string) => {
      metrics.rejected.inc({ listener: this.name, reason });
      log.warn({ listener: this.name, client: clientAddress, reason }, 'client refused');
      endReason = reason;
      client.destroy();
      finish();
    };

    client.on('error', (err: NodeJS.ErrnoException) => {
      endReason ||= `client-${err.code ?? 'error'}`;
      server?.destroy();
    });
    client.on('close', () => {
      // Gone before its backend was connected (queued or connecting): give back what it held.
      if (!server) finish();
    });

    if (!pool) return refuse('no-pool');
    client.setNoDelay(true);
    if (pool.config.keepaliveMs > 0) client.setKeepAlive(true, pool.config.keepaliveMs);

    const begin = (b: Backend) => {
      // Slots taken synchronously so that a burst cannot overshoot maxconn.
      this.active++;
      holdsListenerSlot = true;
      b.acquire();
      backend = b;
      void this.connectWithRetries(client, pool, b, clientAddress, (next) => {
        if (closed) return;
        backend?.release();
        backend = next;
        next?.acquire();
      }).then((r) => {
        if (closed || client.destroyed) {
          r?.socket.destroy();
          finish();
          return;
        }
        if (!r) return refuse('connect-failed');
        server = r.socket;
        spliced = backend;
        this.total++;
        this.splice(client, r.socket, r.pump, pool.config, backend!, (reason) => {
          endReason ||= reason;
        }, finish);
      });
    };

    const first = this.hasSlot() ? pool.pick(clientAddress) : null;
    if (first) return begin(first);
    if (this.hasSlot() && !pool.serviceable()) return refuse('no-backend');
    const q = pool.enqueue(this, clientAddress, (b, reason) => {
      cancelQueue = null;
      if (closed) {
        // Client left while queued but the slot was handed over: give it back.
        if (b) pool.dispatch();
        return;
      }
      if (!b) return refuse(reason ?? 'queue-timeout');
      queuedMs = Date.now() - start;
      begin(b);
    });
    if (!q) return refuse('queue-full');
    cancelQueue = () => q.cancel();
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

  private splice(client: net.Socket, server: net.Socket, pump: ReadPump, pool: PoolConfig, backend: Backend, setReason: (r: string) => void, done: () => void): void {
    this.children(backend).inc();
    backend.total++;
    const header = buildProxyHeader(pool.proxyProtocol, { address: client.remoteAddress ?? '', port: client.remotePort ?? 0 }, { address: client.localAddress ?? '', port: client.localPort ?? 0 });
    if (header.length) server.write(header);
    let closedCount = 0;
    const onClose = () => {
      if (++closedCount === 2) done();
    };
    server.on('error', (err: NodeJS.ErrnoException) => {
      setReason(`backend-${err.code ?? 'error'}`);
      client.destroy();
    });
    client.on('error', () => server.destroy());
    server.on('close', (hadError) => {
      if (hadError) client.destroy();
      onClose();
    });
    client.on('close', (hadError) => {
      if (hadError) server.destroy();
      onClose();
    });
    if (pool.idleTimeoutMs > 0) {
      const idle = () => {
        setReason('idle-timeout');
        client.destroy();
        server.destroy();
      };
      client.setTimeout(pool.idleTimeoutMs, idle);
      server.setTimeout(pool.idleTimeoutMs, idle);
    }
    relay(client, server, { bPump: pump });
  }
}
