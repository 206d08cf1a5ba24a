/**
 * The primary holds a DATA frame until the end of the tick (its local write goes to the I/O
 * threads first); frames sent meanwhile must still leave after it. Two volumes in this process,
 * their link through a relay that records the order of the frames it carries.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { volumeConfigSchema } from '../../pair-agent/volume/config.ts';
import { ReplicatedVolume } from '../../pair-agent/volume/replicated-volume.ts';
import { FrameDecoder, FrameType } from '../../pair-agent/volume/wire.ts';
import { waitFor } from '../helpers/net.ts';

let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

/** A TCP relay to `targetPort` that forwards bytes as they are and records every frame's type, per direction. */
async function recordingRelay(targetPort: number, seen: FrameType[]): Promise<number> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: '127.0.0.1', port: targetPort });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    const dec = new FrameDecoder();
    client.on('data', (chunk: Buffer) => {
      for (const f of dec.push(chunk)) seen.push(f.type);
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => client.write(chunk));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  cleanups.push(() => new Promise<void>((r) => {
    for (const s of sockets) s.destroy();
    server.close(() => r());
  }));
  return (server.address() as net.AddressInfo).port;
}

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

describe('frame order on the replication link', () => {
  it('a DISCONNECT sent in the same tick as a write leaves after the write\'s DATA frame, and the peer applies the write', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-link-order-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    // The node whose address sorts lower dials: a, through the relay (b's peer address is a port
    // nobody listens on, in case b sorts lower than it).
    const fromA: FrameType[] = [];
    const listen = { a: 0, b: await freePort() };
    const relayToB = await recordingRelay(listen.b, fromA);
    for (let i = 0; i < 100 && !(listen.a && `127.0.0.1:${listen.a}` < `127.0.0.1:${relayToB}`); i++) listen.a = await freePort();
    expect(`127.0.0.1:${listen.a}` < `127.0.0.1:${relayToB}`).toBe(true);
    const config = (me: 'a' | 'b', peer: string) =>
      volumeConfigSchema.parse({
        name: 'order', dataFile: join(dir, `${me}.data`), metaFile: join(dir, `${me}.meta`), sizeBytes: 8 * 1024 * 1024,
        listen: `127.0.0.1:${listen[me]}`, peer, secret: 'link-order-secret-0123', protocol: 'C',
      });
    const deps = () => ({ log: silentLogger, registry: createRegistry({}, false) });
    const a = await ReplicatedVolume.open(config('a', `127.0.0.1:${relayToB}`), deps());
    cleanups.push(() => a.close());
    const b = await ReplicatedVolume.open(config('b', `127.0.0.1:${await freePort()}`), deps());
    cleanups.push(() => b.close());
    await waitFor(() => a.status().connection === 'Connected' && b.status().connection === 'Connected' && a.status().disk === 'UpToDate', 10_000, 'the pair to connect');
    await a.promote();
    // A first write to the extent, so that the second needs no activity-log write and sends in this tick.
    await a.write(0, Buffer.alloc(4096, 1));
    const data = Buffer.alloc(8192, 0x5a);
    const written = a.write(4096, data);
    a.disconnect();
    await written;
    const dataAt = fromA.lastIndexOf(FrameType.Data);
    const disconnectAt = fromA.indexOf(FrameType.Disconnect);
    expect(disconnectAt).toBeGreaterThan(-1);
    expect(dataAt).toBeLessThan(disconnectAt);
    expect(fromA.filter((t) => t === FrameType.Data)).toHaveLength(2);
    // The peer got the frame before the link ended, so it applies it.
    await waitFor(() => readFileSync(join(dir, 'b.data')).subarray(4096, 4096 + 8192).equals(data), 5000, 'the write on b');
  });
});
