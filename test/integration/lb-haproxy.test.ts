/**
 * The shipped HAProxy config (infra/haproxy/pairgate.cfg), run for real with its addresses
 * moved to loopback test ports: PROXY v2 to the backends, leastconn, /health checks with
 * fall/rise, established sessions kept when a proxy is marked down. HAProxy also serves as an
 * independent peer for pairgate's own PROXY v2 writer: pairgate lb -> HAProxy (accept-proxy)
 * -> backend, which must see the real client's address. Skipped when haproxy is not installed.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, waitFor, waitForPort } from '../helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { connectClient, count, greetings, startBackend, startHealthEndpoint, startLb, type TestBackend } from './lb-harness.ts';

function haproxyPath(): string | null {
  for (const p of ['/usr/sbin/haproxy', '/usr/local/sbin/haproxy', '/usr/bin/haproxy']) {
    try {
      execFileSync(p, ['-v'], { stdio: 'ignore' });
      return p;
    } catch {
      // try the next
    }
  }
  return null;
}

const HAPROXY = haproxyPath();

describe.skipIf(!HAPROXY)('infra/haproxy/pairgate.cfg', () => {
  const tmp = tempDir('pairgate-lb-haproxy-');
  let hap: Managed;
  let b1: TestBackend;
  let b2: TestBackend;
  let h1: Awaited<ReturnType<typeof startHealthEndpoint>>;
  let h2: Awaited<ReturnType<typeof startHealthEndpoint>>;
  let imapPort = 0;
  let fromLbPort = 0;

  beforeAll(async () => {
    b1 = await startBackend('proxy-1');
    b2 = await startBackend('proxy-2');
    h1 = await startHealthEndpoint();
    h2 = await startHealthEndpoint();
    const hport = (u: string) => new URL(u).port;
    let cfg = readFileSync(join(import.meta.dirname, '../../infra/haproxy/pairgate.cfg'), 'utf8');
    cfg = cfg.replace(/stats socket \S+/, `stats socket ${join(tmp.path, 'admin.sock')}`);
    cfg = cfg.replace(/log stdout format raw local0 info/, 'log stderr format raw local0 info').replace(/maxconn 100000/, 'maxconn 4000');
    // Test pace: checks every 200 ms instead of 2 s.
    cfg = cfg.replace('inter 2s', 'inter 200ms').replace('slowstart 10s', 'slowstart 500ms').replace('timeout check 1s', 'timeout check 300ms');
    const binds = [...cfg.matchAll(/bind (\S+)/g)].map((m) => m[1]!);
    for (const b of binds) {
      const p = await freePort();
      if (b === ':143') imapPort = p;
      cfg = cfg.replace(`bind ${b}\n`, `bind 127.0.0.1:${p}\n`);
    }
    cfg = cfg.replace(/server proxy-1 10\.0\.0\.21:\d+/g, `server proxy-1 127.0.0.1:${b1.port} port ${hport(h1.url)}`);
    cfg = cfg.replace(/server proxy-2 10\.0\.0\.22:\d+/g, `server proxy-2 127.0.0.1:${b2.port} port ${hport(h2.url)}`);
    fromLbPort = await freePort();
    cfg += `\nfrontend from_pairgate_lb\n    bind 127.0.0.1:${fromLbPort} accept-proxy\n    default_backend imap\n`;
    const file = join(tmp.path, 'pairgate.cfg');
    writeFileSync(file, cfg);
    execFileSync(HAPROXY!, ['-c', '-f', file], { stdio: 'pipe' });
    hap = startProcess('haproxy', HAPROXY!, ['-db', '-f', file]);
    hap.exited.then(() => process.stderr.write(`haproxy exited: ${hap.output()}\n`), () => {});
    await waitForPort('127.0.0.1', imapPort, 10_000, () => hap.alive());
  });

  afterAll(async () => {
    await hap?.stop();
    await b1?.close();
    await b2?.close();
    await h1?.close();
    await h2?.close();
    tmp.cleanup();
  });

  it('sends PROXY v2 with the client address and balances leastconn over both proxies', async () => {
    const held = [];
    for (let i = 0; i < 6; i++) {
      const c = await connectClient(imapPort);
      await c.greeting();
      held.push(c);
    }
    expect(count(held.map((c) => c.data().split('\n')[0]!))).toEqual({ 'proxy-1': 3, 'proxy-2': 3 });
    const c = held[0]!;
    const seen = [...b1.headers, ...b2.headers].find((h) => h.source?.port === c.socket.localPort);
    expect(seen).toMatchObject({ version: 2, source: { address: '127.0.0.1' }, destination: { address: '127.0.0.1', port: imapPort } });
    for (const h of held) h.socket.destroy();
  });

  it('marks a proxy down after failed /health checks, keeps its session, and back up after rise', async () => {
    const held = await connectClient(imapPort);
    const first = await held.greeting();
    const h = first === 'proxy-1' ? h1 : h2;
    const other = first === 'proxy-1' ? 'proxy-2' : 'proxy-1';
    h.setHealthy(false);
    // 3 failed checks at 200 ms: within ~1 s; poll until every new session avoids it.
    await waitFor(async () => (await greetings(imapPort, 4)).every((n) => n === other), 10_000, `${first} marked down`);
    held.socket.write('still there');
    await held.waitFor('still there');
    h.setHealthy(true);
    await waitFor(async () => (await greetings(imapPort, 4)).includes(first), 10_000, `${first} back up`);
    held.socket.destroy();
  });

  it("HAProxy (accept-proxy) decodes pairgate lb's PROXY v2 header to the real client address", async () => {
    const lb = await startLb({
      listeners: [{ name: 'l', listen: '127.0.0.1:0', pool: 'hap' }],
      pools: { hap: { check: { enabled: false }, backends: [{ name: 'haproxy', address: `127.0.0.1:${fromLbPort}` }] } },
    });
    try {
      const c = await connectClient(lb.port());
      await c.greeting();
      // pairgate lb -> HAProxy -> backend: the backend's header carries the client's own port,
      // which only HAProxy's reading of our header can have told it.
      const seen = [...b1.headers, ...b2.headers].find((x) => x.source?.port === c.socket.localPort);
      expect(seen).toMatchObject({ version: 2, source: { address: '127.0.0.1', port: c.socket.localPort }, destination: { port: lb.port() } });
      c.socket.destroy();
    } finally {
      await lb.stop();
    }
  });
});
