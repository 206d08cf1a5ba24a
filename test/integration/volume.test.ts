/**
 * The replicated volume with two nodes as two processes on loopback: replication under
 * protocol C, SIGKILL of the primary, bitmap resync after a disconnection, split brain and its
 * policies, online verify repairing a corrupted block, and hostile input on the link.
 */
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { openSync, writeSync, closeSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FrameType, authResponse, encodeBlockWrite, encodeFrame, encodeJson, FrameDecoder } from '../../pair-agent/volume/wire.ts';
import { sleep, waitFor } from '../helpers/net.ts';
import { tempDir } from '../helpers/proc.ts';
import { freshMetadata, writeMetadata } from '../../pair-agent/volume/metadata.ts';
import { SECRET, block, inSync, volumePair, type VolumeNode } from './volume-harness.ts';

const BS = 4096;
let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

async function pair(opts: Parameters<typeof volumePair>[1] = {}) {
  const dir = tempDir('pairgate-volume-');
  const p = await volumePair(dir.path, opts);
  cleanups.push(() => dir.cleanup(), () => p.stop());
  return { ...p, dir: dir.path };
}

function digestOf(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex').slice(0, 32);
}

async function write(node: VolumeNode, blockNo: number, data: Buffer): Promise<void> {
  const res = await node.post('/write', { offset: blockNo * BS, data: data.toString('base64') });
  if (res.status !== 200) throw new Error(`write to block ${blockNo} on ${node.name}: ${res.status} ${JSON.stringify(res.body)}`);
}

function rejected(metrics: string, reason: string): number {
  const m = metrics.match(new RegExp(`pairgate_replication_frames_rejected_total\\{[^}]*reason="${reason}"[^}]*\\} (\\d+)`));
  return m ? Number(m[1]) : 0;
}

describe('replicated volume (two processes)', () => {
  it('protocol C: random writes on the primary leave every block identical on the secondary', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    expect((await b.status()).lastDecision).toEqual({ decision: 'no-sync', rule: 10 });
    expect((await a.post('/primary')).status).toBe(200);
    const blocks = 2048;
    // The 16 writes in flight at once never overlap (the block device's contract, as a file system
    // keeps it: overlapping concurrent writes may land in either order locally while the peer
    // applies them in issue order); each gets its own 128-block region, at a random place in it.
    // Batches follow one another, so later batches overwrite earlier ones at random.
    const region = blocks / 16;
    for (let batch = 0; batch < 12; batch++) {
      await Promise.all(
        Array.from({ length: 16 }, (_, i) => {
          const n = 1 + ((batch * 16 + i) % 4);
          const first = i * region + Math.floor(Math.random() * (region - n));
          return write(a, first, randomBytes(n * BS));
        }),
      );
    }
    const [da, db] = await Promise.all([a.digests(), b.digests()]);
    expect(db).toEqual(da);
    // The secondary is not readable by the store, and a second primary is refused.
    const second = await b.post('/primary');
    expect(second.status).toBe(409);
    expect(JSON.stringify(second.body)).toMatch(/peer is primary/);
  });

  it('a secondary replicating normally leaves its metadata file alone (nothing in it changes)', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    expect((await a.post('/primary')).status).toBe(200);
    await write(a, 1, randomBytes(BS));
    await sleep(1500); // whatever the promotion and the first write changed is persisted by now (1 s timer)
    const metaFile = String(b.config.metaFile);
    const before = statSync(metaFile);
    // Writes for over two timer periods: each marks the secondary's metadata dirty, none changes it.
    for (let i = 0; i < 22; i++) {
      await write(a, 2 + i, randomBytes(BS));
      await sleep(100);
    }
    const after = statSync(metaFile);
    expect({ ino: after.ino, mtimeMs: after.mtimeMs }).toEqual({ ino: before.ino, mtimeMs: before.mtimeMs });
    expect(await b.digests()).toEqual(await a.digests());
  });

  it('SIGKILL of the primary mid-stream: every acknowledged write is on the secondary; the old primary resyncs on return', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    await a.post('/primary');
    const acked = new Set<number>();
    let next = 0;
    let stop = false;
    const writer = async () => {
      while (!stop && next < 2000) {
        const n = next++;
        try {
          await write(a, n, block(n));
          acked.add(n);
        } catch {
          return; // the primary is gone
        }
      }
    };
    const writers = Array.from({ length: 8 }, writer);
    await waitFor(() => acked.size >= 150, 20_000, '150 acknowledged writes');
    a.kill('SIGKILL');
    stop = true;
    await Promise.all(writers);
    await waitFor(async () => (await b.status()).connection === 'Connecting', 5000, 'the secondary to notice the lost link');
    expect((await b.post('/primary')).status).toBe(200);
    const db = await b.digests();
    const missing = [...acked].filter((n) => db[n] !== digestOf(block(n)));
    expect(missing).toEqual([]);
    expect(acked.size).toBeGreaterThanOrEqual(150);

    // The old primary comes back as secondary, becomes the sync target, and ends identical.
    await a.start();
    await inSync(a, b);
    const sa = await a.status();
    expect(sa.role).toBe('secondary');
    expect(sa.lastDecision?.decision).toBe('target');
    expect(await a.digests()).toEqual(await b.digests());
  });

  it('replaced disk: the fresh node refuses promotion while its peer is down; with the peer back it takes a full sync from it', async () => {
    const { a, b, dir } = await pair();
    await inSync(a, b);
    await a.post('/primary');
    for (let i = 0; i < 20; i++) await write(a, i, block(300 + i));
    expect((await b.digests())[19]).toBe(digestOf(block(319)));
    // b's disk is replaced: new, empty data and metadata files. Then a (holding the data) goes down.
    await b.stop();
    rmSync(join(dir, 'b.data'));
    rmSync(join(dir, 'b.meta'));
    a.kill('SIGKILL');
    await a.proc!.exited;
    await b.start();
    const alone = await b.status();
    expect(alone).toMatchObject({ role: 'secondary', disk: 'Inconsistent', connection: 'Connecting' });
    const refused = await b.post('/primary');
    expect(refused.status).toBe(409);
    expect(JSON.stringify(refused.body)).toMatch(/fresh.*--force/);
    await sleep(300);
    expect((await b.status()).role).toBe('secondary');
    // The peer comes back: b is the target of a full sync and ends with a's data.
    await a.start();
    await inSync(a, b);
    const sb = await b.status();
    expect(sb.lastDecision).toEqual({ decision: 'target-full', rule: 20 });
    expect(sb.role).toBe('secondary');
    const [da, db] = await Promise.all([a.digests(), b.digests()]);
    expect(db).toEqual(da);
    expect(db[19]).toBe(digestOf(block(319)));
    // And b, UpToDate now, would be promotable (once a steps down).
    await a.post('/secondary');
    expect((await b.post('/primary')).status).toBe(200);
  });

  it('a fresh node alone: promotion only with --force; its fresh peer then receives only the blocks written since (bitmap, rule 15)', async () => {
    const { a, b } = await pair({ start: ['a'] });
    expect(await a.status()).toMatchObject({ disk: 'Inconsistent', uuids: { current: '4' } });
    expect((await a.post('/primary')).status).toBe(409);
    const forced = await a.post('/primary', { force: true });
    expect(forced.status).toBe(200);
    expect(forced.body).toMatchObject({ role: 'primary', disk: 'UpToDate' });
    for (let i = 0; i < 5; i++) await write(a, 100 + i, block(i));
    await b.start();
    await inSync(a, b);
    expect((await b.status()).lastDecision).toEqual({ decision: 'target', rule: 15 });
    expect((await a.status()).stats.resyncBytesSent).toBe(5 * BS);
    expect(await b.digests()).toEqual(await a.digests());
  });

  it('metadata an older build wrote for a fresh volume (UpToDate, never connected) opens Inconsistent', async () => {
    const dir = tempDir('pairgate-volume-');
    cleanups.push(() => dir.cleanup());
    const old = freshMetadata(8 * 1024 * 1024);
    old.disk = 'UpToDate';
    old.flags.consistent = true;
    writeMetadata(join(dir.path, 'a.meta'), old);
    const p = await volumePair(dir.path, { start: ['a'] });
    cleanups.push(() => p.stop());
    expect(await p.a.status()).toMatchObject({ disk: 'Inconsistent', uuids: { current: '4' } });
    expect((await p.a.post('/primary')).status).toBe(409);
  });

  it('fencing resource-and-stonith by hand: the primary holds writes when its peer leaves until `resume-io`; the peer that left is Outdated, refuses to serve, and resyncs', async () => {
    const { a, b } = await pair({ fencing: 'resource-and-stonith' });
    await inSync(a, b);
    expect((await a.post('/primary')).status).toBe(200);
    await write(a, 1, block(1));
    // b leaves its primary on purpose: it marks its own data Outdated (DRBD's disconnect).
    await b.post('/disconnect');
    expect((await b.status()).disk).toBe('Outdated');
    expect((await b.post('/primary')).status).toBe(409);
    await waitFor(async () => (await a.status()).peerFence !== null, 5000, 'a to hold writes');
    // A write now waits: nobody has told a that b cannot be promoted.
    await expect(a.post('/write', { offset: 2 * BS, data: block(2).toString('base64') }, 1000)).rejects.toThrow(/timeout/i);
    expect((await a.metrics())).toMatch(/pairgate_volume_writes_held\{[^}]*\} 1/);
    // The operator says b is outdated (it is): the held write goes on, and new ones too.
    const bad = await a.post('/resume-io', { peer: 'nonsense' });
    expect(bad.status).toBe(409); // the admin API's answer to bad input
    expect(JSON.stringify(bad.body)).toMatch(/say how the peer was made safe/);
    expect((await a.post('/resume-io', { peer: 'outdated' })).status).toBe(200);
    await write(a, 3, block(3));
    // b resyncs from a, then has every block a acknowledged.
    await b.post('/connect');
    await inSync(a, b);
    expect((await b.status()).disk).toBe('UpToDate');
    const [da, db] = await Promise.all([a.digests(), b.digests()]);
    expect(db).toEqual(da);
    expect(db[3]).toBe(digestOf(block(3)));
  });

  it('an Inconsistent node (resync cut short) never serves as a sync source, not even to a fresh peer', async () => {
    // Slow resync (128 changed blocks take 2 s), so that it can be cut short. If the first
    // handshake is lost half-way (under load), the two fresh volumes meet again by a full sync
    // (8 MiB at this rate: 32 s), hence the long bound on the first meeting.
    const { a, b, dir } = await pair({ resyncRateBytesPerSec: 256 * 1024 });
    await inSync(a, b, 60_000);
    await a.post('/primary');
    await b.post('/disconnect');
    await waitFor(async () => (await a.status()).connection === 'Connecting', 5000, 'a to see the disconnection');
    for (let i = 0; i < 128; i++) await write(a, i * 16, block(i));
    await b.post('/connect');
    await waitFor(async () => (await b.status()).connection === 'SyncTarget', 10_000, 'b a sync target');
    // a dies mid-resync and comes back with a replaced disk: b's half-synced data must not be copied to it.
    a.kill('SIGKILL');
    await a.proc!.exited;
    await waitFor(async () => (await b.status()).connection === 'Connecting', 5000, 'b to lose a');
    expect((await b.status()).disk).toBe('Inconsistent');
    rmSync(join(dir, 'a.data'));
    rmSync(join(dir, 'a.meta'));
    await a.start();
    await waitFor(async () => (await b.status()).connection === 'StandAlone', 10_000, 'b to refuse the sync (StandAlone)');
    const [sa, sb] = await Promise.all([a.status(), b.status()]);
    expect(sa.disk).toBe('Inconsistent');
    expect(sb.disk).toBe('Inconsistent');
    expect(sb.stats.resyncBytesSent).toBe(0);
    expect(sa.stats.resyncBytesReceived).toBe(0);
  });

  it('two fresh volumes meet: both UpToDate with one shared generation, nothing sent', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    const [sa, sb] = await Promise.all([a.status(), b.status()]);
    expect(sa.uuids.current).toBe(sb.uuids.current);
    expect(sa.uuids.current).not.toBe('4');
    expect(sa.stats.resyncBytesSent + sb.stats.resyncBytesSent).toBe(0);
  });

  it('both nodes asked to become primary at the same moment: exactly one succeeds, every round', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    for (let round = 0; round < 6; round++) {
      const [ra, rb] = await Promise.all([a.post('/primary'), b.post('/primary')]);
      const oks = [ra, rb].filter((r) => r.status === 200).length;
      expect([ra.status, rb.status].sort()).toEqual([200, 409]);
      expect(oks).toBe(1);
      const [sa, sb] = await Promise.all([a.status(), b.status()]);
      expect([sa.role, sb.role].sort()).toEqual(['primary', 'secondary']);
      expect(sa.connection).toBe('Connected');
      const winner = ra.status === 200 ? a : b;
      await write(winner, round, block(round));
      await winner.post('/secondary');
      await waitFor(async () => (await a.status()).peer?.role === 'secondary' && (await b.status()).peer?.role === 'secondary', 5000, 'both secondary');
    }
    expect(await b.digests()).toEqual(await a.digests());
  });

  it('disconnect, write 1% of the volume, reconnect: only those blocks cross the link', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    await a.post('/primary');
    await write(a, 0, block(1));
    await b.post('/disconnect');
    await waitFor(async () => (await a.status()).connection === 'Connecting', 5000, 'a to see the disconnection');
    const dirty = 2048 / 100;
    const chosen = new Set<number>();
    while (chosen.size < Math.round(dirty)) chosen.add(1 + Math.floor(Math.random() * 2000));
    for (const n of chosen) await write(a, n, block(n + 7));
    const before = await a.status();
    expect(before.outOfSyncBytes).toBe(chosen.size * BS);
    expect(before.stats.resyncBytesSent).toBe(0);
    await b.post('/connect');
    await inSync(a, b);
    const after = await a.status();
    expect(after.stats.resyncBytesSent).toBe(chosen.size * BS);
    expect((await b.status()).lastDecision).toEqual({ decision: 'target', rule: 50 });
    expect(await b.digests()).toEqual(await a.digests());
  });

  it('split brain with the disconnect policy: detected, nothing overwritten until resolve --discard-my-data', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    await a.post('/disconnect');
    await b.post('/disconnect');
    await a.post('/primary');
    await b.post('/primary');
    await write(a, 5, block(500));
    await write(b, 5, block(501));
    await write(b, 6, block(601));
    await a.post('/connect');
    await b.post('/connect');
    await waitFor(async () => (await a.status()).splitBrain && (await b.status()).splitBrain, 10_000, 'both nodes to report the split brain');
    const [sa, sb] = await Promise.all([a.status(), b.status()]);
    expect(sa.connection).toBe('StandAlone');
    expect(sb.connection).toBe('StandAlone');
    expect((await a.digests())[5]).toBe(digestOf(block(500)));
    expect((await b.digests())[5]).toBe(digestOf(block(501)));
    // The operator keeps a's data: b steps down and discards its changes.
    expect((await b.post('/resolve', { discardMyData: true })).status).toBe(409); // still primary
    await b.post('/secondary');
    expect((await b.post('/resolve', { discardMyData: true })).status).toBe(200);
    await a.post('/connect');
    await inSync(a, b);
    const db = await b.digests();
    expect(db[5]).toBe(digestOf(block(500)));
    expect(db[6]).toBe(digestOf(Buffer.alloc(BS)));
    expect(db).toEqual(await a.digests());
    expect((await a.status()).splitBrain).toBe(false);
  });

  async function splitBrainWith(policy: string, writesA: number, writesB: number, bFirst = false) {
    const { a, b } = await pair({ afterSb0Pri: policy });
    await inSync(a, b);
    await a.post('/disconnect');
    await b.post('/disconnect');
    const [first, second] = bFirst ? [b, a] : [a, b];
    await first.post('/primary');
    await sleep(30);
    await second.post('/primary');
    for (let i = 0; i < writesA; i++) await write(a, 10 + i, block(1000 + i));
    for (let i = 0; i < writesB; i++) await write(b, 10 + i, block(2000 + i));
    await a.post('/secondary');
    await b.post('/secondary');
    await a.post('/connect');
    await b.post('/connect');
    await inSync(a, b);
    const [da, db] = await Promise.all([a.digests(), b.digests()]);
    expect(db).toEqual(da);
    return { a: await a.status(), b: await b.status(), digests: da };
  }

  it('split brain, discard-zero-changes: the side that wrote nothing takes the other side\'s data', async () => {
    const r = await splitBrainWith('discard-zero-changes', 3, 0);
    expect(r.digests[10]).toBe(digestOf(block(1000)));
    expect(r.b.stats.resyncBytesReceived).toBeGreaterThan(0);
  });

  it('split brain, discard-younger-primary: the later promotion loses', async () => {
    const r = await splitBrainWith('discard-younger-primary', 2, 2, true);
    // b was promoted first, so a (younger) is discarded.
    expect(r.digests[10]).toBe(digestOf(block(2000)));
    expect(r.a.stats.resyncBytesReceived).toBeGreaterThan(0);
  });

  it('split brain, discard-least-changes: the side with fewer changed blocks loses', async () => {
    const r = await splitBrainWith('discard-least-changes', 2, 5);
    expect(r.digests[10]).toBe(digestOf(block(2000)));
    expect(r.digests[14]).toBe(digestOf(block(2004)));
  });

  it('online verify finds a block corrupted on the secondary\'s disk and the resync repairs it', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    await a.post('/primary');
    for (let i = 0; i < 16; i++) await write(a, i, block(i));
    const fd = openSync(b.dataFile, 'r+');
    writeSync(fd, randomBytes(100), 0, 100, 7 * BS + 1000);
    closeSync(fd);
    expect((await b.digests())[7]).not.toBe(digestOf(block(7)));
    const v = await a.post('/verify', {}, 60_000);
    expect(v.status).toBe(200);
    expect(v.body).toEqual({ checkedBlocks: 2048, outOfSyncBlocks: 1 });
    await inSync(a, b);
    expect((await b.digests())[7]).toBe(digestOf(block(7)));
    expect(await b.digests()).toEqual(await a.digests());
  });

  it('garbage, forged and malformed frames on the replication port: dropped, logged, nothing written', async () => {
    const { a, b } = await pair();
    await inSync(a, b);
    await b.stop(); // a now accepts connections from anyone who claims to be its peer
    await waitFor(async () => (await a.status()).connection === 'Connecting', 5000, 'a to lose its peer');
    const before = { status: await a.status(), digests: await a.digests() };
    const port = a.replicationPort;

    /** Sends bytes and resolves when the node closes the connection. */
    const exchange = (parts: Buffer[] | ((sock: net.Socket, incoming: FrameDecoder) => void)) =>
      new Promise<void>((resolve, reject) => {
        const sock = net.connect({ host: '127.0.0.1', port });
        const t = setTimeout(() => {
          sock.destroy();
          reject(new Error(`the node kept a hostile connection open\n${a.proc?.output().slice(-3000)}`));
        }, 5000);
        const dec = new FrameDecoder();
        sock.on('connect', () => {
          if (Array.isArray(parts)) {
            for (const p of parts) sock.write(p);
            sock.resume(); // read, so that the node's close is seen
          } else parts(sock, dec);
        });
        sock.on('error', () => undefined);
        sock.on('close', () => {
          clearTimeout(t);
          resolve();
        });
      });

    await exchange([Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')]);
    const bad = Buffer.concat(encodeFrame(FrameType.Ping, 1));
    bad[4] = 99; // unknown type; header checksum now wrong too
    await exchange([bad]);
    const hello = (nonce: string) => Buffer.concat(encodeFrame(FrameType.Hello, 1, encodeJson({ proto: 1, volume: 'testvol', node: 'x', sizeBytes: 8 * 1024 * 1024, nonce })));
    const nonce = randomBytes(32).toString('hex');
    // A forged AUTH: signed with the wrong secret.
    await exchange((sock, dec) => {
      sock.write(hello(nonce));
      sock.on('data', (c: Buffer) => {
        for (const f of dec.push(c)) {
          if (f.type === FrameType.Hello) {
            const theirs = JSON.parse(f.payload.toString()).nonce as string;
            for (const p of encodeFrame(FrameType.Auth, 2, authResponse('not-the-secret-at-all', 'testvol', theirs, nonce))) sock.write(p);
          }
        }
      });
    });
    // Truncated header, then close.
    await new Promise<void>((resolve) => {
      const sock = net.connect({ host: '127.0.0.1', port }, () => {
        sock.end(Buffer.concat(encodeFrame(FrameType.Ping, 1)).subarray(0, 10));
      });
      sock.resume();
      sock.on('error', () => undefined);
      sock.on('close', () => resolve());
    });
    // A fully authenticated peer (right secret) that sends a write past the end of the volume.
    await exchange((sock, dec) => {
      sock.write(hello(nonce));
      sock.on('data', (c: Buffer) => {
        for (const f of dec.push(c)) {
          if (f.type === FrameType.Hello) {
            const theirs = JSON.parse(f.payload.toString()).nonce as string;
            for (const p of encodeFrame(FrameType.Auth, 2, authResponse(SECRET, 'testvol', theirs, nonce))) sock.write(p);
            for (const p of encodeFrame(FrameType.Data, 3, Buffer.concat(encodeBlockWrite(8 * 1024 * 1024, Buffer.alloc(BS, 1))))) sock.write(p);
          }
        }
      });
    });
    // A checksum error in the payload of an otherwise good frame.
    const corrupt = Buffer.concat(encodeFrame(FrameType.Hello, 1, encodeJson({ proto: 1, volume: 'testvol', node: 'x', sizeBytes: 8 * 1024 * 1024, nonce })));
    corrupt[corrupt.length - 3] ^= 0xff;
    await exchange([corrupt]);

    const metrics = await a.metrics();
    expect(rejected(metrics, 'bad-frame')).toBeGreaterThanOrEqual(3);
    expect(rejected(metrics, 'auth')).toBeGreaterThanOrEqual(1);
    expect(rejected(metrics, 'protocol')).toBeGreaterThanOrEqual(1);
    const after = await a.status();
    expect(after.role).toBe(before.status.role);
    expect(after.disk).toBe('UpToDate');
    expect(after.uuids).toEqual(before.status.uuids);
    expect(await a.digests()).toEqual(before.digests);
  });
});
