/**
 * The log's device writes from record parts (pair-agent/store/log.ts deviceWrites) and the
 * devices' writes of parts (FileBlockDevice with pwritev): the bytes on disk are those of the
 * parts back to back, zero-padded to the block, in writes of at most MAX_DEVICE_WRITE; large
 * payloads are passed by reference, not copied; and a failed group write fails every commit that waits on it.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { LogWriter, MAX_DEVICE_WRITE, chooseGeometry, deviceWrites, roundUp, segmentStart } from '../../pair-agent/store/log.ts';
import type { BlockDevice } from '../../pair-agent/volume/block-device.ts';
import { BLOCK_SIZE, FileBlockDevice, writeLength } from '../../pair-agent/volume/block-device.ts';

function joined(data: Buffer | readonly Buffer[]): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.concat(data);
}

describe('store log: device writes from record parts', () => {
  it('cuts regions of small and large parts into padded writes of at most MAX_DEVICE_WRITE with the same bytes', () => {
    let seed = 7;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    for (let round = 0; round < 40; round++) {
      const parts: Buffer[] = [];
      const count = 1 + rnd(40);
      for (let i = 0; i < count; i++) {
        const kind = rnd(4);
        parts.push(randomBytes(kind === 0 ? rnd(40) : kind === 1 ? rnd(5000) : kind === 2 ? 16 * 1024 + rnd(100_000) : rnd(3 * MAX_DEVICE_WRITE)));
      }
      const len = parts.reduce((n, p) => n + p.length, 0);
      const writes = deviceWrites({ parts, len });
      const expected = Buffer.alloc(roundUp(len));
      Buffer.concat(parts).copy(expected);
      let total = 0;
      for (const w of writes) {
        expect(w.length).toBe(writeLength(w.data));
        expect(w.length).toBeLessThanOrEqual(MAX_DEVICE_WRITE);
        expect(w.length % BLOCK_SIZE === 0 || total + w.length === expected.length).toBe(true);
        expect(joined(w.data).equals(expected.subarray(total, total + w.length))).toBe(true);
        total += w.length;
      }
      expect(total).toBe(expected.length);
      expect(total % BLOCK_SIZE).toBe(0);
    }
  });

  it('passes a large body by reference instead of copying it', () => {
    const header = Buffer.alloc(60, 1);
    const body = randomBytes(MAX_DEVICE_WRITE);
    const writes = deviceWrites({ parts: [header, body], len: header.length + body.length });
    expect(writes).toHaveLength(2);
    const first = writes[0]!.data as Buffer[];
    expect(Array.isArray(first)).toBe(true);
    // the body's bytes in the first write are a view of the body itself
    expect(first[1]!.buffer).toBe(body.buffer);
    expect(first[1]!.byteOffset).toBe(body.byteOffset);
  });

  it('FileBlockDevice writes parts back to back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-log-writes-'));
    try {
      const dev = await FileBlockDevice.open(join(dir, 'vol.img'), { size: 64 * BLOCK_SIZE, create: true });
      const parts = [randomBytes(10), randomBytes(3 * BLOCK_SIZE), Buffer.alloc(0), randomBytes(BLOCK_SIZE - 10)];
      await dev.write(2 * BLOCK_SIZE, parts);
      // the same through the write-then-fdatasync path (another write in flight)
      const more = [randomBytes(100), randomBytes(2 * BLOCK_SIZE - 100)];
      await Promise.all([dev.write(8 * BLOCK_SIZE, more), dev.write(16 * BLOCK_SIZE, [randomBytes(BLOCK_SIZE)])]);
      await expect(dev.write(0, [randomBytes(100)])).rejects.toThrow(/aligned/);
      expect((await dev.read(2 * BLOCK_SIZE, 4 * BLOCK_SIZE)).equals(Buffer.concat(parts))).toBe(true);
      expect((await dev.read(8 * BLOCK_SIZE, 2 * BLOCK_SIZE)).equals(Buffer.concat(more))).toBe(true);
      await dev.close();
      const file = readFileSync(join(dir, 'vol.img'));
      expect(file.subarray(2 * BLOCK_SIZE, 6 * BLOCK_SIZE).equals(Buffer.concat(parts))).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a commit with nothing of its own pending fails when the group in flight fails (its records may be in it)', async () => {
    const size = 64 * 1024 * 1024;
    let failWrites: ((e: Error) => void) | null = null;
    const device: BlockDevice = {
      size,
      read: async (_offset: number, length: number) => Buffer.alloc(length),
      // Every write waits until the test fails it: the group stays in flight meanwhile.
      write: () => new Promise<void>((_, reject) => (failWrites = reject)),
      flush: async () => undefined,
    } as unknown as BlockDevice;
    const g = chooseGeometry(size);
    const writer = new LogWriter(device, g, { offset: segmentStart(g, 0), seq: 1, prevCrc: 0 }, () => 1, () => undefined);
    writer.append(1, Buffer.from('record of caller A'));
    const a = writer.commit(); // starts the group
    const b = writer.commit(); // nothing pending of its own: waits for A's group
    await new Promise((r) => setImmediate(r));
    failWrites!(new Error('EIO'));
    await expect(a).rejects.toThrow(/store log write failed: EIO/);
    await expect(b).rejects.toThrow(/failed a write/);
    await expect(writer.commit()).rejects.toThrow(/failed a write/);
  });
});

