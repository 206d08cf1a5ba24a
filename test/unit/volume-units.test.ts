/**
 * The volume's pure parts: the UUID decision table (each DRBD rule that applies, and mirror
 * symmetry), the split-brain policies, the frame codec against bad input, and the metadata file.
 */
import { mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statfsSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ProtocolError, IntegrityError } from '../../common/errors.ts';
import { crc32c, crc32cJs } from '../../pair-agent/store/crc32c.ts';
import { AL_SLOT_BYTES, ActivityLogFile, Bitmap, JUST_CREATED, NO_UUID, freshMetadata, readMetadata, retireBitmapUuid, rotateUuids, writeMetadata, type Uuids } from '../../pair-agent/volume/metadata.ts';
import { AlignedPool, DIRECT_CHUNK, FileBlockDevice, sliceWriteData } from '../../pair-agent/volume/block-device.ts';
import { volumeConfigSchema } from '../../pair-agent/volume/config.ts';
import { ReplicatedVolume } from '../../pair-agent/volume/replicated-volume.ts';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { compareUuids, mirrorDecision, splitBrainVictim, type UuidSide } from '../../pair-agent/volume/uuid-compare.ts';
import { FrameDecoder, FrameType, HEADER_BYTES, MAX_PAYLOAD, authMatches, authResponse, decodeBlockWrite, decodeBlockWriteParts, decodeSeqs, encodeBlockWrite, encodeFrame, encodeSeqs } from '../../pair-agent/volume/wire.ts';

const side = (uuids: Partial<Uuids>, extra: Partial<UuidSide> = {}): UuidSide => ({
  uuids: { current: 'aaaa', bitmap: NO_UUID, history: [NO_UUID, NO_UUID], ...uuids },
  primaryCrashed: false,
  name: 'x',
  ...extra,
});

describe('UUID decision table', () => {
  const cases: Array<[string, UuidSide, UuidSide, string, number]> = [
    ['two fresh volumes: no initial sync', side({ current: JUST_CREATED }), side({ current: JUST_CREATED }), 'no-sync', 10],
    ['fresh self, peer promoted alone from the same fresh state: bitmap resync', side({ current: JUST_CREATED }), side({ current: 'c1', bitmap: JUST_CREATED }), 'target', 15],
    ['fresh self, peer with data: full sync from the peer', side({ current: JUST_CREATED }), side({ current: 'c1' }), 'target-full', 20],
    ['fresh peer: full sync to it', side({ current: 'c1' }), side({ current: JUST_CREATED }), 'source-full', 30],
    ['same generation, clean: nothing', side({ current: 'c1' }), side({ current: 'c1' }), 'no-sync', 42],
    ['same generation, self crashed as primary: resend its activity log', side({ current: 'c1' }, { primaryCrashed: true }), side({ current: 'c1' }), 'source', 40],
    ['same generation, peer crashed as primary', side({ current: 'c1' }), side({ current: 'c1' }, { primaryCrashed: true }), 'target', 40],
    ['peer moved on from our generation: bitmap resync from it', side({ current: 'c1' }), side({ current: 'c2', bitmap: 'c1' }), 'target', 50],
    ['our generation is in the peer history: full resync from it', side({ current: 'c1' }), side({ current: 'c3', history: ['c2', 'c1'] }), 'target-full', 60],
    ['we moved on from the peer generation', side({ current: 'c2', bitmap: 'c1' }), side({ current: 'c1' }), 'source', 70],
    ['the peer generation is in our history', side({ current: 'c3', history: ['c2', 'c1'] }), side({ current: 'c1' }), 'source-full', 80],
    ['both moved on from the same generation: split brain', side({ current: 'c2', bitmap: 'c1' }), side({ current: 'c3', bitmap: 'c1' }), 'split-brain', 90],
    ['older common ancestor only: split brain', side({ current: 'c5', bitmap: 'c4', history: ['c1', NO_UUID] }), side({ current: 'c6', bitmap: 'c3', history: ['c1', NO_UUID] }), 'split-brain', 100],
    ['nothing in common: unrelated', side({ current: 'c1', bitmap: 'c0' }), side({ current: 'd1', bitmap: 'd0' }), 'unrelated', 1000],
  ];
  for (const [name, self, peer, decision, rule] of cases) {
    it(`${name} (rule ${rule})`, () => {
      expect(compareUuids(self, peer)).toEqual({ decision, rule });
      // The peer, running the same function, reaches the mirror image.
      expect(compareUuids(peer, self).decision).toBe(mirrorDecision(decision as never));
    });
  }

  it('both crashed as primary of the same generation: the tie is broken the same way on both sides', () => {
    const a = side({ current: 'c1' }, { primaryCrashed: true, name: 'a' });
    const b = side({ current: 'c1' }, { primaryCrashed: true, name: 'b' });
    expect(compareUuids(a, b).decision).toBe('source');
    expect(compareUuids(b, a).decision).toBe('target');
  });

  it('generations rotate as DRBD does: new current, old current kept as bitmap UUID, then history', () => {
    const u0: Uuids = { current: 'c1', bitmap: NO_UUID, history: [NO_UUID, NO_UUID] };
    const u1 = rotateUuids(u0);
    expect(u1.bitmap).toBe('c1');
    expect(u1.current).not.toBe('c1');
    expect(rotateUuids(u1).bitmap).toBe('c1'); // a second promotion keeps the bitmap base
    expect(retireBitmapUuid(u1)).toEqual({ current: u1.current, bitmap: NO_UUID, history: ['c1', NO_UUID] });
  });
});

describe('after-split-brain policies', () => {
  const s = (name: string, changes: number, primarySince: number, primary = false) => ({ name, changes, primarySince, primary });
  const zero = (p: string) => ({ afterSb0Pri: p as never, afterSb1Pri: 'disconnect' as const });
  it('disconnect: always the operator', () => expect(splitBrainVictim(s('a', 0, 1), s('b', 5, 2), zero('disconnect'))).toBeNull());
  it('discard-zero-changes', () => {
    expect(splitBrainVictim(s('a', 0, 1), s('b', 5, 2), zero('discard-zero-changes'))).toBe('self');
    expect(splitBrainVictim(s('a', 3, 1), s('b', 5, 2), zero('discard-zero-changes'))).toBeNull();
  });
  it('discard-younger-primary', () => expect(splitBrainVictim(s('a', 3, 10), s('b', 5, 20), zero('discard-younger-primary'))).toBe('peer'));
  it('discard-least-changes', () => expect(splitBrainVictim(s('a', 3, 10), s('b', 5, 20), zero('discard-least-changes'))).toBe('self'));
  it('one primary: discard-secondary and consensus', () => {
    const p = s('a', 3, 10, true);
    const q = s('b', 0, 20);
    expect(splitBrainVictim(p, q, { afterSb0Pri: 'disconnect', afterSb1Pri: 'discard-secondary' })).toBe('peer');
    expect(splitBrainVictim(p, q, { afterSb0Pri: 'discard-zero-changes', afterSb1Pri: 'consensus' })).toBe('peer');
    expect(splitBrainVictim(p, q, { afterSb0Pri: 'discard-younger-primary', afterSb1Pri: 'consensus' })).toBe('peer');
    expect(splitBrainVictim(p, s('b', 9, 5), { afterSb0Pri: 'discard-younger-primary', afterSb1Pri: 'consensus' })).toBeNull();
  });
  it('two primaries: never decided automatically', () => {
    expect(splitBrainVictim(s('a', 0, 1, true), s('b', 5, 2, true), { afterSb0Pri: 'discard-zero-changes', afterSb1Pri: 'discard-secondary' })).toBeNull();
  });
});

describe('replication frames', () => {
  it('round trip, split across any chunk boundaries', () => {
    const payload = Buffer.concat(encodeBlockWrite(8192, Buffer.alloc(4096, 7)));
    const wire = Buffer.concat([...encodeFrame(FrameType.Data, 42, payload), ...encodeFrame(FrameType.Ping, 43)]);
    for (const step of [1, 7, 24, 100, wire.length]) {
      const d = new FrameDecoder();
      const frames = [];
      for (let i = 0; i < wire.length; i += step) frames.push(...d.push(wire.subarray(i, i + step)));
      expect(frames.map((f) => [f.type, f.seq])).toEqual([
        [FrameType.Data, 42],
        [FrameType.Ping, 43],
      ]);
      expect(decodeBlockWrite(frames[0]!.payload)).toEqual({ offset: 8192, data: Buffer.alloc(4096, 7) });
      // The same write from the parts (views of the chunks, the offset possibly split across two).
      const w = decodeBlockWriteParts(frames[0]!);
      expect(w.offset).toBe(8192);
      expect(w.length).toBe(4096);
      expect(Buffer.concat(w.data)).toEqual(Buffer.alloc(4096, 7));
      expect(frames[1]!.payload.length).toBe(0);
    }
  });

  it('large payloads are kept as views of the received chunks, checksummed as they arrive', () => {
    const block = Buffer.alloc(256 * 1024);
    for (let i = 0; i < block.length; i++) block[i] = (i * 131 + 7) & 0xff;
    const wire = Buffer.concat([...encodeFrame(FrameType.Data, 9, encodeBlockWrite(1 << 20, block)), ...encodeFrame(FrameType.Ping, 10)]);
    for (const step of [3, 1000, 65536, wire.length]) {
      const d = new FrameDecoder();
      const frames = [];
      for (let i = 0; i < wire.length; i += step) frames.push(...d.push(wire.subarray(i, i + step)));
      expect(frames.map((f) => f.type)).toEqual([FrameType.Data, FrameType.Ping]);
      const w = decodeBlockWriteParts(frames[0]!);
      expect(w.offset).toBe(1 << 20);
      expect(Buffer.concat(w.data)).toEqual(block);
      // no copy: every part shares memory with the wire buffer
      for (const p of w.data) expect(p.buffer).toBe(wire.buffer);
      expect(d.pending).toBe(0);
    }
    // one flipped bit anywhere in the payload is caught, whatever the chunking
    const bad = Buffer.from(wire);
    bad[HEADER_BYTES + 8 + 200_000] ^= 0x10;
    for (const step of [1000, 65536, bad.length]) {
      const d = new FrameDecoder();
      expect(() => {
        for (let i = 0; i < bad.length; i += step) d.push(bad.subarray(i, i + step));
      }).toThrow(/payload checksum/);
    }
  });

  it('owned reads: payloads land in the buffers chosen for them, straight from the read or copied from the scratch buffer', () => {
    const block = Buffer.alloc(256 * 1024);
    for (let i = 0; i < block.length; i++) block[i] = (i * 131 + 7) & 0xff;
    const wire = Buffer.concat([
      ...encodeFrame(FrameType.Ping, 1),
      ...encodeFrame(FrameType.Data, 9, encodeBlockWrite(1 << 20, block), 1),
      ...encodeFrame(FrameType.State, 2, Buffer.from('{"x":1}')),
      ...encodeFrame(FrameType.Data, 10, encodeBlockWrite(4096, block.subarray(0, 4096))),
    ]);
    for (const step of [1, 5, 24, 1000, 65536, wire.length]) {
      const targets: Buffer[] = [];
      const d = new FrameDecoder(MAX_PAYLOAD, (type, length) => {
        if (type !== FrameType.Data) return null;
        const t = Buffer.alloc(length - 8);
        targets.push(t);
        return [Buffer.alloc(8), t];
      });
      const frames = [];
      // A socket that fills at most `step` bytes of whatever buffer it is given.
      for (let at = 0; at < wire.length; ) {
        const buf = d.readBuffer();
        const n = Math.min(step, buf.length, wire.length - at);
        wire.copy(buf, 0, at, at + n);
        at += n;
        frames.push(...d.received(buf, n));
      }
      expect(frames.map((f) => [f.type, f.seq, f.flags])).toEqual([[FrameType.Ping, 1, 0], [FrameType.Data, 9, 1], [FrameType.State, 2, 0], [FrameType.Data, 10, 0]]);
      const w = decodeBlockWriteParts(frames[1]!);
      expect(w.offset).toBe(1 << 20);
      expect(w.data).toEqual([targets[0]]); // the chosen buffer itself, not a copy
      expect(targets[0]!.equals(block)).toBe(true);
      expect(decodeBlockWriteParts(frames[3]!).data[0]!.equals(block.subarray(0, 4096))).toBe(true);
      expect(frames[2]!.payload.toString()).toBe('{"x":1}');
      expect(d.pending).toBe(0);
    }
    // A flipped bit: caught whether the byte came through the scratch buffer or straight into the target.
    for (const step of [1000, 65536, wire.length]) {
      const bad = Buffer.from(wire);
      bad[2 * HEADER_BYTES + 8 + 200_000] ^= 0x10;
      const d = new FrameDecoder(MAX_PAYLOAD, (type, length) => (type === FrameType.Data ? [Buffer.alloc(8), Buffer.alloc(length - 8)] : null));
      const got: number[] = [];
      expect(() => {
        for (let at = 0; at < bad.length; ) {
          const buf = d.readBuffer();
          const n = Math.min(step, buf.length, bad.length - at);
          bad.copy(buf, 0, at, at + n);
          at += n;
          got.push(...d.received(buf, n).map((f) => f.type));
        }
      }).toThrow(/payload checksum/);
      expect(got).toEqual([FrameType.Ping]); // nothing of the bad frame delivered
    }
  });

  const bad = (mutate: (b: Buffer) => void, message: RegExp) => {
    const b = Buffer.concat(encodeFrame(FrameType.State, 1, Buffer.from('{"role":"primary"}')));
    mutate(b);
    expect(() => new FrameDecoder().push(b)).toThrow(message);
    expect(() => new FrameDecoder().push(b)).toThrow(ProtocolError);
  };
  it('wrong magic', () => bad((b) => b.writeUInt32BE(0x12345678, 0), /magic/));
  it('wrong header checksum', () => bad((b) => (b[9] ^= 1), /header checksum/));
  it('wrong payload checksum', () => bad((b) => (b[HEADER_BYTES + 2] ^= 1), /payload checksum/));
  it('unknown type (with a valid header checksum)', () => {
    const b = Buffer.concat(encodeFrame(FrameType.Ping, 1));
    b[4] = 200;
    b.writeUInt32BE(crc32c(b, 0, 0, 20), 20);
    expect(() => new FrameDecoder().push(b)).toThrow(/unknown frame type 200/);
  });
  it('length over the limit', () => {
    const b = Buffer.concat(encodeFrame(FrameType.Ping, 1));
    b.writeUInt32BE(MAX_PAYLOAD + 1, 12);
    b.writeUInt32BE(crc32c(b, 0, 0, 20), 20);
    expect(() => new FrameDecoder().push(b)).toThrow(/over the/);
  });
  it('a truncated frame is held, not delivered', () => {
    const d = new FrameDecoder();
    expect(d.push(Buffer.concat(encodeFrame(FrameType.Ping, 1)).subarray(0, 10))).toEqual([]);
    expect(d.pending).toBe(10);
  });
  it('HMAC handshake answers bind the secret, the volume and both nonces', () => {
    const r = authResponse('secret-0123456789', 'vol', 'n1', 'n2');
    expect(authMatches(r, authResponse('secret-0123456789', 'vol', 'n1', 'n2'))).toBe(true);
    expect(authMatches(r, authResponse('secret-0123456789', 'vol', 'n2', 'n1'))).toBe(false);
    expect(authMatches(r, authResponse('other-secret-012345', 'vol', 'n1', 'n2'))).toBe(false);
    expect(authMatches(r, authResponse('secret-0123456789', 'vol2', 'n1', 'n2'))).toBe(false);
    expect(authMatches(r, r.subarray(0, 16))).toBe(false);
  });
});

describe('CRC-32C', () => {
  it('the native binding and the table-driven fallback agree, whole, continued and on sub-ranges', () => {
    const b = Buffer.alloc(100_003);
    for (let i = 0; i < b.length; i++) b[i] = (i * 7919) & 0xff;
    expect(crc32c(b)).toBe(crc32cJs(b));
    expect(crc32c(b, crc32c(b.subarray(0, 500)), 500)).toBe(crc32cJs(b));
    expect(crc32c(b, 0, 1000, 90_000)).toBe(crc32cJs(b, 0, 1000, 90_000));
    expect(crc32c(new Uint8Array(b.buffer, b.byteOffset + 3, 5000))).toBe(crc32cJs(b, 0, 3, 5003));
    expect(crc32cJs(Buffer.from('123456789'))).toBe(0xe3069283); // the standard check value
  });
});

describe('volume metadata file', () => {
  it('round trip with bitmap and activity log; a corrupted file is refused, not misread', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-meta-'));
    try {
      const file = join(dir, 'v.meta');
      const m = freshMetadata(8 * 1024 * 1024);
      m.bitmap.setRange(100, 10);
      m.activityLog = [0, 3];
      m.uuids = rotateUuids({ current: 'c1', bitmap: NO_UUID, history: [NO_UUID, NO_UUID] });
      writeMetadata(file, m);
      const back = readMetadata(file)!;
      expect(back.bitmap.setCount).toBe(10);
      expect(back.bitmap.get(105)).toBe(true);
      expect(back.activityLog).toEqual([0, 3]);
      expect(back.uuids).toEqual(m.uuids);
      const raw = readFileSync(file);
      raw[raw.length - 5] ^= 0xff;
      writeFileSync(file, raw);
      expect(() => readMetadata(file)).toThrow(IntegrityError);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('fresh metadata is Inconsistent (never promotable alone without force) and "just created"', () => {
    const m = freshMetadata(8 * 1024 * 1024);
    expect(m.disk).toBe('Inconsistent');
    expect(m.flags.consistent).toBe(false);
    expect(m.uuids).toEqual({ current: JUST_CREATED, bitmap: NO_UUID, history: [NO_UUID, NO_UUID] });
    expect(m.bitmap.setCount).toBe(0);
  });

  it('bitmap: counts, next set bit, merge', () => {
    const b = new Bitmap(100);
    b.set(3);
    b.set(64);
    expect(b.next(0)).toBe(3);
    expect(b.next(4)).toBe(64);
    expect(b.next(65)).toBe(-1);
    const o = new Bitmap(100);
    o.set(99);
    b.merge(o.bits);
    expect(b.setCount).toBe(3);
    b.clearRange(0, 100);
    expect(b.setCount).toBe(0);
  });
});

describe('activity log file', () => {
  it('alternates two checksummed slots: the newest valid one is read back; a torn slot leaves the previous log', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-al-'));
    try {
      const file = join(dir, 'v.meta.al');
      const al = await ActivityLogFile.open(file);
      expect(al.extents).toEqual([]);
      await al.write([1, 2]);
      await al.write([1, 2, 7]);
      const pending = al.write([1, 2, 7, 9]);
      expect(al.pending).not.toBeNull();
      await pending;
      expect(al.pending).toBeNull();
      await al.close();
      const reopened = await ActivityLogFile.open(file);
      expect(reopened.extents).toEqual([1, 2, 7, 9]);
      await reopened.close();
      // Tear the newest slot (sequence 3, odd: the second slot): the one before it is read.
      const second = AL_SLOT_BYTES;
      const fd = openSync(file, 'r+');
      writeSync(fd, Buffer.from([0xff, 0xee]), 0, 2, second + 18);
      closeSync(fd);
      const back = await ActivityLogFile.open(file);
      expect(back.extents).toEqual([1, 2, 7]);
      await back.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('write acknowledgements', () => {
  it('one frame carries every sequence number one flush made durable; a ragged list is refused', () => {
    expect(decodeSeqs(encodeSeqs([1, 2, 0xffffffff]))).toEqual([1, 2, 0xffffffff]);
    expect(() => decodeSeqs(Buffer.alloc(6))).toThrow(ProtocolError);
    expect(() => decodeSeqs(Buffer.alloc(0))).toThrow(ProtocolError);
  });
});

describe('file block device', () => {
  it('a lone write (O_DSYNC) and concurrent writes (group commit) all land, in order for the same block', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-bd-'));
    try {
      const dev = await FileBlockDevice.open(join(dir, 'd'), { size: 1024 * 1024, create: true });
      expect(dev.idle).toBe(true);
      await dev.write(0, Buffer.alloc(4096, 1));
      expect(dev.idle).toBe(true);
      await Promise.all(Array.from({ length: 20 }, (_, i) => dev.write((i + 1) * 4096, Buffer.alloc(4096, i + 2))));
      await dev.write(4096, Buffer.alloc(4096, 99));
      expect((await dev.read(0, 4096))[100]).toBe(1);
      expect((await dev.read(4096, 4096))[0]).toBe(99);
      expect((await dev.read(20 * 4096, 4096))[4095]).toBe(21);
      await dev.close();
      expect(readFileSync(join(dir, 'd'))[4096 * 5]).toBe(6);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('opening a volume', () => {
  it('a replication port already taken: open rejects (EADDRINUSE) and leaves the files closed for a retry', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-open-'));
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const config = volumeConfigSchema.parse({
        name: 'v', dataFile: join(dir, 'v.data'), metaFile: join(dir, 'v.meta'), sizeBytes: 1024 * 1024,
        listen: `127.0.0.1:${port}`, peer: '127.0.0.1:9', secret: 'open-test-secret-0123',
      });
      const deps = { log: silentLogger, registry: createRegistry({}, false) };
      const fds = () => readdirSync('/proc/self/fd').length;
      const before = fds();
      await expect(ReplicatedVolume.open(config, deps)).rejects.toThrow(/EADDRINUSE/);
      expect(fds()).toBe(before);
      await new Promise<void>((r) => blocker.close(() => r()));
      const v = await ReplicatedVolume.open(config, deps);
      expect(v.status()).toMatchObject({ disk: 'Inconsistent', role: 'secondary' });
      await v.close();
    } finally {
      blocker.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('sliceWriteData', () => {
  it('gives any byte range of a list of parts as views, across part boundaries', () => {
    const parts = [Buffer.from('abc'), Buffer.from(''), Buffer.from('defgh'), Buffer.from('ij')];
    const whole = Buffer.concat(parts).toString();
    for (let start = 0; start <= whole.length; start++) {
      for (let end = start; end <= whole.length; end++) {
        const got = sliceWriteData(parts, start, end);
        expect(Buffer.concat(got).toString()).toBe(whole.slice(start, end));
        expect(got.every((g) => g.length > 0)).toBe(true);
        // Views: writing through one changes the original part.
        for (const g of got) {
          expect(parts.some((p) => p.buffer === g.buffer && g.byteOffset >= p.byteOffset && g.byteOffset + g.length <= p.byteOffset + p.length)).toBe(true);
        }
      }
    }
    expect(Buffer.concat(sliceWriteData(Buffer.from('xyz'), 1, 3)).toString()).toBe('yz');
  });
});

/** Two replicated volumes on this machine, connected under protocol C, `a` primary (`extra`: more volume config). */
async function connectedPair(name: string, secret: string, extra: Record<string, unknown> = {}) {
  const dir = mkdtempSync(join(tmpdir(), `pairgate-${name}-`));
  const ports = await Promise.all([0, 1].map(() => new Promise<number>((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  })));
  const deps = () => ({ log: silentLogger, registry: createRegistry({}, false) });
  const config = (me: number, peer: number, node: string) =>
    volumeConfigSchema.parse({
      name, dataFile: join(dir, `${node}.data`), metaFile: join(dir, `${node}.meta`), sizeBytes: 16 * 1024 * 1024,
      listen: `127.0.0.1:${ports[me]}`, peer: `127.0.0.1:${ports[peer]}`, secret, protocol: 'C', ...extra,
    });
  const a = await ReplicatedVolume.open(config(0, 1, 'a'), deps());
  const b = await ReplicatedVolume.open(config(1, 0, 'b'), deps());
  const close = async () => {
    await a.close();
    await b.close();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const deadline = Date.now() + 10_000;
    while (!(a.status().connection === 'Connected' && b.status().connection === 'Connected' && a.status().disk === 'UpToDate')) {
      if (Date.now() > deadline) throw new Error(`not connected: ${JSON.stringify([a.status().connection, b.status().connection])}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    await a.promote();
  } catch (err) {
    await close();
    throw err;
  }
  return { a, b, close };
}

describe('writes larger than one replication frame', () => {
  it('a 3 MiB + 4 KiB write under protocol C resolves once both disks hold all of it', async () => {
    // Each 1 MiB piece leaves as four DATA frames (MORE, MORE, MORE, last).
    const { a, b, close } = await connectedPair('big', 'big-write-secret-0123', { dataFrameBytes: 256 * 1024 });
    try {
      const big = Buffer.alloc(3 * 1024 * 1024 + 4096);
      for (let i = 0; i < big.length; i += 4096) big.fill(i / 4096 + 1, i, i + 4096);
      await a.write(8 * 4096, big);
      expect((await a.read(8 * 4096, big.length)).equals(big)).toBe(true);
      // The same as parts (records around a body, as the store writes): cut into frames as views, not joined.
      const parts = [big.subarray(0, 4096), big.subarray(4096, 2 * 1024 * 1024 + 8192), big.subarray(2 * 1024 * 1024 + 8192)].map((p) => Buffer.from(p).fill(0xa5, 0, 1));
      await a.write(2 * 1024 * 1024 + 8 * 4096, parts);
      expect((await a.read(2 * 1024 * 1024 + 8 * 4096, big.length)).equals(Buffer.concat(parts))).toBe(true);
      const [da, db] = await Promise.all([a.blockDigests(), b.blockDigests()]);
      expect(db).toEqual(da);
      expect(b.status().outOfSyncBytes).toBe(0);
    } finally {
      await close();
    }
  });
});

describe('DATA frames sent together (MORE)', () => {
  it('the peer writes every frame of a batch and flushes once after the last, then acknowledges them all', async () => {
    const { a, b, close } = await connectedPair('more', 'more-frames-secret-0123');
    try {
      const peerDev = (b as unknown as { dev: FileBlockDevice }).dev;
      let durable = 0;
      const writeDurable = peerDev.writeDurable.bind(peerDev);
      peerDev.writeDurable = (off, data) => {
        durable++;
        return writeDurable(off, data);
      };
      const one = Buffer.alloc(1024 * 1024, 0x5a);
      const tail = Buffer.alloc(8192, 0xa5);
      // As the store commits a 1 MiB delivery: two writes issued in one tick, two DATA frames.
      const flushesBefore = peerDev.flushCount;
      await Promise.all([a.write(1024 * 1024, one), a.write(2 * 1024 * 1024, tail)]);
      expect(durable).toBe(0); // no O_DSYNC write (a flush) of its own for the first frame
      expect(peerDev.flushCount - flushesBefore).toBe(1);
      // A lone write still takes the one-trip O_DSYNC path on the peer.
      await a.write(4 * 1024 * 1024, tail);
      expect(durable).toBe(1);
      const [da, db] = await Promise.all([a.blockDigests(), b.blockDigests()]);
      expect(db).toEqual(da);
      expect(a.status().outOfSyncBytes).toBe(0);
    } finally {
      await close();
    }
  });
});

describe('a data file without its metadata', () => {
  it('is never opened as a fresh (all-zero) volume: open refuses it and names the way to start over', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-orphan-'));
    try {
      const dataFile = join(dir, 'v.data');
      writeFileSync(dataFile, Buffer.alloc(1024 * 1024, 7)); // blocks a fresh peer would not have
      const config = volumeConfigSchema.parse({
        name: 'v', dataFile, metaFile: join(dir, 'v.meta'), sizeBytes: 1024 * 1024,
        listen: '127.0.0.1:0', peer: '127.0.0.1:9', secret: 'orphan-test-secret-0123',
      });
      await expect(ReplicatedVolume.open(config, { log: silentLogger, registry: createRegistry({}, false) })).rejects.toThrow(/exists but .*v\.meta does not.*create --force/);
      expect(readdirSync(dir)).toEqual(['v.data']); // no metadata was written over it
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('FileBlockDevice write groups', () => {
  it('writes issued in one tick share one fdatasync; a write alone on an idle device needs none (O_DSYNC)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-dev-group-'));
    try {
      const dev = await FileBlockDevice.open(join(dir, 'vol.img'), { size: 64 * 4096, create: true });
      const a = Buffer.alloc(4096 * 2, 1);
      const b = Buffer.alloc(4096, 2);
      const c = [Buffer.alloc(100, 3), Buffer.alloc(4096 - 100, 4)];
      await dev.write(0, Buffer.alloc(4096, 9));
      expect(dev.flushCount).toBe(0);
      // One large write handed over as three (the store log's way): one flush for the group.
      await Promise.all([dev.write(4096, a), dev.write(3 * 4096, b), dev.write(4 * 4096, c)]);
      expect(dev.flushCount).toBe(1);
      expect((await dev.read(4096, 4 * 4096)).equals(Buffer.concat([a, b, ...c]))).toBe(true);
      // A bad write in a group fails alone; the others are still made durable.
      const results = await Promise.allSettled([dev.write(5 * 4096, b), dev.write(64 * 4096, b), dev.write(6 * 4096, b)]);
      expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
      expect(dev.flushCount).toBe(2);
      expect(dev.idle).toBe(true);
      await dev.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/**
 * Runs `fn` on a fresh O_DIRECT device of `size` bytes in a temp dir, then closes it and removes
 * the dir. On a file system without O_DIRECT the test has nothing to check and `fn` is skipped.
 */
async function withDirectDevice(prefix: string, size: number, fn: (dev: FileBlockDevice) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  try {
    const dev = await FileBlockDevice.open(join(dir, 'd.img'), { size, create: true });
    try {
      if (dev.direct) await fn(dev);
    } finally {
      await dev.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('FileBlockDevice direct writes (O_DIRECT)', () => {
  it('pooled buffers are page-aligned, reused, and never grown', () => {
    const pool = AlignedPool.create(2)!;
    expect(pool).not.toBeNull();
    const a = pool.take();
    expect(a.length).toBe(DIRECT_CHUNK);
    expect(a.byteOffset).toBe(0);
    pool.give(a);
    expect(pool.take()).toBe(a);
  });

  it('parts of any length, writes over one pooled buffer, both paths and a group: the same bytes as the buffered device', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-dev-direct-'));
    try {
      const direct = await FileBlockDevice.open(join(dir, 'direct.img'), { size: 8 * 1024 * 1024, create: true });
      const buffered = await FileBlockDevice.open(join(dir, 'buffered.img'), { size: 8 * 1024 * 1024, create: true, direct: false });
      expect(buffered.direct).toBe(false);
      // /tmp here and in CI is ext4, which takes O_DIRECT (a file system that refuses it, as tmpfs
      // before Linux 6.6, keeps the buffered path: then both devices below write through the page cache).
      if (process.platform === 'linux' && statfsSync(dir).type !== TMPFS_MAGIC) expect(direct.direct).toBe(true);
      const rnd = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + n) & 0xff));
      const writes: Array<[number, Buffer | Buffer[]]> = [
        [0, rnd(4096)],
        [4096, [rnd(1), rnd(4095), rnd(8192)]],
        [65536, [rnd(DIRECT_CHUNK - 100), rnd(100 + 4096 * 3), rnd(4096)]], // over one pooled buffer
      ];
      for (const dev of [direct, buffered]) {
        for (const [off, data] of writes) await dev.write(off, data);
        // a group of three in one tick (write + one fdatasync), and the peer's no-sync and durable paths
        await Promise.all([dev.write(3 * 1024 * 1024, rnd(8192)), dev.write(4 * 1024 * 1024, [rnd(3000), rnd(1096)]), dev.write(5 * 1024 * 1024, rnd(4096 * 5))]);
        await dev.writeNoSync(6 * 1024 * 1024, [rnd(2048), rnd(2048)]);
        await dev.flush();
        await dev.writeDurable(7 * 1024 * 1024, rnd(4096 * 2));
      }
      expect((await direct.read(0, 8 * 1024 * 1024)).equals(await buffered.read(0, 8 * 1024 * 1024))).toBe(true);
      await direct.close();
      await buffered.close();
      expect(readFileSync(join(dir, 'direct.img')).equals(readFileSync(join(dir, 'buffered.img')))).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a write from one of the device\'s own aligned buffers goes out from it as it is, and lands', async () => {
    // Needs O_DIRECT: a file system without it has no aligned buffers to lend.
    await withDirectDevice('pairgate-dev-inplace-', 4 * 1024 * 1024, async (dev) => {
      const slot = dev.takeAligned()!;
      expect(slot.length).toBe(DIRECT_CHUNK);
      for (let i = 0; i < slot.length; i++) slot[i] = (i * 13 + 5) & 0xff;
      const copies: Buffer[] = [];
      const copy = Buffer.prototype.copy;
      Buffer.prototype.copy = function (this: Buffer, ...args: Parameters<Buffer['copy']>) {
        copies.push(this);
        return copy.apply(this, args);
      };
      try {
        await dev.write(8192, slot.subarray(0, 64 * 1024)); // durable, alone (O_DSYNC)
        await dev.writeNoSync(1024 * 1024, [slot]); // the peer's no-sync path, a list of one
        await dev.flush();
      } finally {
        Buffer.prototype.copy = copy;
      }
      expect(copies.filter((b) => b.buffer === slot.buffer)).toEqual([]); // never copied into another buffer
      expect((await dev.read(8192, 64 * 1024)).equals(slot.subarray(0, 64 * 1024))).toBe(true);
      expect((await dev.read(1024 * 1024, DIRECT_CHUNK)).equals(slot)).toBe(true);
      dev.releaseAligned(slot.subarray(0, 4096));
      expect(dev.takeAligned()).not.toBeNull();
    });
  });

  it('a durable direct write longer than one buffer goes out plain and pays one fdatasync, not one flush per piece', async () => {
    // Needs O_DIRECT: the buffered path is covered above.
    await withDirectDevice('pairgate-dev-direct-', 8 * 1024 * 1024, async (dev) => {
      const internals = dev as unknown as { fh: { datasync(): Promise<void> }; directSync: { write: (...a: unknown[]) => Promise<unknown> } };
      let datasyncs = 0;
      let syncPieces = 0;
      const datasync = internals.fh.datasync.bind(internals.fh);
      internals.fh.datasync = () => (datasyncs++, datasync());
      const syncWrite = internals.directSync.write.bind(internals.directSync);
      internals.directSync.write = (...a: unknown[]) => (syncPieces++, syncWrite(...a));
      const big = Buffer.alloc(DIRECT_CHUNK + 8192, 0x3c);
      await dev.writeDurable(1024 * 1024, big);
      expect(syncPieces).toBe(0);
      expect(datasyncs).toBe(1);
      // One buffer's worth or less: one O_DSYNC write, no fdatasync.
      await dev.writeDurable(4 * 1024 * 1024, Buffer.alloc(8192, 0x3d));
      expect(syncPieces).toBe(1);
      expect(datasyncs).toBe(1);
      expect((await dev.read(1024 * 1024, big.length)).equals(big)).toBe(true);
    });
  });

  it('a direct write refused with EINVAL goes back to the page cache, and so does one in flight beside it', async () => {
    // Needs O_DIRECT: without it there is nothing to fall back from.
    await withDirectDevice('pairgate-dev-direct-', 8 * 1024 * 1024, async (dev) => {
      // Buffers off page alignment: the kernel refuses every direct write from them with EINVAL.
      const pool = (dev as unknown as { pool: AlignedPool }).pool;
      pool.take = () => Buffer.from(new ArrayBuffer(DIRECT_CHUNK + 4096), 512, DIRECT_CHUNK);
      const a = Buffer.alloc(3 * DIRECT_CHUNK, 0xa5);
      const b = Buffer.alloc(8192, 0x5a);
      await Promise.all([dev.writeNoSync(0, a), dev.writeNoSync(4 * 1024 * 1024, b), dev.writeDurable(5 * 1024 * 1024, b)]);
      expect(dev.direct).toBe(false);
      await dev.write(6 * 1024 * 1024, b);
      await dev.flush();
      expect((await dev.read(0, a.length)).equals(a)).toBe(true);
      for (const at of [4, 5, 6]) expect((await dev.read(at * 1024 * 1024, b.length)).equals(b)).toBe(true);
    });
  });
});

/** statfs(2) f_type of tmpfs. */
const TMPFS_MAGIC = 0x01021994;
