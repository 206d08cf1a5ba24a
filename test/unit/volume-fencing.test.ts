/**
 * DRBD's `fencing resource-and-stonith` on the replicated volume. A primary that loses its link
 * must not acknowledge a write the peer lacks while the peer could still be promoted with its old
 * data: it holds writes (and the acknowledgement of writes in flight) until the peer is marked
 * Outdated, or fenced, or the link is back. Two volumes in this process, a's link to b through a
 * relay that can be paused (so that a write is in flight when the link goes).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { waitFor } from '../helpers/net.ts';
import { pairThroughPausableRelay } from '../helpers/volume-pair.ts';

let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

const settings = (fencing: 'dont-care' | 'resource-and-stonith') => ({ name: 'fence', sizeBytes: 8 * 1024 * 1024, secret: 'fencing-test-secret-01', protocol: 'C', fencing, reconnectMs: 100 });

/** Resolves to 'done' or, if still pending after `ms`, 'pending'. */
const settledWithin = (p: Promise<unknown>, ms: number) => Promise.race([p.then(() => 'done' as const), new Promise<'pending'>((r) => setTimeout(() => r('pending'), ms))]);

describe('volume fencing resource-and-stonith', () => {
  it('link lost: a write in flight and a new one are held until the peer is outdated; the outdated peer refuses promotion, then resyncs', async () => {
    const { a, b, pauseRelay, resumeRelay } = await pairThroughPausableRelay(cleanups, settings('resource-and-stonith'));
    await a.write(0, Buffer.alloc(4096, 1));
    // A write the peer never confirms: the relay holds its frame, then b drops the link.
    pauseRelay();
    const inFlight = a.write(4096, Buffer.alloc(4096, 2));
    await new Promise((r) => setTimeout(r, 50));
    b.disconnect();
    await waitFor(() => a.status().connection === 'Connecting' || undefined, 5000, 'a to lose the link');
    resumeRelay();
    expect(a.status().peerFence).toMatchObject({ reason: 'replication link lost' });
    const fresh = a.write(8192, Buffer.alloc(4096, 3));
    expect(await settledWithin(Promise.all([inFlight, fresh]), 300)).toBe('pending');
    // The peer (not connected) marks its data Outdated: it may no longer be promoted on its own.
    expect(b.outdate().disk).toBe('Outdated');
    await expect(b.promote()).rejects.toThrow(/local data is Outdated/);
    a.peerSettled('outdated');
    expect(await settledWithin(Promise.all([inFlight, fresh]), 2000)).toBe('done');
    expect(a.status().peerFence).toBeNull();
    // Further writes are not held: the peer cannot be promoted without them.
    expect(await settledWithin(a.write(12_288, Buffer.alloc(4096, 4)), 2000)).toBe('done');
    // Back together: b resyncs from a and is UpToDate with a's data.
    b.connect();
    await waitFor(() => (b.status().connection === 'Connected' && b.status().disk === 'UpToDate') || undefined, 10_000, 'b resynced');
    expect(await b.blockDigests()).toEqual(await a.blockDigests());
  });

  it('link lost and back before anyone settled it: held writes go on, and the peer gets them', async () => {
    const { a, b } = await pairThroughPausableRelay(cleanups, settings('resource-and-stonith'));
    await a.write(0, Buffer.alloc(4096, 1));
    b.disconnect();
    await waitFor(() => a.status().peerFence !== null || undefined, 5000, 'a to hold writes');
    const held = a.write(4096, Buffer.alloc(4096, 5));
    expect(await settledWithin(held, 300)).toBe('pending');
    b.connect();
    expect(await settledWithin(held, 10_000)).toBe('done');
    await waitFor(() => (b.status().disk === 'UpToDate' && b.status().outOfSyncBytes === 0 && a.status().outOfSyncBytes === 0) || undefined, 10_000, 'b in sync');
    expect(await b.blockDigests()).toEqual(await a.blockDigests());
  });

  it('released while writes are held: the held writes fail (never acknowledged), and so does every write until the demotion', async () => {
    const { a, b, pauseRelay, resumeRelay } = await pairThroughPausableRelay(cleanups, settings('resource-and-stonith'));
    await a.write(0, Buffer.alloc(4096, 1));
    pauseRelay();
    const inFlight = a.write(4096, Buffer.alloc(4096, 2));
    inFlight.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 50));
    b.disconnect();
    await waitFor(() => a.status().peerFence !== null || undefined, 5000, 'a to hold writes');
    resumeRelay();
    const fresh = a.write(8192, Buffer.alloc(4096, 3));
    fresh.catch(() => undefined);
    // The pair agent releases: the held writes fail, and so does any write before the demotion
    // (it would be acknowledged alone while the peer may still be promoted).
    a.failHeldWrites('the node releases its resources');
    await expect(inFlight).rejects.toThrow(/not acknowledged: held for the peer, then the node releases its resources/);
    await expect(fresh).rejects.toThrow(/held for the peer, then the held writes failed/);
    await expect(a.write(12_288, Buffer.alloc(4096, 4))).rejects.toThrow(/held for the peer, then the held writes failed/);
    expect(a.status().peerFence).toMatchObject({ failed: true });
    await a.demote();
    expect(a.status().peerFence).toBeNull();
    // What was not acknowledged stays out of sync, for the next resync.
    expect(a.status().outOfSyncBytes).toBeGreaterThanOrEqual(4096);
  });

  it('a secondary that leaves its primary on purpose marks its data Outdated; the node that outdated its peer refuses to be outdated', async () => {
    const { a, b } = await pairThroughPausableRelay(cleanups, settings('resource-and-stonith'));
    b.disconnect();
    expect(b.status().disk).toBe('Outdated');
    await waitFor(() => a.status().peerFence !== null || undefined, 5000, 'a to hold writes');
    a.peerSettled('outdated');
    await a.demote();
    expect(() => a.outdate()).toThrow(/wrote without its peer after outdating it/);
  });

  it('dont-care (the default, standalone): writes go on alone at once', async () => {
    const { a, b } = await pairThroughPausableRelay(cleanups, settings('dont-care'));
    b.disconnect();
    await waitFor(() => a.status().connection === 'Connecting' || undefined, 5000, 'a to lose the link');
    expect(a.status().peerFence).toBeNull();
    expect(await settledWithin(a.write(0, Buffer.alloc(4096, 6)), 2000)).toBe('done');
  });
});
