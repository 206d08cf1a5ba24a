/**
 * `pairgate volume …`: run one node of a replicated volume by hand (`serve`) and operate it
 * through its admin listener (the `admin:` block of the volume config, or `--admin URL`):
 *
 *   pairgate volume create --config a.yaml        # data + metadata files
 *   pairgate volume serve --config a.yaml         # one node; a second shell runs b.yaml
 *   pairgate volume primary --config a.yaml
 *   pairgate volume fill --config a.yaml --bytes 8388608
 *   pairgate volume disconnect --config b.yaml    # …write on a…, then:
 *   pairgate volume connect --config b.yaml --wait   # resync with a progress bar
 *   pairgate volume verify --config a.yaml
 */
import { existsSync, readFileSync, rmSync } from 'node:fs';
import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { adminCall } from '../../common/admin-http.ts';
import { startVolumeAdmin } from './admin.ts';
import { parseYaml, validateConfig } from '../../common/config.ts';
import { BadInputError, ConfigError, ConflictError, UnavailableError } from '../../common/errors.ts';
import { createLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { FileBlockDevice } from './block-device.ts';
import { volumeConfigSchema, type VolumeConfig } from './config.ts';
import { activityLogPath, freshMetadata, writeMetadata } from './metadata.ts';
import { ReplicatedVolume, type VolumeStatus } from './replicated-volume.ts';

interface Target {
  url: string;
  token?: string | undefined;
}

/** A volume config file, or a pair-agent config (its `volume:` section), so one file serves both. */
function loadVolumeConfig(file: string): VolumeConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError('', `cannot read config file ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  const raw = parseYaml(text, file) as Record<string, unknown> | null;
  const isAgent = raw !== null && typeof raw === 'object' && !('name' in raw) && raw.volume !== null && typeof raw.volume === 'object';
  return validateConfig(volumeConfigSchema, isAgent ? raw.volume : raw, isAgent ? `${file} (volume:)` : file);
}

function target(o: { config?: string; admin?: string; token?: string }): Target {
  if (o.admin) return { url: o.admin, token: o.token ?? process.env.PAIRGATE_ADMIN_TOKEN };
  if (!o.config) throw new BadInputError('give --config FILE (with an admin: block) or --admin URL');
  const c = loadVolumeConfig(o.config);
  if (!c.admin) throw new BadInputError(`${o.config} has no admin: block; give --admin URL`);
  return { url: `http://${c.admin.host}:${c.admin.port}`, token: o.token ?? c.admin.token };
}

async function call(t: Target, method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = 10_000): Promise<unknown> {
  let res: { status: number; body: unknown };
  try {
    res = await adminCall(t.url, method, path, body, { token: t.token, timeoutMs });
  } catch (err) {
    throw new UnavailableError(`volume admin at ${t.url} did not answer: ${(err as Error).message}`);
  }
  if (res.status >= 300) {
    const msg = (res.body as { message?: string })?.message ?? JSON.stringify(res.body);
    throw res.status === 409 ? new ConflictError(msg) : new UnavailableError(msg);
  }
  return res.body;
}

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function printStatus(s: VolumeStatus): void {
  const lines = [
    `volume ${s.name} (${mib(s.sizeBytes)}) on ${s.node}`,
    `  role ${s.role}, disk ${s.disk}, connection ${s.connection}, protocol ${s.protocol}${s.splitBrain ? ', SPLIT BRAIN (resolve by hand)' : ''}`,
    ...(s.peerFence ? [`  WRITES HELD for ${Math.round((Date.now() - s.peerFence.since) / 1000)} s (${s.peerFence.reason}) until the peer is outdated or fenced`] : []),
    `  peer ${s.peer ? `${s.peer.name}: ${s.peer.role}, ${s.peer.disk}` : 'not connected'}`,
    `  out of sync ${mib(s.outOfSyncBytes)}${s.resync ? `; resync ${s.resync.direction}: ${mib(s.resync.bytesLeft)} left of ${mib(s.resync.totalBytes)}, ${mib(s.resync.rateBytesPerSec)}/s, ETA ${s.resync.etaSec ?? '?'} s` : ''}`,
    `  uuids current ${s.uuids.current} bitmap ${s.uuids.bitmap} history ${s.uuids.history.join(' ')}`,
    `  sent data ${mib(s.stats.dataBytesSent)}, resync ${mib(s.stats.resyncBytesSent)}; received resync ${mib(s.stats.resyncBytesReceived)}; rejected frames ${s.stats.framesRejected}`,
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
}

/** Polls until connected with nothing out of sync, drawing the resync as a progress bar. */
async function waitInSync(t: Target, timeoutMs: number): Promise<VolumeStatus> {
  const bar = process.stdout.isTTY ? new cliProgress.SingleBar({ format: '  resync [{bar}] {percentage}% | {left} left | {rate}/s | ETA {eta_s}s' }, cliProgress.Presets.shades_classic) : null;
  const until = Date.now() + timeoutMs;
  let last = '';
  try {
    for (;;) {
      const s = (await call(t, 'GET', '/status')) as VolumeStatus;
      if (s.connection === 'Connected' && s.outOfSyncBytes === 0 && s.disk === 'UpToDate') return s;
      if (s.splitBrain) throw new ConflictError('split brain: resolve it with `pairgate volume resolve --discard-my-data` on the node to discard');
      if (s.resync) {
        if (bar && !bar.isActive) bar.start(s.resync.totalBytes, 0, { left: mib(s.resync.bytesLeft), rate: mib(s.resync.rateBytesPerSec) });
        bar?.update(s.resync.totalBytes - s.resync.bytesLeft, { left: mib(s.resync.bytesLeft), rate: mib(s.resync.rateBytesPerSec) });
      }
      const line = `${s.connection} ${s.disk} ${mib(s.outOfSyncBytes)} out of sync`;
      if (!bar && line !== last) process.stdout.write(`  ${line}\n`);
      last = line;
      if (Date.now() > until) throw new UnavailableError(`not in sync after ${timeoutMs / 1000} s (last: ${line})`);
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    bar?.stop();
  }
}

async function serve(config: VolumeConfig, level: string): Promise<void> {
  if (!config.admin) throw new BadInputError('volume serve needs an admin: block (host, port) so that the volume commands can reach it');
  const log = createLogger({ role: 'volume', level });
  const registry = createRegistry({ role: 'volume', volume: config.name });
  const volume = await ReplicatedVolume.open(config, { log, registry });
  const admin = await startVolumeAdmin(volume, config.admin, { log, registry });
  log.info({ admin: admin.url, replication: volume.replicationAddress }, 'volume node serving');
  process.stdout.write(`volume ${config.name}: replication ${config.listen}, admin ${admin.url}\n`);
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await admin.close();
    await volume.close();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop());
  process.on('SIGINT', () => void stop());
}

export function register(program: Command): void {
  const vol = program.command('volume').description('the replicated volume: create, serve one node, operate it');
  const withTarget = (c: Command) =>
    c
      .option('-c, --config <file>', 'the volume config (its admin: block says where the node listens)')
      .option('--admin <url>', 'the node\'s admin URL instead of --config')
      .option('--token <token>', 'admin token (default: $PAIRGATE_ADMIN_TOKEN or the config\'s)');

  vol
    .command('create')
    .description('create the data and metadata files of one node (both nodes: same name, size and secret)')
    .requiredOption('-c, --config <file>', 'volume config (YAML: the volume: section of a pair-agent, or a file with just those keys)')
    .option('--force', 'start this node over: wipe its data and metadata (a fresh node; its peer, if it has data, syncs to it)', false)
    .action(async (o: { config: string; force: boolean }) => {
      const c = loadVolumeConfig(o.config);
      if ((existsSync(c.metaFile) || existsSync(c.dataFile)) && !o.force) throw new ConflictError(`${existsSync(c.metaFile) ? c.metaFile : c.dataFile} exists; use --force to start over (this node's data and generation history are wiped)`);
      // Fresh metadata promises all-zero data (two fresh nodes skip the initial sync): an old
      // data file is emptied (sparse zeros), so starting over never keeps stale blocks.
      rmSync(c.dataFile, { force: true });
      const dev = await FileBlockDevice.open(c.dataFile, { size: c.sizeBytes, create: true });
      await dev.close();
      writeMetadata(c.metaFile, freshMetadata(c.sizeBytes));
      rmSync(activityLogPath(c.metaFile), { force: true }); // a stale log of a former life
      process.stdout.write(`created ${c.dataFile} (${mib(c.sizeBytes)}) and ${c.metaFile}\n`);
    });

  vol
    .command('serve')
    .description('run one node of the volume (replication link + admin listener) until SIGTERM')
    .requiredOption('-c, --config <file>', 'volume config')
    .option('--log-level <level>', 'log level', 'info')
    .action(async (o: { config: string; logLevel: string }) => serve(loadVolumeConfig(o.config), o.logLevel));

  withTarget(vol.command('status').description('role, disk, connection, out-of-sync bytes, resync progress'))
    .option('--json', 'print the status as JSON', false)
    .action(async (o: { json: boolean; config?: string; admin?: string; token?: string }) => {
      const s = (await call(target(o), 'GET', '/status')) as VolumeStatus;
      if (o.json) process.stdout.write(`${JSON.stringify(s, null, 2)}\n`);
      else printStatus(s);
    });
  withTarget(vol.command('primary').description('promote (refused while the peer is primary or the data is not UpToDate)'))
    .option('--force', 'promote data that is not UpToDate (the peer\'s data must be lost for good)', false)
    .action(async (o: { force: boolean; config?: string; admin?: string; token?: string }) => printStatus((await call(target(o), 'POST', '/primary', { force: o.force })) as VolumeStatus));
  withTarget(vol.command('secondary').description('demote')).action(async (o) => printStatus((await call(target(o), 'POST', '/secondary')) as VolumeStatus));
  withTarget(vol.command('disconnect').description('drop the link and stop reconnecting (StandAlone)')).action(async (o) => printStatus((await call(target(o), 'POST', '/disconnect')) as VolumeStatus));
  withTarget(vol.command('connect').description('connect again; with --wait, follow the resync to the end'))
    .option('--wait', 'wait until connected and in sync, with a progress bar', false)
    .option('--timeout <seconds>', 'bound for --wait', (v) => Number.parseInt(v, 10), 600)
    .action(async (o: { wait: boolean; timeout: number; config?: string; admin?: string; token?: string }) => {
      const t = target(o);
      await call(t, 'POST', '/connect');
      printStatus(o.wait ? await waitInSync(t, o.timeout * 1000) : ((await call(t, 'GET', '/status')) as VolumeStatus));
    });
  withTarget(vol.command('verify').description('compare every block digest with the peer; differences are resynced from this node'))
    .action(async (o) => {
      const t = target(o);
      const r = (await call(t, 'POST', '/verify', {}, 30 * 60_000)) as { checkedBlocks: number; outOfSyncBlocks: number };
      process.stdout.write(`verified ${r.checkedBlocks} blocks: ${r.outOfSyncBlocks} out of sync${r.outOfSyncBlocks ? ' (resyncing from this node)' : ''}\n`);
      if (r.outOfSyncBlocks) printStatus(await waitInSync(t, 600_000));
    });
  withTarget(vol.command('outdate').description('mark this secondary\'s data Outdated (its primary writes without it): not promoted until resynced'))
    .action(async (o) => printStatus((await call(target(o), 'POST', '/outdate')) as VolumeStatus));
  withTarget(vol.command('resume-io').description('fencing resource-and-stonith: let a primary\'s held writes go on once the peer is outdated or fenced by hand'))
    .requiredOption('--peer <how>', 'how the peer was made safe: outdated | fenced')
    .action(async (o: { peer: string; config?: string; admin?: string; token?: string }) => {
      if (o.peer !== 'outdated' && o.peer !== 'fenced') throw new BadInputError('--peer must be outdated or fenced');
      printStatus((await call(target(o), 'POST', '/resume-io', { peer: o.peer })) as VolumeStatus);
    });
  withTarget(vol.command('resolve').description('settle a split brain: this node\'s changes are discarded at the next connection'))
    .option('--discard-my-data', 'required: this node becomes the sync target', false)
    .action(async (o: { discardMyData: boolean; config?: string; admin?: string; token?: string }) => {
      if (!o.discardMyData) throw new BadInputError('resolve needs --discard-my-data (run it on the node whose changes are to be dropped)');
      printStatus((await call(target(o), 'POST', '/resolve', { discardMyData: true })) as VolumeStatus);
    });
  withTarget(vol.command('fill').description('write random data through the primary (a demo and test load)'))
    .requiredOption('--bytes <n>', 'bytes to write (multiple of 4096)', (v) => Number.parseInt(v, 10))
    .option('--offset <n>', 'start offset', (v) => Number.parseInt(v, 10), 0)
    .action(async (o: { bytes: number; offset: number; config?: string; admin?: string; token?: string }) => {
      const r = (await call(target(o), 'POST', '/fill', { bytes: o.bytes, offset: o.offset }, 30 * 60_000)) as { bytes: number; ms: number };
      process.stdout.write(`wrote ${mib(r.bytes)} in ${r.ms} ms\n`);
    });
  withTarget(vol.command('digest').description('SHA-256 over every block of this node\'s data (compare the two nodes)')).action(async (o) => {
    const r = (await call(target(o), 'GET', '/digest', undefined, 120_000)) as { blocks: number; digest: string };
    process.stdout.write(`${r.digest}  (${r.blocks} blocks)\n`);
  });
}
