/**
 * The proxy listener's per-connection accounting (per-address slots, the open-connection gauge,
 * the session registry) when a connection ends in the ways that skip the usual path: implicit TLS
 * behind a load balancer whose PROXY header arrived with the ClientHello (TLS over the prefix
 * replay), STARTTLS/STLS upgrades, and clients that reset instead of closing.
 */
import net from 'node:net';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startProxy, proxyConfigSchema, type Proxy } from '../../proxy/index.ts';
import { createRegistry, type MetricsRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import { tableDirectory } from './proxy-harness.ts';
import { makeTestCert } from '../helpers/tls.ts';
import { tempDir } from '../helpers/proc.ts';
import { waitFor } from '../helpers/net.ts';
import { LineClient, connectSocket, implicitTlsViaLb } from '../helpers/line-client.ts';

describe('proxy listener: per-connection accounting on every way a connection ends', () => {
  const tmp = tempDir('pairgate-lifecycle-');
  const cert = makeTestCert(tmp.path);
  let proxy: Proxy;
  let lbProxy: Proxy;
  let registry: MetricsRegistry;
  let lbRegistry: MetricsRegistry;

  const config = (loadBalancers: string[]) =>
    proxyConfigSchema.parse({
      directory: {},
      tls: { cert: cert.certFile, key: cert.keyFile },
      loadBalancers,
      listeners: [
        { protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'implicit' },
        { protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'starttls' },
        { protocol: 'pop3', host: '127.0.0.1', port: 0, tls: 'starttls' },
      ],
      backend: { masterUser: 'm', masterSecret: 'master-secret-123', trustedNetworks: ['127.0.0.0/8'] },
      limits: { maxConnectionsPerIp: 2 },
    });

  const gauge = async (r: MetricsRegistry) => (await r.getSingleMetric('pairgate_proxy_connections')!.get()).values.reduce((n, v) => n + v.value, 0);

  beforeAll(async () => {
    const directory = tableDirectory([], []);
    registry = createRegistry({}, false);
    lbRegistry = createRegistry({}, false);
    proxy = await startProxy(config([]), { log: silentLogger, registry, directory });
    lbProxy = await startProxy(config(['127.0.0.1']), { log: silentLogger, registry: lbRegistry, directory });
  });
  afterAll(async () => {
    await proxy?.stop(100);
    await lbProxy?.stop(100);
    tmp.cleanup();
  });

  for (const how of ['server', 'close', 'reset'] as const) {
    it(`implicit TLS behind a load balancer, header and ClientHello in one segment, client end: ${how}`, async () => {
      const port = lbProxy.address('imap', 'implicit')!.port;
      for (let i = 0; i < 4; i++) {
        const c = await implicitTlsViaLb(port, { address: '192.0.2.7', port: 40000 });
        await c.until(/^\* OK/);
        await c.end(how, 'a LOGOUT\r\n');
        await waitFor(() => lbProxy.sessions.size === 0 || undefined, 5000, `session ${i} removed`);
      }
      expect(await gauge(lbRegistry)).toBe(0);
    });
  }

  for (const how of ['server', 'close', 'reset'] as const) {
    it(`IMAP STARTTLS, client end: ${how}`, async () => {
      const port = proxy.address('imap', 'starttls')!.port;
      for (let i = 0; i < 4; i++) {
        const raw = await connectSocket(port);
        const c = new LineClient(raw, raw);
        await c.until(/^\* OK/);
        raw.write('s STARTTLS\r\n');
        await c.until(/s OK/);
        await c.starttls();
        c.sock.write('n NOOP\r\n');
        await c.until(/n OK/);
        await c.end(how, 'a LOGOUT\r\n');
        await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, `session ${i} removed`);
      }
      expect(await gauge(registry)).toBe(0);
    });

    it(`POP3 STLS, client end: ${how}`, async () => {
      const port = proxy.address('pop3', 'starttls')!.port;
      for (let i = 0; i < 4; i++) {
        const raw = await connectSocket(port);
        const c = new LineClient(raw, raw);
        await c.until(/^\+OK/);
        raw.write('STLS\r\n');
        await c.until(/\r\n\+OK/);
        await c.starttls();
        c.sock.write('CAPA\r\n');
        await c.until(/\r\n\.\r\n/);
        await c.end(how, 'QUIT\r\n');
        await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, `session ${i} removed`);
      }
      expect(await gauge(registry)).toBe(0);
    });
  }

  it('a STARTTLS handshake that fails (client sends garbage, then resets) frees the slot', async () => {
    const port = proxy.address('imap', 'starttls')!.port;
    for (let i = 0; i < 4; i++) {
      const raw = await connectSocket(port);
      const c = new LineClient(raw, raw);
      await c.until(/^\* OK/);
      raw.write('s STARTTLS\r\n');
      await c.until(/s OK/);
      raw.write('this is not a ClientHello\r\n');
      await new Promise((r) => setTimeout(r, 50));
      raw.resetAndDestroy();
      await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, `session ${i} removed`);
    }
    const raw = await connectSocket(port);
    const c = new LineClient(raw, raw);
    await c.until(/^\* OK/);
    raw.destroy();
    await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, 'last session removed');
    expect(await gauge(registry)).toBe(0);
  });

  it('TLS handshakes in flight hold their address slots; a failed handshake gives its slot back', async () => {
    const port = proxy.address('imap', 'implicit')!.port;
    // Two connections that never send a ClientHello hold both of this address's slots.
    const stalled = [await connectSocket(port), await connectSocket(port)];
    for (const s of stalled) s.on('error', () => undefined);
    const refusedMaxPerIp = async () =>
      (await registry.getSingleMetric('pairgate_proxy_connections_rejected_total')!.get()).values.find((v) => v.labels.reason === 'max-per-ip')?.value ?? 0;
    const before = await refusedMaxPerIp();
    const third = await connectSocket(port);
    third.on('error', () => undefined);
    // Refused for the address's limit (not closed later by the handshake bound).
    await waitFor(async () => (await refusedMaxPerIp()) === before + 1 || undefined, 5000, 'the third connection refused at the limit');
    await waitFor(() => third.destroyed || third.readableEnded || undefined, 5000, 'the third connection closed');
    // One stalled connection sends garbage instead: its handshake fails and its slot comes back.
    stalled[0]!.write('not a ClientHello at all\r\n\r\n');
    await waitFor(() => stalled[0]!.readableEnded || stalled[0]!.destroyed || undefined, 5000, 'the failed handshake closed');
    const c = await new Promise<LineClient>((resolve, reject) => {
      const raw = net.connect({ host: '127.0.0.1', port });
      const s = tls.connect({ socket: raw, rejectUnauthorized: false });
      s.once('secureConnect', () => resolve(new LineClient(raw, s)));
      s.once('error', reject);
    });
    await c.until(/^\* OK/);
    await c.end('server', 'a LOGOUT\r\n');
    stalled[1]!.destroy();
    await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, 'sessions removed');
    expect(await gauge(registry)).toBe(0);
  });
});
