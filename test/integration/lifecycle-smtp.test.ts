/**
 * The SMTP front ends' per-connection accounting (per-address slots, the open-session gauge) on
 * the ways a connection ends besides QUIT: STARTTLS handshakes that fail or are cut, resets
 * after STARTTLS, implicit TLS behind a load balancer whose PROXY header came with the
 * ClientHello, and connections smtp-server itself turns away (maxClients).
 */
import net from 'node:net';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSmtpFrontEnds, type SmtpFrontEnds } from '../../proxy/smtp/index.ts';
import { createRegistry, type MetricsRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import { tableDirectory } from './proxy-harness.ts';
import { makeTestCert } from '../helpers/tls.ts';
import { tempDir } from '../helpers/proc.ts';
import { waitFor } from '../helpers/net.ts';
import { LineClient, connectLine, implicitTlsViaLb } from '../helpers/line-client.ts';

describe('SMTP front ends: per-connection accounting on every way a connection ends', () => {
  const tmp = tempDir('pairgate-lifecycle-smtp-');
  const cert = makeTestCert(tmp.path);
  let fe: SmtpFrontEnds;
  let lbFe: SmtpFrontEnds;
  let registry: MetricsRegistry;
  let lbRegistry: MetricsRegistry;
  const health = { awaitServable: async () => undefined };

  const open = async (r: MetricsRegistry) => (await r.getSingleMetric('pairgate_sessions')!.get()).values.find((v) => v.labels.protocol === 'smtp')?.value ?? 0;

  beforeAll(async () => {
    const directory = tableDirectory([], []);
    registry = createRegistry({}, false);
    lbRegistry = createRegistry({}, false);
    const smtp = (maxConnections: number) => ({
      hostname: 'lifecycle.test',
      localDomains: ['example.net'],
      listeners: [
        { kind: 'mx', host: '127.0.0.1', port: 0, tls: 'starttls' },
        { kind: 'submission', host: '127.0.0.1', port: 0, tls: 'implicit' },
      ],
      limits: { maxConnectionsPerIp: 2, maxConnections },
    });
    fe = await startSmtpFrontEnds({ tls: { cert: cert.certFile, key: cert.keyFile }, smtp: smtp(3), timeouts: { proxyHeaderMs: 2000, tlsHandshakeMs: 1500 } }, { directory, pairHealth: health, log: silentLogger, registry });
    lbFe = await startSmtpFrontEnds(
      { tls: { cert: cert.certFile, key: cert.keyFile }, smtp: smtp(0), loadBalancers: ['127.0.0.1'], timeouts: { proxyHeaderMs: 2000, tlsHandshakeMs: 1500 } },
      { directory, pairHealth: health, log: silentLogger, registry: lbRegistry },
    );
  });
  afterAll(async () => {
    await fe?.close(100);
    await lbFe?.close(100);
    tmp.cleanup();
  });

  const rounds = async (f: SmtpFrontEnds, r: MetricsRegistry, one: (i: number) => Promise<void>) => {
    for (let i = 0; i < 4; i++) {
      await one(i);
      await waitFor(async () => (f.sessions() === 0 && (await open(r))) === 0 || undefined, 5000, `session ${i} counted out`);
    }
    // Both of the address's slots are free again.
    const a = await connectLine(f.address('mx')!.port);
    const b = await connectLine(f.address('mx')!.port);
    await a.until(/^220 /);
    await b.until(/^220 /);
    a.raw.destroy();
    b.raw.destroy();
    await waitFor(async () => (f.sessions() === 0 && (await open(r))) === 0 || undefined, 5000, 'counted out');
  };

  it('STARTTLS handshake refused (garbage instead of a ClientHello)', async () => {
    await rounds(fe, registry, async () => {
      const c = await connectLine(fe.address('mx')!.port);
      await c.until(/^220 /);
      c.raw.write('EHLO x\r\n');
      await c.until(/250 /);
      c.raw.write('STARTTLS\r\n');
      await c.until(/\r\n220 /);
      c.raw.write('GARBAGE GARBAGE GARBAGE\r\n');
      await waitFor(() => c.closed || undefined, 5000, 'closed by the server');
    });
  });

  it('STARTTLS handshake cut: the client resets after the 220', async () => {
    await rounds(fe, registry, async () => {
      const c = await connectLine(fe.address('mx')!.port);
      await c.until(/^220 /);
      c.raw.write('EHLO x\r\nSTARTTLS\r\n');
      await c.until(/\r\n220 /);
      c.raw.resetAndDestroy();
    });
  });

  it('STARTTLS handshake never started: the handshake bound closes it', async () => {
    await rounds(fe, registry, async () => {
      const c = await connectLine(fe.address('mx')!.port);
      await c.until(/^220 /);
      c.raw.write('EHLO x\r\nSTARTTLS\r\n');
      await c.until(/\r\n220 /);
      c.raw.end();
      await waitFor(() => c.closed || undefined, 5000, 'closed');
    });
  });

  it('reset after STARTTLS, and in the middle of a message', async () => {
    await rounds(fe, registry, async (i) => {
      const c = await connectLine(fe.address('mx')!.port);
      await c.until(/^220 /);
      c.raw.write('EHLO x\r\nSTARTTLS\r\n');
      await c.until(/\r\n220 /);
      await c.starttls();
      c.sock.write('EHLO x\r\n');
      await c.until(/250 /);
      if (i % 2) {
        c.sock.write('MAIL FROM:<a@example.org>\r\n');
        await c.until(/250 /);
      }
      c.raw.resetAndDestroy();
    });
  });

  it('turned away by smtp-server at maxClients (421), with and without STARTTLS sessions open', async () => {
    const port = fe.address('mx')!.port;
    // Three sessions (maxConnections 3) from three source addresses (per-address limit 2).
    const held: LineClient[] = [];
    for (const local of ['127.0.0.2', '127.0.0.3', '127.0.0.4']) {
      const s = net.connect({ host: '127.0.0.1', port, localAddress: local });
      await new Promise<void>((resolve, reject) => {
        s.once('connect', resolve);
        s.once('error', reject);
      });
      const c = new LineClient(s, s);
      await c.until(/^220 /);
      c.raw.write('EHLO x\r\nSTARTTLS\r\n');
      await c.until(/\r\n220 /);
      await c.starttls();
      held.push(c);
    }
    for (let i = 0; i < 3; i++) {
      const c = await connectLine(port);
      await c.until(/^421 /);
      await waitFor(() => c.closed || undefined, 5000, 'refused connection closed');
    }
    for (const c of held) c.raw.destroy();
    await waitFor(async () => (fe.sessions() === 0 && (await open(registry))) === 0 || undefined, 5000, 'counted out');
    await rounds(fe, registry, async () => undefined);
  });

  for (const how of ['quit', 'reset'] as const) {
    it(`implicit TLS behind a load balancer (header with the ClientHello), end: ${how}`, async () => {
      const port = lbFe.address('submission')!.port;
      for (let i = 0; i < 4; i++) {
        const c = await implicitTlsViaLb(port, { address: '192.0.2.9', port: 40000 });
        await c.until(/^220 /);
        if (how === 'quit') {
          c.sock.write('QUIT\r\n');
          await waitFor(() => c.closed || undefined, 5000, 'closed');
        } else c.raw.resetAndDestroy();
        await waitFor(async () => (lbFe.sessions() === 0 && (await open(lbRegistry))) === 0 || undefined, 5000, `session ${i} counted out`);
      }
      expect(await open(lbRegistry)).toBe(0);
    });
  }

  it('implicit TLS: handshakes in flight hold their address slots; a failed handshake gives its slot back', async () => {
    const port = fe.address('submission', 'implicit')!.port;
    const stalled = [await connectLine(port), await connectLine(port)];
    const refusedMaxPerIp = async () => (await registry.getSingleMetric('pairgate_smtp_rejects_total')!.get()).values.find((v) => v.labels.reason === 'max-per-ip')?.value ?? 0;
    const before = await refusedMaxPerIp();
    const third = await connectLine(port);
    // Refused for the address's limit (not closed later by the handshake bound).
    await waitFor(async () => (await refusedMaxPerIp()) === before + 1 || undefined, 5000, 'the third connection refused at the limit');
    await waitFor(() => third.closed || undefined, 5000, 'the third connection closed');
    stalled[0]!.raw.write('not a ClientHello at all\r\n\r\n');
    await waitFor(() => stalled[0]!.closed || undefined, 5000, 'the failed handshake closed');
    const raw = net.connect({ host: '127.0.0.1', port });
    const s = tls.connect({ socket: raw, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      s.once('secureConnect', resolve);
      s.once('error', reject);
    });
    const c = new LineClient(raw, s);
    await c.until(/^220 /);
    s.write('QUIT\r\n');
    await waitFor(() => c.closed || undefined, 5000, 'QUIT closed');
    stalled[1]!.raw.destroy();
    await waitFor(async () => (fe.sessions() === 0 && (await open(registry))) === 0 || undefined, 5000, 'counted out');
  });
});
