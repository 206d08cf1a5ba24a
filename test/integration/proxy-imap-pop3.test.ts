/**
 * The proxy's IMAP and POP3 front ends against two real Dovecot instances standing in for two
 * pairs, a real directory (LDIF file backend), a real redis-server, and real clients (imapflow,
 * raw sockets, PROXY v2 headers built with proxy-protocol-js). Each pair's admin `/health`
 * endpoint is a small HTTP server serving health records whose state the test sets, as a
 * pair-agent would.
 */
import http from 'node:http';
import net from 'node:net';
import tls from 'node:tls';
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImapFlow } from 'imapflow';
import { V2ProxyProtocol, Command, TransportProtocol, IPv4ProxyAddress, IPv4Address } from 'proxy-protocol-js';
import { startProxy, proxyConfigSchema, type Proxy } from '../../proxy/index.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import type { HealthRecord, PairState } from '../../common/health.ts';
import type { Directory, PairRecord } from '../../directory/types.ts';
import { startDovecot, type Dovecot } from '../helpers/dovecot.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { makeTestCert, type TestCert } from '../helpers/tls.ts';
import { tempDir, startProcess } from '../helpers/proc.ts';
import { waitFor, sleep, freePort, waitForPort } from '../helpers/net.ts';
import { haveDirectory, openDirectory, tableDirectory } from './proxy-harness.ts';

const MASTER = 'pgmaster';
const MASTER_SECRET = `m-${randomBytes(6).toString('hex')}`;
const USERS = [
  { uid: 'alice', password: 'alice-pass', pair: 'pair-a' },
  { uid: 'carol', password: 'carol-pass', pair: 'pair-a' },
  { uid: 'bob', password: 'bob-pass', pair: 'pair-b' },
  { uid: 'dave', password: 'dave-pass', pair: 'pair-b' },
];

function ssha(password: string): string {
  const salt = randomBytes(8);
  return `{SSHA}${Buffer.concat([createHash('sha1').update(password).update(salt).digest(), salt]).toString('base64')}`;
}

function healthRecord(pair: string, state: PairState): HealthRecord {
  return {
    pair,
    at: Date.now(),
    state,
    primary: 'a',
    nodes: { a: { heartbeat: 'up', role: 'primary', disk: 'UpToDate' }, b: { heartbeat: 'up', role: 'secondary', disk: 'UpToDate' } },
    replication: { connection: 'Connected', protocol: 'C', outOfSyncBytes: 0 },
    store: { mailboxes: 2, messages: 0, bytesUsed: 0, bytesTotal: 1 << 30 },
    sessions: { imap: 0, pop3: 0, lmtp: 0 },
  };
}

/** A pair's admin endpoint (as the active pair-agent serves it) with a settable state. */
async function pairAdmin(id: string) {
  let state: PairState = 'ok';
  const server = http.createServer((_req, res) => {
    res.writeHead(state === 'ok' || state === 'degraded' ? 200 : 503, { 'content-type': 'application/json' });
    res.end(JSON.stringify(healthRecord(id, state)));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    set(s: PairState) {
      state = s;
    },
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

/** A raw line client (IMAP/POP3) with bounded waits. */
class LineClient {
  private buf = '';
  private lines: string[] = [];
  private wake: (() => void) | null = null;
  ended = false;
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        this.lines.push(this.buf.slice(0, i).replace(/\r$/, ''));
        this.buf = this.buf.slice(i + 1);
      }
      this.wake?.();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((r) =>
      socket.once('close', () => {
        this.ended = true;
        this.wake?.();
        r();
      }),
    );
  }

  static async connect(port: number, opts: { localAddress?: string; prefix?: Buffer; tls?: boolean } = {}): Promise<LineClient> {
    const plain = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}) });
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    // Corked, so that the PROXY header and the TLS ClientHello leave in one segment (the proxy must
    // hand the bytes after the header to the TLS layer).
    if (opts.prefix && opts.tls) plain.cork();
    if (opts.prefix) plain.write(opts.prefix);
    if (!opts.tls) return new LineClient(plain);
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false, servername: 'localhost' });
    if (opts.prefix) setImmediate(() => plain.uncork());
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    return new LineClient(secure);
  }

  send(line: string): void {
    this.socket.write(`${line}\r\n`);
  }

  async line(timeoutMs = 8000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (this.lines.length === 0) {
      if (this.ended) throw new Error('connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a line');
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
    return this.lines.shift()!;
  }

  /** Reads lines until one matches; returns it. */
  async until(re: RegExp, timeoutMs = 8000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const l = await this.line(Math.max(1, deadline - Date.now()));
      if (re.test(l)) return l;
    }
  }

  /** Upgrades to TLS after a STARTTLS/STLS OK. */
  async starttls(): Promise<LineClient> {
    this.socket.removeAllListeners('data');
    const secure = tls.connect({ socket: this.socket, rejectUnauthorized: false, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    return new LineClient(secure);
  }

  close(): void {
    this.socket.destroy();
  }
}

function proxyV2(src: string, srcPort: number): Buffer {
  const p = src.split('.').map(Number);
  return Buffer.from(
    new V2ProxyProtocol(Command.PROXY, TransportProtocol.STREAM, new IPv4ProxyAddress(IPv4Address.createFrom(p), srcPort, IPv4Address.createFrom([127, 0, 0, 1]), 143)).build(),
  );
}

async function imapLogin(port: number, user: string, pass: string, opts: { localAddress?: string; prefix?: Buffer } = {}) {
  const c = await LineClient.connect(port, opts);
  await c.until(/^\* OK/);
  c.send(`a1 LOGIN ${user} "${pass}"`);
  const answer = await c.until(/^a1 /, 20_000);
  return { c, answer };
}

describe(`proxy IMAP/POP3 front ends (directory: ${haveDirectory ? 'LDIF file' : 'in-test table'})`, () => {
  let redis: RedisServer;
  let dovA: Dovecot;
  let dovB: Dovecot;
  let adminA: Awaited<ReturnType<typeof pairAdmin>>;
  let adminB: Awaited<ReturnType<typeof pairAdmin>>;
  let cert: TestCert;
  let dir: { path: string; cleanup(): void };
  let directory: Directory;
  let proxy: Proxy;
  let proxy2: Proxy;
  const registry = createRegistry({}, false);

  const baseConfig = (extra: Record<string, unknown> = {}) =>
    proxyConfigSchema.parse({
      id: 'proxy-test',
      directory: { ldif: join(dir.path, 'directory.ldif') },
      redis: { url: redis.url },
      tls: { cert: cert.certFile, key: cert.keyFile },
      listeners: [
        { protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'none', name: 'imap-plain' },
        { protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'starttls', name: 'imap-starttls' },
        { protocol: 'imap', host: '127.0.0.1', port: 0, tls: 'implicit', name: 'imaps' },
        { protocol: 'pop3', host: '127.0.0.1', port: 0, tls: 'none', name: 'pop3-plain' },
        { protocol: 'pop3', host: '127.0.0.1', port: 0, tls: 'starttls', name: 'pop3-starttls' },
      ],
      loadBalancers: ['127.0.0.2/32'],
      backend: { masterUser: MASTER, masterSecret: MASTER_SECRET, trustedNetworks: ['127.0.0.0/8'] },
      hold: { maxMs: 4000, retryMs: 200 },
      health: { pollIntervalMs: 150, pollTimeoutMs: 400, ttlMs: 1500 },
      authLimits: { windowMs: 60_000, maxPerIp: 4, maxPerLogin: 50, delayStepMs: 5, maxDelayMs: 20 },
      ...extra,
    });

  beforeAll(async () => {
    dir = tempDir('pairgate-proxy-test-');
    cert = makeTestCert(dir.path, 'proxy');
    const dovUsers = USERS.map((u) => ({ user: u.uid, password: `backend-${u.password}` }));
    [redis, dovA, dovB, adminA, adminB] = await Promise.all([
      startRedis(),
      startDovecot({ users: dovUsers, masterUser: MASTER, masterPassword: MASTER_SECRET, trustedNetworks: '127.0.0.0/8' }),
      startDovecot({ users: dovUsers, masterUser: MASTER, masterPassword: MASTER_SECRET, trustedNetworks: '127.0.0.0/8' }),
      pairAdmin('pair-a'),
      pairAdmin('pair-b'),
    ]);
    const pairEntry = (id: string, d: Dovecot, adminPort: number) =>
      `dn: cn=${id},ou=pairs,dc=pairgate,dc=test\nobjectClass: pairgatePair\ncn: ${id}\npairgateAddress: 127.0.0.1\npairgatePorts: imap=${d.imapPort},pop3=${d.pop3Port},lmtp=${d.lmtpPort},admin=${adminPort}\npairgateState: active\npairgateWeight: 100\n`;
    const userEntry = (u: (typeof USERS)[number]) =>
      `dn: uid=${u.uid},ou=people,dc=pairgate,dc=test\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: ${u.uid}\ncn: ${u.uid}\nsn: ${u.uid}\nmail: ${u.uid}@example.net\nmailHost: ${u.pair}\nuserPassword: ${ssha(u.password)}\n`;
    const ldif = [
      'dn: dc=pairgate,dc=test\nobjectClass: dcObject\nobjectClass: organization\ndc: pairgate\no: test\n',
      'dn: ou=people,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: people\n',
      'dn: ou=pairs,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: pairs\n',
      pairEntry('pair-a', dovA, adminA.port),
      pairEntry('pair-b', dovB, adminB.port),
      ...USERS.map(userEntry),
    ].join('\n');
    writeFileSync(join(dir.path, 'directory.ldif'), ldif);
    const pairRecord = (id: string, d: Dovecot, adminPort: number): PairRecord => ({
      id,
      dn: `cn=${id},ou=pairs,dc=pairgate,dc=test`,
      address: '127.0.0.1',
      ports: { imap: d.imapPort, pop3: d.pop3Port, lmtp: d.lmtpPort, admin: adminPort },
      state: 'active',
      weight: 100,
    });
    directory = haveDirectory
      ? await openDirectory({ ldif: join(dir.path, 'directory.ldif') }, { log: silentLogger })
      : tableDirectory(USERS, [pairRecord('pair-a', dovA, adminA.port), pairRecord('pair-b', dovB, adminB.port)]);
    proxy = await startProxy(baseConfig(), { log: silentLogger, registry, directory });
    proxy2 = await startProxy(baseConfig({ id: 'proxy-test-2' }), { log: silentLogger, registry: createRegistry({}, false), directory });
  });

  afterAll(async () => {
    await proxy?.stop(500);
    await proxy2?.stop(500);
    await directory?.close();
    await Promise.all([dovA?.close(), dovB?.close(), redis?.close(), adminA?.close(), adminB?.close()]);
    dir?.cleanup();
  });

  const port = (name: string) => proxy.listeners.find((l) => l.name === name)!.address.port;

  it('routes IMAP logins to the home pair (imapflow, plain and implicit TLS)', async () => {
    for (const [user, secure, backend] of [
      ['alice', false, () => dovA],
      ['bob', true, () => dovB],
    ] as const) {
      const client = new ImapFlow({
        host: '127.0.0.1',
        port: port(secure ? 'imaps' : 'imap-plain'),
        secure,
        tls: { rejectUnauthorized: false },
        auth: { user, pass: `${user}-pass` },
        logger: false,
        disableAutoIdle: true,
      });
      await client.connect();
      const msg = `Subject: routed ${user}\r\nMessage-ID: <${randomBytes(4).toString('hex')}@t>\r\n\r\nhello ${user}\r\n`;
      await client.append('INBOX', msg);
      const box = await client.mailboxOpen('INBOX');
      expect(box.exists).toBeGreaterThanOrEqual(1);
      await client.logout();
      expect(backend().messages(user).some((m) => m.toString().includes(`routed ${user}`))).toBe(true);
      const other = backend() === dovA ? dovB : dovA;
      expect(other.messages(user).some((m) => m.toString().includes(`routed ${user}`))).toBe(false);
    }
    // The backend saw the master login and the client's address.
    expect(dovA.log()).toMatch(/imap-login: Info: Login: user=<alice>.*rip=127\.0\.0\.1/);
  });

  it('refuses a wrong password and bad input without reaching a backend', async () => {
    const { c, answer } = await imapLogin(port('imap-plain'), 'carol', 'wrong');
    expect(answer).toMatch(/^a1 NO \[AUTHENTICATIONFAILED\]/);
    c.send('a2 LOGIN {5}');
    await c.until(/^\+ /);
    c.send('car\r\nol "x"'.replace('\r\n', 'ol'));
    expect(await c.until(/^a2 /, 10_000)).toMatch(/^a2 (NO|BAD)/);
    c.send('a3 SELECT INBOX');
    expect(await c.until(/^a3 /)).toMatch(/^a3 BAD/);
    c.send(`a4 ${'x'.repeat(10_000)}`);
    expect(await c.until(/^a4 |^\* BAD/)).toMatch(/BAD/);
    c.send('a5 LOGOUT');
    await c.until(/^a5 OK/);
    await c.closed;
    expect(dovA.log()).not.toMatch(/user=<carol>/);
  });

  it('pre-login input cut into 1, 3 and 17-byte chunks; commands pipelined after LOGIN reach the backend', async () => {
    const script = 'a1 CAPABILITY\r\na2 NOOP\r\na3 ID ("name" "chunky")\r\na4 LOGIN {5+}\r\ncarol "carol-pass"\r\na5 SELECT INBOX\r\na6 LOGOUT\r\n';
    for (const size of [1, 3, 17]) {
      const c = await LineClient.connect(port('imap-plain'));
      await c.until(/^\* OK/);
      for (let i = 0; i < script.length; i += size) {
        c.socket.write(script.slice(i, i + size));
        await sleep(1);
      }
      const statuses: string[] = [];
      for (const tag of ['a1', 'a2', 'a3', 'a4', 'a5', 'a6']) statuses.push((await c.until(new RegExp(`^${tag} `), 20_000)).split(' ').slice(0, 2).join(' '));
      expect(statuses, `chunk size ${size}`).toEqual(['a1 OK', 'a2 OK', 'a3 OK', 'a4 OK', 'a5 OK', 'a6 OK']);
      await c.closed;
    }
    const p = await LineClient.connect(port('pop3-plain'));
    await p.line();
    p.socket.write('USER carol\r\nPASS carol-pass\r\nSTAT\r\nQUIT\r\n');
    const replies = [await p.line(), await p.line(20_000), await p.line(), await p.line()];
    expect(replies.map((r) => r.slice(0, 3))).toEqual(['+OK', '+OK', '+OK', '+OK']);
    expect(replies[2]).toMatch(/^\+OK \d+ \d+/);
    await p.closed;
  });

  it('garbage and over-long lines before login: protocol errors, then BYE; the proxy keeps serving', async () => {
    let seed = Number(process.env.PROXY_FUZZ_SEED ?? Date.now() % 100_000);
    process.stdout.write(`proxy garbage seed ${seed} (set PROXY_FUZZ_SEED to replay)\n`);
    const rnd = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    for (const listener of ['imap-plain', 'pop3-plain']) {
      const c = await LineClient.connect(port(listener));
      await c.line();
      for (let i = 0; i < 12 && !c.ended; i++) {
        const junk = Buffer.from(Array.from({ length: 1 + Math.floor(rnd() * 60) }, () => 32 + Math.floor(rnd() * 200)).filter((b) => b !== 10 && b !== 13 && b !== 123));
        c.socket.write(Buffer.concat([junk, Buffer.from('\r\n')]));
        await sleep(2);
      }
      c.socket.write(`${'A'.repeat(20_000)}\r\n`);
      await c.closed;
    }
    const { c, answer } = await imapLogin(port('imap-plain'), 'alice', 'alice-pass');
    expect(answer).toMatch(/^a1 OK/);
    c.close();
  });

  it('POP3: USER/PASS and AUTH PLAIN routed, XCLIENT forwards the address', async () => {
    const c = await LineClient.connect(port('pop3-plain'));
    expect(await c.line()).toMatch(/^\+OK/);
    c.send('CAPA');
    expect(await c.until(/^SASL /)).toBe('SASL PLAIN LOGIN');
    await c.until(/^\.$/);
    c.send('USER dave');
    await c.until(/^\+OK/);
    c.send('PASS dave-pass');
    expect(await c.line(20_000)).toMatch(/^\+OK/);
    c.send('STAT');
    expect(await c.line()).toMatch(/^\+OK \d+ \d+/);
    c.send('QUIT');
    await c.until(/^\+OK/);
    await c.closed;
    expect(dovB.log()).toMatch(/pop3-login: Info: Login: user=<dave>/);

    const d = await LineClient.connect(port('pop3-plain'));
    await d.line();
    d.send(`AUTH PLAIN ${Buffer.from('\0alice\0wrong').toString('base64')}`);
    expect(await d.line(10_000)).toMatch(/^-ERR \[AUTH\]/);
    d.send(`AUTH PLAIN ${Buffer.from('\0alice\0alice-pass').toString('base64')}`);
    expect(await d.line(20_000)).toMatch(/^\+OK/);
    d.send('QUIT');
    await d.closed;
  });

  it('STARTTLS: LOGINDISABLED before TLS, login after', async () => {
    const c = await LineClient.connect(port('imap-starttls'));
    const greeting = await c.line();
    expect(greeting).toMatch(/STARTTLS/);
    expect(greeting).toMatch(/LOGINDISABLED/);
    c.send('a1 LOGIN alice alice-pass');
    expect(await c.until(/^a1 /)).toMatch(/^a1 NO \[PRIVACYREQUIRED\]/);
    c.send('a2 STARTTLS');
    await c.until(/^a2 OK/);
    const s = await c.starttls();
    s.send('a3 CAPABILITY');
    const caps = await s.until(/^\* CAPABILITY/);
    expect(caps).not.toMatch(/LOGINDISABLED|STARTTLS/);
    expect(caps).toMatch(/AUTH=PLAIN/);
    s.send(`a4 AUTHENTICATE PLAIN ${Buffer.from('\0alice\0alice-pass').toString('base64')}`);
    const ok = await s.until(/^a4 /, 20_000);
    expect(ok).toMatch(/^a4 OK \[CAPABILITY [^\]]*IMAP4rev1/);
    s.send('a5 SELECT INBOX');
    expect(await s.until(/^a5 /)).toMatch(/^a5 OK/);
    s.send('a6 LOGOUT');
    await s.closed;

    const p = await LineClient.connect(port('pop3-starttls'));
    await p.line();
    p.send('USER alice');
    expect(await p.line()).toMatch(/^-ERR \[AUTH\]/);
    p.send('STLS');
    await p.until(/^\+OK/);
    const ps = await p.starttls();
    ps.send('USER alice');
    await ps.until(/^\+OK/);
    ps.send('PASS alice-pass');
    expect(await ps.line(20_000)).toMatch(/^\+OK/);
    ps.send('QUIT');
    await ps.closed;
  });

  it('PROXY v2 header: required from the load balancer, refused from others; the backend sees the original client', async () => {
    const { c, answer } = await imapLogin(port('imap-plain'), 'bob', 'bob-pass', { localAddress: '127.0.0.2', prefix: proxyV2('192.0.2.7', 40001) });
    expect(answer).toMatch(/^a1 OK/);
    c.send('a2 LOGOUT');
    await c.closed;
    await waitFor(() => /Login: user=<bob>.*rip=192\.0\.2\.7/.test(dovB.log()), 5000, 'dovecot log with rip=192.0.2.7');

    // From the LB without a header: closed without a greeting.
    const noHeader = await LineClient.connect(port('imap-plain'), { localAddress: '127.0.0.2' });
    noHeader.send('a1 CAPABILITY');
    await noHeader.closed;
    await expect(noHeader.line(100)).rejects.toThrow();

    // From anyone else with a header: refused.
    const spoof = await LineClient.connect(port('imap-plain'), { prefix: proxyV2('192.0.2.99', 1) });
    const lines: string[] = [];
    await spoof.closed;
    for (;;) {
      try {
        lines.push(await spoof.line(100));
      } catch {
        break;
      }
    }
    expect(lines.join('\n')).toMatch(/BYE PROXY header not accepted/);
  });

  it('implicit TLS behind the load balancer: PROXY v2 header and ClientHello in one segment', async () => {
    const c = await LineClient.connect(port('imaps'), { localAddress: '127.0.0.2', prefix: proxyV2('192.0.2.44', 40044), tls: true });
    await c.until(/^\* OK/);
    c.send('a1 LOGIN alice alice-pass');
    expect(await c.until(/^a1 /, 20_000)).toMatch(/^a1 OK/);
    c.send('a2 LOGOUT');
    await c.closed;
    await waitFor(() => /Login: user=<alice>.*rip=192\.0\.2\.44/.test(dovA.log()), 5000, 'dovecot log with rip=192.0.2.44');
  });

  it('pair down: open sessions closed with BYE, new logins NO [UNAVAILABLE] / -ERR [SYS/TEMP]', async () => {
    const { c, answer } = await imapLogin(port('imap-plain'), 'alice', 'alice-pass');
    expect(answer).toMatch(/^a1 OK/);
    adminA.set('down');
    try {
      expect(await c.until(/^\* BYE/, 5000)).toMatch(/UNAVAILABLE/);
      await c.closed;
      const again = await imapLogin(port('imap-plain'), 'alice', 'alice-pass');
      expect(again.answer).toMatch(/^a1 NO \[UNAVAILABLE\]/);
      again.c.close();
      const p = await LineClient.connect(port('pop3-plain'));
      await p.line();
      p.send('USER carol');
      await p.line();
      p.send('PASS carol-pass');
      expect(await p.line(10_000)).toMatch(/^-ERR \[SYS\/TEMP\]/);
      p.close();
      // The other pair is unaffected.
      const b = await imapLogin(port('imap-plain'), 'bob', 'bob-pass');
      expect(b.answer).toMatch(/^a1 OK/);
      b.c.close();
    } finally {
      adminA.set('ok');
    }
    await waitFor(() => proxy.pairHealth.state('pair-a') === 'ok', 5000, 'pair-a ok');
  });

  it('failing-over: a login is held and served once the pair is back', async () => {
    adminB.set('failing-over');
    await waitFor(() => proxy.pairHealth.state('pair-b') === 'failing-over', 5000, 'failing-over seen');
    const t0 = Date.now();
    setTimeout(() => adminB.set('ok'), 800);
    const { c, answer } = await imapLogin(port('imap-plain'), 'bob', 'bob-pass');
    expect(answer).toMatch(/^a1 OK/);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(500);
    c.send('a2 LOGOUT');
    await c.closed;
    const metrics = await registry.metrics();
    expect(metrics).toMatch(/pairgate_held_logins_total\{pair="pair-b"\} [1-9]/);
  });

  it('backend killed mid-session: the client is closed cleanly, without a reset', async () => {
    const { c, answer } = await imapLogin(port('imap-plain'), 'dave', 'dave-pass');
    expect(answer).toMatch(/^a1 OK/);
    const p = await LineClient.connect(port('pop3-plain'));
    await p.line();
    p.send('USER bob');
    await p.line();
    p.send('PASS bob-pass');
    expect(await p.line(20_000)).toMatch(/^\+OK/);
    // The mail processes serving these two sessions (Dovecot logs their pid as mpid=).
    const mpid = (re: RegExp) => {
      const all = [...dovB.log().matchAll(re)];
      return Number(all[all.length - 1]![1]);
    };
    const imapPid = mpid(/imap-login: Info: Login: user=<dave>.*?mpid=(\d+)/g);
    const popPid = mpid(/pop3-login: Info: Login: user=<bob>.*?mpid=(\d+)/g);
    let reset = false;
    c.socket.on('error', () => (reset = true));
    p.socket.on('error', () => (reset = true));
    process.kill(imapPid, 'SIGKILL');
    process.kill(popPid, 'SIGKILL');
    await Promise.all([c.closed, p.closed]);
    expect(reset).toBe(false);
    const again = await imapLogin(port('imap-plain'), 'dave', 'dave-pass');
    expect(again.answer).toMatch(/^a1 OK/);
    again.c.close();
  });

  it('brute force from one address across two proxies is throttled; the user still logs in from another address', async () => {
    const attacker = proxyV2('192.0.2.66', 5000);
    const p2 = proxy2.listeners.find((l) => l.name === 'imap-plain')!.address.port;
    for (let i = 0; i < 4; i++) {
      const { c, answer } = await imapLogin(i % 2 ? p2 : port('imap-plain'), 'carol', `guess-${i}`, { localAddress: '127.0.0.2', prefix: attacker });
      expect(answer).toMatch(/AUTHENTICATIONFAILED/);
      c.close();
    }
    const locked = await imapLogin(p2, 'carol', 'carol-pass', { localAddress: '127.0.0.2', prefix: attacker });
    expect(locked.answer).toMatch(/^a1 NO \[UNAVAILABLE\]/);
    locked.c.close();
    const good = await imapLogin(port('imap-plain'), 'carol', 'carol-pass', { localAddress: '127.0.0.2', prefix: proxyV2('198.51.100.20', 6000) });
    expect(good.answer).toMatch(/^a1 OK/);
    good.c.close();
  });

  it('user move: logins held while the usermove key is set; user-close-sessions closes the user\'s sessions', async () => {
    const { RedisBus, keys } = await import('../../common/redis-bus.ts');
    const bus = new RedisBus({ url: redis.url });
    await waitFor(() => bus.connected, 5000, 'redis');
    try {
      const open = await imapLogin(port('imap-plain'), 'dave', 'dave-pass');
      expect(open.answer).toMatch(/^a1 OK/);
      await bus.publish({ type: 'user-close-sessions', user: 'dave' });
      expect(await open.c.until(/^\* BYE/, 5000)).toMatch(/BYE/);
      await open.c.closed;

      await bus.set(keys.userMove('dave'), 'moving', 800);
      const t0 = Date.now();
      const held = await imapLogin(port('imap-plain'), 'dave', 'dave-pass');
      expect(held.answer).toMatch(/^a1 OK/);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(500);
      held.c.close();
    } finally {
      await bus.close();
    }
  });

  it('Redis down: logins are still routed (health by polling, limits locally)', async () => {
    await redis.stop();
    try {
      await sleep(300);
      const { c, answer } = await imapLogin(port('imap-plain'), 'alice', 'alice-pass');
      expect(answer).toMatch(/^a1 OK/);
      c.close();
      const bad = await imapLogin(port('imap-plain'), 'alice', 'nope');
      expect(bad.answer).toMatch(/AUTHENTICATIONFAILED/);
      bad.c.close();
    } finally {
      await redis.start();
    }
  });

  it('HAProxy (TCP mode, send-proxy-v2) in front of the proxy: the backend sees the original client', async () => {
    const front = await freePort();
    const cfg = join(dir.path, 'haproxy.cfg');
    writeFileSync(
      cfg,
      [
        'global',
        '  maxconn 200',
        'defaults',
        '  mode tcp',
        '  timeout connect 2s',
        '  timeout client 30s',
        '  timeout server 30s',
        'frontend imap',
        `  bind 127.0.0.1:${front}`,
        '  default_backend proxies',
        'backend proxies',
        `  server p1 127.0.0.1:${port('imap-plain')} send-proxy-v2 source 127.0.0.2`,
        '',
      ].join('\n'),
    );
    const haproxy = startProcess('haproxy', 'haproxy', ['-db', '-f', cfg]);
    try {
      await waitForPort('127.0.0.1', front, 10_000, haproxy.alive);
      const { c, answer } = await imapLogin(front, 'carol', 'carol-pass', { localAddress: '127.0.0.3' });
      expect(answer).toMatch(/^a1 OK/);
      c.send('a2 LOGOUT');
      await c.closed;
      await waitFor(() => /Login: user=<carol>.*rip=127\.0\.0\.3/.test(dovA.log()), 5000, 'dovecot log with rip=127.0.0.3');
    } finally {
      await haproxy.stop();
    }
  });

  it('reload (SIGHUP path): new connections get the new certificate, a bad one is refused and the old kept', async () => {
    const fingerprint = async () => {
      const s = tls.connect({ host: '127.0.0.1', port: port('imaps'), rejectUnauthorized: false });
      await new Promise<void>((resolve, reject) => {
        s.once('secureConnect', () => resolve());
        s.once('error', reject);
      });
      const fp = s.getPeerCertificate().fingerprint256;
      s.destroy();
      return fp;
    };
    const before = await fingerprint();
    const next = makeTestCert(dir.path, 'proxy-next');
    await proxy.reload(baseConfig({ tls: { cert: next.certFile, key: next.keyFile } }));
    const after = await fingerprint();
    expect(after).not.toBe(before);
    await expect(proxy.reload(baseConfig({ tls: { cert: join(dir.path, 'missing.crt'), key: next.keyFile } }))).rejects.toThrow(/cannot load certificate/);
    expect(await fingerprint()).toBe(after);
  });

  it('limits: connections per address, sessions per user; SASL LOGIN and a cancelled AUTHENTICATE', async () => {
    const p4 = await startProxy(baseConfig({ id: 'proxy-test-4', limits: { maxConnectionsPerIp: 3, maxSessionsPerUser: 1 } }), {
      log: silentLogger,
      registry: createRegistry({}, false),
      directory,
    });
    const p4port = p4.listeners.find((l) => l.name === 'imap-plain')!.address.port;
    const open: LineClient[] = [];
    try {
      const first = await imapLogin(p4port, 'bob', 'bob-pass');
      open.push(first.c);
      expect(first.answer).toMatch(/^a1 OK/);
      // Same user again: over the per-user cap.
      const second = await imapLogin(p4port, 'bob', 'bob-pass');
      open.push(second.c);
      expect(second.answer).toMatch(/^a1 NO \[LIMIT\]/);
      // SASL LOGIN with continuations, and a cancelled exchange.
      const third = await LineClient.connect(p4port);
      open.push(third);
      await third.line();
      third.send('s1 AUTHENTICATE PLAIN');
      await third.until(/^\+/);
      third.send('*');
      expect(await third.until(/^s1 /)).toMatch(/^s1 BAD/);
      third.send('s2 AUTHENTICATE LOGIN');
      await third.until(/^\+ VXNlcm5hbWU6/);
      third.send(Buffer.from('dave').toString('base64'));
      await third.until(/^\+ UGFzc3dvcmQ6/);
      third.send(Buffer.from('dave-pass').toString('base64'));
      expect(await third.until(/^s2 /, 20_000)).toMatch(/^s2 OK/);
      // Fourth connection from the same address: refused.
      const fourth = await LineClient.connect(p4port);
      open.push(fourth);
      expect(await fourth.line()).toMatch(/^\* BYE \[UNAVAILABLE\] Too many connections/);
      await fourth.closed;
    } finally {
      for (const c of open) c.close();
      await p4.stop(200);
    }
  });

  it('graceful stop: stops accepting, closes sessions left after the grace time with BYE', async () => {
    const p3 = await startProxy(baseConfig({ id: 'proxy-test-3' }), { log: silentLogger, registry: createRegistry({}, false), directory });
    const p3port = p3.listeners.find((l) => l.name === 'imap-plain')!.address.port;
    const { c, answer } = await imapLogin(p3port, 'bob', 'bob-pass');
    expect(answer).toMatch(/^a1 OK/);
    const stopping = p3.stop(300);
    await expect(LineClient.connect(p3port)).rejects.toThrow();
    expect(await c.until(/^\* BYE/, 5000)).toMatch(/shutting down/);
    await c.closed;
    await stopping;
  });

  it('admin HTTP: /health, /sessions, /metrics', async () => {
    const h = await fetch(`${proxy.admin.url}/health`);
    expect(h.status).toBe(200);
    const body = (await h.json()) as { pairs: Array<{ pair: string }> };
    expect(body.pairs.map((p) => p.pair).sort()).toEqual(['pair-a', 'pair-b']);
    const s = await (await fetch(`${proxy.admin.url}/sessions`)).json();
    expect(s).toHaveProperty('total');
    const m = await (await fetch(`${proxy.admin.url}/metrics`)).text();
    expect(m).toMatch(/pairgate_logins_total\{protocol="imap",result="ok"\}/);
    expect(m).toMatch(/pairgate_proxy_bytes_total\{direction="out",protocol="imap"\}/);
    expect(m).toMatch(/pairgate_sessions_total\{protocol="imap",pair="pair-a",role="proxy"\}/);
  });
});
