/**
 * bench/lb: pairgate's L4 balancer against HAProxy in TCP mode and direct connections to the
 * backends (the ceiling), with the same backends, interleaved in one run.
 *
 *   npm run bench -- lb [--seconds 3] [--rounds 3] [--warmup 3] [--concurrency 32] [--streams 4] [--workers N]
 *                       [--compare-workers N[,N]] [--compare-tree DIR[,DIR]]
 *
 * Backends: two TCP servers in one child process that skip a PROXY v2 header when one comes,
 * echo a line (connection rate) or stream bytes until the client closes (throughput).
 * Paths: direct (no balancer), pairgate (`pairgate lb` child process, leastconn, PROXY v2,
 * TCP checks) and haproxy (leastconn, send-proxy-v2, check) — both balancers over both backends.
 * Cores: HAProxy runs its default thread count (nbthread = the CPUs it may use; counted from
 * /proc/<pid>/task) and pairgate gets as many worker processes (`workers`; --workers N overrides);
 * both figures are printed. --compare-workers N adds a path `pairgate-wN`: this tree with N workers,
 * interleaved in the same rounds. The balancer's CPU is summed over its primary and all its workers.
 * Figures: connections/s (connect, one 6-byte exchange, close) at --concurrency clients, and
 * bulk throughput (MiB/s, backend -> client over --streams connections); medians over --rounds.
 * Targets (issue 8): connection rate >= 0.5x HAProxy's, throughput >= 0.8x HAProxy's, each as the
 * median over the rounds of pairgate's figure / HAProxy's in the same round (the ratio of the two
 * medians is printed too). With a clustered balancer each row also shows the share of the round's
 * connections each worker spliced and how the throughput streams sat on the workers (the kernel
 * picks the worker, SCHED_NONE).
 * Information rows (no target): CPU ms per MiB of the relay, the backends and this generator during
 * the throughput runs (/proc/<pid>/stat, all threads), since all of them share the machine's cores.
 * --compare-tree DIR[,DIR…] adds a path `pairgate@<folder name>` per folder: the balancer served
 * from another checkout (e.g. `git archive HEAD | tar -x -C DIR` with node_modules linked), same
 * config, interleaved with this tree's in the same rounds (an A/B the machine's load hits alike);
 * the config has `workers`, so the trees must be from the commit that added it on.
 * Ends with one JSON line.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import { basename, dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { freePort, waitForPort } from '../test/helpers/net.ts';
import { tempDir } from '../test/helpers/proc.ts';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '32' },
    streams: { type: 'string', default: '4' },
    'compare-tree': { type: 'string' },
    workers: { type: 'string' },
    'compare-workers': { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (args.help) {
  process.stdout.write(readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]!.replace(/^\/\*\*|^ \* ?/gm, '') + '\n');
  process.exit(0);
}
const SECONDS = Number(args.seconds);
const ROUNDS = Number(args.rounds);
/** Seconds of connections per path before the rounds (not counted). */
const WARMUP = Number(args.warmup);
const CONCURRENCY = Number(args.concurrency);
const STREAMS = Number(args.streams);
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const COMPARE_TREES = args['compare-tree'] ? args['compare-tree'].split(',').filter(Boolean) : [];
const COMPARE_WORKERS = args['compare-workers'] ? args['compare-workers'].split(',').filter(Boolean).map(Number) : [];

const BACKEND_JS = `
const net = require('net');
const SIG = Buffer.from([0x0d,0x0a,0x0d,0x0a,0x00,0x0d,0x0a,0x51,0x55,0x49,0x54,0x0a]);
const block = Buffer.alloc(256 * 1024, 97);
for (const port of process.argv.slice(1).map(Number)) {
  net.createServer({ noDelay: true }, (s) => {
    s.on('error', () => {});
    let buf = null, started = false;
    s.on('data', (d) => {
      if (!started) {
        buf = buf ? Buffer.concat([buf, d]) : d;
        if (buf[0] === 0x0d) {
          if (buf.length < 16) return;
          if (!buf.subarray(0, 12).equals(SIG)) return s.destroy();
          const len = 16 + buf.readUInt16BE(14);
          if (buf.length < len) return;
          d = buf.subarray(len);
        } else d = buf;
        started = true; buf = null;
        if (d.length === 0) return;
      }
      if (d[0] === 0x53 /* S: stream */) {
        const pump = () => { while (!s.destroyed && s.write(block)); };
        s.on('drain', pump); pump();
      } else s.write(d);
    });
  }).listen(port, '127.0.0.1', () => process.stdout.write('listening ' + port + '\\n'));
}
`;

function child(cmd: string, argv: string[]): ChildProcess {
  const c = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], cwd: root });
  c.stdout?.resume();
  c.stderr?.resume();
  return c;
}

let lastConnCpuUs = NaN;

/** Connections per second: connect, send "hello\n", read the echo, close; CONCURRENCY loops. */
async function connRate(port: number, seconds: number): Promise<number> {
  const r0 = cpuSeconds(relayPid);
  let done = 0;
  let errors = 0;
  const end = Date.now() + seconds * 1000;
  const one = () =>
    new Promise<void>((resolve) => {
      const s = net.connect({ port, host: '127.0.0.1', noDelay: true });
      let ok = false;
      s.once('connect', () => s.write('hello\n'));
      s.on('data', (d: Buffer) => {
        if (d.includes(0x0a)) {
          ok = true;
          s.end();
        }
      });
      s.on('error', () => {});
      s.setTimeout(5000, () => s.destroy());
      s.once('close', () => {
        if (ok) done++;
        else errors++;
        resolve();
      });
    });
  const t0 = Date.now();
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (Date.now() < end) await one();
    }),
  );
  if (errors > done / 100) process.stderr.write(`  (${errors} failed connections on port ${port})\n`);
  lastConnCpuUs = ((cpuSeconds(relayPid) - r0) * 1e6) / Math.max(done, 1);
  return done / ((Date.now() - t0) / 1000);
}

/**
 * CPU seconds (user + system, all threads) a process and its child processes (a balancer's
 * workers) have used so far, from /proc (Linux); NaN if unreadable.
 */
function cpuSeconds(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK + childPids(pid).reduce((sum, c) => sum + cpuSeconds(c), 0);
  } catch {
    return NaN;
  }
}
function childPids(pid: number): number[] {
  const out: number[] = [];
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    const list = readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').trim();
    if (list) out.push(...list.split(' ').map(Number));
  }
  return out;
}
/** Threads of a process (HAProxy's nbthread in effect). */
const threadCount = (pid: number) => readdirSync(`/proc/${pid}/task`).length;
const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();
const selfCpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** CPU seconds used during a measurement by the relay (balancer) process, the backends' process and this generator. */
interface CpuSplit {
  relay: number;
  backends: number;
  generator: number;
}
let relayPid: number | undefined;
let backendPid: number | undefined;
function cpuMark(): () => CpuSplit {
  const r0 = cpuSeconds(relayPid);
  const b0 = cpuSeconds(backendPid);
  const g0 = selfCpu();
  return () => ({ relay: relayPid ? cpuSeconds(relayPid) - r0 : 0, backends: cpuSeconds(backendPid) - b0, generator: selfCpu() - g0 });
}
let lastCpu: CpuSplit = { relay: NaN, backends: NaN, generator: NaN };
let lastMiB = 0;

/** How the last throughput run's streams sat on a clustered balancer's workers, e.g. "3+1" ('' when not known). */
let lastSpread = '';

/** A clustered balancer's workers from its admin /status (null: not clustered or no answer). */
async function workerStatus(adminPort: number | undefined): Promise<Array<{ connections: number; spliced: number }> | null> {
  if (!adminPort) return null;
  try {
    const st = (await (await fetch(`http://127.0.0.1:${adminPort}/status`, { signal: AbortSignal.timeout(2000) })).json()) as {
      workers?: Array<{ connections: number; spliced: number }>;
    };
    return st.workers ?? null;
  } catch {
    return null;
  }
}
/** Connections open per worker now, e.g. "3+1". */
async function workerSpread(adminPort: number | undefined): Promise<string | null> {
  const ws = await workerStatus(adminPort);
  return ws ? ws.map((w) => w.connections).join('+') : null;
}

/** MiB/s received over STREAMS connections each streaming from the backend for `seconds`. */
async function throughput(port: number, seconds: number, adminPort?: number): Promise<number> {
  let bytes = 0;
  const warm = 300;
  let counting = false;
  const socks: net.Socket[] = [];
  await Promise.all(
    Array.from(
      { length: STREAMS },
      () =>
        new Promise<void>((resolve, reject) => {
          const s = net.connect({ port, host: '127.0.0.1' }, () => {
            s.write('S\n');
            resolve();
          });
          s.on('data', (d: Buffer) => {
            if (counting) bytes += d.length;
          });
          s.on('error', reject);
          socks.push(s);
        }),
    ),
  );
  await new Promise((r) => setTimeout(r, warm));
  // Which worker accepts a stream is the kernel's choice (SCHED_NONE): all four may sit on one.
  lastSpread = (await workerSpread(adminPort)) ?? '';
  counting = true;
  const t0 = Date.now();
  const cpu = cpuMark();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  counting = false;
  lastCpu = cpu();
  lastMiB = bytes / 1024 / 1024;
  const secs = (Date.now() - t0) / 1000;
  for (const s of socks) s.destroy();
  await new Promise((r) => setTimeout(r, 200));
  return bytes / 1024 / 1024 / secs;
}

/** Waits until a clustered balancer's admin status shows every worker accepting. */
async function waitForWorkers(adminPort: number, workers: number): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const st = (await (await fetch(`http://127.0.0.1:${adminPort}/status`, { signal: AbortSignal.timeout(5000) })).json()) as { workers?: Array<{ state: string }> };
      if ((st.workers ?? []).filter((w) => w.state === 'running').length === workers) return;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) throw new Error(`pairgate lb: ${workers} workers not running after 60 s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const tmp = tempDir('pairgate-bench-lb-');
  const procs: ChildProcess[] = [];
  const cleanup = () => {
    for (const p of procs) p.kill('SIGKILL');
    tmp.cleanup();
  };
  process.on('exit', cleanup);
  try {
    const b1 = await freePort();
    const b2 = await freePort();
    const backends = child(process.execPath, ['-e', BACKEND_JS, String(b1), String(b2)]);
    procs.push(backends);
    backendPid = backends.pid;
    await waitForPort('127.0.0.1', b1);
    await waitForPort('127.0.0.1', b2);

    let haproxyVersion = 'not installed';
    let hapPort = 0;
    let hapPid: number | undefined;
    let hapThreads = 0;
    try {
      haproxyVersion = execFileSync('haproxy', ['-v'], { encoding: 'utf8' }).split('\n')[0]!.replace(/ - https.*/, '');
      hapPort = await freePort();
      const hapFile = join(tmp.path, 'haproxy.cfg');
      writeFileSync(
        hapFile,
        [
          'global',
          '    maxconn 4000',
          'defaults',
          '    mode tcp',
          '    timeout connect 2s',
          '    timeout client 30s',
          '    timeout server 30s',
          '    retries 2',
          '    option redispatch',
          '    option tcpka',
          'frontend bench',
          `    bind 127.0.0.1:${hapPort}`,
          '    default_backend p',
          'backend p',
          '    balance leastconn',
          `    server b1 127.0.0.1:${b1} send-proxy-v2 check inter 2s`,
          `    server b2 127.0.0.1:${b2} send-proxy-v2 check inter 2s`,
          '',
        ].join('\n'),
      );
      const hap = child('haproxy', ['-db', '-f', hapFile]);
      procs.push(hap);
      hapPid = hap.pid;
      await waitForPort('127.0.0.1', hapPort, 10_000);
      hapThreads = threadCount(hap.pid!);
    } catch (err) {
      process.stderr.write(`haproxy unavailable: ${(err as Error).message}\n`);
      hapPort = 0;
    }

    // As many balancer processes as HAProxy has threads (its default: one per CPU it may use).
    const WORKERS = args.workers ? Number(args.workers) : hapThreads || os.availableParallelism();
    const lbYaml = (port: number, admin: number, workers: number) =>
      stringify({
        logLevel: 'warn',
        workers,
        admin: { host: '127.0.0.1', port: admin },
        listeners: [{ name: 'bench', listen: `127.0.0.1:${port}`, pool: 'p' }],
        pools: { p: { balance: 'leastconn', proxyProtocol: 'v2', check: { intervalMs: 2000 }, backends: [{ name: 'b1', address: `127.0.0.1:${b1}` }, { name: 'b2', address: `127.0.0.1:${b2}` }] } },
      });
    /** Starts `pairgate lb` from a tree; resolves once its listener accepts and every worker runs. */
    const startBalancer = async (tree: string, label: string, workers: number) => {
      const port = await freePort();
      const admin = await freePort();
      const file = join(tmp.path, `lb-${label}.yaml`);
      writeFileSync(file, lbYaml(port, admin, workers));
      const c = child(process.execPath, [join(tree, 'bin/pairgate.mjs'), 'lb', '--config', file]);
      procs.push(c);
      await waitForPort('127.0.0.1', port, 30_000);
      if (workers > 1) await waitForWorkers(admin, workers);
      return { port, pid: c.pid, admin: workers > 1 ? admin : undefined };
    };
    const pgLb = await startBalancer(root, 'pairgate', WORKERS);

    const paths: Array<[string, number]> = [
      ['direct', b1],
      ['pairgate', pgLb.port],
      ...(hapPort ? ([['haproxy', hapPort]] as Array<[string, number]>) : []),
    ];
    const pidOf: Record<string, number | undefined> = { direct: undefined, pairgate: pgLb.pid, haproxy: hapPid };
    /** Admin ports of clustered balancers (for the streams' spread over the workers). */
    const adminOf: Record<string, number | undefined> = { pairgate: pgLb.admin };
    for (const n of COMPARE_WORKERS) {
      const name = `pairgate-w${n}`;
      const b = await startBalancer(root, name, n);
      paths.push([name, b.port]);
      pidOf[name] = b.pid;
      adminOf[name] = b.admin;
    }
    for (const dir of COMPARE_TREES) {
      const name = `pairgate@${basename(dir)}`;
      const b = await startBalancer(dir, name, WORKERS);
      paths.push([name, b.port]);
      pidOf[name] = b.pid;
      adminOf[name] = b.admin;
    }
    const rate: Record<string, number[]> = {};
    const tput: Record<string, number[]> = {};
    /** Balancer CPU µs per connection in the connection-rate runs. */
    const cpuPerConn: Record<string, number[]> = {};
    /** CPU ms per MiB moved in the throughput runs, per path and process. */
    const cpuPerMiB: Record<string, { relay: number[]; backends: number[]; generator: number[] }> = {};
    process.stdout.write(
      `bench lb: ${ROUNDS} rounds x ${SECONDS} s, ${CONCURRENCY} clients (conn rate), ${STREAMS} streams (throughput); ${haproxyVersion}\n` +
        `  haproxy threads: ${hapThreads || '-'}; pairgate workers: ${WORKERS}; CPUs: ${os.availableParallelism()}\n`,
    );
    // Warm-up on every path, not counted: a balancer in service is long past its JIT's tiering
    // (each worker process tiers up on its own), connection tables and heap growth. With 1 s
    // (before 2026-12-06 07:10) pairgate's first round still cost 1.5-3x the CPU per
    // connection of its later ones; HAProxy's rounds were flat.
    for (const [name, port] of paths) {
      relayPid = pidOf[name];
      await connRate(port, WARMUP);
      await throughput(port, 0.5);
    }
    for (let r = 0; r < ROUNDS; r++) {
      for (const [name, port] of r % 2 ? [...paths].reverse() : paths) {
        relayPid = pidOf[name];
        const before = await workerStatus(adminOf[name]);
        (rate[name] ??= []).push(await connRate(port, SECONDS));
        const after = before && (await workerStatus(adminOf[name]));
        // Share of the round's connections each worker spliced (the kernel picks the worker).
        const connSpread = after && after.length === before.length ? after.map((w, i) => w.spliced - before[i]!.spliced) : null;
        (cpuPerConn[name] ??= []).push(lastConnCpuUs);
        (tput[name] ??= []).push(await throughput(port, SECONDS, adminOf[name]));
        const c = (cpuPerMiB[name] ??= { relay: [], backends: [], generator: [] });
        const perMiB = (sec: number) => (sec * 1000) / Math.max(lastMiB, 1e-9);
        c.relay.push(perMiB(lastCpu.relay));
        c.backends.push(perMiB(lastCpu.backends));
        c.generator.push(perMiB(lastCpu.generator));
        process.stdout.write(
          `  round ${r + 1} ${name.padEnd(8)} ${rate[name]!.at(-1)!.toFixed(0).padStart(6)} conn/s ${tput[name]!.at(-1)!.toFixed(0).padStart(6)} MiB/s` +
            `  relay cpu µs/conn ${name === 'direct' ? '-' : cpuPerConn[name]!.at(-1)!.toFixed(0)};` +
            `  cpu ms/MiB relay ${c.relay.at(-1)!.toFixed(2)} backends ${c.backends.at(-1)!.toFixed(2)} generator ${c.generator.at(-1)!.toFixed(2)}` +
            `${connSpread ? `  conns per worker ${connSpread.map((n) => `${Math.round((100 * n) / Math.max(1, connSpread.reduce((a, b) => a + b, 0)))}%`).join('+')}` : ''}` +
            `${lastSpread ? `  streams per worker ${lastSpread}` : ''}\n`,
        );
      }
    }
    const f = (n: string) => ({ rate: rate[n] ? median(rate[n]!) : NaN, tput: tput[n] ? median(tput[n]!) : NaN });
    const direct = f('direct');
    const pg = f('pairgate');
    const hp = f('haproxy');
    const row = (n: string, x: { rate: number; tput: number }) =>
      `| ${n} | ${x.rate.toFixed(0)} | ${(x.rate / direct.rate).toFixed(2)} | ${x.tput.toFixed(0)} | ${(x.tput / direct.tput).toFixed(2)} |`;
    process.stdout.write(
      [
        '',
        '| path | conn/s | x direct | MiB/s | x direct |',
        '| --- | ---: | ---: | ---: | ---: |',
        row('direct (ceiling)', direct),
        row('pairgate lb', pg),
        ...COMPARE_WORKERS.map((n) => row(`pairgate-w${n}`, f(`pairgate-w${n}`))),
        ...COMPARE_TREES.map((d) => row(`pairgate@${basename(d)}`, f(`pairgate@${basename(d)}`))),
        ...(hapPort ? [row('haproxy', hp)] : []),
        '',
      ].join('\n'),
    );
    // Information, not a target: where the CPU goes while bulk data moves (all processes share the 2 cores).
    const cpuRow = (n: string, label: string) => {
      const c = cpuPerMiB[n];
      if (!c) return [];
      const perConn = n === 'direct' ? '-' : median(cpuPerConn[n]!).toFixed(0);
      return [`| ${label} | ${perConn} | ${n === 'direct' ? '-' : median(c.relay).toFixed(2)} | ${median(c.backends).toFixed(2)} | ${median(c.generator).toFixed(2)} |`];
    };
    process.stdout.write(
      [
        '| CPU (medians, information) | relay µs/conn | relay ms/MiB | backends ms/MiB | generator ms/MiB |',
        '| --- | ---: | ---: | ---: | ---: |',
        ...cpuRow('direct', 'direct'),
        ...cpuRow('pairgate', 'pairgate lb'),
        ...COMPARE_WORKERS.flatMap((n) => cpuRow(`pairgate-w${n}`, `pairgate-w${n}`)),
        ...COMPARE_TREES.flatMap((d) => cpuRow(`pairgate@${basename(d)}`, `pairgate@${basename(d)}`)),
        ...cpuRow('haproxy', 'haproxy'),
        '',
      ].join('\n'),
    );
    // The targets' ratios pair each round's pairgate figure with HAProxy's from the same round
    // (run next to each other, order alternating) and take the median over the rounds: load that
    // other processes put on the shared cores moves between rounds, and a ratio of the two
    // medians can set one path's figure from a quiet round against the other's from a busy one.
    // The ratio of the medians (the figure before 2026-12-06 08:50) is printed too.
    const paired = (xs: number[] | undefined, ys: number[] | undefined) => (xs && ys ? median(xs.map((x, i) => x / ys[i]!)) : NaN);
    const rateRatio = hapPort ? paired(rate.pairgate, rate.haproxy) : NaN;
    const tputRatio = hapPort ? paired(tput.pairgate, tput.haproxy) : NaN;
    const rateOfMedians = hapPort ? pg.rate / hp.rate : NaN;
    const tputOfMedians = hapPort ? pg.tput / hp.tput : NaN;
    if (hapPort) {
      const perRound = (xs: number[], ys: number[]) => xs.map((x, i) => (x / ys[i]!).toFixed(2)).join(' ');
      process.stdout.write(
        `pairgate / haproxy per round: connection rate ${perRound(rate.pairgate!, rate.haproxy!)}; throughput ${perRound(tput.pairgate!, tput.haproxy!)}\n` +
          `pairgate / haproxy (median of the rounds' ratios): connection rate ${rateRatio.toFixed(2)}x (target >= 0.5), throughput ${tputRatio.toFixed(2)}x (target >= 0.8); ` +
          `ratio of the medians: ${rateOfMedians.toFixed(2)}x, ${tputOfMedians.toFixed(2)}x\n`,
      );
    }
    const round2 = (x: number) => Math.round(x * 100) / 100;
    const targets = hapPort
      ? { conn_rate_vs_haproxy: { value: round2(rateRatio), min: 0.5 }, throughput_vs_haproxy: { value: round2(tputRatio), min: 0.8 } }
      : {};
    process.stdout.write(
      JSON.stringify({
        bench: 'lb',
        figures: {
          direct_conn_per_s: Math.round(direct.rate),
          pairgate_conn_per_s: Math.round(pg.rate),
          haproxy_conn_per_s: Math.round(hp.rate) || null,
          direct_mib_per_s: Math.round(direct.tput),
          pairgate_mib_per_s: Math.round(pg.tput),
          haproxy_mib_per_s: Math.round(hp.tput) || null,
          pairgate_cpu_us_per_conn: cpuPerConn.pairgate ? Math.round(median(cpuPerConn.pairgate)) : null,
          haproxy_cpu_us_per_conn: cpuPerConn.haproxy ? Math.round(median(cpuPerConn.haproxy)) : null,
          haproxy_threads: hapThreads || null,
          pairgate_workers: WORKERS,
          pairgate_cpu_ms_per_mib: cpuPerMiB.pairgate ? round2(median(cpuPerMiB.pairgate.relay)) : null,
          haproxy_cpu_ms_per_mib: cpuPerMiB.haproxy ? round2(median(cpuPerMiB.haproxy.relay)) : null,
          conn_rate_ratio_of_medians: hapPort ? round2(rateOfMedians) : null,
          throughput_ratio_of_medians: hapPort ? round2(tputOfMedians) : null,
        },
        targets,
        met: hapPort ? rateRatio >= 0.5 && tputRatio >= 0.8 : false,
      }) + '\n',
    );
  } finally {
    cleanup();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench lb failed: ${(err as Error).stack}\n`);
    process.exit(1);
  },
);
