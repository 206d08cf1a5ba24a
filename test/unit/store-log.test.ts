/**
 * The log-structured mail store on a local FileBlockDevice: the MailStore contract, durability
 * across reopen (replay and checkpoints), truncation at a corrupted record, single-instance
 * bodies, idempotent deliveries, quotas, compaction.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { ConflictError, LimitError, NotFoundError, BadInputError } from '../../common/errors.ts';
import { FileBlockDevice, writeLength, type WriteData } from '../../pair-agent/volume/block-device.ts';
import { openMailStore, type LogStore } from '../../pair-agent/store/index.ts';
import { CACHE_ON_WRITE_MAX } from '../../pair-agent/store/store.ts';
import { crc32c } from '../../pair-agent/store/crc32c.ts';
import { decodeSuperblock, MAX_DEVICE_WRITE } from '../../pair-agent/store/log.ts';
import { tempDir } from '../helpers/proc.ts';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function fresh(size = 32 * 1024 * 1024, opts: { quotaBytes?: number; checkpointBytes?: number } = {}) {
  const dir = tempDir('pairgate-store-');
  const path = join(dir.path, 'vol.img');
  let device = await FileBlockDevice.open(path, { size, create: true });
  let store = await openMailStore(device, { log: silentLogger, compactBytesPerSec: 0, ...opts });
  const h = {
    path,
    get store(): LogStore {
      return store;
    },
    get device(): FileBlockDevice {
      return device;
    },
    async reopen(extra: { quotaBytes?: number; checkpoint?: boolean } = {}) {
      if (!store.closed) {
        if (extra.checkpoint === false) {
          // Simulate a crash: no final checkpoint, just stop using the device.
          (store as unknown as { closed: boolean }).closed = true;
        } else await store.close();
      }
      await device.close();
      device = await FileBlockDevice.open(path);
      store = await openMailStore(device, { log: silentLogger, compactBytesPerSec: 0, ...opts, ...extra });
      return store;
    },
  };
  cleanups.push(async () => {
    await store.close().catch(() => undefined);
    await device.close();
    dir.cleanup();
  });
  return h;
}

const msg = (n: number, pad = 0) => Buffer.from(`Subject: m${n}\r\nMessage-ID: <${n}@x>\r\n\r\nbody ${n}\r\n${'x'.repeat(pad)}`);

describe('crc32c', () => {
  it('matches the standard check value and continues across calls', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    const b = Buffer.from('hello, world of checksums');
    expect(crc32c(b.subarray(7), crc32c(b.subarray(0, 7)))).toBe(crc32c(b));
  });
});

describe('mail store', () => {
  it('creates users with default mailboxes, delivers, lists and reads back', async () => {
    const h = await fresh();
    const s = h.store;
    const res = await s.deliver('d1', ['alice', 'bob'], msg(1));
    expect(res.map((r) => [r.user, r.ok, r.uid])).toEqual([
      ['alice', true, 1],
      ['bob', true, 1],
    ]);
    const boxes = await s.listMailboxes('alice');
    expect(boxes.map((b) => b.name)).toEqual(['INBOX', 'Archive', 'Drafts', 'Junk', 'Sent', 'Trash']);
    expect(boxes.find((b) => b.name === 'Sent')?.specialUse).toBe('\\Sent');
    const list = await s.listMessages('alice', 'INBOX');
    expect(list).toHaveLength(1);
    expect(list[0]!.bodyId).toBe(createHash('sha256').update(msg(1)).digest('hex'));
    expect((await s.readMessage(list[0]!.bodyId)).equals(msg(1))).toBe(true);
    const info = await s.mailboxInfo('alice', 'inbox');
    expect(info).toMatchObject({ name: 'INBOX', messages: 1, unseen: 1, uidNext: 2 });
    await expect(s.mailboxInfo('alice', 'Nope')).rejects.toBeInstanceOf(NotFoundError);
    await expect(s.createMailbox('alice', 'Sent')).rejects.toBeInstanceOf(ConflictError);
    await expect(s.createMailbox('alice', '../etc')).rejects.toBeInstanceOf(BadInputError);
    await expect(s.createMailbox('alice', 'a//b')).rejects.toBeInstanceOf(BadInputError);
    await expect(s.deliver('d-bad', ['../root'], msg(9))).resolves.toMatchObject([{ ok: false }]);
  });

  it('keeps everything across reopen, with and without a final checkpoint', async () => {
    const h = await fresh();
    let s = h.store;
    await s.createMailbox('alice', 'Work');
    await s.deliver('d1', ['alice'], msg(1));
    await s.deliver('d2', ['alice'], msg(2));
    const a = await s.append('alice', 'Work', msg(3), { flags: ['\\seen', 'Custom'], internalDate: 1_700_000_000_000 });
    await s.updateFlags('alice', 'INBOX', [1], 'add', ['\\Flagged']);
    await s.expunge('alice', 'INBOX', [2]);
    await s.setSubscribed('alice', 'Work', true);
    const before = { boxes: await s.listMailboxes('alice'), inbox: await s.listMessages('alice', 'INBOX'), work: await s.listMessages('alice', 'Work') };
    expect(before.work[0]).toMatchObject({ uid: a.uid, flags: ['\\Seen', 'Custom'], internalDate: 1_700_000_000_000 });
    for (const checkpoint of [false, true]) {
      s = await h.reopen({ checkpoint });
      expect(await s.listMailboxes('alice')).toEqual(before.boxes);
      expect(await s.listMessages('alice', 'INBOX')).toEqual(before.inbox);
      expect(await s.listMessages('alice', 'Work')).toEqual(before.work);
      expect((await s.readMessage(before.work[0]!.bodyId)).equals(msg(3))).toBe(true);
    }
    expect(s.recovery.replayedRecords).toBeGreaterThan(0);
    expect((await s.check()).ok).toBe(true);
  });

  it('stores one body for many recipients and is idempotent per delivery id', async () => {
    const h = await fresh();
    const s = h.store;
    await s.ensureUser('u0');
    const big = msg(1, 200_000);
    const users = Array.from({ length: 20 }, (_, i) => `u${i}`);
    for (const u of users) await s.ensureUser(u);
    const used0 = (await s.stats()).bytesUsed;
    const r1 = await s.deliver('same-id', users, big);
    const used1 = (await s.stats()).bytesUsed;
    expect(r1.every((r) => r.ok && !r.duplicate)).toBe(true);
    expect(used1 - used0).toBeGreaterThan(big.length);
    expect(used1 - used0).toBeLessThan(big.length + 64 * 1024);
    const r2 = await s.deliver('same-id', [...users, 'late'], big);
    expect(r2.slice(0, 20).every((r) => r.ok && r.duplicate)).toBe(true);
    expect(r2[20]).toMatchObject({ user: 'late', ok: true, uid: 1 });
    expect(r2[20]!.duplicate).toBeFalsy();
    expect((await s.listMessages('u3', 'INBOX')).length).toBe(1);
    expect((await s.stats()).bodyBytes).toBe(big.length);
    const s2 = await h.reopen({ checkpoint: false });
    const r3 = await s2.deliver('same-id', users.slice(0, 2), big);
    expect(r3.every((r) => r.duplicate)).toBe(true);
  });

  it('refuses deliveries over quota per recipient', async () => {
    const h = await fresh(32 * 1024 * 1024, { quotaBytes: 10_000 });
    const s = h.store;
    await s.deliver('a', ['full'], msg(1, 9_000));
    const r = await s.deliver('b', ['full', 'empty'], msg(2, 5_000));
    expect(r[0]!.ok).toBe(false);
    expect(r[0]!.error).toBeInstanceOf(LimitError);
    expect(r[1]!.ok).toBe(true);
    expect(await s.quota('full')).toMatchObject({ limitBytes: 10_000 });
  });

  it('takes per-user limits from quotaFor, falling back to quotaBytes', async () => {
    const dir = tempDir('pairgate-store-q-');
    cleanups.push(() => dir.cleanup());
    const dev = await FileBlockDevice.open(join(dir.path, 'v.img'), { size: 16 * 1024 * 1024, create: true });
    const s = await openMailStore(dev, { log: silentLogger, quotaBytes: 1000, quotaFor: (u) => (u === 'big' ? 100_000 : u === 'free' ? null : undefined), compactBytesPerSec: 0 });
    cleanups.push(async () => {
      await s.close();
      await dev.close();
    });
    const r = await s.deliver('q1', ['big', 'small', 'free'], msg(1, 5000));
    expect(r.map((x) => x.ok)).toEqual([true, false, true]);
    expect((await s.quota('big')).limitBytes).toBe(100_000);
    expect((await s.quota('free')).limitBytes).toBeNull();
    expect((await s.quota('small')).limitBytes).toBe(1000);
  });

  it('copies, moves, and keeps reference counts right through expunge and delete', async () => {
    const h = await fresh();
    const s = h.store;
    await s.deliver('d', ['al'], msg(1));
    await s.createMailbox('al', 'Keep');
    const c = await s.copy('al', 'INBOX', [1], 'Keep');
    expect(c.mapping).toEqual([[1, 1]]);
    const m = await s.move('al', 'INBOX', [1], 'Archive');
    expect(m.mapping).toEqual([[1, 1]]);
    expect(await s.listMessages('al', 'INBOX')).toEqual([]);
    const id = (await s.listMessages('al', 'Keep'))[0]!.bodyId;
    await s.deleteMailbox('al', 'Keep');
    expect((await s.readMessage(id)).equals(msg(1))).toBe(true);
    await s.expunge('al', 'Archive', [1]);
    await expect(s.readMessage(id)).rejects.toBeInstanceOf(NotFoundError);
    await s.renameMailbox('al', 'Junk', 'Spam');
    expect((await s.listMailboxes('al')).map((b) => b.name)).toContain('Spam');
    const s2 = await h.reopen({ checkpoint: false });
    expect((await s2.stats()).bodyBytes).toBe(0);
    expect((await s2.check()).ok).toBe(true);
  });

  it('honours CONDSTORE unchangedSince and raises modseq', async () => {
    const h = await fresh();
    const s = h.store;
    await s.deliver('d1', ['c'], msg(1));
    await s.deliver('d2', ['c'], msg(2));
    const [m1, m2] = await s.listMessages('c', 'INBOX');
    await s.updateFlags('c', 'INBOX', [2], 'add', ['\\Seen']);
    const r = await s.updateFlags('c', 'INBOX', [1, 2], 'add', ['\\Flagged'], { unchangedSince: m2!.modseq });
    expect(r.failed).toEqual([2]);
    expect(r.updated.map((u) => u.uid)).toEqual([1]);
    expect(r.updated[0]!.modseq).toBeGreaterThan(m1!.modseq);
    expect((await s.mailboxInfo('c', 'INBOX')).highestModseq).toBe(r.updated[0]!.modseq);
  });

  it('truncates the log at a corrupted record and serves what came before', async () => {
    const h = await fresh();
    const s = h.store;
    for (let i = 1; i <= 5; i++) await s.deliver(`d${i}`, ['t'], msg(i));
    // No checkpoint at close: replay covers every delivery. Corrupt a byte of the last op record.
    (s as unknown as { closed: boolean }).closed = true;
    const dev = h.device;
    const scan = await dev.read(0, 1024 * 1024);
    const needle = Buffer.from('"id":"d5"');
    const at = scan.lastIndexOf(needle);
    expect(at).toBeGreaterThan(0);
    const blockStart = at - (at % 4096);
    const blk = await dev.read(blockStart, 4096);
    blk[at - blockStart + 6] ^= 0xff;
    await dev.write(blockStart, blk);
    const s2 = await h.reopen({ checkpoint: false });
    expect(s2.recovery.stop).toBe('bad-crc');
    expect(s2.recovery.truncatedAt).not.toBeNull();
    expect((await s2.listMessages('t', 'INBOX')).map((m) => m.uid)).toEqual([1, 2, 3, 4]);
    await s2.deliver('d6', ['t'], msg(6));
    const s3 = await h.reopen({ checkpoint: false });
    expect((await s3.listMessages('t', 'INBOX')).map((m) => m.uid)).toEqual([1, 2, 3, 4, 5]);
    expect(s3.recovery.stop).toBe('end');
    expect((await s3.check()).ok).toBe(true);
  });

  it('refuses to serve a damaged body', async () => {
    const h = await fresh();
    const s = h.store;
    const body = msg(1, 10_000);
    await s.deliver('d1', ['x'], body);
    await s.close();
    const dev = h.device;
    const scan = await dev.read(0, 1024 * 1024);
    const at = scan.indexOf(Buffer.from('xxxxxxxxxx'));
    const blockStart = at - (at % 4096);
    const blk = await dev.read(blockStart, 4096);
    blk[at - blockStart + 100] ^= 0x01;
    await dev.write(blockStart, blk);
    const s2 = await h.reopen();
    const [m] = await s2.listMessages('x', 'INBOX');
    await expect(s2.readMessage(m!.bodyId)).rejects.toThrow(/damaged|SHA-256/);
    const rep = await s2.check();
    expect(rep.ok).toBe(false);
    expect(rep.problems.join('\n')).toMatch(/damaged/);
  });

  it('checkpoints bound the replay and compaction frees segments without losing live mail', async () => {
    const h = await fresh(16 * 1024 * 1024, { checkpointBytes: 1024 * 1024 });
    let s = h.store;
    const bodies = new Map<number, Buffer>();
    for (let i = 0; i < 120; i++) {
      const b = msg(i, 60_000 + i);
      bodies.set(i, b);
      await s.deliver(`d${i}`, ['k'], b);
    }
    const all = await s.listMessages('k', 'INBOX');
    // Expunge most, keep every tenth.
    await s.expunge('k', 'INBOX', all.filter((m) => m.uid % 10 !== 0).map((m) => m.uid));
    const freeBefore = s.freeSegments();
    const res = await s.compact({ maxLiveRatio: 0.9 });
    expect(res.bodiesMoved).toBeGreaterThan(0);
    expect(s.freeSegments()).toBeGreaterThan(freeBefore);
    // Fill the freed space again: segments get reused.
    for (let i = 200; i < 300; i++) await s.deliver(`d${i}`, ['k'], msg(i, 60_000));
    s = await h.reopen({ checkpoint: false });
    expect(s.recovery.replayedBytes).toBeLessThan(6 * 1024 * 1024);
    const left = await s.listMessages('k', 'INBOX');
    expect(left.length).toBe(12 + 100);
    for (const m of left.slice(0, 12)) expect((await s.readMessage(m.bodyId)).equals(bodies.get(m.uid - 1)!)).toBe(true);
    expect((await s.check()).ok).toBe(true);
  });

  it('reports a full volume as a temporary limit and exposes the store gauges', async () => {
    const dir = tempDir('pairgate-store-full-');
    cleanups.push(() => dir.cleanup());
    const dev = await FileBlockDevice.open(join(dir.path, 'v.img'), { size: 4 * 1024 * 1024, create: true });
    const registry = createRegistry({}, false);
    const s = await openMailStore(dev, { log: silentLogger, registry, compactBytesPerSec: 0 });
    cleanups.push(async () => {
      await s.close();
      await dev.close();
    });
    let err: unknown = null;
    let delivered = 0;
    for (let i = 0; i < 100 && !err; i++) {
      try {
        const r = await s.deliver(`f${i}`, ['z'], msg(i, 200_000));
        if (!r[0]!.ok) err = r[0]!.error;
        else delivered++;
      } catch (e) {
        err = e;
      }
    }
    expect(err).toBeInstanceOf(LimitError);
    expect((err as LimitError).temporary).toBe(true);
    const text = await registry.metrics();
    expect(text).toContain(`pairgate_store_messages ${delivered}`);
    expect(text).toContain(`pairgate_store_bytes_total ${4 * 1024 * 1024}`);
    expect(text).toMatch(/pairgate_store_mailboxes 6/);
    // Expunging and compacting makes room again.
    const list = await s.listMessages('z', 'INBOX');
    await s.expunge('z', 'INBOX', list.map((m) => m.uid));
    await s.compact();
    await s.checkpoint();
    await s.compact();
    const r = await s.deliver('after-full', ['z'], msg(999, 200_000));
    expect(r[0]!.ok).toBe(true);
  });

  it('steps over a damaged checkpoint: falls back to the previous one and loses nothing', async () => {
    const h = await fresh();
    let s = h.store;
    for (let i = 0; i < 5; i++) await s.deliver(`a${i}`, ['cp'], msg(i));
    await s.checkpoint();
    for (let i = 5; i < 10; i++) await s.deliver(`a${i}`, ['cp'], msg(i));
    await s.checkpoint();
    for (let i = 10; i < 15; i++) await s.deliver(`a${i}`, ['cp'], msg(i));
    (s as unknown as { closed: boolean }).closed = true;
    const sbs = [decodeSuperblock(await h.device.read(0, 4096)), decodeSuperblock(await h.device.read(4096, 4096))];
    const sb = sbs.filter((x) => x !== null).sort((a, b) => b!.generation - a!.generation)[0]!;
    const at = sb.checkpoint!.offset;
    const head = await h.device.read(at, 64);
    expect(head.readUInt32LE(4)).toBe(4); // a CKPT record
    const blockStart = (at + 48) - ((at + 48) % 4096);
    const blk = await h.device.read(blockStart, 4096);
    blk[at + 48 - blockStart] ^= 0xff;
    await h.device.write(blockStart, blk);
    s = await h.reopen({ checkpoint: false });
    expect(s.recovery.usedFallbackCheckpoint).toBe(true);
    expect(s.recovery.problems.join('\n')).toMatch(/checkpoint record .* skipped/);
    expect((await s.listMessages('cp', 'INBOX')).map((m) => m.uid)).toEqual(Array.from({ length: 15 }, (_, i) => i + 1));
  });

  it('compacts in the background when free space runs low', async () => {
    const dir = tempDir('pairgate-store-bg-');
    cleanups.push(() => dir.cleanup());
    const dev = await FileBlockDevice.open(join(dir.path, 'v.img'), { size: 8 * 1024 * 1024, create: true });
    const s = await openMailStore(dev, { log: silentLogger, compactIntervalMs: 50, compactBytesPerSec: 64 * 1024 * 1024, checkpointBytes: 512 * 1024 });
    cleanups.push(async () => {
      await s.close();
      await dev.close();
    });
    for (let i = 0; i < 58; i++) await s.deliver(`b${i}`, ['bg'], msg(i, 100_000));
    const list = await s.listMessages('bg', 'INBOX');
    // Every other message: each segment keeps one live body, so only compaction can free it.
    await s.expunge('bg', 'INBOX', list.filter((m) => m.uid % 2 !== 0).map((m) => m.uid));
    const before = s.freeSegments();
    expect(before).toBeLessThan(s.g.segmentCount * 0.3);
    const deadline = Date.now() + 10_000;
    while (s.freeSegments() <= before + 2 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(s.freeSegments()).toBeGreaterThan(before + 2);
    for (const m of await s.listMessages('bg', 'INBOX')) expect((await s.readMessage(m.bodyId)).equals(msg(m.uid - 1, 100_000))).toBe(true);
  });

  it('never writes more than MAX_DEVICE_WRITE at once: a group with multi-MiB messages fits a device with a 1 MiB frame limit', async () => {
    const h = await fresh(64 * 1024 * 1024);
    const s = h.store;
    const dev = h.device as unknown as { write(o: number, d: WriteData): Promise<void> };
    const orig = dev.write.bind(dev);
    let largest = 0;
    // As the replicated volume does (one frame per write, payload limit 1 MiB + 64 bytes).
    dev.write = async (o: number, d: WriteData) => {
      const n = writeLength(d);
      largest = Math.max(largest, n);
      if (n > 1024 * 1024 + 64 - 16) throw new Error(`frame payload of ${n} bytes is over the limit`);
      return orig(o, d);
    };
    const big = (n: number) => msg(n, 3 * 1024 * 1024 + n * 1000);
    // Several deliveries at once share one group commit (several MiB in one region).
    await Promise.all([1, 2, 3].map((n) => s.deliver(`big-${n}`, ['big'], big(n))));
    expect(s.failed()).toBe(false);
    expect(largest).toBe(MAX_DEVICE_WRITE);
    const s2 = await h.reopen({ checkpoint: false });
    const list = await s2.listMessages('big', 'INBOX');
    expect(list).toHaveLength(3);
    for (const m of list) {
      const body = await s2.readMessage(m.bodyId);
      expect([1, 2, 3].some((n) => body.equals(big(n)))).toBe(true);
    }
  });

  it('stores a body given as parts (cut anywhere, records cut across parts) exactly as the same body in one buffer', async () => {
    // A small volume: 64 KiB segments, so a body spans several BODY records whose bounds fall inside parts.
    const h = await fresh(2 * 1024 * 1024);
    const s = h.store;
    let seed = 11;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const bodies = [msg(1), msg(2, 150_000), msg(3, 200_001)];
    for (const [i, body] of bodies.entries()) {
      const parts: Buffer[] = [];
      for (let at = 0; at < body.length; ) {
        const n = Math.min(body.length - at, 1 + rand(i === 0 ? 7 : 30_000));
        parts.push(body.subarray(at, at + n));
        at += n;
      }
      const [r] = await s.deliver(`parts-${i}`, ['pp'], parts);
      expect(r).toMatchObject({ ok: true, uid: i + 1 });
      // the same body again in one buffer: the same content address, stored once
      const [again] = await s.deliver(`whole-${i}`, ['pq'], body);
      expect(again).toMatchObject({ ok: true });
    }
    const check = async (st: LogStore) => {
      const list = await st.listMessages('pp', 'INBOX');
      expect(list.map((m) => m.size)).toEqual(bodies.map((b) => b.length));
      for (const [i, m] of list.entries()) {
        expect(m.bodyId).toBe(createHash('sha256').update(bodies[i]!).digest('hex'));
        expect((await st.readMessage(m.bodyId)).equals(bodies[i]!)).toBe(true);
      }
      expect((await st.listMessages('pq', 'INBOX')).map((m) => m.bodyId)).toEqual(list.map((m) => m.bodyId));
      expect((await st.stats()).bodyBytes).toBe(bodies.reduce((n, b) => n + b.length, 0));
    };
    await check(s);
    await check(await h.reopen({ checkpoint: false }));
    expect((await h.store.check()).ok).toBe(true);
  });

  it('keeps small new bodies in the read cache, not large ones (read from the log when asked for)', async () => {
    const h = await fresh(64 * 1024 * 1024);
    const s = h.store;
    const small = msg(1, 10_000);
    const large = msg(2, CACHE_ON_WRITE_MAX + 1);
    await s.deliver('c-small', ['cc'], [small.subarray(0, 100), small.subarray(100)]);
    await s.deliver('c-large', ['cc'], [large.subarray(0, 100), large.subarray(100)]);
    const reads: number[] = [];
    const dev = h.device as unknown as { read(o: number, n: number): Promise<Buffer> };
    const orig = dev.read.bind(dev);
    dev.read = async (o: number, n: number) => {
      reads.push(n);
      return orig(o, n);
    };
    const [m1, m2] = await s.listMessages('cc', 'INBOX');
    expect((await s.readMessage(m1!.bodyId)).equals(small)).toBe(true);
    expect(reads).toEqual([]);
    expect((await s.readMessage(m2!.bodyId)).equals(large)).toBe(true);
    expect(reads.length).toBeGreaterThan(0);
    // and once read, it is cached
    reads.length = 0;
    expect((await s.readMessage(m2!.bodyId)).equals(large)).toBe(true);
    expect(reads).toEqual([]);
  });

  it('turns a failing volume write into UnavailableError for everyone, without crashing', async () => {
    const h = await fresh();
    const s = h.store;
    await s.deliver('ok-1', ['w'], msg(1));
    const dev = h.device as unknown as { write(o: number, d: Buffer): Promise<void> };
    const orig = dev.write.bind(dev);
    dev.write = async () => {
      throw new Error('EIO: simulated disk failure');
    };
    const results = await Promise.allSettled([s.deliver('bad-1', ['w'], msg(2)), s.deliver('bad-2', ['w'], msg(3)), s.append('w', 'INBOX', msg(4))]);
    expect(results.every((r) => r.status === 'rejected' && (r.reason as Error).name === 'UnavailableError')).toBe(true);
    expect(s.failed()).toBe(true);
    await expect(s.deliver('bad-3', ['w'], msg(5))).rejects.toThrow(/failed a write|reopen/);
    dev.write = orig;
    // A reopen recovers what was durable.
    const s2 = await h.reopen({ checkpoint: false });
    expect((await s2.listMessages('w', 'INBOX')).length).toBe(1);
  });
});
