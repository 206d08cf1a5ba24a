/** Ports and readiness for test servers: everything on loopback. */
import { readFileSync } from 'node:fs';
import net from 'node:net';

/** Lowest port of the kernel's ephemeral range (outgoing connections' source ports, listen(0)). */
function ephemeralLow(): number {
  try {
    const lo = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
    if (lo > 0) return lo;
  } catch {
    // not Linux: the usual default
  }
  return 32768;
}
const EPHEMERAL_LOW = ephemeralLow();
/** Ports tests reserve come from below the ephemeral range (and above the registered services most hosts run). */
const PICK_LOW = 20000;

function tryListen(port: number, host: string): Promise<number | null> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(null));
    srv.listen({ port, host, exclusive: true }, () => {
      const got = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(got));
    });
  });
}

/**
 * A port that is free now, for a server a test starts a moment later. It comes from below the
 * kernel's ephemeral range where that range leaves room: a port from listen(0) is an ephemeral
 * one, and between this check and the server's bind the suite's thousands of outgoing
 * connections could take it as their source port. Tests in other processes can still pick the
 * same port (a stress run of 8 copies of one pair test saw a pair's replication port reached by
 * another copy's node): the random pick makes that rare, and the servers' EADDRINUSE says so.
 */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  if (EPHEMERAL_LOW - PICK_LOW >= 1000) {
    for (let i = 0; i < 50; i++) {
      const candidate = PICK_LOW + Math.floor(Math.random() * (EPHEMERAL_LOW - PICK_LOW));
      const port = await tryListen(candidate, host);
      if (port !== null) return port;
    }
  }
  const port = await tryListen(0, host);
  if (port === null) throw new Error(`no free port on ${host}`);
  return port;
}

export async function canConnect(host: string, port: number, timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/** Waits until something accepts on host:port, polling; throws after timeoutMs. */
export async function waitForPort(host: string, port: number, timeoutMs = 10_000, isAlive?: () => boolean): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (isAlive && !isAlive()) throw new Error(`process for ${host}:${port} exited before listening`);
    if (await canConnect(host, port, 300)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nothing listening on ${host}:${port} after ${timeoutMs} ms`);
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value or the time runs out. */
export async function waitFor<T>(check: () => T | Promise<T>, timeoutMs = 10_000, what = 'condition', intervalMs = 25): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await check();
      if (v) return v as NonNullable<T>;
    } catch (err) {
      last = err;
    }
    await sleep(intervalMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
}

export interface TcpRelay {
  port: number;
  /** The accepted (client-side) sockets, to pause or resume their reads. */
  clients: net.Socket[];
  close(): Promise<void>;
}

/**
 * A TCP relay on loopback to `targetPort`, both ways: while `refuse()` says so it closes new
 * connections at once; `onClientData` sees every chunk from the client before it is forwarded.
 */
export async function startTcpRelay(targetPort: number, opts: { refuse?: () => boolean; onClientData?: (chunk: Buffer) => void } = {}): Promise<TcpRelay> {
  const sockets = new Set<net.Socket>();
  const clients: net.Socket[] = [];
  const server = net.createServer((client) => {
    if (opts.refuse?.()) {
      client.destroy();
      return;
    }
    const upstream = net.connect({ host: '127.0.0.1', port: targetPort });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    clients.push(client);
    const watch = opts.onClientData;
    if (watch) {
      client.on('data', (chunk: Buffer) => {
        watch(chunk);
        upstream.write(chunk);
      });
      upstream.on('data', (chunk: Buffer) => client.write(chunk));
    } else {
      client.pipe(upstream);
      upstream.pipe(client);
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as net.AddressInfo).port,
    clients,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/**
 * Ports for two nodes' replication with a's link to b through a relay (`opts` as startTcpRelay's):
 * the node whose address sorts lower dials, so a's port is picked to sort below both b's and the
 * relay's (callers check that one was found), and b never dials a.
 */
export async function relayedLinkPorts(opts: Parameters<typeof startTcpRelay>[1] = {}): Promise<{ a: number; b: number; relay: TcpRelay }> {
  const addr = (port: number) => `127.0.0.1:${port}`;
  // Two ports, the lower for a: a port for a below a b picked alone may not be found (b = 20003, say).
  const [x, y] = [await freePort(), await freePort()];
  const ports = addr(x) < addr(y) ? { a: x, b: y } : { a: y, b: x };
  const relay = await startTcpRelay(ports.b, opts);
  for (let i = 0; i < 200 && !(addr(ports.a) < addr(relay.port) && addr(ports.a) < addr(ports.b)); i++) ports.a = await freePort();
  return { ...ports, relay };
}
