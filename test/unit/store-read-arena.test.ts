/**
 * ReadArena: socket reads into slabs that are reused once nothing refers to what was read.
 */
import { describe, expect, it } from 'vitest';
import { ReadArena, SLAB_BYTES } from '../../pair-agent/store/read-arena.ts';

/** One "socket read" of `n` bytes of `fill` into the arena; returns the view it hands out. */
function read(arena: ReadArena, n: number, fill: number): Buffer {
  const into = arena.next();
  expect(into.length).toBeGreaterThanOrEqual(n);
  into.fill(fill, 0, n);
  return arena.took(n);
}

describe('ReadArena', () => {
  it('hands out views that do not overlap until recycled; a full slab is retired, then reused after recycle()', () => {
    const arena = new ReadArena();
    const views = Array.from({ length: 10 }, (_, i) => read(arena, 60_000, i + 1));
    // Ten reads of 60,000 bytes need more than two 256 KiB slabs: none overwrote another.
    views.forEach((v, i) => expect(v.every((b) => b === i + 1)).toBe(true));
    const slabs = new Set(views.map((v) => v.buffer));
    expect(slabs.size).toBeGreaterThan(2);
    arena.consumed(10 * 60_000);
    arena.recycle();
    // The retired slabs are back in the pool: a second arena's reads land in one of them.
    const other = new ReadArena();
    const reused = read(other, 1000, 0xee);
    expect(slabs.has(reused.buffer)).toBe(true);
    expect(reused.buffer.byteLength).toBe(SLAB_BYTES);
    other.abandon();
    arena.abandon();
  });

  it('does not recycle while bytes it handed out have not reached the reader', () => {
    const arena = new ReadArena();
    const first = Array.from({ length: 6 }, (_, i) => read(arena, 60_000, 0x10 + i));
    arena.consumed(5 * 60_000); // the last read still waits in a stream buffer
    arena.recycle();
    const other = new ReadArena();
    const fresh = read(other, 60_000, 0xaa);
    expect(first.some((v) => v.buffer === fresh.buffer)).toBe(false);
    first.forEach((v, i) => expect(v.every((b) => b === 0x10 + i)).toBe(true));
    // Once the reader has it all, the next recycle() frees them.
    arena.consumed(60_000);
    arena.recycle();
    const again = new ReadArena();
    expect(first.some((v) => v.buffer === read(again, 10, 1).buffer)).toBe(true);
    for (const a of [arena, other, again]) a.abandon();
  });

  it('abandon() pools nothing: views still in use keep their bytes', () => {
    const arena = new ReadArena();
    const kept = Array.from({ length: 6 }, (_, i) => read(arena, 60_000, 0x30 + i));
    arena.consumed(6 * 60_000);
    arena.abandon();
    const others = Array.from({ length: 8 }, () => new ReadArena());
    const fresh = others.map((o) => read(o, 60_000, 0x77));
    expect(fresh.some((f) => kept.some((k) => k.buffer === f.buffer))).toBe(false);
    kept.forEach((v, i) => expect(v.every((b) => b === 0x30 + i)).toBe(true));
    for (const o of others) o.abandon();
  });

  it('after abandon(), the read Node already holds still lands in the current slab, which is dropped, not pooled, when it retires', () => {
    const arena = new ReadArena();
    const before = read(arena, 1000, 0x41);
    const into = arena.next(); // Node holds this buffer for the next read
    arena.abandon(); // a delivery failed meanwhile
    into.fill(0x42, 0, 1000);
    const after = arena.took(1000); // the read completes: threw while abandon() emptied the current slab
    expect(after.buffer).toBe(before.buffer);
    // Reads go on until the slab retires; then nothing read before is held and recycle() pools.
    const more = Array.from({ length: 5 }, (_, i) => read(arena, 60_000, 0x50 + i));
    expect(more[4]!.buffer).not.toBe(before.buffer);
    arena.consumed(2000 + 5 * 60_000);
    arena.recycle();
    const others = Array.from({ length: 8 }, () => new ReadArena());
    const fresh = others.map((o) => read(o, 60_000, 0x77));
    expect(fresh.some((f) => f.buffer === before.buffer)).toBe(false);
    expect(after.every((b) => b === 0x42)).toBe(true);
    for (const a of [arena, ...others]) a.abandon();
  });
});
