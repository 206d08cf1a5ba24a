/**
 * Two ReplicatedVolumes in the test process, a dialling b through a TCP relay on loopback that can
 * stop reading from a (so that a's frames wait in the kernel's buffers, then in a's socket), for
 * tests of what crosses the replication link and in which order. Connected, a promoted, and b
 * told so before it returns. Everything it opens is closed by the caller's `cleanups`.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { volumeConfigSchema } from '../../pair-agent/volume/config.ts';
import { ReplicatedVolume } from '../../pair-agent/volume/replicated-volume.ts';
import { freePort, startTcpRelay, waitFor } from './net.ts';

export type Cleanups = Array<() => Promise<void> | void>;

/** A port from listen(0): the relay's ordering trick needs any port, not one below the ephemeral range. */
export async function anyFreePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Volumes a (dialling b through the relay at `relayPort`) and b in `dir`, connected, a promoted. */
export async function openPromotedPair(cleanups: Cleanups, dir: string, listen: { a: number; b: number }, relayPort: number, settings: Record<string, unknown>) {
  const config = (me: 'a' | 'b', peer: string) =>
    volumeConfigSchema.parse({ dataFile: join(dir, `${me}.data`), metaFile: join(dir, `${me}.meta`), listen: `127.0.0.1:${listen[me]}`, peer, ...settings });
  const deps = () => ({ log: silentLogger, registry: createRegistry({}, false) });
  const a = await ReplicatedVolume.open(config('a', `127.0.0.1:${relayPort}`), deps());
  cleanups.push(() => a.close());
  const b = await ReplicatedVolume.open(config('b', `127.0.0.1:${await anyFreePort()}`), deps());
  cleanups.push(() => b.close());
  await waitFor(() => a.status().connection === 'Connected' && b.status().connection === 'Connected' && a.status().disk === 'UpToDate', 10_000, 'the pair to connect');
  await a.promote();
  await waitFor(() => b.status().peer?.role === 'primary', 5000, 'b to hear that a is primary');
  return { a, b };
}

/**
 * Volumes a and b with a's link to b through a relay that can stop reading from a. `settings` are
 * volume config keys (protocol, size, secret…); pings are slow and patient so that the link
 * survives long pauses (pings queue behind the data too).
 */
export async function pairThroughPausableRelay(cleanups: Cleanups, settings: Record<string, unknown>) {
  const dir = mkdtempSync(join(tmpdir(), 'pairgate-link-pause-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const listen = { a: 0, b: await anyFreePort() };
  const relay = await startTcpRelay(listen.b);
  cleanups.push(() => relay.close());
  const relayPort = relay.port;
  // The node whose address sorts lower dials: a, through the relay.
  // A port below the ephemeral range (where the relay's is), so that a's address sorts lower.
  for (let i = 0; i < 100 && !(listen.a && `127.0.0.1:${listen.a}` < `127.0.0.1:${relayPort}`); i++) listen.a = await freePort();
  const { a, b } = await openPromotedPair(cleanups, dir, listen, relayPort, { pingIntervalMs: 1000, pingTimeoutMs: 10_000, ...settings });
  return {
    a,
    b,
    bData: () => readFileSync(join(dir, 'b.data')),
    /** Bytes a's link socket has not yet handed to the kernel (0 without a link). */
    queuedOnA: () => (a as unknown as { link: { socket: net.Socket } | null }).link?.socket.writableLength ?? 0,
    pauseRelay: () => relay.clients.forEach((s) => s.pause()),
    resumeRelay: () => relay.clients.forEach((s) => s.resume()),
  };
}
