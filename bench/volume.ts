/**
 * bench/volume: the replicated volume's write rate under protocol C against the same writes on
 * a local file with no peer (the baseline, measured in the same run), then the resync rate and
 * the bytes a 1% dirty resync sends against a full sync.
 *
 *   npm run bench -- volume [--seconds 2] [--size-mib 256] [--peer-dir DIR] [--floor] [--compare-tree DIR] [--data-frame-kib N]
 *
 * On one machine both nodes' files share one disk, so the two fdatasyncs of a protocol C write
 * queue behind each other, which two real nodes never do; `--peer-dir` puts the peer's files
 * elsewhere (another disk, or /dev/shm to see the link's own cost).
 *
 * Writes: sequential and random, 4 KiB, 64 KiB and 1 MiB, one at a time (each acknowledged
 * before the next: the latency a store delivery sees), each durable before it resolves (the
 * local baseline: FileBlockDevice.write, the device the volume itself writes through: one O_DSYNC
 * write when idle, else write + a shared fdatasync; protocol C: that, and the peer's). The
 * primary runs in this process; the peer is a separate `pairgate volume serve` process on
 * loopback, as on a real pair. Targets (issue #3): protocol C >= 0.7x local for 64 KiB and
 * larger writes; 4 KiB reported as measured. Ends with one JSON line.
 *
 * `--floor` adds information rows on what the machine itself allows (no volume code): two
 * processes doing O_DSYNC writes at once, one to a file beside the primary's and one beside the
 * peer's, against one process alone (do the two nodes' disk writes serialize?), and a bare Node
 * loopback round trip of 64 KiB and 1 MiB between two processes.
 *
 * `--compare-tree DIR` (an A/B of two builds in one run; information, not a target): a second pair
 * whose primary and peer run the volume code of another checkout (e.g. `git archive REV | tar -x
 * -C DIR`, node_modules symlinked), with its own files beside this pair's; each row then runs
 * local, then this tree's C and the other tree's C one after the other (the two C runs swap order
 * every row), so all three see the same load.
 *
 * `--data-frame-kib N` sets this tree's pair's `dataFrameBytes` (volume config: a larger write leaves
 * as several DATA frames the peer writes as they arrive; default 1024, i.e. one frame per 1 MiB);
 * the compare tree's pair keeps its default.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { adminCall } from '../common/admin-http.ts';
import { silentLogger } from '../common/log.ts';
import { createRegistry } from '../common/metrics.ts';
import { PAIRGATE_BIN, REPO_ROOT } from '../bin/lab/supervisor.ts';
import { FileBlockDevice, type BlockDevice } from '../pair-agent/volume/block-device.ts';
import { ReplicatedVolume } from '../pair-agent/volume/replicated-volume.ts';
import { volumeConfigSchema } from '../pair-agent/volume/config.ts';
import { freePort, waitFor, waitForPort } from '../test/helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../test/helpers/proc.ts';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '2' },
    'size-mib': { type: 'string', default: '256' },
    'peer-dir': { type: 'string' },
    floor: { type: 'boolean', default: false },
    'compare-tree': { type: 'string' },
    'data-frame-kib': { type: 'string' },
  },
});
const SECONDS = Number(args.seconds);
const SIZE = Number(args['size-mib']) * 1024 * 1024;
const SECRET = 'bench-volume-secret-0123456789';

type Pattern = 'seq' | 'rand';

/** Writes of `size` bytes, one at a time, for SECONDS; returns MiB/s and writes/s. */
async function run(dev: BlockDevice, size: number, pattern: Pattern): Promise<{ mibs: number; ops: number }> {
  const slots = Math.floor(dev.size / size);
  const data = randomBytes(size);
  let n = 0;
  const start = performance.now();
  const until = start + SECONDS * 1000;
  while (performance.now() < until && n < 200_000) {
    const slot = pattern === 'seq' ? n % slots : Math.floor(Math.random() * slots);
    await dev.write(slot * size, data);
    n++;
  }
  const s = (performance.now() - start) / 1000;
  return { mibs: (n * size) / 1048576 / s, ops: n / s };
}

/** A child process writing `size` bytes at a time with O_DSYNC (sequential) from `startAt` for SECONDS: MiB/s. */
const DSYNC_WRITER = `
const { open } = require('node:fs/promises'); const { constants } = require('node:fs');
const [file, size, secs, startAt, volBytes] = process.argv.slice(1).map((v, i) => (i ? Number(v) : v));
(async () => {
  const pre = await open(file, 'a+'); await pre.truncate(volBytes); await pre.close();
  const fh = await open(file, constants.O_RDWR | constants.O_DSYNC);
  const data = require('node:crypto').randomBytes(size); const slots = Math.floor(volBytes / size);
  await new Promise((r) => setTimeout(r, Math.max(0, startAt - Date.now())));
  const t0 = performance.now(); let n = 0;
  while (performance.now() - t0 < secs * 1000) { await fh.write(data, 0, size, (n % slots) * size); n++; }
  process.stdout.write(String((n * size) / 1048576 / ((performance.now() - t0) / 1000)));
  await fh.close();
})();`;

function runChild(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.on('error', reject);
    c.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`probe child exited with ${code}`))));
  });
}

/** O_DSYNC writers on the two nodes' folders: one alone, then both at once (MiB/s each). */
async function diskFloor(dirA: string, dirB: string, size: number): Promise<{ alone: number; pairA: number; pairB: number }> {
  const fa = join(dirA, 'floor-a.data');
  const fb = join(dirB, 'floor-b.data');
  const w = (f: string, startAt: number) => runChild(['-e', DSYNC_WRITER, f, String(size), String(SECONDS), String(startAt), String(SIZE)]).then(Number);
  const alone = await w(fa, 0);
  const startAt = Date.now() + 500;
  const [pairA, pairB] = await Promise.all([w(fa, startAt), w(fb, startAt)]);
  rmSync(fa, { force: true });
  rmSync(fb, { force: true });
  return { alone, pairA, pairB };
}

/** A child acks every `size` bytes it receives; the median time from write to ack, in ms. */
const ECHO_CHILD = `
const s = require('node:net').createServer((c) => { c.setNoDelay(true); let want = 0, got = 0;
  c.on('data', (d) => { if (want === 0) { want = d.readUInt32BE(0); got = d.length - 4; } else got += d.length; if (got >= want) { want = 0; c.write(Buffer.alloc(4)); } }); });
s.listen(0, '127.0.0.1', () => { process.stdout.write(String(s.address().port) + '\\n'); });
process.stdin.on('end', () => process.exit(0)); process.stdin.resume();`;

async function loopbackRtt(sizes: number[]): Promise<Record<number, number>> {
  const net = await import('node:net');
  const c = spawn(process.execPath, ['-e', ECHO_CHILD], { stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    const port = await new Promise<number>((resolve) => c.stdout.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
    const s = net.connect(port, '127.0.0.1');
    s.setNoDelay(true);
    await new Promise((r) => s.once('connect', r));
    let waiter: (() => void) | null = null;
    s.on('data', () => waiter?.());
    const out: Record<number, number> = {};
    for (const size of sizes) {
      const data = randomBytes(size);
      const h = Buffer.alloc(4);
      h.writeUInt32BE(size);
      const lat: number[] = [];
      const t0 = performance.now();
      let i = 0;
      while (performance.now() - t0 < SECONDS * 1000) {
        const a = performance.now();
        const warm = i++ < 50; // the first round trips of a size are left out
        const acked = new Promise<void>((r) => (waiter = r));
        s.cork();
        s.write(h);
        s.write(data);
        s.uncork();
        await acked;
        if (!warm) lat.push(performance.now() - a);
      }
      lat.sort((x, y) => x - y);
      out[size] = lat[lat.length >> 1]!;
    }
    s.destroy();
    return out;
  } finally {
    c.stdin.end();
  }
}

async function main(): Promise<void> {
  // The machine's load beside the figures: on a shared box the other processes decide a lot.
  const loadAtStart = loadavg()[0]!;
  const dir = tempDir('pairgate-bench-volume-');
  let peer: Managed | null = null;
  let volume: ReplicatedVolume | null = null;
  let comparePeer: Managed | null = null;
  let compareVolume: BlockDevice & { close(): Promise<void> } | null = null;
  let cleanupPeer: () => unknown = () => undefined;
  try {
    const ports = { a: await freePort(), b: await freePort() };
    const peerAdmin = await freePort();
    const base = { name: 'benchvol', sizeBytes: SIZE, secret: SECRET, protocol: 'C', resyncRateBytesPerSec: 2 * 1024 * 1024 * 1024 };
    const frame = args['data-frame-kib'] ? { dataFrameBytes: Number(args['data-frame-kib']) * 1024 } : {};
    const cfgA = volumeConfigSchema.parse({ ...base, ...frame, dataFile: join(dir.path, 'a.data'), metaFile: join(dir.path, 'a.meta'), listen: `127.0.0.1:${ports.a}`, peer: `127.0.0.1:${ports.b}` });
    const peerDir = args['peer-dir'] ? mkdtempSync(join(args['peer-dir'], 'pairgate-bench-peer-')) : dir.path;
    cleanupPeer = () => peerDir !== dir.path && rmSync(peerDir, { recursive: true, force: true });
    const cfgB = { ...base, ...frame, dataFile: join(peerDir, 'b.data'), metaFile: join(peerDir, 'b.meta'), listen: `127.0.0.1:${ports.b}`, peer: `127.0.0.1:${ports.a}`, admin: { host: '127.0.0.1', port: peerAdmin } };
    writeFileSync(join(dir.path, 'b.yaml'), stringify(cfgB));
    const startPeer = async () => {
      peer = startProcess('volume-peer', process.execPath, [PAIRGATE_BIN, 'volume', 'serve', '--config', join(dir.path, 'b.yaml'), '--log-level', 'warn'], { cwd: REPO_ROOT });
      await waitForPort('127.0.0.1', peerAdmin, 20_000);
    };
    await startPeer();
    volume = await ReplicatedVolume.open(cfgA, { log: silentLogger, registry: createRegistry({}, false) });
    const v = volume;
    await waitFor(() => v.status().connection === 'Connected', 10_000, 'the peer to connect');
    await v.promote();
    const local = await FileBlockDevice.open(join(dir.path, 'local.data'), { size: SIZE, create: true });

    const compareTree = args['compare-tree'];
    if (compareTree) {
      // The same pair built from the other checkout: its own ports and files, same folders.
      const cports = { a: await freePort(), b: await freePort(), admin: await freePort() };
      const cfgCA = { ...base, dataFile: join(dir.path, 'ca.data'), metaFile: join(dir.path, 'ca.meta'), listen: `127.0.0.1:${cports.a}`, peer: `127.0.0.1:${cports.b}` };
      const cfgCB = { ...base, dataFile: join(peerDir, 'cb.data'), metaFile: join(peerDir, 'cb.meta'), listen: `127.0.0.1:${cports.b}`, peer: `127.0.0.1:${cports.a}`, admin: { host: '127.0.0.1', port: cports.admin } };
      writeFileSync(join(dir.path, 'cb.yaml'), stringify(cfgCB));
      comparePeer = startProcess('volume-peer-compare', process.execPath, [join(compareTree, 'bin/pairgate.mjs'), 'volume', 'serve', '--config', join(dir.path, 'cb.yaml'), '--log-level', 'warn'], { cwd: compareTree });
      await waitForPort('127.0.0.1', cports.admin, 20_000);
      const mod = (await import(pathToFileURL(join(compareTree, 'pair-agent/volume/replicated-volume.ts')).href)) as { ReplicatedVolume: typeof ReplicatedVolume };
      const schema = (await import(pathToFileURL(join(compareTree, 'pair-agent/volume/config.ts')).href)) as { volumeConfigSchema: typeof volumeConfigSchema };
      const cv = await mod.ReplicatedVolume.open(schema.volumeConfigSchema.parse(cfgCA), { log: silentLogger, registry: createRegistry({}, false) });
      compareVolume = cv;
      await waitFor(() => cv.status().connection === 'Connected', 10_000, 'the compare-tree peer to connect');
      await cv.promote();
    }

    const rows: Array<{ name: string; local: { mibs: number; ops: number }; c: { mibs: number; ops: number }; compare?: { mibs: number; ops: number } }> = [];
    for (const size of [4096, 65536, 1048576]) {
      for (const pattern of ['seq', 'rand'] as Pattern[]) {
        // Interleaved, baseline first, so that both see the same machine load.
        const l = await run(local, size, pattern);
        // With a compare tree the two C runs swap places every row: whatever running second costs
        // (the disk still flushing the first one's writes) falls on each tree in turn.
        const otherFirst = compareVolume !== null && rows.length % 2 === 1;
        const early = otherFirst ? await run(compareVolume!, size, pattern) : undefined;
        const c = await run(v, size, pattern);
        const compare = compareVolume ? (early ?? (await run(compareVolume, size, pattern))) : undefined;
        rows.push({ name: `${pattern} ${size >= 1048576 ? `${size / 1048576} MiB` : `${size / 1024} KiB`}`, local: l, c, compare });
      }
    }
    await compareVolume?.close();
    compareVolume = null;
    await (comparePeer as Managed | null)?.stop(3000);
    comparePeer = null;
    await local.close();

    // What the machine allows, without the volume: O_DSYNC writers alone and two at once; loopback round trips.
    const floor: Array<{ size: number; alone: number; pairA: number; pairB: number }> = [];
    let rtt: Record<number, number> = {};
    if (args.floor) {
      for (const size of [65536, 1048576]) floor.push({ size, ...(await diskFloor(dir.path, peerDir, size)) });
      rtt = await loopbackRtt([65536, 1048576]);
    }

    // Resync: the peer away while 1% of the volume changes, then back.
    const statusOf = async () => (await adminCall(`http://127.0.0.1:${peerAdmin}`, 'GET', '/status')).body as { connection: string; outOfSyncBytes: number; disk: string };
    await adminCall(`http://127.0.0.1:${peerAdmin}`, 'POST', '/disconnect', {});
    await waitFor(() => v.status().connection === 'Connecting', 5000, 'the link to drop');
    const blocks = SIZE / 4096;
    const dirty = new Set<number>();
    while (dirty.size < Math.round(blocks / 100)) dirty.add(Math.floor(Math.random() * blocks));
    const blk = randomBytes(4096);
    for (const b of dirty) await v.write(b * 4096, blk);
    const sentBefore = v.status().stats.resyncBytesSent;
    let t0 = performance.now();
    await adminCall(`http://127.0.0.1:${peerAdmin}`, 'POST', '/connect', {});
    await waitFor(async () => v.status().connection === 'Connected' && v.status().outOfSyncBytes === 0 && (await statusOf()).disk === 'UpToDate', 60_000, 'the 1% resync', 5);
    const dirtyMs = performance.now() - t0;
    const dirtyBytes = v.status().stats.resyncBytesSent - sentBefore;

    // Full sync: the peer starts over with fresh metadata (a replaced disk).
    await (peer as Managed | null)?.stop(3000);
    await waitFor(() => v.status().connection === 'Connecting', 5000, 'the link to drop');
    rmSync(cfgB.metaFile);
    rmSync(cfgB.dataFile);
    const sentBeforeFull = v.status().stats.resyncBytesSent;
    t0 = performance.now();
    await startPeer();
    await waitFor(async () => v.status().connection === 'Connected' && v.status().outOfSyncBytes === 0 && (await statusOf()).disk === 'UpToDate', 300_000, 'the full sync', 20);
    const fullMs = performance.now() - t0;
    const fullBytes = v.status().stats.resyncBytesSent - sentBeforeFull;

    const pad = (s: string, n: number) => s.padEnd(n);
    const num = (x: number, d = 1) => x.toFixed(d).padStart(9);
    process.stdout.write(`\nvolume writes, one at a time with fdatasync, ${SECONDS} s each (${SIZE / 1048576} MiB volume; peer files in ${peerDir === dir.path ? 'the same folder (same disk)' : peerDir}; DATA frames of ${cfgA.dataFrameBytes / 1024} KiB at most)\n`);
    process.stdout.write(`${pad('write', 12)}${'local MiB/s'.padStart(12)}${'C MiB/s'.padStart(10)}${'local w/s'.padStart(11)}${'C w/s'.padStart(9)}${'C/local'.padStart(9)}\n`);
    for (const r of rows) process.stdout.write(`${pad(r.name, 12)}${num(r.local.mibs).padStart(12)}${num(r.c.mibs).padStart(10)}${num(r.local.ops, 0).padStart(11)}${num(r.c.ops, 0).padStart(9)}${num(r.c.mibs / r.local.mibs, 2).padStart(9)}\n`);
    if (compareTree) {
      process.stdout.write(`\nthe same rows, protocol C of ${compareTree} (beside this tree's C row: after it in odd rows, before it in even ones)\n`);
      process.stdout.write(`${pad('write', 12)}${'this C MiB/s'.padStart(13)}${'other C MiB/s'.padStart(14)}${'this/local'.padStart(11)}${'other/local'.padStart(12)}\n`);
      for (const r of rows) process.stdout.write(`${pad(r.name, 12)}${num(r.c.mibs).padStart(13)}${num(r.compare!.mibs).padStart(14)}${num(r.c.mibs / r.local.mibs, 2).padStart(11)}${num(r.compare!.mibs / r.local.mibs, 2).padStart(12)}\n`);
    }
    if (floor.length) {
      process.stdout.write(`\nfloor (no volume code): O_DSYNC sequential writes, one process alone vs two at once (one beside each node's files)\n`);
      process.stdout.write(`${pad('write', 12)}${'alone MiB/s'.padStart(12)}${'two: each MiB/s'.padStart(17)}${'each/alone'.padStart(12)}\n`);
      for (const f of floor) {
        const each = Math.min(f.pairA, f.pairB);
        process.stdout.write(`${pad(f.size >= 1048576 ? '1 MiB' : '64 KiB', 12)}${num(f.alone).padStart(12)}${`${f.pairA.toFixed(1)} / ${f.pairB.toFixed(1)}`.padStart(17)}${num(each / f.alone, 2).padStart(12)}\n`);
      }
      process.stdout.write(`loopback round trip (Node, two processes, median): 64 KiB ${rtt[65536]!.toFixed(3)} ms, 1 MiB ${rtt[1048576]!.toFixed(3)} ms\n`);
    }
    process.stdout.write(`\nresync after 1% of the blocks changed: ${dirtyBytes} bytes sent (${dirty.size} blocks) in ${dirtyMs.toFixed(0)} ms\n`);
    process.stdout.write(`full sync of a replaced peer disk: ${fullBytes} bytes in ${fullMs.toFixed(0)} ms = ${((fullBytes / 1048576) / (fullMs / 1000)).toFixed(0)} MiB/s (peer process start included)\n`);
    process.stdout.write(`1% dirty resync sends ${((dirtyBytes / fullBytes) * 100).toFixed(2)}% of a full sync\n`);
    process.stdout.write(`load average (1 min): ${loadAtStart.toFixed(2)} at the start, ${loadavg()[0]!.toFixed(2)} at the end\n\n`);

    const figures: Record<string, number> = {};
    for (const r of rows) {
      const key = r.name.replace(/ /g, '_').toLowerCase();
      figures[`${key}_local_mib_s`] = Number(r.local.mibs.toFixed(1));
      figures[`${key}_c_mib_s`] = Number(r.c.mibs.toFixed(1));
      figures[`${key}_c_vs_local`] = Number((r.c.mibs / r.local.mibs).toFixed(3));
      if (r.compare) {
        figures[`${key}_compare_tree_c_mib_s`] = Number(r.compare.mibs.toFixed(1));
        figures[`${key}_compare_tree_c_vs_local`] = Number((r.compare.mibs / r.local.mibs).toFixed(3));
      }
    }
    figures.data_frame_kib = cfgA.dataFrameBytes / 1024;
    figures.resync_1pct_bytes = dirtyBytes;
    figures.full_sync_bytes = fullBytes;
    figures.full_sync_mib_s = Number(((fullBytes / 1048576) / (fullMs / 1000)).toFixed(1));
    for (const f of floor) {
      const k = f.size >= 1048576 ? '1_mib' : '64_kib';
      figures[`floor_dsync_${k}_alone_mib_s`] = Number(f.alone.toFixed(1));
      figures[`floor_dsync_${k}_two_at_once_each_mib_s`] = Number(Math.min(f.pairA, f.pairB).toFixed(1));
      figures[`floor_dsync_${k}_two_vs_alone`] = Number((Math.min(f.pairA, f.pairB) / f.alone).toFixed(3));
    }
    for (const [size, ms] of Object.entries(rtt)) figures[`floor_loopback_rtt_${Number(size) >= 1048576 ? '1_mib' : '64_kib'}_ms`] = Number(ms.toFixed(3));
    figures.load_avg_1m_start = Number(loadAtStart.toFixed(2));
    figures.load_avg_1m_end = Number(loadavg()[0]!.toFixed(2));
    const ratio = (name: string) => rows.find((r) => r.name === name)!;
    const targets: Record<string, { value: number; min?: number; max?: number }> = {};
    for (const name of ['seq 64 KiB', 'rand 64 KiB', 'seq 1 MiB', 'rand 1 MiB']) {
      const r = ratio(name);
      targets[`${name.replace(/ /g, '_').toLowerCase()}_c_vs_local`] = { value: Number((r.c.mibs / r.local.mibs).toFixed(3)), min: 0.7 };
    }
    targets.resync_1pct_share_of_full = { value: Number((dirtyBytes / fullBytes).toFixed(4)), max: 0.011 };
    const met = Object.values(targets).every((t) => (t.min === undefined || t.value >= t.min) && (t.max === undefined || t.value <= t.max));
    process.stdout.write(JSON.stringify({ bench: 'volume', figures, targets, met }) + '\n');
  } finally {
    await compareVolume?.close().catch(() => undefined);
    await (comparePeer as Managed | null)?.stop(3000);
    await volume?.close().catch(() => undefined);
    await (peer as Managed | null)?.stop(3000);
    cleanupPeer();
    dir.cleanup();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench volume failed: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
