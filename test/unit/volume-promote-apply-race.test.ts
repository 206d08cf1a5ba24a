/**
 * A promotion right after the peer's demotion, with the old primary's last writes still queued
 * for this node's disk: the peer's DATA frames reach this node before its STATE and its answer to
 * the promotion (one stream), but they are applied asynchronously (a queue of disk writes). The
 * new primary must not serve (nor write) before they have landed: its store would read a log
 * without them, and a queued write landing later would overwrite the new primary's own.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { pairThroughPausableRelay } from '../helpers/volume-pair.ts';

let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

const PIECE = 256 * 1024;

describe('promotion with the old primary\'s writes still queued for the local disk', () => {
  it('protocol A: the new primary reads every write the old one completed, and its own later write is not overwritten by them', async () => {
    const { a, b, pauseRelay, resumeRelay } = await pairThroughPausableRelay(cleanups, { name: 'promote-apply', sizeBytes: 64 * 1024 * 1024, secret: 'promote-apply-secret-0123', protocol: 'A' });
    // a's frames wait in the kernel's buffers (protocol A completes a write once its frame is
    // there): b then receives the writes, the demotion and the grant in one burst.
    pauseRelay();
    // b's disk is slow (each peer write it applies takes 50 ms more), as a loaded disk can be: the
    // writes are still queued on b when the grant arrives right behind them.
    const dev = (b as unknown as { dev: { writeNoSync: (...args: unknown[]) => Promise<void>; writeDurable: (...args: unknown[]) => Promise<void> } }).dev;
    for (const m of ['writeNoSync', 'writeDurable'] as const) {
      const orig = dev[m].bind(dev);
      dev[m] = async (...args: unknown[]) => {
        await new Promise((r) => setTimeout(r, 50));
        return orig(...args);
      };
    }
    // 2 MiB in all: well within what the kernel's buffers take before the relay reads again.
    const writes = 8;
    for (let i = 0; i < writes; i++) await a.write(i * PIECE, Buffer.alloc(PIECE, i + 1));
    await a.demote();
    const promoted = b.promote();
    await new Promise((r) => setTimeout(r, 200));
    resumeRelay();
    expect((await promoted).role).toBe('primary');
    // Right after the promotion, b's data is what a wrote before it demoted.
    for (let i = 0; i < writes; i++) {
      const got = await b.read(i * PIECE, PIECE);
      expect(got.equals(Buffer.alloc(PIECE, i + 1)), `write ${i} on the new primary`).toBe(true);
    }
    // The new primary's own write to a block a wrote last stays.
    const last = (writes - 1) * PIECE;
    await b.write(last, Buffer.alloc(PIECE, 0xb0));
    await b.blockDigests(); // after every queued peer write
    expect((await b.read(last, PIECE)).equals(Buffer.alloc(PIECE, 0xb0))).toBe(true);
  }, 30_000);
});
