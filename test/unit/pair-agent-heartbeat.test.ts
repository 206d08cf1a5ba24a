/** Heartbeat datagrams: round trip, and every kind of bad datagram dropped with its reason. */
import { describe, expect, it } from 'vitest';
import { decodeHeartbeat, decodeRequest, encodeHeartbeat, encodeRequest, ReplayGuard, type HeartbeatMessage } from '../../pair-agent/ha/heartbeat-codec.ts';

const key = Buffer.from('k'.repeat(32));
const msg = (seq: number, gen = 1000): HeartbeatMessage => ({
  pair: 'pair-01',
  node: 'a',
  gen,
  seq,
  view: { state: 'primary', holds: true, disk: 'UpToDate', ping: true, request: 'none', failed: false },
});
const expectFrom = { pair: 'pair-01', peer: 'a' as const };

describe('heartbeat codec', () => {
  it('round-trips a signed view', () => {
    const d = decodeHeartbeat(key, encodeHeartbeat(key, msg(7)), expectFrom);
    expect(d).toEqual({ ok: true, message: msg(7) });
  });
  it('carries `unclean` only while true, so a clean view encodes as the release before it did', () => {
    const unclean = { ...msg(8), view: { ...msg(8).view, unclean: true as const } };
    expect(decodeHeartbeat(key, encodeHeartbeat(key, unclean), expectFrom)).toEqual({ ok: true, message: unclean });
    expect(encodeHeartbeat(key, msg(8)).toString('latin1')).not.toContain('unclean');
    const saysFalse = encodeHeartbeat(key, { ...msg(9), view: { ...msg(9).view, unclean: false } } as unknown as HeartbeatMessage);
    expect(decodeHeartbeat(key, saysFalse, expectFrom)).toEqual({ ok: false, reason: 'malformed' });
  });
  it('requests travel in datagrams of their own: signed, and dropped as bad-magic by a view decoder (a peer of the release before)', () => {
    const req = { pair: 'pair-01', node: 'a' as const, gen: 1000, seq: 10, request: 'outdate' as const };
    const d = encodeRequest(key, req);
    expect(decodeRequest(key, d, expectFrom)).toEqual({ ok: true, message: req });
    expect(decodeHeartbeat(key, d, expectFrom)).toEqual({ ok: false, reason: 'bad-magic' });
    expect(decodeRequest(Buffer.from('other key'), d, expectFrom)).toEqual({ ok: false, reason: 'forged' });
    expect(decodeRequest(key, d, { pair: 'pair-01', peer: 'b' })).toEqual({ ok: false, reason: 'unknown-node' });
    expect(decodeRequest(key, encodeRequest(key, { ...req, request: 'promote' } as unknown as typeof req), expectFrom)).toEqual({ ok: false, reason: 'malformed' });
    expect(decodeRequest(key, encodeHeartbeat(key, msg(1)), expectFrom)).toEqual({ ok: false, reason: 'bad-magic' });
  });
  it('drops short, foreign, forged and malformed datagrams', () => {
    const good = encodeHeartbeat(key, msg(1));
    expect(decodeHeartbeat(key, Buffer.alloc(0), expectFrom)).toEqual({ ok: false, reason: 'short' });
    expect(decodeHeartbeat(key, good.subarray(0, 20), expectFrom)).toEqual({ ok: false, reason: 'short' });
    expect(decodeHeartbeat(key, Buffer.alloc(2000), expectFrom)).toEqual({ ok: false, reason: 'oversize' });
    expect(decodeHeartbeat(key, Buffer.concat([Buffer.from('XXXX'), good.subarray(4)]), expectFrom)).toEqual({ ok: false, reason: 'bad-magic' });
    expect(decodeHeartbeat(Buffer.from('other key'), good, expectFrom)).toEqual({ ok: false, reason: 'forged' });
    const flipped = Buffer.from(good);
    flipped[10] = flipped[10]! ^ 1;
    expect(decodeHeartbeat(key, flipped, expectFrom)).toEqual({ ok: false, reason: 'forged' });
    expect(decodeHeartbeat(key, good, { pair: 'pair-02', peer: 'a' })).toEqual({ ok: false, reason: 'unknown-node' });
    expect(decodeHeartbeat(key, good, { pair: 'pair-01', peer: 'b' })).toEqual({ ok: false, reason: 'unknown-node' });
  });
  it('drops a correctly signed body that does not match the schema', () => {
    const bad = encodeHeartbeat(key, { ...msg(1), view: { state: 'bogus' } } as unknown as HeartbeatMessage);
    expect(decodeHeartbeat(key, bad, expectFrom)).toEqual({ ok: false, reason: 'malformed' });
  });
  it('seeded fuzz: random bytes and bit flips never decode', () => {
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    const good = encodeHeartbeat(key, msg(1));
    for (let i = 0; i < 500; i++) {
      const buf = rand() < 0.5 ? Buffer.from(Array.from({ length: Math.floor(rand() * 300) }, () => Math.floor(rand() * 256))) : Buffer.from(good);
      if (buf === good || buf.length === good.length) buf[Math.floor(rand() * buf.length)] ^= 1 + Math.floor(rand() * 255);
      expect(decodeHeartbeat(key, buf, expectFrom).ok, `seed 12345 iteration ${i}`).toBe(false);
    }
  });
});

describe('replay guard', () => {
  it('accepts growing sequences, drops replays and duplicates, accepts a new generation', () => {
    const g = new ReplayGuard();
    expect(g.check({ gen: 5, seq: 1 })).toEqual({ ok: true, restarted: false });
    expect(g.check({ gen: 5, seq: 2 }).ok).toBe(true);
    expect(g.check({ gen: 5, seq: 2 })).toEqual({ ok: false, reason: 'duplicate' });
    expect(g.check({ gen: 5, seq: 1 })).toEqual({ ok: false, reason: 'replay' });
    expect(g.check({ gen: 6, seq: 1 })).toEqual({ ok: true, restarted: true });
    expect(g.check({ gen: 5, seq: 99 })).toEqual({ ok: false, reason: 'replay' });
  });
});
