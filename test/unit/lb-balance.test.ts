/** Balancing algorithms against their definitions, config validation, PROXY header building. */
import { describe, expect, it } from 'vitest';
import { V1ProxyProtocol, V2ProxyProtocol, IPv4ProxyAddress, IPv6ProxyAddress } from 'proxy-protocol-js';
import { Balancer, type Candidate } from '../../loadbalancer/balance.ts';
import { lbConfigSchema } from '../../loadbalancer/index.ts';
import { validateConfig } from '../../common/config.ts';
import { buildProxyHeader, buildLocalHeader } from '../../loadbalancer/proxy-header.ts';
import { decodeProxyHeader } from '../../proxy/proxy-protocol.ts';

class Fake implements Candidate {
  active = 0;
  up = true;
  constructor(
    readonly name: string,
    public weight: number,
    public ramp = 1,
  ) {}
  effectiveWeight(): number {
    return this.weight * this.ramp;
  }
  eligible(): boolean {
    return this.up;
  }
}

function tally(picks: Array<Fake | null>): Record<string, number> {
  const m: Record<string, number> = {};
  for (const p of picks) m[p?.name ?? 'none'] = (m[p?.name ?? 'none'] ?? 0) + 1;
  return m;
}

describe('roundrobin (smooth weighted)', () => {
  it('gives each backend exactly its weight over every window, interleaved', () => {
    const bs = [new Fake('a', 5), new Fake('b', 1), new Fake('c', 1)];
    const bal = new Balancer('roundrobin', bs);
    const picks = Array.from({ length: 7 }, () => bal.pick('x'));
    expect(tally(picks)).toEqual({ a: 5, b: 1, c: 1 });
    // Smooth: never all of a's picks in one run (nginx gives a a b a c a a).
    expect(picks.map((p) => p!.name).join('')).not.toMatch(/aaaaa/);
    expect(tally(Array.from({ length: 700 }, () => bal.pick('x')))).toEqual({ a: 500, b: 100, c: 100 });
  });

  it('skips backends that are down and excluded ones', () => {
    const bs = [new Fake('a', 1), new Fake('b', 1), new Fake('c', 1)];
    const bal = new Balancer('roundrobin', bs);
    bs[1]!.up = false;
    expect(tally(Array.from({ length: 10 }, () => bal.pick('x')))).toEqual({ a: 5, c: 5 });
    expect(bal.pick('x', new Set([bs[0]!, bs[2]!]))).toBeNull();
  });

  it('slow start: a ramping backend gets a proportionally smaller share', () => {
    const bs = [new Fake('a', 1), new Fake('b', 1, 0.25)];
    const bal = new Balancer('roundrobin', bs);
    expect(tally(Array.from({ length: 500 }, () => bal.pick('x')))).toEqual({ a: 400, b: 100 });
  });
});

describe('leastconn (weighted)', () => {
  it('fills backends in proportion to weight and prefers the least loaded', () => {
    const bs = [new Fake('a', 1), new Fake('b', 2), new Fake('c', 1)];
    const bal = new Balancer('leastconn', bs);
    for (let i = 0; i < 400; i++) bal.pick('x')!.active++;
    expect(bs.map((b) => b.active)).toEqual([100, 200, 100]);
    bs[2]!.active = 10;
    expect(bal.pick('x')!.name).toBe('c');
  });

  it('ties go round-robin', () => {
    const bs = [new Fake('a', 1), new Fake('b', 1), new Fake('c', 1)];
    const bal = new Balancer('leastconn', bs);
    expect(tally(Array.from({ length: 30 }, () => bal.pick('x')))).toEqual({ a: 10, b: 10, c: 10 });
  });
});

describe('source (consistent hash)', () => {
  const addrs = Array.from({ length: 4000 }, (_v, i) => `10.${(i >> 8) & 255}.${i & 255}.${(i * 7) & 255}`);

  it('spreads addresses by weight within a tolerance and is stable', () => {
    const bs = [new Fake('p1', 1), new Fake('p2', 1), new Fake('p3', 2)];
    const bal = new Balancer('source', bs);
    const t = tally(addrs.map((a) => bal.pick(a)));
    expect(t.p1! / 4000).toBeGreaterThan(0.18);
    expect(t.p1! / 4000).toBeLessThan(0.32);
    expect(t.p3! / 4000).toBeGreaterThan(0.4);
    expect(t.p3! / 4000).toBeLessThan(0.6);
    const again = new Balancer('source', [new Fake('p3', 2), new Fake('p1', 1), new Fake('p2', 1)]);
    expect(addrs.map((a) => again.pick(a)!.name)).toEqual(addrs.map((a) => bal.pick(a)!.name));
  });

  it('adding a backend moves few clients, and only to the new one', () => {
    const three = [new Fake('p1', 1), new Fake('p2', 1), new Fake('p3', 1)];
    const before = new Balancer('source', three);
    const after = new Balancer('source', [...three, new Fake('p4', 1)]);
    let moved = 0;
    for (const a of addrs) {
      const x = before.pick(a)!.name;
      const y = after.pick(a)!.name;
      if (x !== y) {
        moved++;
        expect(y).toBe('p4');
      }
    }
    // Ideal is 1/4; a modulo hash would move about 3/4.
    expect(moved / addrs.length).toBeGreaterThan(0.15);
    expect(moved / addrs.length).toBeLessThan(0.35);
  });

  it('a down backend sends only its own clients elsewhere', () => {
    const bs = [new Fake('p1', 1), new Fake('p2', 1), new Fake('p3', 1)];
    const bal = new Balancer('source', bs);
    const first = addrs.map((a) => bal.pick(a)!.name);
    bs[1]!.up = false;
    const second = addrs.map((a) => bal.pick(a)!.name);
    first.forEach((n, i) => {
      if (n !== 'p2') expect(second[i]).toBe(n);
      else expect(second[i]).not.toBe('p2');
    });
  });
});

describe('config', () => {
  const base = { listeners: [{ name: 'imap', listen: '0.0.0.0:143', pool: 'imap' }], pools: { imap: { backends: [{ name: 'p1', address: '10.0.0.1:143' }] } } };

  it('fills defaults (leastconn, PROXY v2, checks on)', () => {
    const c = validateConfig(lbConfigSchema, base);
    expect(c.pools.imap!.balance).toBe('leastconn');
    expect(c.pools.imap!.proxyProtocol).toBe('v2');
    expect(c.pools.imap!.check).toMatchObject({ enabled: true, fall: 3, rise: 2 });
    expect(c.relay).toEqual({ bulkBufferBytes: 1024 * 1024, maxBulkConnections: 64 });
  });

  it('relay buffers: 0 bulk connections is allowed (copy per read only); a buffer under 64 KiB is refused, naming the key', () => {
    expect(validateConfig(lbConfigSchema, { ...base, relay: { maxBulkConnections: 0 } }).relay.maxBulkConnections).toBe(0);
    expect(() => validateConfig(lbConfigSchema, { ...base, relay: { bulkBufferBytes: 4096 } })).toThrow(/relay\.bulkBufferBytes/);
  });

  it('names an unknown balancing method, a duplicate port, an unknown pool, a duplicate backend', () => {
    expect(() => validateConfig(lbConfigSchema, { ...base, pools: { imap: { balance: 'random', backends: base.pools.imap.backends } } })).toThrow(
      /pools\.imap\.balance: expected one of leastconn\|roundrobin\|source, got "random"/,
    );
    expect(() => validateConfig(lbConfigSchema, { ...base, listeners: [...base.listeners, { name: 'imap2', listen: '10.0.0.5:143', pool: 'imap' }] })).toThrow(
      /listeners\[1\]\.listen: duplicate port 143 \(also used by listener imap\)/,
    );
    expect(() => validateConfig(lbConfigSchema, { ...base, listeners: [{ name: 'x', listen: '0.0.0.0:25', pool: 'smtp' }] })).toThrow(/listeners\[0\]\.pool: no pool named smtp/);
    expect(() =>
      validateConfig(lbConfigSchema, { ...base, pools: { imap: { backends: [{ name: 'p1', address: 'a:1' }, { name: 'p1', address: 'b:1' }] } } }),
    ).toThrow(/duplicate backend name p1/);
    expect(() => validateConfig(lbConfigSchema, { ...base, pools: { imap: { backends: [{ name: 'p1', address: 'nohost' }] } } })).toThrow(/address: expected host:port/);
    // Different addresses on the same port are fine.
    expect(() =>
      validateConfig(lbConfigSchema, {
        ...base,
        listeners: [
          { name: 'a', listen: '10.0.0.1:143', pool: 'imap' },
          { name: 'b', listen: '10.0.0.2:143', pool: 'imap' },
        ],
      }),
    ).not.toThrow();
  });
});

describe('PROXY header', () => {
  it('v2 TCP4/TCP6 and v1 decode with proxy-protocol-js to the given addresses', () => {
    const v4 = V2ProxyProtocol.parse(new Uint8Array(buildProxyHeader('v2', { address: '192.0.2.7', port: 40000 }, { address: '198.51.100.1', port: 143 })));
    const a4 = v4.proxyAddress as IPv4ProxyAddress;
    expect([a4.sourceAddress.address.join('.'), a4.sourcePort, a4.destinationAddress.address.join('.'), a4.destinationPort]).toEqual(['192.0.2.7', 40000, '198.51.100.1', 143]);
    const v6 = V2ProxyProtocol.parse(new Uint8Array(buildProxyHeader('v2', { address: '2001:db8::7', port: 1 }, { address: '2001:db8::1:0', port: 993 })));
    const a6 = v6.proxyAddress as IPv6ProxyAddress;
    expect(a6.sourceAddress.address).toEqual([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    expect(a6.destinationAddress.address).toEqual([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
    const e4 = V2ProxyProtocol.parse(new Uint8Array(buildProxyHeader('v2', { address: '255.0.10.1', port: 65535 }, { address: '0.0.0.0', port: 0 })));
    const b4 = e4.proxyAddress as IPv4ProxyAddress;
    expect([b4.sourceAddress.address, b4.sourcePort, b4.destinationAddress.address]).toEqual([[255, 0, 10, 1], 65535, [0, 0, 0, 0]]);
    const t6 = V2ProxyProtocol.parse(new Uint8Array(buildProxyHeader('v2', { address: '64:ff9b::198.51.100.20', port: 2 }, { address: '::1', port: 993 })));
    expect((t6.proxyAddress as IPv6ProxyAddress).sourceAddress.address).toEqual([0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, 198, 51, 100, 20]);
    // Mapped addresses from a dual-stack listener go out as TCP4.
    const m = V2ProxyProtocol.parse(new Uint8Array(buildProxyHeader('v2', { address: '::ffff:192.0.2.9', port: 5 }, { address: '::ffff:10.0.0.1', port: 110 })));
    expect(m.proxyAddress).toBeInstanceOf(IPv4ProxyAddress);
    const v1 = V1ProxyProtocol.parse(buildProxyHeader('v1', { address: '192.0.2.7', port: 40000 }, { address: '198.51.100.1', port: 143 }).toString());
    expect([v1.source.ipAddress, v1.source.port, v1.destination.ipAddress, v1.destination.port]).toEqual(['192.0.2.7', 40000, '198.51.100.1', 143]);
    expect(buildProxyHeader('none', { address: '1.2.3.4', port: 1 }, { address: '1.2.3.4', port: 2 }).length).toBe(0);
    expect(buildLocalHeader().length).toBe(16);
  });

  it("the pairgate proxy's reader (proxy/proxy-protocol.ts) decodes what the balancer writes, health checks as LOCAL", () => {
    const cases: Array<[string, string]> = [
      ['192.0.2.7', '198.51.100.1'],
      ['2001:db8::7', '2001:db8::1'],
      ['::ffff:192.0.2.9', '::ffff:10.0.0.1'],
    ];
    for (const [src, dst] of cases) {
      for (const v of ['v1', 'v2'] as const) {
        const buf = buildProxyHeader(v, { address: src, port: 40001 }, { address: dst, port: 143 });
        const d = decodeProxyHeader(Buffer.concat([buf, Buffer.from('a1 CAPABILITY\r\n')]));
        expect(d!.length).toBe(buf.length);
        expect(d!.header).toEqual({ version: v === 'v1' ? 1 : 2, source: { address: src.replace('::ffff:', ''), port: 40001 } });
      }
    }
    expect(decodeProxyHeader(buildLocalHeader())!.header.source).toBeNull();
  });
});
