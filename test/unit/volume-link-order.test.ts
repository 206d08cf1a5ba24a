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

describe('protocol A', () => {
  it('a write completes only once its frame is in the send buffer: the caller may reuse its buffer at once, and the peer gets what was written', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pairgate-protocol-a-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    // a dials b through a relay that can stop reading from a, so that a's socket backs up.
    const listen = { a: 0, b: await freePort() };
    let relayPaused = true;
    const fromA: net.Socket[] = [];
    const relay = net.createServer((client) => {
      const upstream = net.connect({ host: '127.0.0.1', port: listen.b });
      for (const s of [client, upstream]) {
        s.on('error', () => undefined);
        s.on('close', () => {
          client.destroy();
          upstream.destroy();
        });
      }
      fromA.push(client);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise<void>((r) => relay.listen(0, '127.0.0.1', () => r()));
    const relayPort = (relay.address() as net.AddressInfo).port;
    cleanups.push(() => new Promise<void>((r) => relay.close(() => r())));
    for (let i = 0; i < 100 && !(listen.a && `127.0.0.1:${listen.a}` < `127.0.0.1:${relayPort}`); i++) listen.a = await freePort();
    const config = (me: 'a' | 'b', peer: string) =>
      volumeConfigSchema.parse({
        name: 'proto-a', dataFile: join(dir, `${me}.data`), metaFile: join(dir, `${me}.meta`), sizeBytes: 192 * 1024 * 1024,
        listen: `127.0.0.1:${listen[me]}`, peer, secret: 'protocol-a-secret-0123', protocol: 'A',
        // The link must survive the relay's pause below (pings queue behind the data too).
        pingIntervalMs: 1000, pingTimeoutMs: 10_000,
      });
    const deps = () => ({ log: silentLogger, registry: createRegistry({}, false) });
    const a = await ReplicatedVolume.open(config('a', `127.0.0.1:${relayPort}`), deps());
    cleanups.push(() => a.close());
    const b = await ReplicatedVolume.open(config('b', `127.0.0.1:${await freePort()}`), deps());
    cleanups.push(() => b.close());
    await waitFor(() => a.status().connection === 'Connected' && b.status().connection === 'Connected' && a.status().disk === 'UpToDate', 10_000, 'the pair to connect');
    await a.promote();
    // The relay stops reading from a: the kernel's buffers on both ends fill (loopback autotuning
    // lets them grow to tens of MiB), then a's socket queues the frames.
    for (const s of fromA) s.pause();
    const MiB = 1024 * 1024;
    const writes = 160;
    const buf = Buffer.alloc(MiB);
    let done = 0;
    const writer = (async () => {
      for (let i = 0; i < writes; i++) {
        buf.fill(i + 1);
        await a.write(i * MiB, buf);
        done++;
      }
    })();
    await new Promise((r) => setTimeout(r, 500));
    // Not every write can have completed: their frames cannot all be in the kernel's buffers.
    expect(done).toBeLessThan(writes);
    relayPaused = false;
    for (const s of fromA) s.resume();
    await writer;
    expect(relayPaused).toBe(false);
    await waitFor(() => {
      const data = readFileSync(join(dir, 'b.data'));
      return Array.from({ length: writes }, (_, i) => data[i * MiB] === i + 1 && data[i * MiB + MiB - 1] === i + 1).every(Boolean);
    }, 10_000, 'every write on b');
    const data = readFileSync(join(dir, 'b.data'));
    for (let i = 0; i < writes; i++) expect(data.subarray(i * MiB, (i + 1) * MiB).equals(Buffer.alloc(MiB, i + 1))).toBe(true);
    // b got every block in DATA frames whose checksums held: the link never dropped, no resync made up for it.
    expect(a.status().connection).toBe('Connected');
    expect(b.status().stats.framesRejected).toBe(0);
    expect(a.status().stats.resyncBytesSent).toBe(0);
  }, 30_000);
});
