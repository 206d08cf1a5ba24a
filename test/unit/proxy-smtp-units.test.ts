/**
 * Units of the SMTP front ends: DATA encoding (dot-stuffing, line ends; seeded fuzz), the
 * delivery id and header hygiene, the per-message verdict table, the config check, the DSN,
 * and the LMTP client against real smtp-server LMTP peers (per-recipient replies, XCLIENT,
 * no PIPELINING) and broken ones (garbage, silence, refused).
 */
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { SMTPServer, type SMTPServerSession } from 'smtp-server';
import { LmtpPool, encodeData, sendLmtp } from '../../proxy/smtp/lmtp-client.ts';
import { PairSlots, deliveryIdFor, stripDeliveryIdHeaders, verdictFor, type RecipientOutcome } from '../../proxy/smtp/delivery.ts';
import { splitEnhanced, REPLIES } from '../../proxy/smtp/replies.ts';
import { buildBounce } from '../../proxy/smtp/bounce.ts';
import { parseSmtpConfig } from '../../proxy/smtp/index.ts';
import { ConfigError, ProtocolError, TimeoutError, UnavailableError } from '../../common/errors.ts';

/** Undoes encodeData: what an SMTP server hands its application. */
function decode(wire: Buffer): string {
  const s = wire.toString('latin1');
  expect(s === '.\r\n' || s.endsWith('\r\n.\r\n')).toBe(true);
  if (s === '.\r\n') return '';
  return s
    .slice(0, -3)
    .split('\r\n')
    .slice(0, -1)
    .map((l) => (l.startsWith('.') ? l.slice(1) : l))
    .join('\r\n');
}

function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

describe('encodeData', () => {
  it('dot-stuffs, normalises line ends, terminates', () => {
    expect(encodeData(Buffer.from('a\r\n.b\n..c\r\n.\r\nend')).toString()).toBe('a\r\n..b\r\n...c\r\n..\r\nend\r\n.\r\n');
    expect(encodeData(Buffer.from('')).toString()).toBe('.\r\n');
    expect(encodeData(Buffer.from('x\r\n')).toString()).toBe('x\r\n.\r\n');
  });

  it('round-trips random messages (seeded fuzz)', () => {
    const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 100000);
    const r = rng(seed);
    const alphabet = ['.', '\r\n', '\n', 'a', 'b', ' ', '\r\n.', '..'];
    for (let n = 0; n < 300; n++) {
      let s = '';
      const len = Math.floor(r() * 40);
      for (let i = 0; i < len; i++) s += alphabet[Math.floor(r() * alphabet.length)];
      // Bare CRs are not line ends; keep the fuzz to line structure.
      s = s.replace(/\r(?!\n)/g, '');
      const wire = encodeData(Buffer.from(s));
      const expected = s.replace(/\r?\n/g, '\r\n').replace(/\r\n$/, '');
      expect(decode(wire), `seed ${seed}, input ${JSON.stringify(s)}`).toBe(expected);
      // No line of the wire form is a lone dot before the terminator.
      expect(wire.toString('latin1').slice(0, -3).split('\r\n').includes('.'), `seed ${seed}`).toBe(false);
    }
  });
});

describe('delivery id and headers', () => {
  const msg = Buffer.from('Subject: x\r\nX-Pairgate-Delivery-Id: evil\r\n  continued\r\nFrom: a@b\r\n\r\nX-Pairgate-Delivery-Id: in the body stays\r\n');

  it('removes the delivery id header (with continuations) from the header block only', () => {
    const out = stripDeliveryIdHeaders(msg).toString();
    expect(out).toBe('Subject: x\r\nFrom: a@b\r\n\r\nX-Pairgate-Delivery-Id: in the body stays\r\n');
    const clean = Buffer.from('Subject: y\r\n\r\nbody\r\n');
    expect(stripDeliveryIdHeaders(clean)).toBe(clean);
    expect(stripDeliveryIdHeaders(Buffer.from('x-pairgate-delivery-id: a\nSubject: z\n\nbody\n')).toString()).toBe('Subject: z\n\nbody\n');
  });

  it('is stable for a retry and differs for another sender or body', () => {
    const a = deliveryIdFor('s@x', msg);
    expect(deliveryIdFor('S@X', Buffer.from(msg))).toBe(a);
    expect(deliveryIdFor('t@x', msg)).not.toBe(a);
    expect(deliveryIdFor('s@x', Buffer.concat([msg, Buffer.from('.')]))).not.toBe(a);
    expect(a).toMatch(/^pg1-[0-9a-f]{40}$/);
  });
});

describe('verdictFor', () => {
  const o = (address: string, code: number, enhanced: string, text = 't'): RecipientOutcome => ({ address, pair: 'p', reply: { code, enhanced, text } });

  it('accepts only when nothing failed temporarily, and bounces the permanent rest', () => {
    expect(verdictFor([o('a', 250, '2.0.0'), o('b', 250, '2.0.0')], 'id').error).toBeNull();
    const mixed = verdictFor([o('a', 250, '2.0.0'), o('b', 552, '5.2.2')], 'id');
    expect(mixed.error).toBeNull();
    expect(mixed.permanent).toBe(1);
  });

  it('any temporary failure makes the message 451, whatever else happened', () => {
    const v = verdictFor([o('a', 250, '2.0.0'), o('b', 451, '4.3.2'), o('c', 550, '5.1.1')], 'pg1-x');
    expect(v.error?.responseCode).toBe(451);
    expect(v.error?.enhanced).toBe('4.3.2');
    expect(v.error?.message).toContain('pg1-x');
    expect(verdictFor([o('a', 452, '5.9.9')], 'id').error?.enhanced).toBe('4.3.0');
  });

  it('all refused permanently: 552 when all over quota, else 550 with the pair’s enhanced code', () => {
    expect(verdictFor([o('a', 552, '5.2.2'), o('b', 552, '5.2.2')], 'id').error).toMatchObject({ responseCode: 552, enhanced: '5.2.2' });
    expect(verdictFor([o('a', 550, '5.1.1'), o('b', 552, '5.2.2')], 'id').error).toMatchObject({ responseCode: 550, enhanced: '5.1.1' });
    expect(verdictFor([o('a', 554, '4.0.0')], 'id').error).toMatchObject({ responseCode: 550, enhanced: '5.0.0' });
  });
});

describe('PairSlots', () => {
  it('bounds connections per pair, hands a freed slot to the next waiter, times out', async () => {
    const slots = new PairSlots(2);
    const a = (await slots.acquire('p', 10))!;
    const b = (await slots.acquire('p', 10))!;
    expect(await slots.acquire('p', 30)).toBeNull();
    expect(await slots.acquire('q', 10)).not.toBeNull();
    const waiter = slots.acquire('p', 2000);
    a();
    a(); // idempotent
    const c = await waiter;
    expect(c).not.toBeNull();
    expect(slots.inUse('p')).toBe(2);
    b();
    c!();
    expect(slots.inUse('p')).toBe(0);
    expect(await new PairSlots(0).acquire('p', 0)).not.toBeNull();
  });
});

describe('replies, config, bounce', () => {
  it('splits enhanced codes and builds replies from one table', () => {
    expect(splitEnhanced(550, '5.1.1 No such user')).toEqual({ enhanced: '5.1.1', text: 'No such user' });
    expect(splitEnhanced(451, 'later')).toEqual({ enhanced: '4.0.0', text: 'later' });
    expect(REPLIES.relayDenied().message).toBe('5.7.1 Relay access denied');
    expect(REPLIES.pairDown('pair-07')).toMatchObject({ responseCode: 451, enhanced: '4.3.2', temporary: true });
  });

  it('validates the smtp section, naming the bad key', () => {
    const cfg = parseSmtpConfig({ listeners: [{ kind: 'mx', port: 25 }] });
    expect(cfg.listeners[0]!.tls).toBe('starttls');
    expect(cfg.limits.maxRecipients).toBe(100);
    expect(() => parseSmtpConfig({ listeners: [{ kind: 'relay', port: 25 }] })).toThrow(ConfigError);
    expect(() => parseSmtpConfig({ limits: { maxMessageBytes: 10 } })).toThrow(/smtp\.limits\.maxMessageBytes/);
    expect(() => parseSmtpConfig({ smarthost: { port: 25 } })).toThrow(/smtp\.smarthost\.host/);
    expect(() => parseSmtpConfig({ typo: 1 })).toThrow(/smtp\.typo/);
  });

  it('builds a delivery status notification with the original headers only', () => {
    const dsn = buildBounce({
      hostname: 'mx.test',
      sender: 'a@b.example',
      failed: [{ address: 'full@x\r\nBcc: evil', pair: 'p', reply: { code: 552, enhanced: '5.2.2', text: 'Mailbox full' } }],
      original: Buffer.from('Subject: hi\r\nFrom: a@b.example\r\n\r\nsecret body\r\n'),
      deliveryId: 'pg1-abc',
      arrival: new Date(0),
    }).toString();
    expect(dsn).toMatch(/^From: Mail Delivery System <MAILER-DAEMON@mx\.test>\r\nTo: <a@b\.example>/);
    expect(dsn).toContain('Content-Type: multipart/report; report-type=delivery-status');
    expect(dsn).toContain('Status: 5.2.2');
    expect(dsn).toContain('Subject: hi');
    expect(dsn).not.toContain('secret body');
    expect(dsn).not.toMatch(/\r\nBcc: evil/);
  });
});

describe('sendLmtp', () => {
  const servers: Array<{ close(cb: () => void): void }> = [];
  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => new Promise<void>((r) => s.close(() => r()))));
  });

  async function lmtpPeer(opts: { hidePIPELINING?: boolean; xclient?: boolean } = {}) {
    const seen: Array<{ rcpts: string[]; body: string; addr: string; from: string }> = [];
    const stats = { connections: 0 };
    const server = new SMTPServer({
      onConnect(_s, cb) {
        stats.connections++;
        cb();
      },
      lmtp: true,
      authOptional: true,
      disabledCommands: ['AUTH', 'STARTTLS'],
      hideENHANCEDSTATUSCODES: true,
      hidePIPELINING: opts.hidePIPELINING ?? false,
      useXClient: opts.xclient ?? false,
      logger: false,
      onRcptTo(a, _s, cb) {
        if (a.address.startsWith('unknown@')) return cb(Object.assign(new Error('5.1.1 No such user here'), { responseCode: 550 }));
        if (a.address.startsWith('busy@')) return cb(Object.assign(new Error('4.2.1 Try later'), { responseCode: 450 }));
        cb();
      },
      onData(stream, session: SMTPServerSession, cb) {
        const parts: Buffer[] = [];
        stream.on('data', (d: Buffer) => parts.push(d));
        stream.on('end', () => {
          const rcpts = session.envelope.rcptTo.map((r) => r.address);
          seen.push({ rcpts, body: Buffer.concat(parts).toString(), addr: session.remoteAddress, from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '' });
          cb(null, rcpts.map((r) => (r.startsWith('full@') ? Object.assign(new Error('5.2.2 Mailbox full'), { responseCode: 552 }) : `2.0.0 Saved ${r}`)) as unknown as string);
        });
      },
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    servers.push(server);
    return { port: (server.server.address() as AddressInfo).port, seen, stats, server };
  }

  const base = { host: '127.0.0.1', name: 'proxy.test', from: 'sender@x', connectTimeoutMs: 2000, replyTimeoutMs: 2000 };

  for (const hidePIPELINING of [false, true]) {
    it(`returns one reply per recipient, RCPT and DATA stage (${hidePIPELINING ? 'no ' : ''}PIPELINING)`, async () => {
      const peer = await lmtpPeer({ hidePIPELINING });
      const res = await sendLmtp({ ...base, port: peer.port, recipients: ['ok@p', 'unknown@p', 'busy@p', 'full@p'], body: Buffer.from('Subject: t\r\n\r\n.dot\r\n') });
      expect(res.map((r) => [r.recipient, r.reply.code, r.reply.enhanced, r.stage])).toEqual([
        ['ok@p', 250, '2.0.0', 'data'],
        ['unknown@p', 550, '5.1.1', 'rcpt'],
        ['busy@p', 450, '4.2.1', 'rcpt'],
        ['full@p', 552, '5.2.2', 'data'],
      ]);
      expect(peer.seen[0]!.rcpts).toEqual(['ok@p', 'full@p']);
      expect(peer.seen[0]!.body).toBe('Subject: t\r\n\r\n.dot\r\n');
    });
  }

  it('all recipients refused at RCPT: no DATA is sent', async () => {
    const peer = await lmtpPeer();
    const res = await sendLmtp({ ...base, port: peer.port, recipients: ['unknown@p', 'busy@p'], body: Buffer.from('x\r\n') });
    expect(res.map((r) => r.reply.code)).toEqual([550, 450]);
    expect(peer.seen).toHaveLength(0);
  });

  it('forwards the client address with XCLIENT when the peer trusts us, and carries on when it does not', async () => {
    const trusting = await lmtpPeer({ xclient: true });
    await sendLmtp({ ...base, port: trusting.port, recipients: ['ok@p'], body: Buffer.from('x\r\n'), client: { address: '192.0.2.44', port: 4444 } });
    expect(trusting.seen[0]!.addr).toBe('192.0.2.44');
    const plain = await lmtpPeer();
    await sendLmtp({ ...base, port: plain.port, recipients: ['ok@p'], body: Buffer.from('x\r\n'), client: { address: '192.0.2.44', port: 4444 } });
    expect(plain.seen[0]!.addr).toBe('127.0.0.1');
  });

  it('the pool reuses a connection per client, and replaces one the server closed', async () => {
    const peer = await lmtpPeer({ xclient: true });
    const pool = new LmtpPool(5000);
    const client = { address: '192.0.2.7', port: 1000 };
    for (let i = 0; i < 3; i++) {
      const res = await pool.deliver({ ...base, port: peer.port, recipients: ['ok@p', 'unknown@p'], body: Buffer.from(`n${i}\r\n`), client });
      expect(res.map((r) => r.reply.code)).toEqual([250, 550]);
    }
    expect(peer.stats.connections).toBe(1);
    expect(peer.seen.map((m) => m.addr)).toEqual(['192.0.2.7', '192.0.2.7', '192.0.2.7']);
    // Another client gets its own connection (the first one was moved to 192.0.2.7 by XCLIENT).
    await pool.deliver({ ...base, port: peer.port, recipients: ['ok@p'], body: Buffer.from('other\r\n'), client: { address: '192.0.2.8', port: 2000 } });
    expect(peer.stats.connections).toBe(2);
    expect(pool.size).toBe(2);
    // The server drops its connections: the next delivery still succeeds, on a new one.
    for (const c of (peer.server as unknown as { connections: Set<{ close(): void }> }).connections) c.close();
    await new Promise((r) => setTimeout(r, 100));
    const res = await pool.deliver({ ...base, port: peer.port, recipients: ['ok@p'], body: Buffer.from('after\r\n'), client });
    expect(res[0]!.reply.code).toBe(250);
    expect(peer.stats.connections).toBe(3);
    pool.close();
    expect(pool.size).toBe(0);
  });

  it('connection-level faults are temporary errors: refused, garbage, silence', async () => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const deadPort = (closed.address() as AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));
    await expect(sendLmtp({ ...base, port: deadPort, recipients: ['a@p'], body: Buffer.from('x') })).rejects.toBeInstanceOf(UnavailableError);

    const garbage = net.createServer((s) => s.end('HELLO I am not LMTP\r\n'));
    await new Promise<void>((r) => garbage.listen(0, '127.0.0.1', r));
    servers.push(garbage);
    await expect(sendLmtp({ ...base, port: (garbage.address() as AddressInfo).port, recipients: ['a@p'], body: Buffer.from('x') })).rejects.toBeInstanceOf(ProtocolError);

    const silent = net.createServer((s) => s.on('error', () => undefined));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    servers.push({ close: (cb) => { silent.close(cb); } });
    const t0 = Date.now();
    await expect(sendLmtp({ ...base, replyTimeoutMs: 300, port: (silent.address() as AddressInfo).port, recipients: ['a@p'], body: Buffer.from('x') })).rejects.toBeInstanceOf(TimeoutError);
    expect(Date.now() - t0).toBeLessThan(5000);
    // Let the silent server's sockets go so that close() returns.
    silent.getConnections(() => undefined);
  });
});
