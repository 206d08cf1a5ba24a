/**
 * The store resource over real sockets: LMTP deliveries with nodemailer (per-recipient replies,
 * quota, size limit, idempotent retries, single-instance storage), POP3 with Python's poplib
 * and fetchmail (byte-identical retrieval, UIDL stable across a restart), master login trust,
 * maildrop locks, and bad input on raw sockets.
 */
import net from 'node:net';
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync, chmodSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import nodemailer from 'nodemailer';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { createStoreResource, storeConfigSchema, type StoreResource } from '../../pair-agent/store/resource.ts';
import { tempDir } from '../helpers/proc.ts';

const run = promisify(execFile);
const MASTER = { user: 'proxy-master', secret: 'master-secret-123' };
const QUOTA = 300_000;

let dir: { path: string; cleanup(): void };
let device: FileBlockDevice;
let res: StoreResource;
const registry = createRegistry({}, false);

function ports() {
  const p = res.ports();
  if (!p) throw new Error('store not running');
  return p;
}

const plain = (authz: string, authc: string, pw: string) => Buffer.from(`${authz}\0${authc}\0${pw}`).toString('base64');

/** A raw line client: `cmd` sends a line and reads until `done(text)`; every wait bounded. */
class Raw {
  buf = '';
  closed = false;
  private waiters: Array<() => void> = [];
  constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }
  private wake() {
    for (const w of this.waiters.splice(0)) w();
  }
  static async open(port: number, localAddress?: string): Promise<Raw> {
    const sock = net.connect({ port, host: '127.0.0.1', ...(localAddress ? { localAddress } : {}) });
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const r = new Raw(sock);
    await r.until((t) => t.includes('\r\n'));
    r.take();
    return r;
  }
  async until(done: (t: string) => boolean, ms = 5000): Promise<string> {
    const deadline = Date.now() + ms;
    while (!done(this.buf)) {
      if (this.closed) return this.buf;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout; have: ${this.buf.slice(-300)}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.buf;
  }
  take(): string {
    const t = this.buf;
    this.buf = '';
    return t;
  }
  async line(cmd: string): Promise<string> {
    this.sock.write(cmd + '\r\n');
    await this.until((t) => t.includes('\r\n'));
    const i = this.buf.indexOf('\r\n');
    const l = this.buf.slice(0, i);
    this.buf = this.buf.slice(i + 2);
    return l;
  }
  async multi(cmd: string): Promise<string> {
    this.sock.write(cmd + '\r\n');
    const t = await this.until((x) => x.startsWith('-ERR') ? x.includes('\r\n') : x.includes('\r\n.\r\n'));
    this.buf = '';
    return t;
  }
}

async function startResource() {
  const config = storeConfigSchema.parse({
    ports: { lmtp: 0, pop3: 0, imap: 0 },
    masterUser: MASTER.user,
    masterSecret: MASTER.secret,
    trusted: ['127.0.0.1/32'],
    users: { fetchuser: 'fetch-pass-1' },
    quotaBytes: QUOTA,
    maxMessageBytes: 2 * 1024 * 1024,
    compactBytesPerSec: 0,
    imap: { maxSessionsPerUser: 2, maxAuthFailures: 1 },
  });
  res = createStoreResource({ config, device, listenHost: '127.0.0.1', log: silentLogger, registry });
  await res.start();
}

async function lmtpSend(to: string[], raw: string | Buffer, envelopeFrom = 'sender@example.net') {
  const t = nodemailer.createTransport({ lmtp: true, host: '127.0.0.1', port: ports().lmtp, connectionTimeout: 5000, socketTimeout: 10_000 } as never);
  try {
    return await t.sendMail({ envelope: { from: envelopeFrom, to }, raw });
  } finally {
    t.close();
  }
}

const msg = (subject: string, body = 'Hello there.\r\n', extra = '') =>
  `From: Sender <sender@example.net>\r\nTo: undisclosed-recipients:;\r\nSubject: ${subject}\r\nMessage-ID: <${subject.replace(/\W/g, '')}@example.net>\r\n${extra}\r\n${body}`;

beforeAll(async () => {
  dir = tempDir('pairgate-store-srv-');
  device = await FileBlockDevice.open(join(dir.path, 'vol.img'), { size: 64 * 1024 * 1024, create: true });
  await startResource();
});

afterAll(async () => {
  await res?.stop();
  await device?.close();
  dir?.cleanup();
});

/** A raw LMTP session past LHLO and MAIL FROM, ready for RCPT TO. */
async function lmtpEnvelope(): Promise<Raw> {
  const raw = await Raw.open(ports().lmtp);
  expect(await raw.line('LHLO test')).toMatch(/^250/);
  await raw.until((t) => /^250 /m.test(t));
  raw.take();
  expect(await raw.line('MAIL FROM:<a@b>')).toMatch(/^250/);
  return raw;
}

describe('LMTP', () => {
  it('delivers to many recipients at once, storing the body once', async () => {
    const users = Array.from({ length: 10 }, (_, i) => `multi${i}@pair-01`);
    const body = msg('single instance', 'x'.repeat(100_000) + '\r\n');
    // Create the users first so that the growth measured is the delivery alone.
    for (const u of users) await res.store()!.ensureUser(u.split('@')[0]!);
    const before = (await res.store()!.stats()).bytesUsed;
    const info = await lmtpSend(users, body);
    expect(info.accepted).toHaveLength(10);
    const after = (await res.store()!.stats()).bytesUsed;
    expect(after - before).toBeGreaterThanOrEqual(body.length);
    expect(after - before).toBeLessThan(2 * body.length);
    const metas = await Promise.all(users.map((u) => res.store()!.listMessages(u.split('@')[0]!, 'INBOX')));
    expect(new Set(metas.map((m) => m[0]!.bodyId)).size).toBe(1);
    const text = await registry.metrics();
    expect(text).toMatch(/pairgate_deliveries_total\{result="ok"\} 10/);
    expect(text).toMatch(/pairgate_store_messages \d+/);
  });

  it('answers per recipient: quota refusal 552 5.2.2 next to a success', async () => {
    await lmtpSend(['fullbox@x'], msg('fill', 'f'.repeat(QUOTA - 1000) + '\r\n'));
    const raw = await lmtpEnvelope();
    expect(await raw.line('RCPT TO:<fullbox@example.net>')).toMatch(/^250/);
    expect(await raw.line('RCPT TO:<roomy@example.net>')).toMatch(/^250/);
    expect(await raw.line('DATA')).toMatch(/^354/);
    raw.sock.write(msg('over', 'o'.repeat(5000) + '\r\n') + '.\r\n');
    const replies = await raw.until((t) => t.split('\r\n').length >= 3);
    const lines = replies.split('\r\n').filter(Boolean);
    expect(lines[0]).toMatch(/^552 5\.2\.2 /);
    expect(lines[1]).toMatch(/^250 2\.\d\.\d /);
    raw.take();
    expect(await raw.line('QUIT')).toMatch(/^221/);
  });

  it('a connection cut in the middle of DATA stores nothing; the next delivery is whole', async () => {
    const store = res.store()!;
    const before = await store.stats();
    const raw = await lmtpEnvelope();
    expect(await raw.line('RCPT TO:<cutmid@example.net>')).toMatch(/^250/);
    expect(await raw.line('DATA')).toMatch(/^354/);
    // Half a message (no final dot), written out before the cut, so that the server has read it.
    await new Promise<void>((resolve) => raw.sock.write(msg('cut', 'c'.repeat(200_000) + '\r\n'), () => resolve()));
    await new Promise((r) => setTimeout(r, 100));
    raw.sock.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect(await store.listMessages('cutmid', 'INBOX').catch(() => [])).toHaveLength(0);
    expect((await store.stats()).messages).toBe(before.messages);
    expect((await store.stats()).bytesUsed - before.bytesUsed).toBeLessThan(100_000);
    const whole = msg('after the cut', 'whole\r\n');
    await lmtpSend(['cutmid@x'], whole);
    const list = await store.listMessages('cutmid', 'INBOX');
    expect(list).toHaveLength(1);
    expect((await store.readMessage(list[0]!.bodyId)).toString('latin1')).toBe(whole);
  });

  it('one connection, message after message into reused read buffers: every stored body is byte-identical (one sent ahead of its 354)', async () => {
    // Bodies from 1 byte to past a ReadArena slab (256 KiB), with dot-stuffed lines, each one
    // different, so that a slab reused while a view of it was still in use would show.
    let seed = 7;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n);
    const body = (size: number) => {
      let out = '';
      while (out.length < size) {
        const len = rnd(90);
        out += (rnd(8) === 0 ? '.' : '') + Array.from({ length: len }, () => String.fromCharCode(33 + rnd(94))).join('') + '\r\n';
      }
      return out;
    };
    const sizes = [1, 100, 65_000, 70_000, 262_100, 262_200, 5_000, 290_000, 200_000, 120_000, 280_000, 3, 150_000, 270_000];
    const messages = sizes.map((size, i) => msg(`arena ${i}`, body(size)));
    const raw = await Raw.open(ports().lmtp);
    expect(await raw.line('LHLO test')).toMatch(/^250/);
    await raw.until((t) => /^250 /m.test(t));
    raw.take();
    const stuffed = (m: string) => Buffer.from(m.replace(/^\./gm, '..') + '.\r\n', 'latin1');
    const replies = async (n: number) => {
      const t = await raw.until((x) => x.split('\r\n').length > n, 20_000);
      raw.take();
      return t.split('\r\n').filter(Boolean);
    };
    const envelopeOf = (i: number) => `MAIL FROM:<a@b>\r\nRCPT TO:<arena${i}@example.net>\r\nDATA\r\n`;
    for (const [i, m] of messages.entries()) {
      const envelope = envelopeOf(i);
      if (i === 5) {
        // Ahead of the 354: envelope and message in one write, as a client that does not wait.
        raw.sock.write(Buffer.concat([Buffer.from(envelope), stuffed(m)]));
        expect(await replies(4)).toEqual([expect.stringMatching(/^250/), expect.stringMatching(/^250/), expect.stringMatching(/^354/), expect.stringMatching(/^250/)]);
        continue;
      }
      if (i === 9) {
        // The next message's envelope and body right behind this one's final dot: read while this
        // delivery is still being written, and held until smtp-server's parser resumes.
        raw.sock.write(envelope);
        expect((await replies(3))[2]).toMatch(/^354/);
        raw.sock.write(Buffer.concat([stuffed(m), Buffer.from(envelopeOf(10)), stuffed(messages[10]!)]));
        expect(await replies(5)).toEqual(['250', '250', '250', '354', '250'].map((c) => expect.stringMatching(new RegExp(`^${c}`))));
        continue;
      }
      if (i === 10) continue;
      raw.sock.write(envelope);
      expect((await replies(3))[2]).toMatch(/^354/);
      raw.sock.write(stuffed(m));
      expect((await replies(1))[0]).toMatch(/^250/);
    }
    expect(await raw.line('QUIT')).toMatch(/^221/);
    const store = res.store()!;
    for (const [i, m] of messages.entries()) {
      const list = await store.listMessages(`arena${i}`, 'INBOX');
      expect(list).toHaveLength(1);
      expect((await store.readMessage(list[0]!.bodyId)).toString('latin1'), `message ${i} (${m.length} bytes)`).toBe(m);
    }
    // The slabs were reused, and the metrics say so.
    const text = await registry.metrics();
    expect(Number(/pairgate_lmtp_read_slabs_total\{outcome="reused"\} (\d+)/.exec(text)?.[1] ?? 0)).toBeGreaterThan(0);
    expect(text).toMatch(/pairgate_lmtp_read_slabs_total\{outcome="new"\} [1-9]/);
    expect(text).toMatch(/pairgate_lmtp_read_slabs_pooled \d+/);
  });

  it('is idempotent per X-Pairgate-Delivery-Id, and refuses oversized messages', async () => {
    const m = msg('retry', 'same\r\n', 'X-Pairgate-Delivery-Id: proxy-42\r\n');
    await lmtpSend(['idem@p'], m);
    await lmtpSend(['idem@p'], m);
    // The same body sent again without the header and from another sender is a new delivery.
    await lmtpSend(['idem@p'], msg('retry', 'same\r\n'), 'other@example.net');
    expect(await res.store()!.listMessages('idem', 'INBOX')).toHaveLength(2);
    const big = await lmtpSend(['idem@p'], msg('big', 'b'.repeat(3 * 1024 * 1024))).catch((e: Error) => ({ rejected: ['idem@p'], response: e.message }));
    expect(big.rejected).toEqual(['idem@p']);
    expect(big.response).toMatch(/552/);
    expect(await res.store()!.listMessages('idem', 'INBOX')).toHaveLength(2);
  });

  it('XCLIENT only from trusted peers; garbage is refused without harm', async () => {
    const trusted = await Raw.open(ports().lmtp);
    await trusted.line('LHLO proxy');
    const caps = await trusted.until((t) => /^250 /m.test(t));
    expect(caps).toMatch(/XCLIENT/);
    trusted.take();
    expect(await trusted.line('XCLIENT ADDR=192.0.2.7 PORT=5555')).toMatch(/^220/);
    trusted.sock.destroy();
    const fwd = await Raw.open(ports().lmtp);
    await fwd.line('LHLO proxy');
    await fwd.until((t) => /^250 /m.test(t));
    fwd.take();
    expect(await fwd.line('XFORWARD ADDR=192.0.2.8 PORT=6666')).toMatch(/^250/);
    fwd.sock.destroy();
    const other = await Raw.open(ports().lmtp, '127.0.0.2');
    await other.line('LHLO elsewhere');
    await other.until((t) => /^250 /m.test(t));
    other.take();
    expect(await other.line('XCLIENT ADDR=192.0.2.7')).toMatch(/^5\d\d/);
    expect(await other.line('XFORWARD ADDR=192.0.2.7')).toMatch(/^5\d\d/);
    expect(await other.line('HELO nope')).toMatch(/^5\d\d/);
    expect(await other.line('RCPT TO:<x@y>')).toMatch(/^503/);
    expect(await other.line('MAIL FROM:<a@b>')).toMatch(/^250/);
    expect(await other.line('RCPT TO:<../../etc@y>')).toMatch(/^5\d\d/);
    expect(await other.line('RCPT TO:<bad!user@y>')).toMatch(/^550 5\.1\.1/);
    other.sock.write('A'.repeat(100_000) + '\r\n');
    await other.until((t) => t.includes('\r\n') || other.closed);
    other.sock.destroy();
    // Still serving.
    await lmtpSend(['after-garbage@x'], msg('alive'));
    expect(await res.store()!.listMessages('after-garbage', 'INBOX')).toHaveLength(1);
  });
});

describe('POP3', () => {
  it('master login from a trusted peer; refused from others and with a wrong secret', async () => {
    const c = await Raw.open(ports().pop3);
    expect(await c.multi('CAPA')).toMatch(/SASL PLAIN[\s\S]*XCLIENT/);
    expect(await c.line('XCLIENT ADDR=198.51.100.9 PORT=4444')).toMatch(/^\+OK/);
    expect(await c.line(`AUTH PLAIN ${plain('alice', MASTER.user, 'wrong-secret')}`)).toMatch(/^-ERR \[AUTH\]/);
    expect(await c.line(`AUTH PLAIN ${plain('alice', MASTER.user, MASTER.secret)}`)).toMatch(/^\+OK/);
    expect(await c.line('STAT')).toMatch(/^\+OK 0 0/);
    expect(await c.line('QUIT')).toMatch(/^\+OK/);
    const u = await Raw.open(ports().pop3, '127.0.0.2');
    expect(await u.multi('CAPA')).not.toMatch(/XCLIENT/);
    expect(await u.line('XCLIENT ADDR=1.2.3.4')).toMatch(/^-ERR/);
    expect(await u.line(`AUTH PLAIN ${plain('alice', MASTER.user, MASTER.secret)}`)).toMatch(/^-ERR \[AUTH\]/);
    u.sock.write('AUTH PLAIN\r\n');
    await u.until((t) => t.startsWith('+ '));
    u.take();
    expect(await u.line('*')).toMatch(/^-ERR/);
    u.sock.destroy();
  });

  it('poplib retrieves byte-identical messages; UIDL is stable across a restart; DELE applies at QUIT', async () => {
    const bodies = [msg('pop one'), msg('pop two', '.leading dot\r\nline\r\n..two dots\r\n'), msg('pop three', ('y'.repeat(70) + '\r\n').repeat(1000))];
    for (const b of bodies) await lmtpSend(['popper@x'], b);
    const script = `
import poplib, json, sys, base64
p = poplib.POP3('127.0.0.1', int(sys.argv[1]), timeout=10)
p._shortcmd('AUTH PLAIN ' + base64.b64encode(b'popper\\0${MASTER.user}\\0${MASTER.secret}').decode())
out = {'stat': p.stat(), 'uidl': [u.decode() for u in p.uidl()[1]], 'msgs': []}
for i in range(1, out['stat'][0] + 1):
    out['msgs'].append(base64.b64encode(b'\\r\\n'.join(p.retr(i)[1]) + b'\\r\\n').decode())
out['top'] = [l.decode() for l in p.top(2, 1)[1]]
if len(sys.argv) > 2:
    p.dele(1)
p.quit()
print(json.dumps(out))
`;
    const py = async (...args: string[]) => JSON.parse((await run('python3', ['-c', script, String(ports().pop3), ...args], { timeout: 20_000 })).stdout) as { stat: [number, number]; uidl: string[]; msgs: string[]; top: string[] };
    const first = await py();
    expect(first.stat[0]).toBe(3);
    first.msgs.forEach((m, i) => expect(Buffer.from(m, 'base64').toString('latin1')).toBe(bodies[i]));
    expect(first.top.at(-1)).toBe('.leading dot');
    await res.stop();
    await startResource();
    const second = await py('dele');
    expect(second.uidl).toEqual(first.uidl);
    const third = await py();
    expect(third.stat[0]).toBe(2);
    expect(third.uidl).toEqual(first.uidl.slice(1).map((u, i) => u.replace(/^\d+/, String(i + 1))));
  });

  it('fetchmail retrieves through POP3 (USER/PASS of a configured user)', async () => {
    await lmtpSend(['fetchuser@x'], msg('for fetchmail'));
    const home = join(dir.path, 'fm');
    mkdirSync(home, { recursive: true });
    const rc = join(home, 'fetchmailrc');
    const out = join(home, 'mbox');
    writeFileSync(rc, `poll 127.0.0.1 protocol pop3 port ${ports().pop3} user "fetchuser" password "fetch-pass-1" sslproto '' mda "cat >> ${out}"\n`);
    chmodSync(rc, 0o600);
    await run('fetchmail', ['-f', rc, '-v', '--nokeep', '-i', join(home, 'ids'), '--pidfile', join(home, 'pid')], { timeout: 30_000, env: { ...process.env, HOME: home, FETCHMAILHOME: home } }).catch((e: { code?: number; stdout?: string; stderr?: string }) => {
      if (e.code !== 0 && e.code !== 1) throw new Error(`fetchmail failed (${e.code}): ${e.stdout}\n${e.stderr}`);
    });
    expect(existsSync(out)).toBe(true);
    expect(readFileSync(out, 'latin1')).toContain('Subject: for fetchmail');
    expect(await res.store()!.listMessages('fetchuser', 'INBOX')).toHaveLength(0);
  });

  it('locks the maildrop ([IN-USE]), and survives garbage, huge lines and bad states', async () => {
    await lmtpSend(['locked@x'], msg('lock'));
    const a = await Raw.open(ports().pop3);
    expect(await a.line(`AUTH PLAIN ${plain('locked', MASTER.user, MASTER.secret)}`)).toMatch(/^\+OK/);
    const b = await Raw.open(ports().pop3);
    expect(await b.line(`AUTH PLAIN ${plain('locked', MASTER.user, MASTER.secret)}`)).toMatch(/^-ERR \[IN-USE\]/);
    expect(await b.line('STAT')).toMatch(/^-ERR/);
    expect(await b.line('RETR 1')).toMatch(/^-ERR/);
    b.sock.write('X'.repeat(200_000) + '\r\n');
    await b.until((t) => t.includes('\r\n'));
    expect(b.take()).toMatch(/^-ERR Command line too long\r\n$/);
    expect(await b.line('\u0000\u0001garbage')).toMatch(/^-ERR/);
    expect(await a.line('RETR 99')).toMatch(/^-ERR/);
    expect(await a.line('RETR abc')).toMatch(/^-ERR/);
    expect(await a.line('TOP 1')).toMatch(/^-ERR/);
    expect(await a.line('DELE 1')).toMatch(/^\+OK/);
    expect(await a.line('RETR 1')).toMatch(/^-ERR/);
    expect(await a.line('RSET')).toMatch(/^\+OK/);
    expect(await a.multi('LIST')).toMatch(/^\+OK[^\r]*\r\n1 \d+\r\n\.\r\n$/);
    expect(await a.line('QUIT')).toMatch(/^\+OK/);
    // The lock is released at QUIT.
    expect(await b.line(`AUTH PLAIN ${plain('locked', MASTER.user, MASTER.secret)}`)).toMatch(/^\+OK/);
    for (let i = 0; i < 12 && !b.closed; i++) b.sock.write('BOGUS\r\n');
    await b.until(() => b.closed, 5000);
    expect(b.closed).toBe(true);
    expect(res.sessions().pop3).toBeGreaterThanOrEqual(0);
  });
});

describe('IMAP limits from the store config', () => {
  it('imap.maxSessionsPerUser and imap.maxAuthFailures reach the IMAP server', async () => {
    const open: Raw[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const c = await Raw.open(ports().imap);
        open.push(c);
        expect(await c.line(`a${i} LOGIN fetchuser fetch-pass-1`)).toMatch(new RegExp(`^a${i} OK`));
      }
      const third = await Raw.open(ports().imap);
      open.push(third);
      expect(await third.line('t1 LOGIN fetchuser fetch-pass-1')).toMatch(/^t1 NO \[LIMIT\]/);
      // One failed login is the configured limit: the server says BYE and closes.
      const guesser = await Raw.open(ports().imap);
      open.push(guesser);
      guesser.sock.write('g1 LOGIN fetchuser wrong-password\r\n');
      const text = await guesser.until((t) => t.includes('* BYE'));
      expect(text).toMatch(/g1 NO/);
      await guesser.until(() => guesser.closed);
      expect(guesser.closed).toBe(true);
    } finally {
      for (const c of open) c.sock.destroy();
    }
  });

  it('a stop lets a finishing IMAP session end on its own (stopGraceMs), then says BYE to the rest', async () => {
    const imapPort = ports().imap;
    const finishing = await Raw.open(imapPort);
    const lingering = await Raw.open(imapPort);
    try {
      expect(await finishing.line('f1 LOGIN fetchuser fetch-pass-1')).toMatch(/^f1 OK/);
      expect(await lingering.line('l1 LOGIN fetchuser fetch-pass-1')).toMatch(/^l1 OK/);
      const stopping = res.stop();
      await new Promise((r) => setTimeout(r, 200));
      // New connections are refused at once; the open session still completes its LOGOUT.
      await expect(Raw.open(imapPort).then((c) => c.sock.destroy())).rejects.toThrow();
      finishing.sock.write('f2 LOGOUT\r\n');
      expect(await finishing.until((t) => /f2 OK/.test(t))).toMatch(/\* BYE Logging out/);
      await stopping;
      expect(await lingering.until(() => lingering.closed)).toMatch(/\* BYE Server shutting down/);
    } finally {
      finishing.sock.destroy();
      lingering.sock.destroy();
      await startResource();
    }
  });

  it('a bad IMAP limit in the config is refused by the schema, naming the key', () => {
    const r = storeConfigSchema.safeParse({ masterUser: 'm', masterSecret: 'master-secret-123', imap: { maxSessionsPerUser: -1 } });
    expect(r.success).toBe(false);
    expect(JSON.stringify(r.error?.issues[0]?.path)).toBe('["imap","maxSessionsPerUser"]');
    expect(storeConfigSchema.safeParse({ masterUser: 'm', masterSecret: 'master-secret-123', imap: { maxSesions: 1 } }).success).toBe(false);
    const zero = storeConfigSchema.safeParse({ masterUser: 'm', masterSecret: 'master-secret-123', imap: { maxPipelined: 0 } });
    expect(JSON.stringify(zero.error?.issues[0]?.path)).toBe('["imap","maxPipelined"]');
  });
});

describe('fuzz', () => {
  it('random bytes on POP3 and LMTP connections get errors, never a crash (seeded)', async () => {
    const seed = Number(process.env.STORE_FUZZ_SEED ?? Date.now() % 100_000);
    console.log(`store fuzz seed: ${seed} (STORE_FUZZ_SEED=${seed})`);
    let x = seed >>> 0 || 1;
    const rnd = () => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      return (x >>> 0) / 0x100000000;
    };
    const words = ['USER', 'PASS', 'AUTH', 'PLAIN', 'RETR', 'TOP', 'LIST', 'UIDL', 'DELE', 'STLS', 'XCLIENT', 'CAPA', 'QUIT', 'LHLO', 'MAIL FROM:', 'RCPT TO:', 'DATA', 'RSET', 'BDAT', '.', '-1', '99999999999', '*', '=', 'ADDR=', '\u0000', '\u00ff'];
    const junk = () => {
      const parts: string[] = [];
      const n = 1 + Math.floor(rnd() * 8);
      for (let i = 0; i < n; i++) {
        const r = rnd();
        if (r < 0.5) parts.push(words[Math.floor(rnd() * words.length)]!);
        else if (r < 0.8) parts.push(String.fromCharCode(...Array.from({ length: 1 + Math.floor(rnd() * 20) }, () => Math.floor(rnd() * 256))));
        else parts.push(rnd() < 0.5 ? '\r\n' : '\n');
      }
      return Buffer.from(parts.join(' ') + '\r\n', 'latin1');
    };
    for (let c = 0; c < 16; c++) {
      const port = c % 2 ? ports().lmtp : ports().pop3;
      const sock = net.connect({ port, host: '127.0.0.1' });
      sock.on('error', () => undefined);
      sock.on('data', () => undefined);
      await new Promise<void>((resolve) => sock.once('connect', () => resolve()));
      for (let i = 0; i < 30 && !sock.destroyed; i++) sock.write(junk());
      await new Promise((r) => setTimeout(r, 30));
      sock.destroy();
    }
    // Everyone else is still served.
    const c = await Raw.open(ports().pop3);
    expect(await c.line(`AUTH PLAIN ${plain('fuzzcheck', MASTER.user, MASTER.secret)}`)).toMatch(/^\+OK/);
    expect(await c.line('QUIT')).toMatch(/^\+OK/);
    await lmtpSend(['fuzzcheck@x'], msg('after fuzz'));
    expect(await res.store()!.listMessages('fuzzcheck', 'INBOX')).toHaveLength(1);
  });
});
