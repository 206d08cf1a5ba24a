/**
 * `pairgate store …`: the mail store outside the pair agent.
 *   serve --config FILE            run the store (LMTP, POP3, IMAP) on a local volume file, with /metrics and /health
 *   check --volume FILE [--json]   full scan: every record and body verified (exit 1 on problems); read-only
 *   stats --volume FILE [--json]   mailboxes, messages, bytes; read-only
 *   compact --volume FILE          reclaim space now (segment cleaning)
 *   format --volume FILE --yes     write an empty store over whatever the file holds (destructive)
 * On a pair, run check/stats on a copy of the volume or on the demoted node's disk file.
 */
import cliProgress from 'cli-progress';
import type { Command } from 'commander';
import { adminSchema, loadConfigFile, logLevel, z } from '../../common/config.ts';
import { BadInputError } from '../../common/errors.ts';
import { startAdminServer } from '../../common/admin-http.ts';
import { createLogger, silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { installLifecycle } from '../../common/lifecycle.ts';
import { FileBlockDevice } from '../volume/block-device.ts';
import { openMailStore } from './index.ts';
import { createStoreResource, storeConfigSchema } from './resource.ts';

export const storeServeSchema = z
  .object({
    /** A local volume file (created at `sizeBytes` when missing). On a pair the agent passes the replicated volume instead. */
    volume: z.object({ path: z.string(), sizeBytes: z.number().int().positive().optional() }).strict(),
    listenHost: z.string().default('127.0.0.1'),
    admin: adminSchema,
    log: z.object({ level: logLevel }).strict().default({}),
    store: storeConfigSchema,
  })
  .strict();

function progress(label: string): { update(done: number, total: number): void; stop(): void } {
  if (!process.stderr.isTTY) return { update: () => undefined, stop: () => undefined };
  const bar = new cliProgress.SingleBar({ format: `${label} [{bar}] {percentage}% {value}/{total}`, stream: process.stderr }, cliProgress.Presets.shades_classic);
  let started = false;
  return {
    update(done, total) {
      if (!started) {
        bar.start(total, 0);
        started = true;
      }
      bar.setTotal(total);
      bar.update(done);
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

/** Opens an existing volume file; a missing or unreadable file is a clear BAD_INPUT, not a stack trace. */
async function openVolumeFile(path: string): Promise<FileBlockDevice> {
  try {
    return await FileBlockDevice.open(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code) throw new BadInputError(`cannot open volume file ${path}: ${code}`);
    throw err;
  }
}

async function withStore<T>(path: string, readOnly: boolean, fn: (s: Awaited<ReturnType<typeof openMailStore>>) => Promise<T>, format = false): Promise<T> {
  const device = await openVolumeFile(path);
  try {
    const log = process.env.PAIRGATE_LOG_LEVEL ? createLogger({ role: 'store-cli' }) : silentLogger;
    const store = await openMailStore(device, { log, readOnly, compactBytesPerSec: 0, ...(format ? { format: true } : {}) });
    try {
      return await fn(store);
    } finally {
      await store.close();
    }
  } finally {
    await device.close();
  }
}

const mib = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MiB`;

export function register(program: Command): void {
  const store = program.command('store').description('the mail store: serve it on a volume file, check, stats, compact');

  store
    .command('serve')
    .description('run the store (LMTP, POP3, IMAP) on a local volume file')
    .requiredOption('-c, --config <file>', 'store config file (YAML)')
    .action(async (opts: { config: string }) => {
      const config = loadConfigFile(storeServeSchema, opts.config);
      const log = createLogger({ role: 'store', level: config.log.level });
      const registry = createRegistry({ role: 'store' });
      const device = await FileBlockDevice.open(config.volume.path, { create: true, ...(config.volume.sizeBytes ? { size: config.volume.sizeBytes } : {}) });
      const res = createStoreResource({ config: config.store, device, listenHost: config.listenHost, log, registry });
      await res.start();
      const admin = await startAdminServer({
        host: config.admin.host,
        port: config.admin.port,
        registry,
        token: config.admin.token,
        log,
        health: async () => {
          const h = res.health();
          return { healthy: (await res.monitor()) === 'running', body: { ...h, sessions: res.sessions() } };
        },
      });
      log.info({ admin: admin.url, ports: res.ports() }, 'store serving');
      installLifecycle({
        log,
        stop: async () => {
          await admin.close();
          await res.stop();
          await device.close();
        },
        stopTimeoutMs: 20_000,
      });
    });

  store
    .command('check')
    .description('full scan: verify every record and body; exit 1 when problems are found (read-only)')
    .requiredOption('--volume <file>', 'volume file')
    .option('--json', 'print the report as JSON')
    .action(async (opts: { volume: string; json?: boolean }) => {
      const bar = progress('verifying bodies');
      const rep = await withStore(opts.volume, true, (s) => s.check((d, t) => bar.update(d, t)));
      bar.stop();
      if (opts.json) process.stdout.write(JSON.stringify(rep, null, 2) + '\n');
      else {
        process.stdout.write(
          `records replayed: ${rep.records}\nmessages: ${rep.messages}\nbodies: ${rep.bodies} (${mib(rep.bodyBytes)})\n` +
            `log end: ${rep.recovery.stop}${rep.recovery.stopDetail ? ` (${rep.recovery.stopDetail})` : ''}\n` +
            rep.notes.map((n) => `note: ${n}\n`).join('') +
            (rep.problems.length ? `problems (${rep.problems.length}):\n${rep.problems.map((p) => `  - ${p}`).join('\n')}\n` : 'no problems found\n'),
        );
      }
      process.exitCode = rep.ok ? 0 : 1;
    });

  store
    .command('stats')
    .description('mailboxes, messages and bytes of a store volume (read-only)')
    .requiredOption('--volume <file>', 'volume file')
    .option('--json', 'print JSON')
    .action(async (opts: { volume: string; json?: boolean }) => {
      const out = await withStore(opts.volume, true, async (s) => ({ ...(await s.stats()), freeSegments: s.freeSegments(), segments: s.g.segmentCount, segmentSize: s.g.segmentSize, recoveryMs: s.recovery.ms }));
      if (opts.json) process.stdout.write(JSON.stringify(out) + '\n');
      else
        process.stdout.write(
          `mailboxes: ${out.mailboxes}\nmessages: ${out.messages}\nbody bytes: ${mib(out.bodyBytes)}\nused: ${mib(out.bytesUsed)} of ${mib(out.bytesTotal)}\n` +
            `segments: ${out.freeSegments} free of ${out.segments} x ${mib(out.segmentSize)}\nopen (recovery) took ${out.recoveryMs} ms\n`,
        );
    });

  store
    .command('compact')
    .description('reclaim the space of expunged messages now (segment cleaning)')
    .requiredOption('--volume <file>', 'volume file')
    .option('--rate <bytesPerSec>', 'I/O bound in bytes per second (0 = unbounded)', '0')
    .action(async (opts: { volume: string; rate: string }) => {
      const rate = Number(opts.rate);
      if (!Number.isInteger(rate) || rate < 0) throw new BadInputError(`--rate must be a whole number of bytes per second (0 = unbounded), got ${JSON.stringify(opts.rate)}`);
      const bar = progress('cleaning segments');
      const r = await withStore(opts.volume, false, (s) => s.compact({ bytesPerSec: rate, onProgress: (d, t) => bar.update(d, t) }).then((res) => ({ ...res, free: s.freeSegments() })));
      bar.stop();
      process.stdout.write(`moved ${r.bodiesMoved} bodies (${mib(r.bytesMoved)}), freed ${r.segmentsFreed} segments; ${r.free} segments free\n`);
    });

  store
    .command('format')
    .description('write an empty store on a volume file, over whatever it holds (destructive; needs --yes)')
    .requiredOption('--volume <file>', 'volume file')
    .option('--yes', 'yes, discard everything on the volume')
    .action(async (opts: { volume: string; yes?: boolean }) => {
      // A store that does not open (foreign data, both superblocks damaged) is never formatted
      // implicitly; this is the explicit way, and it asks for --yes.
      if (!opts.yes) throw new BadInputError(`format discards everything on ${opts.volume}; add --yes to go ahead`);
      const out = await withStore(opts.volume, false, async (s) => ({ segments: s.g.segmentCount, segmentSize: s.g.segmentSize }), true);
      process.stdout.write(`formatted ${opts.volume}: empty store, ${out.segments} segments x ${mib(out.segmentSize)}\n`);
    });
}
