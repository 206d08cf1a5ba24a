/**
 * The SMTP front ends (MX and submission) against two real Dovecot instances standing in for
 * two pairs (LMTP), the directory (LDIF backend when directory/index.ts is in the tree), the
 * proxy's real PairHealth following each pair's admin `/health` (a small HTTP server whose state
 * the test sets, as a pair-agent would), a smarthost (smtp-server) for relayed mail, and real
 * clients: nodemailer, swaks when installed, and raw sockets for exact reply codes.
 */
import net from 'node:net';
import tls from 'node:tls';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import nodemailer from 'nodemailer';
import { SMTPServer } from 'smtp-server';
import { V2ProxyProtocol, Command, TransportProtocol, IPv4ProxyAddress, IPv4Address } from 'proxy-protocol-js';
import { startSmtpFrontEnds, type SmtpFrontEnds } from '../../proxy/smtp/index.ts';
import { PairHealth } from '../../proxy/pair-health.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import { AuthError, NotFoundError } from '../../common/errors.ts';
import type { PairState } from '../../common/health.ts';
import type { Directory, PairRecord, UserRecord } from '../../directory/types.ts';
import { AddressList } from '../../common/cidr.ts';
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { openMailStore } from '../../pair-agent/store/index.ts';
import { startLmtpServer, type LmtpServer } from '../../pair-agent/store/lmtp.ts';
import type { MailStore } from '../../pair-agent/store/types.ts';
import { startDovecot, type Dovecot } from '../helpers/dovecot.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { RedisBus, keys } from '../../common/redis-bus.ts';
import { makeTestCert, type TestCert } from '../helpers/tls.ts';
import { tempDir } from '../helpers/proc.ts';
import { freePort, sleep, waitFor } from '../helpers/net.ts';
import { startProxy, proxyConfigSchema } from '../../proxy/index.ts';
import { pairAdmin } from './proxy-harness.ts';

const USERS: TestUser[] = [
  { uid: 'alice', password: 'alice-pass', pair: 'pair-a', aliases: ['postmaster@example.net'] },
  { uid: 'carol', password: 'carol-pass', pair: 'pair-a', aliases: [] },
  { uid: 'bob', password: 'bob-pass', pair: 'pair-b', aliases: ['robert@example.org'] },
];

const DIRECTORY_MODULE = join(dirname(fileURLToPath(import.meta.url)), '../../directory/index.ts');

function ssha(password: string): string {
  const salt = randomBytes(8);
  return `{SSHA}${Buffer.concat([createHash('sha1').update(password).update(salt).digest(), salt]).toString('base64')}`;
}

type TestUser = { uid: string; password: string; pair: string; aliases: string[] };

/**
 * Until directory/index.ts is in the tree, the same users and pairs are served by this small
 * in-test implementation of the Directory contract (only the calls the SMTP side makes).
 */
function tableDirectory(list: TestUser[], pairs: PairRecord[]): Directory {
  const users: UserRecord[] = list.map((u) => ({ dn: `uid=${u.uid},ou=people,dc=pairgate,dc=test`, uid: u.uid, mail: `${u.uid}@example.net`, aliases: u.aliases, pair: u.pair }));
  const byAddr = (a: string) => users.find((u) => u.mail === a.toLowerCase() || u.aliases.includes(a.toLowerCase())) ?? null;
  const unsupported = async (): Promise<never> => {
    throw new Error('not used by the SMTP tests');
  };
  return {
    findLogin: async (l) => users.find((u) => u.uid === l) ?? byAddr(l),
    findRecipient: async (a) => byAddr(a),
    authenticate: async (login, password) => {
      const u = users.find((x) => x.uid === login) ?? byAddr(login);
      if (!u || list.find((x) => x.uid === u.uid)!.password !== password) throw new AuthError('invalid credentials');
      return u;
    },
    routeFor: async (user) => {
      const pair = pairs.find((p) => p.id === user.pair);
      if (!pair) throw new NotFoundError(`no pair ${user.pair}`);
      return { user, pair };
    },
    listPairs: async () => pairs,
    getPair: async (id) => pairs.find((p) => p.id === id) ?? null,
    placeNewUser: unsupported,
    addUser: unsupported,
    setUserPair: async (uid, pair) => {
      const u = users.find((x) => x.uid === uid);
      if (!u) throw new NotFoundError(`no user ${uid}`);
      users[users.indexOf(u)] = { ...u, pair };
    },
    invalidate: async () => undefined,
    close: async () => undefined,
  };
}

/** The real directory (LDIF backend) when directory/index.ts exists, else tableDirectory. */
async function openTestDirectory(users: TestUser[], pairs: PairRecord[], dirPath: string): Promise<Directory> {
  if (!existsSync(DIRECTORY_MODULE)) return tableDirectory(users, pairs);
  const pairEntry = (p: PairRecord) =>
    `dn: ${p.dn}\nobjectClass: pairgatePair\ncn: ${p.id}\npairgateAddress: ${p.address}\npairgatePorts: lmtp=${p.ports.lmtp},admin=${p.ports.admin}\npairgateState: active\npairgateWeight: 100\n`;
  const userEntry = (u: TestUser) =>
    `dn: uid=${u.uid},ou=people,dc=pairgate,dc=test\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: ${u.uid}\ncn: ${u.uid}\nsn: ${u.uid}\nmail: ${u.uid}@example.net\n${u.aliases.map((a) => `mailLocalAddress: ${a}\n`).join('')}mailHost: ${u.pair}\nuserPassword: ${ssha(u.password)}\n`;
  const ldif = [
    'dn: dc=pairgate,dc=test\nobjectClass: dcObject\nobjectClass: organization\ndc: pairgate\no: test\n',
    'dn: ou=people,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: people\n',
    'dn: ou=pairs,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: pairs\n',
    ...pairs.map(pairEntry),
    ...users.map(userEntry),
  ].join('\n');
  const file = join(dirPath, 'directory.ldif');
  writeFileSync(file, ldif);
  const mod = (await import(pathToFileURL(DIRECTORY_MODULE).href)) as { openDirectory(c: unknown, d: { log: typeof silentLogger }): Promise<Directory> };
  return mod.openDirectory({ ldif: file }, { log: silentLogger });
}

function pairRecord(id: string, lmtp: number, admin: number): PairRecord {
  return { id, dn: `cn=${id},ou=pairs,dc=pairgate,dc=test`, address: '127.0.0.1', ports: { lmtp, admin }, state: 'active', weight: 100 };
}

/** startDovecot picks free ports just before binding them; another process can win that race. */
async function startDovecotRetrying(opts: Parameters<typeof startDovecot>[0]): Promise<Dovecot> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startDovecot(opts);
    } catch (err) {
      if (attempt >= 3 || !/Address already in use/.test(String((err as Error).message))) throw err;
    }
  }
}


/** A raw SMTP client: sends lines, reads complete replies (multi-line joined), bounded waits. */
class SmtpClient {
  private buf = '';
  private replies: string[] = [];
  private cur: string[] = [];
  private wake: (() => void) | null = null;
  ended = false;

  private constructor(public socket: net.Socket | tls.TLSSocket) {
    this.attach(socket);
  }

  private attach(socket: net.Socket | tls.TLSSocket) {
    socket.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).replace(/\r$/, '');
        this.buf = this.buf.slice(i + 1);
        this.cur.push(line);
        if (!/^\d{3}-/.test(line)) {
          this.replies.push(this.cur.join('\n'));
          this.cur = [];
        }
      }
      this.wake?.();
    });
    socket.on('error', () => undefined);
    socket.once('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }

  static async connect(port: number, opts: { prefix?: Buffer; localAddress?: string; tls?: boolean } = {}): Promise<SmtpClient> {
    const plain = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}) });
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    if (opts.prefix) plain.write(opts.prefix);
    if (!opts.tls) return new SmtpClient(plain);
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    return new SmtpClient(secure);
  }

  async reply(timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (this.replies.length === 0) {
      if (this.ended) throw new Error('connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a reply');
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
    return this.replies.shift()!;
  }

  async cmd(line: string, timeoutMs?: number): Promise<string> {
    this.socket.write(`${line}\r\n`);
    return this.reply(timeoutMs);
  }

  async starttls(): Promise<void> {
    this.socket.removeAllListeners('data');
    const secure = tls.connect({ socket: this.socket as net.Socket, rejectUnauthorized: false, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', () => resolve());
      secure.once('error', reject);
    });
    this.socket = secure;
    this.attach(secure);
  }

  close() {
    this.socket.destroy();
  }
}

function proxyV2(src: string, srcPort: number): Buffer {
  const p = src.split('.').map(Number);
  return Buffer.from(
    new V2ProxyProtocol(Command.PROXY, TransportProtocol.STREAM, new IPv4ProxyAddress(IPv4Address.createFrom(p), srcPort, IPv4Address.createFrom([127, 0, 0, 1]), 25)).build(),
  );
}

function deliveryIds(messages: Buffer[]): string[] {
  return messages.map((m) => /^X-Pairgate-Delivery-Id: (\S+)/m.exec(m.toString('latin1'))?.[1] ?? '(none)');
}

const withTag = (msgs: Buffer[], tag: string) => msgs.filter((m) => m.toString('latin1').includes(tag));

function message(tag: string, extra = ''): string {
  return `From: sender@remote.example\r\nTo: someone@example.net\r\nSubject: ${tag}\r\nMessage-ID: <${tag}@remote.example>\r\n${extra}\r\nbody of ${tag}\r\n.leading dot line\r\n`;
}

describe('proxy SMTP front ends: MX and submission over LMTP to two Dovecot pairs', () => {
  let dovA: Dovecot;
  let dovB: Dovecot;
  let adminA: Awaited<ReturnType<typeof pairAdmin>>;
  let adminB: Awaited<ReturnType<typeof pairAdmin>>;
  let cert: TestCert;
  let dir: { path: string; cleanup(): void };
  let directory: Directory;
  let health: PairHealth;
  let smtp: SmtpFrontEnds;
  let noRelay: SmtpFrontEnds;
  let smarthost: SMTPServer;
  let smarthostPort = 0;
  const relayed: Array<{ from: string; to: string[]; body: string }> = [];
  const registry = createRegistry({}, false);

  const setPair = async (admin: typeof adminA, pair: string, state: PairState, expected: string) => {
    admin.set(state);
    await waitFor(() => health.state(pair) === expected, 5000, `${pair} ${expected}`);
  };

  beforeAll(async () => {
    dir = tempDir('pairgate-smtp-test-');
    cert = makeTestCert(dir.path, 'proxy');
    const dovUsers = USERS.map((u) => ({ user: u.uid, password: `backend-${u.password}` }));
    [dovA, dovB, adminA, adminB] = await Promise.all([
      startDovecotRetrying({ users: dovUsers, trustedNetworks: '127.0.0.0/8' }),
      startDovecotRetrying({ users: dovUsers, trustedNetworks: '127.0.0.0/8' }),
      pairAdmin('pair-a'),
      pairAdmin('pair-b'),
    ]);
    const pairs = [pairRecord('pair-a', dovA.lmtpPort, adminA.port), pairRecord('pair-b', dovB.lmtpPort, adminB.port)];
    directory = await openTestDirectory(USERS, pairs, dir.path);
    health = new PairHealth({ log: silentLogger, directory, pollIntervalMs: 100, pollTimeoutMs: 400, ttlMs: 1500 });
    await health.start();

    smarthost = new SMTPServer({
      authOptional: true,
      disabledCommands: ['STARTTLS', 'AUTH'],
      logger: false,
      onRcptTo(addr, _s, cb) {
        if (addr.address.startsWith('nobody@')) return cb(Object.assign(new Error('5.1.1 no such user there'), { responseCode: 550 }));
        cb();
      },
      onData(stream, session, cb) {
        const parts: Buffer[] = [];
        stream.on('data', (d: Buffer) => parts.push(d));
        stream.on('end', () => {
          relayed.push({ from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '', to: session.envelope.rcptTo.map((r) => r.address), body: Buffer.concat(parts).toString() });
          cb();
        });
      },
    });
    await new Promise<void>((r) => smarthost.listen(0, '127.0.0.1', r));
    smarthostPort = (smarthost.server.address() as AddressInfo).port;

    const base = {
      tls: { cert: cert.certFile, key: cert.keyFile },
      loadBalancers: ['127.0.0.2/32'],
      hold: { maxMs: 3000, retryMs: 150 },
      authLimits: { windowMs: 60_000, maxPerIp: 4, maxPerLogin: 50, delayStepMs: 5, maxDelayMs: 20 },
    };
    smtp = await startSmtpFrontEnds(
      {
        ...base,
        smtp: {
          hostname: 'mx.test',
          localDomains: ['example.net'],
          listeners: [
            { kind: 'mx', host: '127.0.0.1', port: 0, tls: 'starttls' },
            { kind: 'submission', host: '127.0.0.1', port: 0, tls: 'starttls' },
            { kind: 'submission', host: '127.0.0.1', port: 0, tls: 'implicit' },
          ],
          limits: { maxMessageBytes: 64 * 1024, maxRecipients: 5, commandTimeoutMs: 3000 },
          smarthost: { host: '127.0.0.1', port: smarthostPort, timeoutMs: 5000 },
        },
      },
      { directory, pairHealth: health, log: silentLogger, registry },
    );
    noRelay = await startSmtpFrontEnds(
      { ...base, smtp: { hostname: 'sub.test', localDomains: ['example.net'], listeners: [{ kind: 'submission', host: '127.0.0.1', port: 0, tls: 'implicit' }] } },
      { directory, pairHealth: health, log: silentLogger, registry: createRegistry({}, false) },
    );
    await waitFor(() => health.state('pair-a') === 'ok' && health.state('pair-b') === 'ok', 5000, 'pairs ok');
  }, 60_000);

  afterAll(async () => {
    await smtp?.close(500);
    await noRelay?.close(500);
    await health?.close();
    await directory?.close();
    await new Promise<void>((r) => (smarthost ? smarthost.close(() => r()) : r()));
    await Promise.all([dovA?.close(), dovB?.close(), adminA?.close(), adminB?.close()]);
    dir?.cleanup();
  });

  const mxPort = () => smtp.address('mx')!.port;
  const mxTransport = () =>
    nodemailer.createTransport({ host: '127.0.0.1', port: mxPort(), secure: false, ignoreTLS: true, tls: { rejectUnauthorized: false }, connectionTimeout: 5000, socketTimeout: 20_000 } as never);

  it('MX: one message to three recipients on two pairs lands once in each mailbox, with one delivery id', async () => {
    const tag = `multi-${randomBytes(4).toString('hex')}`;
    const info = await mxTransport().sendMail({
      envelope: { from: 'sender@remote.example', to: ['alice@example.net', 'carol@example.net', 'robert@example.org'] },
      raw: message(tag, 'X-Pairgate-Delivery-Id: forged-by-sender\r\n'),
    });
    expect(info.response).toMatch(/^250 2\.\d\.\d Ok: delivered as pg1-/);
    const a = withTag(dovA.messages('alice'), tag);
    const c = withTag(dovA.messages('carol'), tag);
    const b = withTag(dovB.messages('bob'), tag);
    expect([a.length, c.length, b.length]).toEqual([1, 1, 1]);
    expect(withTag(dovB.messages('alice'), tag)).toHaveLength(0);
    expect(withTag(dovA.messages('bob'), tag)).toHaveLength(0);
    const ids = deliveryIds([a[0]!, c[0]!, b[0]!]);
    expect(new Set(ids).size).toBe(1);
    expect(ids[0]).toMatch(/^pg1-[0-9a-f]{40}$/);
    // The sender's own header is gone; dot-stuffing round-tripped; a Received header was added.
    const text = a[0]!.toString();
    expect(text).not.toContain('forged-by-sender');
    expect(text).toContain('\n.leading dot line');
    expect(text).toMatch(/Received: from .*\s+by mx\.test \(pairgate\) with ESMTP/);
  });

  it('MX: unknown local recipient 550 5.1.1, relay attempt 550 5.7.1, order and syntax errors', async () => {
    const c = await SmtpClient.connect(mxPort());
    expect(await c.reply()).toMatch(/^220 /);
    expect(await c.cmd('EHLO client.test')).toMatch(/^250-mx\.test/);
    expect(await c.cmd('RCPT TO:<alice@example.net>')).toMatch(/^503 /);
    expect(await c.cmd('MAIL FROM:<a@remote.example>')).toMatch(/^250 /);
    expect(await c.cmd('RCPT TO:<nosuchuser@example.net>')).toMatch(/^550 5\.1\.1 /);
    expect(await c.cmd('RCPT TO:<victim@elsewhere.example>')).toMatch(/^550 5\.7\.1 /);
    expect(await c.cmd('RCPT TO:<victim%elsewhere.example@example.net>')).toMatch(/^550 5\.1\.1 /);
    expect(await c.cmd('RCPT TO:<bad address>')).toMatch(/^501 /);
    expect(await c.cmd('AUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3M=')).toMatch(/^5\d\d /);
    expect(await c.cmd('DATA')).toMatch(/^503 /);
    expect(await c.cmd('FOOBAR baz')).toMatch(/^500 /);
    expect(await c.cmd('QUIT')).toMatch(/^221 /);
    c.close();
    const long = await SmtpClient.connect(mxPort());
    await long.reply();
    expect(await long.cmd(`NOOP ${'x'.repeat(5000)}`)).toMatch(/^(5\d\d|421) .*too long/i);
    await waitFor(() => long.ended, 5000, 'connection closed after an over-long line');
    const snapshot = await registry.getSingleMetric('pairgate_smtp_rejects_total')!.get();
    const reasons = snapshot.values.map((v) => v.labels.reason);
    expect(reasons).toEqual(expect.arrayContaining(['unknown-recipient', 'relay-denied']));
  });

  it('MX: garbage and binary input gets protocol errors, then the connection closes; the server lives on', async () => {
    const c = await SmtpClient.connect(mxPort());
    await c.reply();
    for (let i = 0; i < 12 && !c.ended; i++) {
      c.socket.write(Buffer.concat([randomBytes(40).map((b) => (b === 10 || b === 13 ? 65 : b)), Buffer.from('\r\n')]));
      try {
        expect(await c.reply(3000)).toMatch(/^(5\d\d|421) /);
      } catch {
        break;
      }
    }
    await waitFor(() => c.ended, 5000, 'connection closed after too many bad commands');
    const d = await SmtpClient.connect(mxPort());
    expect(await d.reply()).toMatch(/^220 /);
    d.close();
  });

  it('MX: seeded wire fuzz (random command fragments in 1/3/17-byte chunks) never stops the server', async () => {
    const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 100000);
    let x = seed || 1;
    const r = () => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      return (x >>> 0) / 2 ** 32;
    };
    const words = ['EHLO a', 'HELO b', 'MAIL FROM:<a@b>', 'MAIL FROM:<>', 'RCPT TO:<alice@example.net>', 'RCPT TO:<x@y>', 'DATA', '.', 'RSET', 'NOOP', 'VRFY x', 'STARTTLS', 'AUTH LOGIN', 'BDAT 10', 'XCLIENT ADDR=1.2.3.4', '\x00\xff', 'MAIL FROM:<a@b> SIZE=abc', 'RCPT TO:<"q\r"@x>', '...'];
    const session = async (n: number) => {
      const c = await SmtpClient.connect(mxPort());
      await c.reply().catch(() => undefined);
      let wire = '';
      for (let i = 0; i < 12; i++) wire += words[Math.floor(r() * words.length)] + (r() < 0.9 ? '\r\n' : '\n');
      const buf = Buffer.from(wire + 'QUIT\r\n', 'latin1');
      const step = [1, 3, 17][n % 3]!;
      for (let i = 0; i < buf.length && !c.ended; i += step) c.socket.write(buf.subarray(i, i + step));
      await waitFor(() => c.ended, 4000, 'session end').catch(() => undefined);
      c.close();
    };
    await Promise.all(Array.from({ length: 12 }, (_, n) => session(n)));
    const tag = `afterfuzz-${seed}`;
    const info = await mxTransport().sendMail({ envelope: { from: 'sender@remote.example', to: ['carol@example.net'] }, raw: message(tag) });
    expect(info.response, `seed ${seed}`).toMatch(/^250 /);
  });

  it('MX: size limit (SIZE= and a DATA body over the limit) answers 552', async () => {
    const c = await SmtpClient.connect(mxPort());
    await c.reply();
    await c.cmd('EHLO client.test');
    expect(await c.cmd('MAIL FROM:<a@remote.example> SIZE=999999999')).toMatch(/^552 /);
    expect(await c.cmd('MAIL FROM:<a@remote.example>')).toMatch(/^250 /);
    expect(await c.cmd('RCPT TO:<carol@example.net>')).toMatch(/^250 /);
    expect(await c.cmd('DATA')).toMatch(/^354 /);
    const line = 'x'.repeat(998) + '\r\n';
    for (let i = 0; i < 80; i++) c.socket.write(line);
    expect(await c.cmd('.')).toMatch(/^552 5\.3\.4 /);
    c.close();
  });

  it('MX: an idle client is closed with 421 after the command timeout', async () => {
    const c = await SmtpClient.connect(mxPort());
    await c.reply();
    await c.cmd('EHLO idle.test');
    const t0 = Date.now();
    expect(await c.reply(8000)).toMatch(/^421 /);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(2500);
    await waitFor(() => c.ended, 3000, 'idle connection closed');
  });

  it('MX: too many recipients gets 452', async () => {
    const c = await SmtpClient.connect(mxPort());
    await c.reply();
    await c.cmd('EHLO client.test');
    await c.cmd('MAIL FROM:<a@remote.example>');
    for (let i = 0; i < 5; i++) expect(await c.cmd(`RCPT TO:<${i % 2 ? 'alice' : 'carol'}+${i}@example.net>`)).toMatch(/^(250|550) /);
    c.close();
    const d = await SmtpClient.connect(mxPort());
    await d.reply();
    await d.cmd('EHLO client.test');
    await d.cmd('MAIL FROM:<a@remote.example>');
    const rcpts = ['alice@example.net', 'carol@example.net', 'robert@example.org', 'bob@example.net', 'postmaster@example.net'];
    for (const r of rcpts) expect(await d.cmd(`RCPT TO:<${r}>`)).toMatch(/^250 /);
    expect(await d.cmd('RCPT TO:<alice@example.net>')).toMatch(/^250 /); // the same recipient again is not a new one
    d.socket.write('RSET\r\n');
    await d.reply();
    d.close();
  });

  it('MX: three recipients on two pairs, one pair down: 451 4.3.2 at RCPT for its recipient, the others delivered; the retry after recovery adds no duplicate', async () => {
    const tag = `down-${randomBytes(4).toString('hex')}`;
    const raw = message(tag);
    await setPair(adminB, 'pair-b', 'down', 'down');
    try {
      const c = await SmtpClient.connect(mxPort());
      await c.reply();
      await c.cmd('EHLO client.test');
      await c.cmd('MAIL FROM:<a@remote.example>');
      expect(await c.cmd('RCPT TO:<alice@example.net>')).toMatch(/^250 /);
      expect(await c.cmd('RCPT TO:<bob@example.net>')).toMatch(/^451 4\.3\.2 /);
      expect(await c.cmd('RCPT TO:<carol@example.net>')).toMatch(/^250 /);
      expect(await c.cmd('DATA')).toMatch(/^354 /);
      expect(await c.cmd(`${raw}.`, 20_000)).toMatch(/^250 /);
      c.close();
      const got = withTag(dovA.messages('alice'), tag);
      expect(got).toHaveLength(1);
      expect(withTag(dovA.messages('carol'), tag)).toHaveLength(1);
      expect(withTag(dovB.messages('bob'), tag)).toHaveLength(0);
    } finally {
      await setPair(adminB, 'pair-b', 'ok', 'ok');
    }
    // The sender retries what got 451 (bob only, as an MTA queues per recipient): bob gets it
    // once, alice and carol still hold exactly one copy, and no pair holds it for anyone else.
    const info = await mxTransport().sendMail({ envelope: { from: 'a@remote.example', to: ['bob@example.net'] }, raw });
    expect(info.response).toMatch(/^250 /);
    const bobs = withTag(dovB.messages('bob'), tag);
    expect(bobs).toHaveLength(1);
    // The pair saw the recipient rewritten to <uid>@<pair-id> (Dovecot's Received header names a
    // single recipient).
    expect(bobs[0]!.toString()).toMatch(/for <bob@pair-b>/);
    expect(withTag(dovA.messages('alice'), tag)).toHaveLength(1);
    expect(withTag(dovA.messages('carol'), tag)).toHaveLength(1);
    for (const u of ['alice', 'carol']) expect(withTag(dovB.messages(u), tag), `${u} on pair-b`).toHaveLength(0);
    expect(withTag(dovA.messages('bob'), tag)).toHaveLength(0);
  });

  it('MX: a pair failing at DATA gives 451 for the message; the retry carries the same delivery id', async () => {
    const tag = `retry-${randomBytes(4).toString('hex')}`;
    const raw = message(tag);
    await dovB.stop(); // health still says ok: LMTP refuses, the delivery holds (3 s) then fails
    let first: string;
    try {
      const c = await SmtpClient.connect(mxPort());
      await c.reply();
      await c.cmd('EHLO client.test');
      await c.cmd('MAIL FROM:<sender@remote.example>');
      expect(await c.cmd('RCPT TO:<alice@example.net>')).toMatch(/^250 /);
      expect(await c.cmd('RCPT TO:<bob@example.net>')).toMatch(/^250 /);
      await c.cmd('DATA');
      first = await c.cmd(`${raw}.`, 20_000);
      c.close();
    } finally {
      await dovB.start();
    }
    expect(first).toMatch(/^451 4\.4\.1 /);
    expect(withTag(dovA.messages('alice'), tag)).toHaveLength(1);
    // The sender retries the same message: 250, bob gets it, and alice's pair is sent the same
    // delivery id again (a pairgate store drops it as a duplicate; Dovecot stores what it gets).
    const info = await mxTransport().sendMail({ envelope: { from: 'sender@remote.example', to: ['alice@example.net', 'bob@example.net'] }, raw });
    expect(info.response).toMatch(/^250 /);
    const bobs = withTag(dovB.messages('bob'), tag);
    const alices = withTag(dovA.messages('alice'), tag);
    expect(bobs).toHaveLength(1);
    expect(alices).toHaveLength(2);
    const ids = deliveryIds([...alices, ...bobs]);
    expect(new Set(ids).size).toBe(1);
  });

  it('MX: a pair in maintenance gets 451 4.3.2 at RCPT at once', async () => {
    await setPair(adminB, 'pair-b', 'maintenance', 'maintenance');
    try {
      const c = await SmtpClient.connect(mxPort());
      await c.reply();
      await c.cmd('EHLO client.test');
      await c.cmd('MAIL FROM:<a@remote.example>');
      expect(await c.cmd('RCPT TO:<bob@example.net>')).toMatch(/^451 4\.3\.2 /);
      expect(await c.cmd('RCPT TO:<alice@example.net>')).toMatch(/^250 /);
      c.close();
    } finally {
      await setPair(adminB, 'pair-b', 'ok', 'ok');
    }
  });

  it('MX: a pair failing over holds the delivery until it serves again', async () => {
    await setPair(adminB, 'pair-b', 'failing-over', 'failing-over');
    const tag = `hold-${randomBytes(4).toString('hex')}`;
    const t = setTimeout(() => adminB.set('ok'), 400);
    try {
      const info = await mxTransport().sendMail({ envelope: { from: 'sender@remote.example', to: ['bob@example.net'] }, raw: message(tag) });
      expect(info.response).toMatch(/^250 /);
      expect(withTag(dovB.messages('bob'), tag)).toHaveLength(1);
    } finally {
      clearTimeout(t);
      await setPair(adminB, 'pair-b', 'ok', 'ok');
    }
  });

  it('MX behind a load balancer: PROXY v2 address is the client address (Received header, Dovecot log via XCLIENT)', async () => {
    const tag = `lb-${randomBytes(4).toString('hex')}`;
    const c = await SmtpClient.connect(mxPort(), { localAddress: '127.0.0.2', prefix: proxyV2('198.51.100.7', 40123) });
    expect(await c.reply()).toMatch(/^220 /);
    await c.cmd('EHLO client.test');
    await c.cmd('MAIL FROM:<a@remote.example>');
    expect(await c.cmd('RCPT TO:<carol@example.net>')).toMatch(/^250 /);
    await c.cmd('DATA');
    expect(await c.cmd(`${message(tag)}.`, 20_000)).toMatch(/^250 /);
    c.close();
    const got = withTag(dovA.messages('carol'), tag);
    expect(got).toHaveLength(1);
    expect(got[0]!.toString()).toContain('[198.51.100.7]');
    // The pair's LMTP session was moved to the client's address with XCLIENT.
    expect(got[0]!.toString()).toMatch(/\nReceived: from mx\.test \(\[198\.51\.100\.7\]\)\r?\n\s+by \S+ with LMTP/);
    // Without a PROXY header from the load balancer's address the connection is dropped.
    const d = await SmtpClient.connect(mxPort(), { localAddress: '127.0.0.2' });
    d.socket.write('EHLO x\r\n');
    await waitFor(() => d.ended, 8000, 'connection without PROXY header closed');
  });

  it('submission: AUTH required, and only after STARTTLS; wrong passwords throttled', async () => {
    const subPort = smtp.address('submission', 'starttls')!.port;
    // From its own client address (through the load balancer), so the lock-out stays there.
    const c = await SmtpClient.connect(subPort, { localAddress: '127.0.0.2', prefix: proxyV2('203.0.113.9', 5555) });
    await c.reply();
    const ehlo = await c.cmd('EHLO client.test');
    expect(ehlo).toContain('STARTTLS');
    expect(ehlo).not.toMatch(/AUTH/);
    expect(await c.cmd('MAIL FROM:<alice@example.net>')).toMatch(/^530 5\.7\.0 /);
    expect(await c.cmd('AUTH PLAIN AGFsaWNlAGFsaWNlLXBhc3M=')).toMatch(/^5\d\d /);
    expect(await c.cmd('STARTTLS')).toMatch(/^220 /);
    await c.starttls();
    expect(await c.cmd('EHLO client.test')).toMatch(/AUTH PLAIN LOGIN/);
    expect(await c.cmd('MAIL FROM:<alice@example.net>')).toMatch(/^530 /);
    const plain = (u: string, p: string) => Buffer.from(`\0${u}\0${p}`).toString('base64');
    expect(await c.cmd(`AUTH PLAIN ${plain('car\r\nol', 'x')}`)).toMatch(/^5\d\d /);
    for (let i = 0; i < 4; i++) expect(await c.cmd(`AUTH PLAIN ${plain('carol', 'wrong')}`)).toMatch(/^535 5\.7\.8 /);
    expect(await c.cmd(`AUTH PLAIN ${plain('carol', 'carol-pass')}`)).toMatch(/^454 4\.7\.0 /);
    c.close();
  });

  it('submission: local recipients over LMTP, others through the smarthost; sender must be owned', async () => {
    const tag = `sub-${randomBytes(4).toString('hex')}`;
    const transport = nodemailer.createTransport({
      host: '127.0.0.1',
      port: smtp.address('submission', 'implicit')!.port,
      secure: true,
      tls: { rejectUnauthorized: false },
      auth: { user: 'bob', pass: 'bob-pass' },
      connectionTimeout: 5000,
      socketTimeout: 20_000,
    });
    const info = await transport.sendMail({ envelope: { from: 'robert@example.org', to: ['alice@example.net', 'friend@far.example'] }, raw: message(tag) });
    expect(info.accepted).toEqual(['alice@example.net', 'friend@far.example']);
    expect(withTag(dovA.messages('alice'), tag)).toHaveLength(1);
    const r = relayed.find((m) => m.body.includes(tag));
    expect(r?.to).toEqual(['friend@far.example']);
    expect(r?.body).not.toContain('X-Pairgate-Delivery-Id');
    await expect(transport.sendMail({ envelope: { from: 'alice@example.net', to: ['alice@example.net'] }, raw: message(`${tag}-spoof`) })).rejects.toMatchObject({ responseCode: 553 });
    transport.close();
  });

  it('submission without a smarthost refuses non-local recipients 550 5.7.1 (swaks when installed)', async () => {
    const port = noRelay.address('submission', 'implicit')!.port;
    const c = await SmtpClient.connect(port, { tls: true });
    await c.reply();
    await c.cmd('EHLO client.test');
    expect(await c.cmd(`AUTH PLAIN ${Buffer.from('\0alice\0alice-pass').toString('base64')}`)).toMatch(/^235 /);
    await c.cmd('MAIL FROM:<alice@example.net>');
    expect(await c.cmd('RCPT TO:<friend@far.example>')).toMatch(/^550 5\.7\.1 /);
    expect(await c.cmd('RCPT TO:<carol@example.net>')).toMatch(/^250 /);
    c.close();
    if (existsSync('/usr/bin/swaks')) {
      const out = await new Promise<string>((resolve) => {
        execFile(
          'swaks',
          ['--server', '127.0.0.1', '--port', String(port), '--tlsc', '--auth', 'PLAIN', '--auth-user', 'alice', '--auth-password', 'alice-pass', '--from', 'alice@example.net', '--to', 'carol@example.net', '--header', 'Subject: swaks-submission', '--timeout', '15'],
          { timeout: 30_000 },
          (_err, stdout, stderr) => resolve(String(stdout) + String(stderr)),
        );
      });
      expect(out).toMatch(/<~\s+250 2\.\d\.\d Ok: delivered as/);
      await waitFor(() => withTag(dovA.messages('carol'), 'swaks-submission').length >= 1, 5000, 'swaks message at carol');
    }
  });

  it('runs inside `pairgate proxy` (startProxy with an smtp section), metrics on its admin listener', async () => {
    const port = await freePort();
    const config = proxyConfigSchema.parse({
      directory: {},
      backend: { masterUser: 'm', masterSecret: 'secret-secret' },
      health: { pollIntervalMs: 100, pollTimeoutMs: 400, ttlMs: 1500 },
      hold: { maxMs: 1500, retryMs: 150 },
      smtp: { hostname: 'proxy-mx.test', localDomains: ['example.net'], listeners: [{ kind: 'mx', host: '127.0.0.1', port, tls: 'none' }] },
    });
    const proxy = await startProxy(config, { log: silentLogger, registry: createRegistry({}, false), directory });
    try {
      const tag = `viaproxy-${randomBytes(4).toString('hex')}`;
      const transport = nodemailer.createTransport({ host: '127.0.0.1', port, secure: false, ignoreTLS: true, connectionTimeout: 5000, socketTimeout: 20_000 } as never);
      const info = await transport.sendMail({ envelope: { from: 'x@remote.example', to: ['carol@example.net', 'bob@example.net'] }, raw: message(tag) });
      expect(info.response).toMatch(/^250 /);
      expect(withTag(dovA.messages('carol'), tag)).toHaveLength(1);
      expect(withTag(dovB.messages('bob'), tag)).toHaveLength(1);
      const metrics = await (await fetch(`${proxy.admin.url}/metrics`)).text();
      expect(metrics).toMatch(/pairgate_sessions_total\{protocol="smtp",pair="",role="proxy"\} 1/);
      expect(metrics).toMatch(/pairgate_deliveries_total\{result="ok"\} 2/);
    } finally {
      await proxy.stop(500);
    }
    // Stopped: the SMTP listener is gone too.
    await expect(new Promise((resolve, reject) => net.connect(port, '127.0.0.1').once('connect', resolve).once('error', reject))).rejects.toThrow();
  });

  it('reloads the certificate for STARTTLS and implicit TLS (SIGHUP)', async () => {
    const peerCert = async (port: number, starttls: boolean) => {
      const c = await SmtpClient.connect(port, { tls: !starttls });
      await c.reply();
      if (starttls) {
        await c.cmd('EHLO x');
        await c.cmd('STARTTLS');
        await c.starttls();
      }
      const fp = (c.socket as tls.TLSSocket).getPeerCertificate().fingerprint256;
      c.close();
      return fp;
    };
    const before = [await peerCert(smtp.address('submission', 'starttls')!.port, true), await peerCert(smtp.address('submission', 'implicit')!.port, false)];
    const next = makeTestCert(dir.path, 'proxy-next');
    expect(() => smtp.reloadTls({ cert: join(dir.path, 'missing.crt'), key: next.keyFile })).toThrow(/missing\.crt/);
    smtp.reloadTls({ cert: next.certFile, key: next.keyFile });
    const after = [await peerCert(smtp.address('submission', 'starttls')!.port, true), await peerCert(smtp.address('submission', 'implicit')!.port, false)];
    expect(before[0]).toBe(before[1]);
    expect(after[0]).toBe(after[1]);
    expect(after[0]).not.toBe(before[0]);
  });

  it('a session that used STARTTLS or implicit TLS frees its per-address slot and the open-session gauge when it ends', async () => {
    // smtp-server strips the socket's listeners when STARTTLS upgrades it; the front end must
    // still see the end. With 2 slots per address, sessions 3 to 6 are only served if each
    // ended one was counted out.
    const limitedRegistry = createRegistry({}, false);
    const limited = await startSmtpFrontEnds(
      {
        tls: { cert: cert.certFile, key: cert.keyFile },
        smtp: {
          hostname: 'limited.test',
          localDomains: ['example.net'],
          listeners: [
            { kind: 'mx', host: '127.0.0.1', port: 0, tls: 'starttls' },
            { kind: 'submission', host: '127.0.0.1', port: 0, tls: 'implicit' },
          ],
          limits: { maxConnectionsPerIp: 2 },
        },
      },
      { directory, pairHealth: health, log: silentLogger, registry: limitedRegistry },
    );
    try {
      const open = async () => (await limitedRegistry.getSingleMetric('pairgate_sessions')!.get()).values.find((v) => v.labels.protocol === 'smtp')?.value ?? 0;
      for (let i = 0; i < 6; i++) {
        const implicit = i % 2 === 1;
        const c = await SmtpClient.connect(limited.address(implicit ? 'submission' : 'mx', implicit ? 'implicit' : 'starttls')!.port, { tls: implicit });
        expect(await c.reply(), `session ${i}`).toMatch(/^220 /);
        if (!implicit) {
          expect(await c.cmd('EHLO client.test')).toContain('STARTTLS');
          expect(await c.cmd('STARTTLS')).toMatch(/^220 /);
          await c.starttls();
        }
        expect(await c.cmd('EHLO client.test')).toMatch(/^250/);
        expect(await c.cmd('QUIT')).toMatch(/^221 /);
        await waitFor(async () => (await open()) === 0, 5000, `session ${i} counted out`);
      }
    } finally {
      await limited.close(500);
    }
  });

  it('counts sessions and deliveries in the metrics', async () => {
    await sleep(50);
    const deliveries = await registry.getSingleMetric('pairgate_deliveries_total')!.get();
    const ok = deliveries.values.find((v) => v.labels.result === 'ok')?.value ?? 0;
    expect(ok).toBeGreaterThanOrEqual(5);
    const total = await registry.getSingleMetric('pairgate_sessions_total')!.get();
    expect(total.values.find((v) => v.labels.protocol === 'smtp')?.value ?? 0).toBeGreaterThan(5);
    expect(await registry.getSingleMetric('pairgate_delivery_seconds')!.get()).toBeTruthy();
  });
});

describe('proxy SMTP front ends with pairgate store pairs: the retry is stored once, per-recipient refusals', () => {
  const SUSERS: TestUser[] = [
    { uid: 'dana', password: 'dana-pass', pair: 'pair-s1', aliases: [] },
    { uid: 'full', password: 'full-pass', pair: 'pair-s1', aliases: [] },
    { uid: 'erin', password: 'erin-pass', pair: 'pair-s2', aliases: [] },
  ];
  const QUOTA = 200_000;
  let dir: { path: string; cleanup(): void };
  const devices: FileBlockDevice[] = [];
  const stores: MailStore[] = [];
  const lmtps: LmtpServer[] = [];
  const admins: Array<Awaited<ReturnType<typeof pairAdmin>>> = [];
  let directory: Directory;
  let health: PairHealth;
  let smtp: SmtpFrontEnds;
  let redis: RedisServer;
  let bus: RedisBus;

  const startLmtp = (i: number, port = 0) =>
    startLmtpServer({ store: stores[i]!, host: '127.0.0.1', port, log: silentLogger, registry: createRegistry({}, false), trusted: new AddressList(['127.0.0.0/8']) });

  beforeAll(async () => {
    dir = tempDir('pairgate-smtp-store-');
    redis = await startRedis();
    bus = new RedisBus({ url: redis.url, log: silentLogger });
    for (let i = 0; i < 2; i++) {
      devices.push(await FileBlockDevice.open(join(dir.path, `vol${i}.img`), { size: 32 * 1024 * 1024, create: true }));
      stores.push(await openMailStore(devices[i]!, { log: silentLogger, quotaBytes: QUOTA, format: true, compactBytesPerSec: 0 }));
      lmtps.push(await startLmtp(i));
      admins.push(await pairAdmin(`pair-s${i + 1}`));
    }
    const pairs = [pairRecord('pair-s1', lmtps[0]!.port, admins[0]!.port), pairRecord('pair-s2', lmtps[1]!.port, admins[1]!.port)];
    directory = await openTestDirectory(SUSERS, pairs, dir.path);
    health = new PairHealth({ log: silentLogger, directory, pollIntervalMs: 100, pollTimeoutMs: 400, ttlMs: 1500 });
    await health.start();
    smtp = await startSmtpFrontEnds(
      { redis: { url: redis.url, connectTimeoutMs: 1000, commandTimeoutMs: 500 }, hold: { maxMs: 2000, retryMs: 100 }, smtp: { hostname: 'mx2.test', localDomains: ['example.net'], listeners: [{ kind: 'mx', host: '127.0.0.1', port: 0, tls: 'none' }] } },
      { directory, pairHealth: health, log: silentLogger, registry: createRegistry({}, false) },
    );
    await waitFor(() => health.state('pair-s1') === 'ok' && health.state('pair-s2') === 'ok', 5000, 'pairs ok');
  }, 60_000);

  afterAll(async () => {
    await smtp?.close(500);
    await health?.close();
    await directory?.close();
    for (const l of lmtps) await l.close().catch(() => undefined);
    for (const st of stores) await st.close().catch(() => undefined);
    for (const d of devices) await d.close().catch(() => undefined);
    for (const a of admins) await a.close();
    await bus?.close();
    await redis?.close();
    dir?.cleanup();
  });

  const send = (to: string[], raw: string, from = 'sender@remote.example') =>
    nodemailer
      .createTransport({ host: '127.0.0.1', port: smtp.address('mx')!.port, secure: false, ignoreTLS: true, connectionTimeout: 5000, socketTimeout: 20_000 } as never)
      .sendMail({ envelope: { from, to }, raw })
      .then(
        (info) => info.response as string,
        (err: { response?: string }) => err.response ?? String(err),
      );

  const count = async (i: number, user: string) => (await stores[i]!.listMessages(user, 'INBOX').catch(() => [])).length;

  it('a pair failing at DATA gives 451; the retry reaches the other pair and is not stored twice where it was', async () => {
    const raw = message(`store-retry-${randomBytes(4).toString('hex')}`);
    const [d0, e0] = [await count(0, 'dana'), await count(1, 'erin')];
    const port2 = lmtps[1]!.port;
    await lmtps[1]!.close();
    let first: string;
    try {
      first = await send(['dana@example.net', 'erin@example.net'], raw);
    } finally {
      lmtps[1] = await startLmtp(1, port2);
    }
    expect(first).toMatch(/^451 4\.4\.1 /);
    expect(await count(0, 'dana')).toBe(d0 + 1);
    expect(await send(['dana@example.net', 'erin@example.net'], raw)).toMatch(/^250 /);
    expect(await count(0, 'dana')).toBe(d0 + 1);
    expect(await count(1, 'erin')).toBe(e0 + 1);
  });

  it('per-recipient permanent refusals: all refused -> 552 5.2.2; some refused -> 250 for the others and a bounce', async () => {
    await stores[0]!.deliver('fill-full', ['full'], Buffer.from(`Subject: fill\r\n\r\n${'f'.repeat(QUOTA - 2000)}\r\n`));
    const tag = `quota-${randomBytes(4).toString('hex')}`;
    const big = message(tag, `X-Fill: ${'q'.repeat(5000)}\r\n`);
    expect(await send(['full@example.net'], big)).toMatch(/^552 5\.2\.2 /);
    const [d0, e0] = [await count(0, 'dana'), await count(1, 'erin')];
    // From a local sender (erin, on the other pair): the bounce for `full` comes back to her.
    expect(await send(['full@example.net', 'dana@example.net'], big, 'erin@example.net')).toMatch(/^250 /);
    expect(await count(0, 'dana')).toBe(d0 + 1);
    await waitFor(async () => (await count(1, 'erin')) === e0 + 1, 5000, 'bounce at erin');
    const metas = await stores[1]!.listMessages('erin', 'INBOX');
    const dsn = (await stores[1]!.readMessage(metas[metas.length - 1]!.bodyId)).toString();
    expect(dsn).toContain('multipart/report; report-type=delivery-status');
    expect(dsn).toMatch(/Final-Recipient: rfc822; full@example\.net\r\nAction: failed\r\nStatus: 5\.2\.2/);
    expect(dsn).toContain(`Subject: ${tag}`);
  });

  it('a user move in progress holds the delivery, then it goes to the new home pair; past the hold 451', async () => {
    await waitFor(() => bus.connected, 5000, 'redis');
    const [d1, d2] = [await count(0, 'dana'), await count(1, 'dana')];
    await bus.set(keys.userMove('dana'), 'moving', 30_000);
    const sending = send(['dana@example.net'], message(`move-${randomBytes(4).toString('hex')}`));
    await sleep(300);
    await directory.setUserPair('dana', 'pair-s2');
    await bus.del(keys.userMove('dana'));
    expect(await sending).toMatch(/^250 /);
    expect(await count(0, 'dana')).toBe(d1);
    expect(await count(1, 'dana')).toBe(d2 + 1);
    await bus.set(keys.userMove('erin'), 'moving', 30_000);
    try {
      expect(await send(['erin@example.net'], message(`stuck-${randomBytes(4).toString('hex')}`))).toMatch(/^451 4\.2\.0 /);
    } finally {
      await bus.del(keys.userMove('erin'));
    }
  });
});
