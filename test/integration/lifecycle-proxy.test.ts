/**
 * The proxy's per-user session count (limits.maxSessionsPerUser) on the paths where a client
 * leaves while its login is still running: before the user is bound (directory bind in flight)
 * and after (backend login held while the pair does not answer). Real sockets: the proxy in
 * front of pairgate's own store (IMAP), through a relay that can stop answering.
 */
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startProxy, proxyConfigSchema, type Proxy } from '../../proxy/index.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import type { Directory } from '../../directory/types.ts';
import { pairAdmin, tableDirectory } from './proxy-harness.ts';
import { startHarness, MASTER, RawClient, type Harness } from './imap-harness.ts';
import { waitFor } from '../helpers/net.ts';

/** A TCP relay to the store that can be switched to accept connections and never answer. */
async function switchableRelay(target: number): Promise<{ port: number; silent: boolean; close(): Promise<void> }> {
  const held = new Set<net.Socket>();
  const relay = {
    port: 0,
    silent: false,
    close: () =>
      new Promise<void>((r) => {
        for (const s of held) s.destroy();
        server.close(() => r());
      }),
  };
  const server = net.createServer((c) => {
    held.add(c);
    c.on('close', () => held.delete(c));
    c.on('error', () => undefined);
    if (relay.silent) return;
    const b = net.connect({ host: '127.0.0.1', port: target });
    held.add(b);
    b.on('close', () => {
      held.delete(b);
      c.destroy();
    });
    b.on('error', () => undefined);
    c.on('close', () => b.destroy());
    c.pipe(b).pipe(c);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  relay.port = (server.address() as net.AddressInfo).port;
  return relay;
}

describe('proxy: per-user session count when the client leaves during its login', () => {
  let harness: Harness;
  let admin: Awaited<ReturnType<typeof pairAdmin>>;
  let relay: Awaited<ReturnType<typeof switchableRelay>>;
  let proxy: Proxy;
  /** While set, directory binds wait for it (and `bindEntered` is resolved). */
  let bindGate: Promise<void> | null = null;
  let bindEntered: () => void = () => undefined;
  const clients: RawClient[] = [];

  const connect = async () => {
    const c = await RawClient.connect(proxy.address('imap')!.port);
    clients.push(c);
    return c;
  };

  beforeAll(async () => {
    harness = await startHarness({ users: {} });
    admin = await pairAdmin('pair-01');
    relay = await switchableRelay(harness.port);
    const pair = { id: 'pair-01', dn: 'cn=pair-01,ou=pairs,dc=pairgate,dc=test', address: '127.0.0.1', ports: { imap: relay.port, admin: admin.port }, state: 'active' as const, weight: 100 };
    const table = tableDirectory(
      [
        { uid: 'alice', password: 'alice-pass', pair: 'pair-01' },
        { uid: 'bob', password: 'bob-pass', pair: 'pair-01' },
      ],
      [pair],
    );
    const directory: Directory = {
      ...table,
      authenticate: async (login, password) => {
        if (bindGate) {
          bindEntered();
          await bindGate;
        }
        return table.authenticate(login, password);
      },
    };
    proxy = await startProxy(
      proxyConfigSchema.parse({
        directory: {},
        listeners: [{ protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'none' }],
        backend: { masterUser: MASTER.user, masterSecret: MASTER.secret, trustedNetworks: ['127.0.0.0/8'], loginTimeoutMs: 300, connectTimeoutMs: 300 },
        hold: { maxMs: 1200, retryMs: 100 },
        limits: { maxSessionsPerUser: 2 },
        health: { pollIntervalMs: 200 },
      }),
      { log: silentLogger, registry: createRegistry({}, false), directory },
    );
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    relay.silent = false;
    await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, 'every proxy session closed');
  });

  afterAll(async () => {
    await proxy?.stop(200);
    await relay?.close();
    await harness?.close();
    await admin?.close();
  });

  it('a client gone while its directory bind runs leaves no session counted for the user', async () => {
    let release!: () => void;
    bindGate = new Promise<void>((r) => (release = r));
    const entered = new Promise<void>((r) => (bindEntered = r));
    const gone = await connect();
    gone.writeRaw('a LOGIN alice alice-pass\r\n');
    await entered;
    gone.close();
    await waitFor(() => proxy.sessions.size === 0 || undefined, 5000, 'the proxy saw the client leave');
    bindGate = null;
    release();
    // The login goes on after the bind (route, user bound, backend login) for a client that is gone.
    await new Promise((r) => setTimeout(r, 500));
    expect(proxy.sessions.userSessions('alice')).toBe(0);
    // Both of the user's two sessions are available.
    for (let i = 0; i < 2; i++) {
      const c = await connect();
      expect((await c.send('LOGIN alice alice-pass')).tagged, `login ${i + 1}`).toMatch(/ OK /);
    }
  });

  it('a client gone while its backend login is held is counted out once, not twice', async () => {
    const first = await connect();
    expect((await first.send('LOGIN bob bob-pass')).tagged).toMatch(/ OK /);
    expect(proxy.sessions.userSessions('bob')).toBe(1);
    // The pair stops answering: the next login is bound to the user, then held, retrying.
    relay.silent = true;
    const gone = await connect();
    gone.writeRaw('a LOGIN bob bob-pass\r\n');
    await waitFor(() => proxy.sessions.userSessions('bob') === 2 || undefined, 5000, 'the second login bound');
    gone.close();
    // The hold runs out (1.2 s) and the login fails for a client already gone.
    await new Promise((r) => setTimeout(r, 2000));
    expect(proxy.sessions.userSessions('bob')).toBe(1);
    // The first session is still open: one more fits, a third does not.
    relay.silent = false;
    const second = await connect();
    expect((await second.send('LOGIN bob bob-pass')).tagged).toMatch(/ OK /);
    const third = await connect();
    expect((await third.send('LOGIN bob bob-pass')).tagged).toMatch(/NO \[LIMIT\]/);
    expect((await first.send('NOOP')).tagged).toMatch(/ OK /);
  });
});

describe('proxy: a session told to go while its login runs', () => {
  it('is not spliced to the pair when the login completes after the kick (graceful stop)', async () => {
    const harness = await startHarness({ users: {} });
    const admin = await pairAdmin('pair-01');
    const pair = { id: 'pair-01', dn: 'cn=pair-01,ou=pairs,dc=pairgate,dc=test', address: '127.0.0.1', ports: { imap: harness.port, admin: admin.port }, state: 'active' as const, weight: 100 };
    const table = tableDirectory([{ uid: 'alice', password: 'alice-pass', pair: 'pair-01' }], [pair]);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let entered!: () => void;
    const bindRunning = new Promise<void>((r) => (entered = r));
    const directory: Directory = {
      ...table,
      authenticate: async (login, password) => {
        entered();
        await gate;
        return table.authenticate(login, password);
      },
    };
    const proxy = await startProxy(
      proxyConfigSchema.parse({
        directory: {},
        listeners: [{ protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'none' }],
        backend: { masterUser: MASTER.user, masterSecret: MASTER.secret, trustedNetworks: ['127.0.0.0/8'] },
        health: { pollIntervalMs: 200 },
      }),
      { log: silentLogger, registry: createRegistry({}, false), directory },
    );
    // A client that keeps its side open after the proxy's FIN (as it may: the BYE is a request).
    const sock = net.connect({ host: '127.0.0.1', port: proxy.address('imap')!.port, allowHalfOpen: true });
    let buf = '';
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => (buf += d));
    sock.on('error', () => undefined);
    try {
      await waitFor(() => /^\* OK/.test(buf) || undefined, 5000, 'greeting');
      sock.write('a LOGIN alice alice-pass\r\n');
      await bindRunning;
      const stopping = proxy.stop(50);
      await waitFor(() => /\* BYE/.test(buf) || undefined, 5000, 'BYE at the stop');
      release();
      await new Promise((r) => setTimeout(r, 300));
      sock.write('b NOOP\r\n');
      await new Promise((r) => setTimeout(r, 500));
      // Told to go: nothing of the pair's reaches it (no login OK, no NOOP answer).
      expect(buf).not.toMatch(/^(a|b) OK/m);
      const noops = (await harness.registry.getSingleMetric('pairgate_imap_commands_total')!.get()).values.filter((v) => v.labels.command === 'NOOP');
      expect(noops.reduce((n, v) => n + v.value, 0), 'NOOPs the pair answered').toBe(0);
      await stopping;
    } finally {
      sock.destroy();
      await proxy.stop(50);
      await harness.close();
      await admin.close();
    }
  });
});
