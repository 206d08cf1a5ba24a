/**
 * The load balancer over real sockets, in process: distribution per method, PROXY v2/v1
 * headers decoded by the backends with proxy-protocol-js, health checks (fall/rise), a killed
 * backend retried on the next, spliced connections left alone when a backend goes down, drain,
 * reload, maxconn queue bounded in time, half-close, backpressure, timeouts, churn.
 */
import net from 'node:net';
import v8 from 'node:v8';
import vm from 'node:vm';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { canConnect, sleep, waitFor } from '../helpers/net.ts';
import { startProcess } from '../helpers/proc.ts';
import { adminCall } from '../../common/admin-http.ts';
import { lbConfigSchema } from '../../loadbalancer/index.ts';
import { connectClient, count, expand6, greetings, startBackend, startHealthEndpoint, startLb, type LbUnderTest, type TestBackend } from './lb-harness.ts';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

async function backends(n: number, proxy: 'v1' | 'v2' | 'none' = 'v2'): Promise<TestBackend[]> {
  const out: TestBackend[] = [];
  for (let i = 1; i <= n; i++) {
    const b = await startBackend(`b${i}`, { proxy });
    cleanups.push(() => b.close());
    out.push(b);
  }
  return out;
}

async function lbFor(bs: TestBackend[], pool: Record<string, unknown> = {}, extra: Record<string, unknown> = {}): Promise<LbUnderTest> {
  const { backendsExtra, ...rest } = pool as { backendsExtra?: Array<Record<string, unknown>> };
  const lb = await startLb({
    listeners: [{ name: 'imap', listen: '127.0.0.1:0', pool: 'p' }],
    pools: {
      p: {
        check: { intervalMs: 100, timeoutMs: 200, fall: 2, rise: 2 },
        ...rest,
        backends: bs.map((b, i) => ({ name: b.name, address: `127.0.0.1:${b.port}`, ...(backendsExtra?.[i] ?? {}) })),
      },
    },
    ...extra,
  });
  cleanups.push(() => lb.stop());
  return lb;
}

describe('distribution', () => {
  it('roundrobin follows the weights exactly over three backends', async () => {
    const bs = await backends(3);
    const lb = await lbFor(bs, { balance: 'roundrobin', backendsExtra: [{ weight: 1 }, { weight: 2 }, { weight: 3 }] });
    const c = count(await greetings(lb.port(), 60));
    expect(c).toEqual({ b1: 10, b2: 20, b3: 30 });
  });

  it('leastconn with weights spreads held connections in proportion to weight', async () => {
    const bs = await backends(3);
    const lb = await lbFor(bs, { backendsExtra: [{ weight: 1 }, { weight: 1 }, { weight: 2 }] });
    const held = [];
    for (let i = 0; i < 40; i++) {
      const c = await connectClient(lb.port());
      await c.greeting();
      held.push(c);
    }
    const c = count(held.map((h) => h.data().split('\n')[0]!));
    expect(c.b1).toBe(10);
    expect(c.b2).toBe(10);
    expect(c.b3).toBe(20);
    // Close b3's connections: the next ones all go to b3 (fewest per weight).
    for (const h of held.filter((h) => h.data().startsWith('b3'))) h.socket.destroy();
    await waitFor(() => lb.lb.status().pools[0]!.backends[2]!.active === 0, 5000, 'b3 idle');
    const next = [];
    for (let i = 0; i < 10; i++) {
      const x = await connectClient(lb.port());
      next.push(await x.greeting());
      held.push(x);
    }
    expect(count(next)).toEqual({ b3: 10 });
    for (const h of held) h.socket.destroy();
  });

  it('source hash keeps each client address on one backend', async () => {
    const bs = await backends(3);
    const lb = await lbFor(bs, { balance: 'source' });
    // All test clients come from 127.0.0.1: every one lands on the same backend.
    const names = await greetings(lb.port(), 12);
    expect(new Set(names).size).toBe(1);
  });
});

describe('PROXY protocol to the backends', () => {
  it('v2: the backend decodes the client address and port and the listener address', async () => {
    const [b] = await backends(1, 'v2');
    const lb = await lbFor([b!]);
    const c = await connectClient(lb.port());
    expect(await c.greeting()).toBe('b1');
    const h = b!.headers.find((x) => !x.local && x.source?.port === c.socket.localPort);
    expect(h).toBeDefined();
    expect(h!.version).toBe(2);
    expect(h!.source).toEqual({ address: '127.0.0.1', port: c.socket.localPort });
    expect(h!.destination).toEqual({ address: '127.0.0.1', port: lb.port() });
    c.socket.destroy();
  });

  it('a client that speaks first: its bytes follow the header (v2 and v1), a client that waits still gets the greeting', async () => {
    for (const version of ['v2', 'v1'] as const) {
      const [b] = await backends(1, version);
      const lb = await lbFor([b!], { proxyProtocol: version });
      // Written before the balancer has even accepted: header and bytes may leave in one write.
      const s = net.connect({ host: '127.0.0.1', port: lb.port() });
      s.write('first words\n');
      let got = '';
      s.on('data', (d: Buffer) => (got += d.toString('latin1')));
      await vi.waitFor(() => expect(got).toBe('b1\nfirst words\n'), { timeout: 5000 });
      const h = b!.headers.find((x) => !x.local && x.source?.port === s.localPort);
      expect(h).toMatchObject({ version: version === 'v2' ? 2 : 1, source: { address: '127.0.0.1', port: s.localPort }, destination: { port: lb.port() } });
      s.destroy();
      const c = await connectClient(lb.port());
      expect(await c.greeting()).toBe('b1');
      c.socket.destroy();
    }
  });

  it('v1 for old backends, none when off', async () => {
    const [b1] = await backends(1, 'v1');
    const lb1 = await lbFor([b1!], { proxyProtocol: 'v1' });
    const c = await connectClient(lb1.port());
    await c.greeting();
    const h = b1!.headers.find((x) => x.source?.port === c.socket.localPort);
    expect(h).toMatchObject({ version: 1, source: { address: '127.0.0.1', port: c.socket.localPort }, destination: { port: lb1.port() } });
    c.socket.destroy();
    const [b0] = await backends(1, 'none');
    const lb0 = await lbFor([b0!], { proxyProtocol: 'none', check: { enabled: false } });
    const d = await connectClient(lb0.port());
    await d.greeting();
    d.socket.write('hello');
    await d.waitFor('hello');
    d.socket.destroy();
  });

  it('v2 over IPv6 (TCP6) when the listener is on ::1', async () => {
    const v6ok = await new Promise<boolean>((r) => {
      const s = net.createServer().listen(0, '::1', () => s.close(() => r(true)));
      s.on('error', () => r(false));
    });
    if (!v6ok) return; // no IPv6 loopback on this machine
    const [b] = await backends(1, 'v2');
    const lb = await startLb({
      listeners: [{ name: 'imap6', listen: '[::1]:0', pool: 'p' }],
      pools: { p: { check: { enabled: false }, backends: [{ name: 'b1', address: `127.0.0.1:${b!.port}` }] } },
    });
    cleanups.push(() => lb.stop());
    const c = await connectClient(lb.port(), '::1');
    await c.greeting();
    const h = b!.headers.find((x) => x.source?.port === c.socket.localPort)!;
    expect(h.source!.address).toBe(expand6('::1'));
    expect(h.destination).toEqual({ address: expand6('::1'), port: lb.port() });
    c.socket.destroy();
  });
});

describe('health checks and failures', () => {
  it('a killed backend is marked down within interval x fall, a connect to it is retried on the next, back up after rise', async () => {
    const bs = await backends(3);
    // Long interval first, so that the kill is seen by a client before the checks mark it down.
    const lb = await lbFor(bs, { balance: 'roundrobin', check: { intervalMs: 5000, timeoutMs: 200, fall: 2, rise: 2 } });
    await bs[1]!.kill();
    const names = await greetings(lb.port(), 30);
    // No client saw an error: each got a greeting, none from the dead one.
    expect(names).toHaveLength(30);
    expect(names).not.toContain('b2');
    expect(await lb.metrics()).toMatch(/pairgate_lb_connect_failures_total\{backend="p\/b2"\} [1-9]/);
    await lb.lb.stop();

    const lb2 = await lbFor(bs, { balance: 'roundrobin', check: { intervalMs: 100, timeoutMs: 200, fall: 2, rise: 2 } });
    const t0 = Date.now();
    await waitFor(() => !lb2.lb.status().pools[0]!.backends[1]!.up, 3000, 'b2 marked down');
    // Bound from the definition (interval x fall + timeouts) plus generous slack for a loaded CI machine.
    expect(Date.now() - t0).toBeLessThan(100 * 2 + 200 * 2 + 2500);
    expect(await lb2.metrics()).toMatch(/pairgate_lb_backend_up\{backend="p\/b2"\} 0/);
    await bs[1]!.revive();
    await waitFor(() => lb2.lb.status().pools[0]!.backends[1]!.up, 3000, 'b2 back up');
    const after = count(await greetings(lb2.port(), 9));
    expect(after.b2).toBe(3);
    expect(await lb2.metrics()).toMatch(/pairgate_lb_check_total\{backend="p\/b2",result="ok"\} \d+/);
  });

  it('a backend that resets right after accepting is skipped by retry; all backends dead = client closed, not hung', async () => {
    const rst = net.createServer((s) => s.resetAndDestroy());
    await new Promise<void>((r) => rst.listen(0, '127.0.0.1', () => r()));
    cleanups.push(() => new Promise((r) => rst.close(() => r())));
    const [good] = await backends(1, 'v2');
    const rstPort = (rst.address() as net.AddressInfo).port;
    const lb = await startLb({
      listeners: [{ name: 'l', listen: '127.0.0.1:0', pool: 'p' }],
      pools: { p: { balance: 'roundrobin', check: { enabled: false }, backends: [{ name: 'dead', address: '127.0.0.1:1' }, { name: 'good', address: `127.0.0.1:${good!.port}` }] } },
    });
    cleanups.push(() => lb.stop());
    expect(count(await greetings(lb.port(), 6))).toEqual({ b1: 6 });
    expect(rstPort).toBeGreaterThan(0);
    await good!.kill();
    const c = await connectClient(lb.port());
    const closed = await Promise.race([c.closed, sleep(5000).then(() => null)]);
    expect(closed).not.toBeNull();
    expect(c.data()).toBe('');
    expect(await lb.metrics()).toMatch(/pairgate_lb_rejected_total\{listener="l",reason="connect-failed"\} 1/);
  });

  it('connect timeout: a backend that never answers the SYN costs only the timeout', async () => {
    // A listener that never accepts, with its accept queue full, drops further SYNs: connect hangs.
    const py = startProcess('python-hang', 'python3', [
      '-c',
      "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen(0)\nprint(s.getsockname()[1],flush=True)\ntime.sleep(60)",
    ]);
    cleanups.push(() => py.stop(500));
    const hangPort = Number(await waitFor(() => /^\d+/.exec(py.output())?.[0], 5000, 'python listener'));
    const fillers: net.Socket[] = [];
    for (let i = 0; i < 4; i++) fillers.push(net.connect(hangPort, '127.0.0.1').on('error', () => {}));
    await sleep(200);
    cleanups.push(async () => {
      for (const f of fillers) f.destroy();
    });
    // The queue is full when one more connect does not complete.
    expect(await canConnect('127.0.0.1', hangPort, 300)).toBe(false);
    const [good] = await backends(1);
    const lb = await startLb({
      listeners: [{ name: 'l', listen: '127.0.0.1:0', pool: 'p' }],
      pools: {
        p: {
          balance: 'roundrobin',
          connectTimeoutMs: 300,
          check: { enabled: false },
          backends: [{ name: 'hang', address: `127.0.0.1:${hangPort}` }, { name: 'good', address: `127.0.0.1:${good!.port}` }],
        },
      },
    });
    cleanups.push(() => lb.stop());
    const t0 = Date.now();
    const names = await greetings(lb.port(), 2);
    expect(names).toEqual(['b1', 'b1']);
    expect(Date.now() - t0).toBeLessThan(6000); // two clients, one connect timeout (300 ms) each at most, plus slack
    expect(await lb.metrics()).toMatch(/pairgate_lb_connect_failures_total\{backend="p\/hang"\} [1-9]/);
  });

  it('a backend marked down by its HTTP /health check keeps its spliced connections; new ones go elsewhere', async () => {
    const bs = await backends(2);
    const health = await startHealthEndpoint();
    cleanups.push(() => health.close());
    const lb = await lbFor(bs, { balance: 'roundrobin', backendsExtra: [{ healthUrl: health.url }, {}] });
    const a = await connectClient(lb.port());
    expect(await a.greeting()).toBe('b1');
    health.setHealthy(false);
    await waitFor(() => !lb.lb.status().pools[0]!.backends[0]!.up, 3000, 'b1 down by /health');
    a.socket.write('still here');
    await a.waitFor('still here');
    expect(count(await greetings(lb.port(), 4))).toEqual({ b2: 4 });
    health.setHealthy(true);
    await waitFor(() => lb.lb.status().pools[0]!.backends[0]!.up, 3000, 'b1 up again');
    a.socket.destroy();
  });
});

describe('administration', () => {
  it('drain keeps established connections and sends new ones elsewhere; ready, weight, maintenance through the admin API', async () => {
    const bs = await backends(2);
    const lb = await lbFor(bs, { balance: 'roundrobin' });
    const url = lb.lb.admin.url;
    const a = await connectClient(lb.port());
    expect(await a.greeting()).toBe('b1');
    const r = await adminCall(url, 'POST', '/drain', { backend: 'b1' });
    expect(r.status).toBe(200);
    expect(count(await greetings(lb.port(), 4))).toEqual({ b2: 4 });
    a.socket.write('ping');
    await a.waitFor('ping');
    expect((await adminCall(url, 'POST', '/ready', { backend: 'p/b1' })).status).toBe(200);
    expect(count(await greetings(lb.port(), 4))).toEqual({ b1: 2, b2: 2 });
    expect((await adminCall(url, 'POST', '/weight', { backend: 'b2', weight: 3 })).status).toBe(200);
    expect(count(await greetings(lb.port(), 8))).toEqual({ b1: 2, b2: 6 });
    expect((await adminCall(url, 'POST', '/maintenance', { backend: 'b2' })).status).toBe(200);
    expect(count(await greetings(lb.port(), 3))).toEqual({ b1: 3 });
    expect((await adminCall(url, 'POST', '/drain', { backend: 'nope' })).status).toBe(404);
    expect((await adminCall(url, 'POST', '/weight', { backend: 'b1', weight: -1 })).status).toBe(409);
    const st = (await adminCall(url, 'GET', '/status')).body as { backends: Array<{ name: string; state: string }> };
    expect(st.backends.map((b) => `${b.name}:${b.state}`)).toEqual(['p/b1:ready', 'p/b2:maintenance']);
    a.socket.destroy();
  });

  it('reload with a changed pool keeps established connections; new ones follow the new pool', async () => {
    const bs = await backends(3);
    const lb = await lbFor(bs.slice(0, 1), { balance: 'roundrobin', check: { enabled: false } });
    const a = await connectClient(lb.port());
    expect(await a.greeting()).toBe('b1');
    const port = lb.port();
    await lb.lb.reload(
      lbConfigSchema.parse({
        admin: { port: 0 },
        listeners: [
          { name: 'imap', listen: `127.0.0.1:${port}`, pool: 'q' },
          { name: 'pop3', listen: '127.0.0.1:0', pool: 'q' },
        ],
        pools: { q: { balance: 'roundrobin', check: { enabled: false }, backends: [2, 3].map((i) => ({ name: `b${i}`, address: `127.0.0.1:${bs[i - 1]!.port}` })) } },
      }),
    );
    a.socket.write('after reload');
    await a.waitFor('after reload');
    expect(count(await greetings(port, 4))).toEqual({ b2: 2, b3: 2 });
    expect(count(await greetings(lb.port('pop3'), 2))).toEqual({ b2: 1, b3: 1 });
    // A reload that cannot bind is refused whole.
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    cleanups.push(() => new Promise((r) => blocker.close(() => r())));
    const taken = (blocker.address() as net.AddressInfo).port;
    await expect(
      lb.lb.reload(
        lbConfigSchema.parse({
          listeners: [{ name: 'x', listen: `127.0.0.1:${taken}`, pool: 'q' }],
          pools: { q: { backends: [{ name: 'b1', address: `127.0.0.1:${bs[0]!.port}` }] } },
        }),
      ),
    ).rejects.toThrow(/EADDRINUSE/);
    expect(count(await greetings(port, 2))).toEqual({ b2: 1, b3: 1 });
    a.socket.write('still');
    await a.waitFor('still');
    a.socket.destroy();
  });

  it('maxconn per backend: extra clients queue, are served when a slot frees, and time out after queueTimeoutMs', async () => {
    const bs = await backends(1);
    const lb = await lbFor(bs, { queueTimeoutMs: 400, backendsExtra: [{ maxconn: 1 }] });
    const a = await connectClient(lb.port());
    await a.greeting();
    const b = await connectClient(lb.port());
    await sleep(100);
    expect(b.data()).toBe('');
    expect(lb.lb.status().pools[0]!.queued).toBe(1);
    a.socket.destroy();
    expect(await b.greeting()).toBe('b1');
    const t0 = Date.now();
    const c = await connectClient(lb.port());
    await c.closed;
    const waited = Date.now() - t0;
    expect(waited).toBeGreaterThanOrEqual(350);
    expect(waited).toBeLessThan(5000);
    expect(c.data()).toBe('');
    expect(await lb.metrics()).toMatch(/pairgate_lb_rejected_total\{listener="imap",reason="queue-timeout"\} 1/);
    expect(await lb.metrics()).toMatch(/pairgate_lb_queue_seconds_count 1/);
    b.socket.destroy();
  });

  it('maxconn per listener queues too', async () => {
    const bs = await backends(2);
    const lb = await startLb({
      listeners: [{ name: 'l', listen: '127.0.0.1:0', pool: 'p', maxconn: 2 }],
      pools: { p: { queueTimeoutMs: 2000, check: { enabled: false }, backends: bs.map((b) => ({ name: b.name, address: `127.0.0.1:${b.port}` })) } },
    });
    cleanups.push(() => lb.stop());
    const a = await connectClient(lb.port());
    const b = await connectClient(lb.port());
    await a.greeting();
    await b.greeting();
    const c = await connectClient(lb.port());
    await sleep(150);
    expect(c.data()).toBe('');
    b.socket.destroy();
    await c.greeting();
    expect(lb.lb.status().listeners[0]!.active).toBe(2);
    a.socket.destroy();
    c.socket.destroy();
  });
});

describe('splicing', () => {
  let bs: TestBackend[];
  let lb: LbUnderTest;
  beforeAll(async () => {
    bs = [await startBackend('s1')];
    lb = await startLb({
      listeners: [{ name: 'l', listen: '127.0.0.1:0', pool: 'p' }],
      // 2 s: the backpressure test holds its client still for 400 ms, which on a loaded machine
      // came close to a shorter idle timeout; the idle test waits for it.
      pools: { p: { idleTimeoutMs: 2000, check: { enabled: false }, backends: [{ name: 's1', address: `127.0.0.1:${bs[0]!.port}` }] } },
    });
  });
  afterAll(async () => {
    await lb?.stop();
    for (const b of bs ?? []) await b.close();
  });

  it('half-close: the client FIN reaches the backend and its answer still comes back', async () => {
    const c = await connectClient(lb.port());
    await c.greeting();
    c.socket.write('abc');
    await c.waitFor('abc');
    c.socket.end();
    await c.waitFor('BYE 3');
    const r = await c.closed;
    expect(r.hadError).toBe(false);
    await waitFor(() => lb.lb.status().connections === 0, 3000, 'connection released');
    const m = await lb.metrics();
    expect(m).toMatch(/pairgate_lb_bytes_total\{direction="in"\} [1-9]/);
    expect(m).toMatch(/pairgate_lb_bytes_total\{direction="out"\} [1-9]/);
    expect(m).toMatch(/pairgate_lb_connections_total\{listener="l",backend="p\/s1"\} [1-9]/);
    expect(m).toMatch(/pairgate_lb_connections\{listener="l",backend="p\/s1"\} 0/);
  });

  it('backpressure: a client that does not read stops the backend (bounded buffering), then gets every byte', async () => {
    const c = await connectClient(lb.port());
    await c.greeting();
    c.socket.pause();
    const total = 64 * 1024 * 1024;
    c.socket.write(`BULK ${total}\n`);
    await sleep(400);
    const srv = [...bs[0]!.sockets].find((s) => (s as net.Socket & { bulkQueued?: number }).bulkQueued)! as net.Socket & { bulkQueued?: number };
    // The backend hands over what the kernel and the stream buffers hold, then it is held: no
    // more goes out while the client does not read. (How much the kernel holds varies run to run:
    // loopback receive windows autotune up to tcp_rmem's maximum, 32 MiB on these machines; 10-15
    // MiB here, and up to 25 MiB on a proxy's path in CI. So the bound is the whole transfer, not
    // a guess at the buffers.)
    let queued = srv.bulkQueued!;
    for (let i = 0; i < 25; i++) {
      await sleep(200);
      if (srv.bulkQueued === queued) break;
      queued = srv.bulkQueued!;
    }
    expect(srv.bulkQueued, 'the backend held while the client does not read').toBe(queued);
    expect(queued).toBeLessThan(total);
    let got = 0;
    c.socket.removeAllListeners('data');
    c.socket.on('data', (d: Buffer) => {
      got += d.length;
    });
    c.socket.resume();
    // ~1 s alone. Twice, on a machine at load 5-9 (a full-suite run beside benchmarks; a re-run
    // started with the volume, store and IMAP tests), not all bytes had arrived after 20 s (43 of
    // 64 MiB in the first); 24 more re-runs under that load took 0.6-1.7 s, and the cause was not
    // found. So: a stall (no byte for 10 s) fails at once, with where the bytes stopped; a slow
    // machine gets up to 50 s in all.
    let lastGot = 0;
    let lastMove = Date.now();
    let stalled = '';
    const watch = setInterval(() => {
      if (got !== lastGot) {
        lastGot = got;
        lastMove = Date.now();
      } else if (Date.now() - lastMove > 10_000 && !stalled) {
        const b = srv as net.Socket & { bulkQueued?: number };
        stalled = JSON.stringify({
          got,
          client: { destroyed: c.socket.destroyed, paused: c.socket.isPaused(), bytesRead: c.socket.bytesRead, readableLength: c.socket.readableLength },
          backend: { destroyed: b.destroyed, queuedByBulk: b.bulkQueued, bytesWritten: b.bytesWritten, writableLength: b.writableLength },
          lbConnections: lb.lb.status().connections,
        });
      }
    }, 250);
    const deadline = Date.now() + 50_000;
    while (got < total && !stalled && Date.now() < deadline) await sleep(100);
    clearInterval(watch);
    expect(stalled, 'the relay stopped moving bytes').toBe('');
    expect(got).toBeGreaterThanOrEqual(total);
    c.socket.destroy();
  });

  it('a client that sends nothing, or a backend that stops answering, is closed after the idle timeout', async () => {
    const c = await connectClient(lb.port());
    await c.greeting();
    const t0 = Date.now();
    await Promise.race([c.closed, sleep(10_000)]);
    expect(c.socket.destroyed).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1900);
    await waitFor(() => lb.lb.status().connections === 0, 3000, 'connection released');
  });

  it('churn: 10,000 short connections leave no sockets, slots or memory behind', async () => {
    const handles = () => process.getActiveResourcesInfo().filter((x) => x === 'TCPSocketWrap').length;
    // A forced full GC makes the heap figure live memory, not garbage waiting for a collection.
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const liveHeap = async () => {
      bs[0]!.headers.length = 0; // the test backend keeps every header it decoded: the test's memory, not the balancer's
      for (let i = 0; i < 3; i++) {
        gc();
        await sleep(20);
      }
      return process.memoryUsage().heapUsed;
    };
    const churn = async (n: number) => {
      let done = 0;
      let next = 0;
      const deadline = Date.now() + 40_000;
      const worker = async () => {
        while (next < n && Date.now() < deadline) {
          next++;
          await new Promise<void>((resolve) => {
            const s = net.connect({ port: lb.port(), host: '127.0.0.1' });
            s.on('error', () => resolve());
            s.on('close', () => resolve());
            // Half of them drop at once (before a byte), half after the greeting.
            if (next % 2) s.once('connect', () => s.destroy());
            else s.once('data', () => s.destroy());
          });
          done++;
        }
      };
      await Promise.all(Array.from({ length: 32 }, worker));
      await waitFor(() => lb.lb.status().connections === 0 && lb.lb.status().listeners[0]!.active === 0, 10_000, 'all connections released');
      return done;
    };
    const before = handles();
    // Warm-up: JIT code, pools and metric children exist after the first connections.
    expect(await churn(1000)).toBe(1000);
    const heapBefore = await liveHeap();
    const N = 10_000;
    expect(await churn(N)).toBe(N);
    expect(lb.lb.status().pools[0]!.backends[0]!.active).toBe(0);
    await waitFor(() => handles() <= before + 2, 10_000, `socket handles back to ${before} (now ${handles()})`);
    // 10,000 connections: a leak of 200 bytes each would show as 2 MB (measured here: under 0.1 MB either way).
    const grown = (await liveHeap()) - heapBefore;
    expect(grown, `live heap grew ${grown} bytes`).toBeLessThan(2 * 1024 * 1024);
  }, 90_000);
});
