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
import { proxyRegistry } from '../../proxy/metrics.ts';
import { RedisBus } from '../../common/redis-bus.ts';
import { Writable } from 'node:stream';
import { silentLogger, createLogger } from '../../common/log.ts';
import { LazyLog } from '../../proxy/lazy-log.ts';
import { ProtocolError, TimeoutError, UnavailableError } from '../../common/errors.ts';
import net from 'node:net';
import { LineReader } from '../../proxy/backend.ts';
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

describe('LineReader (the master-login dialogue reader: one deadline timer per reader)', () => {
  const pairOfSockets = async (): Promise<{ server: net.Server; near: net.Socket; far: net.Socket }> => {
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const farP = new Promise<net.Socket>((r) => server.once('connection', r));
    const near = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    await new Promise((r) => near.once('connect', r));
    return { server, near, far: await farP };
  };

  it('reads lines and literals that arrive in pieces over several waits, then times out at the deadline', async () => {
    const { server, near, far } = await pairOfSockets();
    try {
      const reader = new LineReader(near, Date.now() + 300);
      far.write('* OK he');
      setTimeout(() => far.write('llo\r\n* 1 FETCH {5}\r\nab'), 20);
      setTimeout(() => far.write('cde)\r\n'), 40);
      expect(await reader.line(true)).toBe('* OK hello');
      expect(await reader.line(true)).toBe('* 1 FETCH {5}abcde)');
      const started = Date.now();
      await expect(reader.line()).rejects.toBeInstanceOf(TimeoutError);
      // Bounded, not timed: the wait ends at the deadline, not never (generous for a loaded machine).
      expect(Date.now() - started).toBeLessThan(5000);
      // Later waits fail at once, and detach leaves no timer or listener behind.
      await expect(reader.line()).rejects.toBeInstanceOf(TimeoutError);
      expect(reader.detach().length).toBe(0);
      expect(near.listenerCount('data')).toBe(0);
    } finally {
      near.destroy();
      far.destroy();
      server.close();
    }
  });

  it('fails a wait when the backend closes, and returns bytes past the last line on detach', async () => {
    const { server, near, far } = await pairOfSockets();
    try {
      const reader = new LineReader(near, Date.now() + 5000);
      far.write('+OK ready\r\nrest');
      expect(await reader.line()).toBe('+OK ready');
      far.end();
      await expect(reader.line()).rejects.toBeInstanceOf(UnavailableError);
      expect(reader.detach().toString()).toBe('rest');
    } finally {
      near.destroy();
      far.destroy();
      server.close();
    }
  });
});
