/**
 * The primary holds a DATA frame until the end of the tick (its local write goes to the I/O
 * threads first); frames sent meanwhile must still leave after it. Two volumes in this process,
 * their link through a relay that records the order of the frames it carries.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ReplicatedVolume } from '../../pair-agent/volume/replicated-volume.ts';
import { FrameDecoder, FrameType } from '../../pair-agent/volume/wire.ts';
import { freePort, startTcpRelay, waitFor } from '../helpers/net.ts';
import { anyFreePort, openPromotedPair, pairThroughPausableRelay } from '../helpers/volume-pair.ts';

let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

/** A relay to `targetPort` that forwards bytes as they are and records the type of every frame from the client. */
async function recordingRelay(targetPort: number, seen: FrameType[]): Promise<number> {
  const dec = new FrameDecoder();
  const relay = await startTcpRelay(targetPort, { onClientData: (chunk) => seen.push(...dec.push(chunk).map((f) => f.type)) });
  cleanups.push(() => relay.close());
  return relay.port;
}

describe('frame order on the replication link', () => {
  it('a DISCONNECT sent in the same tick as a write leaves after the write\'s DATA frame, and the peer applies the write', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-link-order-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    // The node whose address sorts lower dials: a, through the relay (b's peer address is a port
    // nobody listens on, in case b sorts lower than it).
    const fromA: FrameType[] = [];
    const listen = { a: 0, b: await anyFreePort() };
    const relayToB = await recordingRelay(listen.b, fromA);
    // A port below the ephemeral range (where the relay's is), so that a's address sorts lower.
    for (let i = 0; i < 100 && !(listen.a && `127.0.0.1:${listen.a}` < `127.0.0.1:${relayToB}`); i++) listen.a = await freePort();
    expect(`127.0.0.1:${listen.a}` < `127.0.0.1:${relayToB}`).toBe(true);
    const { a } = await openPromotedPair(cleanups, dir, listen, relayToB, { name: 'order', sizeBytes: 8 * 1024 * 1024, secret: 'link-order-secret-0123', protocol: 'C' });
    // A first write to the extent, so that the second needs no activity-log write and sends in this tick.
    await a.write(0, Buffer.alloc(4096, 1));
    const data = Buffer.alloc(8192, 0x5a);
    const written = a.write(4096, data);
    a.disconnect();
    await written;
    // The write resolves once its frames have left a's socket; the relay reads them a moment later.
    await waitFor(() => fromA.includes(FrameType.Disconnect) || undefined, 5000, 'the DISCONNECT at the relay');
    const dataAt = fromA.lastIndexOf(FrameType.Data);
    const disconnectAt = fromA.indexOf(FrameType.Disconnect);
    expect(disconnectAt).toBeGreaterThan(-1);
    expect(dataAt).toBeLessThan(disconnectAt);
    expect(fromA.filter((t) => t === FrameType.Data)).toHaveLength(2);
    // The peer got the frame before the link ended, so it applies it.
    await waitFor(() => readFileSync(join(dir, 'b.data')).subarray(4096, 4096 + 8192).equals(data), 5000, 'the write on b');
  });
});

/** The pair through a pausable relay, with settings that keep 160 MiB of writes in its volume. */
const pausablePair = (protocol: 'A' | 'B' | 'C') =>
  pairThroughPausableRelay(cleanups, { name: 'pause', sizeBytes: 192 * 1024 * 1024, secret: 'link-pause-secret-0123', protocol });

const MiB = 1024 * 1024;

/** Writes 1 MiB at a time from one buffer, refilled with the write's number as soon as the previous write resolved. */
function reusingWriter(a: ReplicatedVolume, writes: number) {
  const buf = Buffer.alloc(MiB);
  const state = { done: 0, finished: null as Promise<void> | null };
  state.finished = (async () => {
    for (let i = 0; i < writes; i++) {
      buf.fill(i + 1);
      await a.write(i * MiB, buf).catch(() => undefined);
      state.done++;
    }
  })();
  return state;
}

describe('the caller\'s buffers after a write resolves', () => {
  it('protocol A: a write completes only once its frame is in the send buffer; the peer gets what each write carried', async () => {
    const { a, b, bData, pauseRelay, resumeRelay } = await pausablePair('A');
    // The relay stops reading from a: the kernel's buffers on both ends fill (loopback autotuning
    // lets them grow to tens of MiB), then a's socket queues the frames.
    pauseRelay();
    const writes = 160;
    const w = reusingWriter(a, writes);
    await new Promise((r) => setTimeout(r, 500));
    // Not every write can have completed: their frames cannot all be in the kernel's buffers.
    expect(w.done).toBeLessThan(writes);
    resumeRelay();
    await w.finished;
    await waitFor(() => {
      const data = bData();
      return Array.from({ length: writes }, (_, i) => data[i * MiB] === i + 1 && data[i * MiB + MiB - 1] === i + 1).every(Boolean);
    }, 10_000, 'every write on b');
    const data = bData();
    for (let i = 0; i < writes; i++) expect(data.subarray(i * MiB, (i + 1) * MiB).equals(Buffer.alloc(MiB, i + 1))).toBe(true);
    // b got every block in DATA frames whose checksums held: the link never dropped, no resync made up for it.
    expect(a.status().connection).toBe('Connected');
    expect(b.status().stats.framesRejected).toBe(0);
    expect(a.status().stats.resyncBytesSent).toBe(0);
  }, 30_000);

  it('protocol C, link dropped with frames still queued: the writes wait until the frames leave the socket, so none goes out changed', async () => {
    const { a, b, pauseRelay, resumeRelay, queuedOnA } = await pausablePair('C');
    pauseRelay();
    // 96 writes at once, each from its own buffer, which its writer overwrites as soon as the write
    // resolves: more than the kernel's buffers hold (a's send buffer and the relay's receive buffer,
    // ~36 MiB at most here), so frames wait in a's socket.
    const lanes = 96;
    let resolved = 0;
    const writes = Array.from({ length: lanes }, async (_, i) => {
      const buf = Buffer.alloc(MiB, i + 1);
      await a.write(i * MiB, buf).catch(() => undefined);
      resolved++;
      buf.fill(0xee);
    });
    // The precondition of the test: frames queued in a's socket, not yet in the kernel.
    await waitFor(() => queuedOnA() >= 32 * MiB, 10_000, 'frames queued in a\'s socket');
    expect(resolved).toBe(0);
    // The link goes: its pending writes are answered (their blocks back in the bitmap), while the
    // queued frames still flow out once the relay reads again (until the link's socket is
    // destroyed, 200 ms after the DISCONNECT frame that follows them).
    a.disconnect();
    resumeRelay();
    await Promise.all(writes);
    // b has read all it will: its link ended (the DISCONNECT, a rejected frame or the relay closing).
    await waitFor(() => b.status().connection !== 'Connected', 10_000, 'b to lose the link');
    // Every frame b received carried the bytes it was checksummed with.
    expect(b.status().stats.framesRejected).toBe(0);
  }, 30_000);
});

describe('promotion right after the peer\'s demotion', () => {
  it('the peer\'s last reported role may lag: the peer\'s own answer decides, after the state it sent first', async () => {
    const { a, b, pauseRelay, resumeRelay } = await pausablePair('C');
    // a's frames stop short of b: b still has a as primary when a has already demoted (as when
    // the pair agent hears of the release over the heartbeat before the volume link carries it).
    await waitFor(() => b.status().peer?.role === 'primary', 5000, 'b to hear that a is primary');
    pauseRelay();
    await a.demote();
    expect(b.status().peer?.role).toBe('primary');
    const promoted = b.promote();
    let settled = false;
    void promoted.then(() => (settled = true), () => (settled = true));
    await new Promise((r) => setTimeout(r, 300));
    // b asked a rather than refusing on stale news, and waits for a's answer.
    expect(settled).toBe(false);
    resumeRelay();
    expect((await promoted).role).toBe('primary');
    expect(b.status().peer?.role).toBe('secondary');
    // A primary still refuses a second one, now that b's state has reached a.
    await expect(a.promote()).rejects.toThrow(/the peer is primary; two primaries are never allowed/);
  }, 30_000);
});
