/**
 * Pure parts of the proxy: PROXY v1/v2 decoding (whole and cut into 1, 3 and 17-byte chunks,
 * malformed and truncated headers), credential validation, and the failed-login limiter over a
 * real redis-server, shared between two limiters (two proxies) and falling back to local
 * counters when Redis stops; the sessions' lazy logger.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { V1ProxyProtocol, V2ProxyProtocol, Peer, INETProtocol, Command, TransportProtocol, IPv4ProxyAddress, IPv4Address, IPv6ProxyAddress, IPv6Address } from 'proxy-protocol-js';
import { decodeProxyHeader, looksLikeProxyHeader } from '../../proxy/proxy-protocol.ts';
import { validCredentials } from '../../proxy/login.ts';
import { AuthLimiter } from '../../proxy/rate-limit.ts';
import { proxyConfigSchema } from '../../proxy/config.ts';
import { proxyMetrics, proxyRegistry, proxyTallies } from '../../proxy/metrics.ts';
import { RedisBus } from '../../common/redis-bus.ts';
import { Writable } from 'node:stream';
import { silentLogger, createLogger } from '../../common/log.ts';
import { LazyLog } from '../../proxy/lazy-log.ts';
import { AuthError, ProtocolError, TimeoutError, UnavailableError } from '../../common/errors.ts';
import net from 'node:net';
import { connectAndLogin } from '../../proxy/backend.ts';
import { AddressSlots } from '../../proxy/address-slots.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { waitFor } from '../helpers/net.ts';

const v1 = Buffer.from(new V1ProxyProtocol(INETProtocol.TCP4, new Peer('192.0.2.7', 5555), new Peer('10.0.0.1', 143)).build());
const v2 = Buffer.from(
  new V2ProxyProtocol(Command.PROXY, TransportProtocol.STREAM, new IPv4ProxyAddress(IPv4Address.createFrom([198, 51, 100, 9]), 40000, IPv4Address.createFrom([10, 0, 0, 1]), 993)).build(),
);
const v2six = Buffer.from(
  new V2ProxyProtocol(
    Command.PROXY,
    TransportProtocol.STREAM,
    new IPv6ProxyAddress(IPv6Address.createFrom([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), 1234, IPv6Address.createFrom(new Array(16).fill(0)), 143),
  ).build(),
);

function decodeChunked(buf: Buffer, chunk: number) {
  let acc = Buffer.alloc(0);
  for (let i = 0; i < buf.length; i += chunk) {
    acc = Buffer.concat([acc, buf.subarray(i, i + chunk)]);
    const d = decodeProxyHeader(acc);
    if (d) return { ...d, rest: acc.subarray(d.length) };
  }
  return null;
}

describe('PROXY header decoding', () => {
  for (const chunk of [1, 3, 17, 4096]) {
    it(`decodes v1 and v2 headers cut into ${chunk}-byte chunks and keeps the bytes after them`, () => {
      const tail = Buffer.from('a1 CAPABILITY\r\n');
      const a = decodeChunked(Buffer.concat([v1, tail]), chunk)!;
      expect(a.header).toEqual({ source: { address: '192.0.2.7', port: 5555 }, version: 1 });
      const b = decodeChunked(Buffer.concat([v2, tail]), chunk)!;
      expect(b.header).toEqual({ source: { address: '198.51.100.9', port: 40000 }, version: 2 });
      expect(Buffer.concat([b.rest]).toString().length).toBeLessThanOrEqual(tail.length);
      const c = decodeChunked(v2six, chunk)!;
      expect(c.header.source).toEqual({ address: '2001:db8::1', port: 1234 });
    });
  }

  it('decodes LOCAL and UNKNOWN as no client address', () => {
    const local = Buffer.from(new V2ProxyProtocol(Command.LOCAL, TransportProtocol.UNSPEC, new IPv4ProxyAddress(IPv4Address.createWithEmptyAddress(), 0, IPv4Address.createWithEmptyAddress(), 0)).build());
    expect(decodeProxyHeader(local)!.header.source).toBeNull();
    expect(decodeProxyHeader(Buffer.from('PROXY UNKNOWN\r\n'))!.header.source).toBeNull();
  });

  it('refuses malformed and oversized headers with ProtocolError', () => {
    for (const bad of [
      'PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n',
      'PROXY TCP4 192.0.2.1 10.0.0.1 0 2\r\n',
      'PROXY TCP6 192.0.2.1 10.0.0.1 1 2\r\n',
      'PROXY TCP4 192.0.2.1 10.0.0.1 1 2\n',
      `PROXY TCP4 ${'1'.repeat(200)}`,
      'a1 LOGIN x y\r\n',
      'PROXX TCP4',
    ]) {
      expect(() => decodeProxyHeader(Buffer.from(bad)), bad).toThrow(ProtocolError);
    }
    const badVersion = Buffer.from(v2);
    badVersion[12] = 0x31;
    expect(() => decodeProxyHeader(badVersion)).toThrow(ProtocolError);
    const huge = Buffer.from(v2);
    huge.writeUInt16BE(60000, 14);
    expect(() => decodeProxyHeader(huge)).toThrow(/too long/);
    expect(decodeProxyHeader(v2.subarray(0, 10))).toBeNull();
  });

  it('spots headers from untrusted peers', () => {
    expect(looksLikeProxyHeader(v1)).toBe(true);
    expect(looksLikeProxyHeader(v2.subarray(0, 3))).toBe(true);
    expect(looksLikeProxyHeader(Buffer.from('a1 NOOP\r\n'))).toBe(false);
  });
});

describe('credentials and config', () => {
  it('refuses logins with control characters or over the bounds', () => {
    expect(validCredentials('alice', 'pw')).toBe(true);
    expect(validCredentials('ali\r\nce', 'pw')).toBe(false);
    expect(validCredentials('alice\0', 'pw')).toBe(false);
    expect(validCredentials('alice', 'p\nw')).toBe(false);
    expect(validCredentials('a'.repeat(300), 'pw')).toBe(false);
    expect(validCredentials('', 'pw')).toBe(false);
  });

  it('validates the config and names the bad key', () => {
    const ok = proxyConfigSchema.parse({ directory: { ldif: '/x' }, backend: { masterUser: 'm', masterSecret: 's' }, listeners: [{ protocol: 'imap', port: 143 }] });
    expect(ok.listeners[0]!.tls).toBe('starttls');
    expect(ok.hold.maxMs).toBe(15_000);
    expect(proxyConfigSchema.safeParse({ directory: {}, backend: { masterUser: 'm', masterSecret: 's' }, listeners: [{ protocol: 'smtp', port: 25 }] }).success).toBe(false);
    expect(proxyConfigSchema.safeParse({ directory: {}, backend: { masterUser: 'm' } }).success).toBe(false);
  });
});

describe('proxyRegistry', () => {
  it('carries the same default process metrics as common/metrics.ts gives (pairgate_process_ prefix, event-loop lag included) with the default labels', async () => {
    const registry = proxyRegistry({ role: 'proxy' });
    const text = await registry.metrics();
    expect(text).toMatch(/^pairgate_process_nodejs_eventloop_lag_p99_seconds\{role="proxy"\} /m);
    expect(text).toMatch(/^pairgate_process_process_cpu_user_seconds_total\{role="proxy"\} /m);
  });
});

describe('AuthLimiter', () => {
  let redis: RedisServer;
  beforeAll(async () => {
    redis = await startRedis();
  });
  afterAll(async () => {
    await redis?.close();
  });

  it('shares counts across proxies, locks the address before the login, and falls back to local counters', async () => {
    const cfg = { windowMs: 60_000, maxPerIp: 4, maxPerLogin: 10, delayStepMs: 10, maxDelayMs: 40 };
    const busA = new RedisBus({ url: redis.url });
    const busB = new RedisBus({ url: redis.url });
    await waitFor(() => busA.connected && busB.connected, 5000, 'redis');
    const a = new AuthLimiter(cfg, busA, silentLogger);
    const b = new AuthLimiter(cfg, busB, silentLogger);
    try {
      const delays: number[] = [];
      delays.push(await a.fail('192.0.2.1', 'Alice'));
      delays.push(await b.fail('192.0.2.1', 'alice'));
      delays.push(await a.fail('192.0.2.1', 'alice'));
      expect(delays).toEqual([10, 20, 40]);
      expect((await b.check('192.0.2.1', 'alice')).locked).toBe(false);
      await b.fail('192.0.2.1', 'alice');
      const v = await a.check('192.0.2.1', 'bob');
      expect(v).toMatchObject({ locked: true, scope: 'ip', ipFailures: 4 });
      // Same login from another address is not locked (login limit is higher).
      expect((await a.check('198.51.100.1', 'ALICE')).locked).toBe(false);

      await redis.stop();
      const c = new AuthLimiter(cfg, busA, silentLogger);
      for (let i = 0; i < 4; i++) await c.fail('203.0.113.5', 'carol');
      expect((await c.check('203.0.113.5', 'x')).locked).toBe(true);
      expect((await c.check('203.0.113.6', 'x')).locked).toBe(false);
      c.close();
    } finally {
      a.close();
      b.close();
      await busA.close();
      await busB.close();
      if (!redis.proc.alive()) await redis.start();
    }
  });
});

describe('AuthLimiter.checkNow (the verdict without a Redis round trip)', () => {
  it('answers from local counters without Redis, leaves it to check() with Redis, and never locks with both limits off', async () => {
    const cfg = { windowMs: 60_000, maxPerIp: 2, maxPerLogin: 5, delayStepMs: 0, maxDelayMs: 0 };
    const local = new AuthLimiter(cfg, null, silentLogger);
    expect(local.checkNow('192.0.2.9', 'eve')).toMatchObject({ locked: false, ipFailures: 0 });
    await local.fail('192.0.2.9', 'eve');
    await local.fail('192.0.2.9', 'Eve');
    expect(local.checkNow('192.0.2.9', 'eve')).toMatchObject({ locked: true, scope: 'ip', ipFailures: 2, loginFailures: 2 });
    expect(await local.check('192.0.2.9', 'eve')).toMatchObject({ locked: true, scope: 'ip' });
    const withBus = new AuthLimiter(cfg, {} as RedisBus, silentLogger);
    expect(withBus.checkNow('192.0.2.9', 'eve')).toBeNull();
    const off = new AuthLimiter({ ...cfg, maxPerIp: 0, maxPerLogin: 0 }, {} as RedisBus, silentLogger);
    expect(off.checkNow('192.0.2.9', 'eve')).toMatchObject({ locked: false });
    for (const l of [local, withBus, off]) l.close();
  });
});

describe('metric tallies (per-session counts added to the metrics when they are read)', () => {
  it('shows counter and gauge changes at every read, a gauge back at zero included, and shares one tally per metric', async () => {
    const registry = proxyRegistry({ role: 'proxy' });
    const m = proxyMetrics(registry);
    const t = proxyTallies(m);
    expect(proxyTallies(proxyMetrics(registry)).sessions).toBe(t.sessions);
    const labels = { protocol: 'imap', pair: 'pair-a', role: 'proxy' };
    t.sessions.add(labels, 1);
    t.sessionsTotal.add(labels, 1);
    t.sessions.add(labels, 1);
    let text = await registry.metrics();
    expect(text).toMatch(/pairgate_sessions\{protocol="imap",pair="pair-a",role="proxy"\} 2\b/);
    expect(text).toMatch(/pairgate_sessions_total\{protocol="imap",pair="pair-a",role="proxy"\} 1\b/);
    t.sessions.add(labels, -1);
    t.sessions.add(labels, 1);
    t.sessions.add(labels, -2);
    t.sessionsTotal.add(labels, 1);
    // Direct updates of the same metric (as the SMTP side makes) add up with the tallied ones.
    m.sessionsTotal.inc(labels);
    text = await registry.metrics();
    expect(text).toMatch(/pairgate_sessions\{protocol="imap",pair="pair-a",role="proxy"\} 0\b/);
    expect(text).toMatch(/pairgate_sessions_total\{protocol="imap",pair="pair-a",role="proxy"\} 3\b/);
    // A read of the one metric flushes it too.
    t.logins.add({ protocol: 'pop3', result: 'ok' }, 1);
    const logins = await m.logins.get();
    expect(logins.values).toEqual([expect.objectContaining({ labels: { protocol: 'pop3', result: 'ok' }, value: 1 })]);
  });
});

describe('LazyLog (a session logger whose pino child is made on the first line written)', () => {
  const captured = (level: string) => {
    const lines: Array<Record<string, unknown>> = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
        cb();
      },
    });
    return { log: createLogger({ role: 'proxy', level, destination: sink }), lines };
  };

  it('makes no child while nothing is logged at an enabled level, then writes what an eager child would', async () => {
    const { log, lines } = captured('warn');
    let made = 0;
    const lazy = new LazyLog(log, () => (made++, { cid: 'abc', client: '192.0.2.1' }));
    lazy.info({ x: 1 }, 'not written');
    lazy.debug('not written either');
    expect(made).toBe(0);
    expect(lazy.isLevelEnabled('info')).toBe(false);
    const more = lazy.with({ user: 'alice', pair: 'pair-a' });
    more.info('still nothing');
    expect(made).toBe(0);
    more.warn({ reason: 'r', password: 'hunter2' }, 'written');
    lazy.warn('written too');
    lazy.error('and this');
    expect(made).toBe(2); // one child per lazy logger, made once
    log.child({ cid: 'abc', client: '192.0.2.1' }).child({ user: 'alice', pair: 'pair-a' }).warn({ reason: 'r', password: 'hunter2' }, 'written');
    await new Promise((r) => setTimeout(r, 50));
    const strip = (l: Record<string, unknown>) => ({ ...l, time: 0 });
    expect(lines).toHaveLength(4);
    expect(strip(lines[0]!)).toEqual(strip(lines[3]!));
    expect(lines[0]).toMatchObject({ level: 'warn', cid: 'abc', client: '192.0.2.1', user: 'alice', pair: 'pair-a', reason: 'r', password: '[redacted]', msg: 'written' });
    expect(lines[1]).toMatchObject({ cid: 'abc', client: '192.0.2.1', msg: 'written too' });
    expect(lines[1]).not.toHaveProperty('user');
    expect(lines[2]).toMatchObject({ level: 'error', msg: 'and this' });
  });

  it('follows the parent level at the time of the call', async () => {
    const { log, lines } = captured('warn');
    const lazy = new LazyLog(log, () => ({ cid: 'x' }));
    lazy.info('dropped');
    log.level = 'info';
    lazy.info('kept');
    await new Promise((r) => setTimeout(r, 50));
    expect(lines.map((l) => l.msg)).toEqual(['kept']);
  });
});

describe('connectAndLogin (the master-login dialogue: a state machine fed from the socket reads, one timer)', () => {
  /** A one-connection server that answers each line the proxy sends with `script(line)` (what it writes back). */
  const fakePair = async (greeting: string | string[], script: (line: string, write: (s: string) => void) => void) => {
    const server = net.createServer((s) => {
      const parts = Array.isArray(greeting) ? greeting : [greeting];
      // The greeting in pieces, some apart in time: the dialogue must wait for whole lines (and literals).
      parts.forEach((p, i) => setTimeout(() => s.write(p), i * 15));
      let buf = '';
      s.on('data', (d: Buffer) => {
        buf += d.toString('latin1');
        let i: number;
        while ((i = buf.indexOf('\r\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 2);
          script(line, (t) => s.write(t));
        }
      });
      s.on('error', () => undefined);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return { server, port: (server.address() as net.AddressInfo).port };
  };
  const login = { uid: 'alice', masterUser: 'm', masterSecret: 's', client: { address: '192.0.2.7', port: 4242 }, timeoutMs: 5000 };

  it('IMAP: reads a greeting that arrives in pieces with a literal, pipelines ID and AUTHENTICATE, keeps the bytes after the answer', async () => {
    const seen: string[] = [];
    const { server, port } = await fakePair(['* OK [CAPABILITY IMAP4rev1 SASL-IR] he', 'llo {5}\r\nab', 'cde\r\n'], (line, write) => {
      seen.push(line);
      const [tag, cmd] = line.split(' ');
      if (cmd === 'ID') write(`* ID NIL\r\n${tag} OK ID done\r\n`);
      if (cmd === 'AUTHENTICATE') write(`${tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 3 EXISTS\r\n`);
    });
    try {
      const b = await connectAndLogin('imap', { host: '127.0.0.1', port }, 2000, login);
      expect(b.capabilities).toBe('IMAP4rev1 IDLE');
      expect(b.okLine).toMatch(/^pg2 OK/);
      expect(seen[0]).toBe('pg1 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "4242")');
      expect(seen[1]).toBe(`pg2 AUTHENTICATE PLAIN ${Buffer.from('alice\0m\0s').toString('base64')}`);
      // What came after the login answer is handed on (the session writes it to the client first).
      expect(b.leftover.toString()).toBe('* 3 EXISTS\r\n');
      b.socket.destroy();
    } finally {
      server.close();
    }
  });

  it('IMAP without SASL-IR: CAPABILITY first, ID alone, then AUTHENTICATE answering the continuation', async () => {
    const seen: string[] = [];
    const { server, port } = await fakePair('* OK ready\r\n', (line, write) => {
      seen.push(line);
      const [tag, cmd] = line.split(' ');
      if (cmd === 'CAPABILITY') write(`* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n${tag} OK done\r\n`);
      else if (cmd === 'ID') write(`${tag} OK ID done\r\n`);
      else if (cmd === 'AUTHENTICATE') write('+ \r\n');
      else if (!line.startsWith('pg')) write('pg3 OK Logged in\r\n');
    });
    try {
      const b = await connectAndLogin('imap', { host: '127.0.0.1', port }, 2000, login);
      expect(seen.map((l) => l.split(' ').slice(0, 3).join(' '))).toEqual(['pg1 CAPABILITY', 'pg2 ID ("x-originating-ip"', 'pg3 AUTHENTICATE PLAIN', Buffer.from('alice\0m\0s').toString('base64'), 'pg4 CAPABILITY']);
      // The login answer had no capabilities: asked again after it (pre-login ones do not count).
      expect(b.capabilities).toBe('IMAP4rev1 AUTH=PLAIN');
      expect(b.okLine).toBe('pg3 OK Logged in');
      b.socket.destroy();
    } finally {
      server.close();
    }
  });

  it('POP3: XCLIENT and AUTH in one write; a refused master login is an AuthError, a temporary one UnavailableError', async () => {
    for (const [answer, kind] of [
      ['-ERR [AUTH] no', AuthError],
      ['-ERR [SYS/TEMP] later', UnavailableError],
    ] as const) {
      const { server, port } = await fakePair('+OK ready\r\n', (line, write) => {
        if (line.startsWith('XCLIENT')) write('+OK\r\n');
        if (line.startsWith('AUTH')) write(`${answer}\r\n`);
      });
      try {
        await expect(connectAndLogin('pop3', { host: '127.0.0.1', port }, 2000, login)).rejects.toBeInstanceOf(kind);
      } finally {
        server.close();
      }
    }
    const { server, port } = await fakePair('+OK ready\r\n', (line, write) => {
      if (line.startsWith('XCLIENT')) write('+OK\r\n');
      if (line.startsWith('AUTH')) write('+OK Logged in.\r\nrest');
    });
    try {
      const b = await connectAndLogin('pop3', { host: '127.0.0.1', port }, 2000, login);
      expect(b.okLine).toBe('+OK Logged in.');
      expect(b.leftover.toString()).toBe('rest');
      b.socket.destroy();
    } finally {
      server.close();
    }
  });

  it('times out at the login bound, fails when the pair closes, and when nothing listens', async () => {
    const silent = await fakePair('* OK [CAPABILITY IMAP4rev1 SASL-IR] hello\r\n', () => undefined);
    try {
      const started = Date.now();
      await expect(connectAndLogin('imap', { host: '127.0.0.1', port: silent.port }, 2000, { ...login, timeoutMs: 300 })).rejects.toBeInstanceOf(TimeoutError);
      // Bounded, not timed: the wait ends at the deadline, not never (generous for a loaded machine).
      expect(Date.now() - started).toBeLessThan(5000);
    } finally {
      silent.server.close();
    }
    const closing = await fakePair('+OK ready\r\n', (line, write) => {
      if (line.startsWith('XCLIENT')) write('+OK\r\n');
    });
    closing.server.on('connection', (s) => setTimeout(() => s.end(), 50));
    try {
      await expect(connectAndLogin('pop3', { host: '127.0.0.1', port: closing.port }, 2000, login)).rejects.toBeInstanceOf(UnavailableError);
    } finally {
      closing.server.close();
    }
    const gone = await fakePair('', () => undefined);
    gone.server.close();
    await new Promise((r) => setTimeout(r, 20));
    await expect(connectAndLogin('imap', { host: '127.0.0.1', port: gone.port }, 2000, login)).rejects.toThrow(/cannot connect/);
  });
});

describe('AddressSlots (per-address connection limit)', () => {
  it('counts up to the limit, refuses at it, frees on give; 0 means no limit', () => {
    const two = new AddressSlots(2);
    expect(two.take('192.0.2.1')).toBe(1);
    expect(two.take('192.0.2.1')).toBe(2);
    expect(two.take('192.0.2.1')).toBeNull();
    expect(two.take('192.0.2.2')).toBe(1);
    two.give('192.0.2.1');
    expect(two.count('192.0.2.1')).toBe(1);
    expect(two.take('192.0.2.1')).toBe(2);
    two.give('192.0.2.2');
    two.give('192.0.2.2'); // one too many: stays at zero, never negative
    expect(two.count('192.0.2.2')).toBe(0);
    const unlimited = new AddressSlots(0);
    for (let i = 1; i <= 100; i++) expect(unlimited.take('192.0.2.3')).toBe(i);
  });
});
