/**
 * Test backends for the load balancer tests: real TCP servers on loopback that decode the PROXY
 * header with proxy-protocol-js (v1 or v2) and record the addresses, greet with their name, echo,
 * answer a half-close with `BYE <bytes>` and stream bulk data on request.
 */
import { execFile } from 'node:child_process';
import net from 'node:net';
import http from 'node:http';
import { join } from 'node:path';
import { V1ProxyProtocol, V2ProxyProtocol, IPv4ProxyAddress, IPv6ProxyAddress, Command } from 'proxy-protocol-js';
import { createLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { lbConfigSchema, startLoadBalancer, type LoadBalancer } from '../../loadbalancer/index.ts';

export interface SeenHeader {
  version: 1 | 2 | 0;
  local?: boolean;
  source?: { address: string; port: number };
  destination?: { address: string; port: number };
}

export interface TestBackend {
  name: string;
  port: number;
  headers: SeenHeader[];
  sockets: Set<net.Socket>;
  accepted: number;
  /** Stop listening and reset every connection (a crashed proxy). */
  kill(): Promise<void>;
  /** Listen again on the same port. */
  revive(): Promise<void>;
  close(): Promise<void>;
}

const V2SIG = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

function v6(bytes: readonly number[]): string {
  const g: string[] = [];
  for (let i = 0; i < 16; i += 2) g.push((((bytes[i] ?? 0) << 8) | (bytes[i + 1] ?? 0)).toString(16));
  return g.join(':');
}

/** Uncompressed IPv6 (`::1` -> `0:0:0:0:0:0:0:1`), to compare with what the backend decoded. */
export function expand6(a: string): string {
  const [head, tail] = a.includes('::') ? a.split('::') : [a, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = [...h, ...Array(tail === undefined ? 0 : 8 - h.length - t.length).fill('0'), ...t];
  return groups.map((x) => parseInt(x, 16).toString(16)).join(':');
}

/** Parses one PROXY header at the start of buf: header + its length, or null if more bytes are needed. */
export function parseHeader(buf: Buffer, expect: 'v1' | 'v2' | 'none'): { h: SeenHeader; len: number } | null {
  if (expect === 'none') return { h: { version: 0 }, len: 0 };
  if (expect === 'v2') {
    if (buf.length < 16) return null;
    if (!buf.subarray(0, 12).equals(V2SIG)) throw new Error('no PROXY v2 signature');
    const len = 16 + buf.readUInt16BE(14);
    if (buf.length < len) return null;
    const p = V2ProxyProtocol.parse(new Uint8Array(buf.subarray(0, len)));
    if (p.command === Command.LOCAL) return { h: { version: 2, local: true }, len };
    const a = p.proxyAddress;
    if (a instanceof IPv4ProxyAddress) {
      return {
        h: {
          version: 2,
          source: { address: a.sourceAddress.address.join('.'), port: a.sourcePort },
          destination: { address: a.destinationAddress.address.join('.'), port: a.destinationPort },
        },
        len,
      };
    }
    if (a instanceof IPv6ProxyAddress) {
      return {
        h: {
          version: 2,
          source: { address: v6(a.sourceAddress.address), port: a.sourcePort },
          destination: { address: v6(a.destinationAddress.address), port: a.destinationPort },
        },
        len,
      };
    }
    throw new Error('unexpected PROXY v2 address family');
  }
  const lf = buf.indexOf(0x0a);
  if (lf < 0) return null;
  const p = V1ProxyProtocol.parse(buf.subarray(0, lf + 1).toString('latin1'));
  return {
    h: { version: 1, source: { address: p.source.ipAddress, port: p.source.port }, destination: { address: p.destination.ipAddress, port: p.destination.port } },
    len: lf + 1,
  };
}

/**
 * Backend protocol after the header: greets `<name>\n`; echoes everything; a line `BULK <n>\n`
 * makes it send n bytes (respecting backpressure) and report how many it managed to queue;
 * on the client's FIN it sends `BYE <bytes received>\n` and closes.
 */
export async function startBackend(name: string, opts: { proxy?: 'v1' | 'v2' | 'none'; port?: number; host?: string } = {}): Promise<TestBackend> {
  const expect = opts.proxy ?? 'v2';
  const host = opts.host ?? '127.0.0.1';
  const sockets = new Set<net.Socket>();
  const b: TestBackend = {
    name,
    port: opts.port ?? 0,
    headers: [],
    sockets,
    accepted: 0,
    kill: async () => {
      await new Promise<void>((r) => server.close(() => r()));
      for (const s of sockets) s.resetAndDestroy();
    },
    revive: async () => {
      server = makeServer();
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(b.port, host, () => resolve());
      });
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => (server.listening ? server.close(() => r()) : r()));
    },
  };
  const makeServer = () =>
    net.createServer({ allowHalfOpen: true }, (s) => {
      b.accepted++;
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
      let buf: Buffer = Buffer.alloc(0);
      let headerDone = expect === 'none';
      if (headerDone) {
        b.headers.push({ version: 0 });
        s.write(`${name}\n`);
      }
      let received = 0;
      s.on('data', (chunk: Buffer) => {
        if (!headerDone) {
          buf = Buffer.concat([buf, chunk]);
          let r: ReturnType<typeof parseHeader>;
          try {
            r = parseHeader(buf, expect);
          } catch {
            s.destroy();
            return;
          }
          if (!r) return;
          headerDone = true;
          b.headers.push(r.h);
          if (r.h.local) {
            s.end();
            return;
          }
          s.write(`${name}\n`);
          chunk = buf.subarray(r.len);
          if (chunk.length === 0) return;
        }
        received += chunk.length;
        const text = chunk.toString('latin1');
        const m = /^BULK (\d+)\n/.exec(text);
        if (m) {
          let left = Number(m[1]);
          const block = Buffer.alloc(64 * 1024, 0x61);
          const pump = () => {
            while (left > 0) {
              const n = Math.min(left, block.length);
              left -= n;
              (s as net.Socket & { bulkQueued?: number }).bulkQueued = ((s as net.Socket & { bulkQueued?: number }).bulkQueued ?? 0) + n;
              if (!s.write(n === block.length ? block : block.subarray(0, n))) {
                s.once('drain', pump);
                return;
              }
            }
          };
          pump();
          return;
        }
        s.write(chunk);
      });
      s.on('end', () => {
        if (!s.destroyed) s.end(`BYE ${received}\n`);
      });
    });
  let server = makeServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(b.port, host, () => resolve());
  });
  b.port = (server.address() as net.AddressInfo).port;
  return b;
}

/** A small HTTP /health endpoint whose answer the test flips. */
export async function startHealthEndpoint(): Promise<{ url: string; setHealthy(h: boolean): void; close(): Promise<void> }> {
  let healthy = true;
  const srv = http.createServer((_req, res) => {
    res.writeHead(healthy ? 200 : 503, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ healthy }));
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  return {
    url: `http://127.0.0.1:${(srv.address() as net.AddressInfo).port}/health`,
    setHealthy: (h) => {
      healthy = h;
    },
    close: () =>
      new Promise<void>((r) => {
        srv.closeAllConnections();
        srv.close(() => r());
      }),
  };
}

/** A client connection through the balancer with line helpers. */
export interface Client {
  socket: net.Socket;
  data(): string;
  /** Resolves with the first line (the backend's name). */
  greeting(timeoutMs?: number): Promise<string>;
  waitFor(text: string, timeoutMs?: number): Promise<void>;
  closed: Promise<{ hadError: boolean }>;
}

export function connectClient(port: number, host = '127.0.0.1'): Promise<Client> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    let data = '';
    const waiters: Array<() => void> = [];
    socket.on('data', (c: Buffer) => {
      data += c.toString('latin1');
      for (const w of [...waiters]) w();
    });
    let hadError = false;
    socket.on('error', () => {
      hadError = true;
    });
    const closed = new Promise<{ hadError: boolean }>((r) => socket.once('close', () => r({ hadError })));
    const waitFor = (text: string, timeoutMs = 5000) =>
      new Promise<void>((res, rej) => {
        const check = () => {
          if (data.includes(text)) {
            clearTimeout(t);
            waiters.splice(waiters.indexOf(check), 1);
            res();
          }
        };
        const t = setTimeout(() => {
          waiters.splice(waiters.indexOf(check), 1);
          rej(new Error(`timed out waiting for ${JSON.stringify(text)}; got ${JSON.stringify(data.slice(0, 200))}`));
        }, timeoutMs);
        waiters.push(check);
        check();
      });
    socket.once('connect', () =>
      resolve({
        socket,
        data: () => data,
        closed,
        waitFor,
        greeting: async (timeoutMs = 5000) => {
          await waitFor('\n', timeoutMs);
          return data.slice(0, data.indexOf('\n'));
        },
      }),
    );
    socket.once('error', reject);
  });
}

export interface LbUnderTest {
  lb: LoadBalancer;
  port(listener?: string): number;
  metrics(): Promise<string>;
  stop(): Promise<void>;
}

/** Starts an in-process balancer with the given raw config (validated like a file). */
export async function startLb(raw: Record<string, unknown>): Promise<LbUnderTest> {
  const config = lbConfigSchema.parse({ admin: { host: '127.0.0.1', port: 0 }, ...raw });
  const registry = createRegistry({}, false);
  const log = createLogger({ role: 'loadbalancer', level: process.env.LB_TEST_LOG ?? 'silent' });
  const lb = await startLoadBalancer(config, { log, registry });
  return {
    lb,
    port: (l = config.listeners[0]!.name) => lb.listenerAddress(l).port,
    metrics: () => registry.metrics(),
    stop: () => lb.stop(),
  };
}

/** Opens n clients one after another and returns which backend greeted each. */
export async function greetings(port: number, n: number, host = '127.0.0.1'): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const c = await connectClient(port, host);
    out.push(await c.greeting());
    c.socket.destroy();
  }
  return out;
}

export function count(names: string[]): Record<string, number> {
  const m: Record<string, number> = {};
  for (const n of names) m[n] = (m[n] ?? 0) + 1;
  return m;
}

/** Runs `pairgate ARGS` (bin/pairgate.mjs, from the repository root) to its end: exit code and output. */
export function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const root = join(import.meta.dirname, '../..');
  return new Promise((resolve) => {
    execFile(process.execPath, [join(root, 'bin/pairgate.mjs'), ...args], { cwd: root, timeout: 20_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}
