/**
 * `npm run bench -- failover [runs] [baselineRuns]`: failovers of a real pair of `pairgate
 * pair-agent` processes on loopback (local-process fencing). Each run SIGKILLs the primary and
 * times the first successful TCP connection to the floating address (the pair's health
 * endpoint); the killed node is restarted and rejoins as standby before the next run.
 *
 * Baseline: the same with the deadtime classic Heartbeat examples use (keepalive 2 s, warntime
 * 5 s, deadtime 10 s). Target: median under 1.5 s with the default timings (100/300/600 ms).
 */
import net from 'node:net';
import { sleep, waitFor } from '../test/helpers/net.ts';
import { startPair, type NodeId, type TestPair } from '../test/integration/pair-agent-harness.ts';

const RUNS = Math.max(1, Math.min(100, Number(process.argv[2] ?? 20)));
const BASELINE_RUNS = Math.max(0, Math.min(20, Number(process.argv[3] ?? 3)));
const DEFAULT = { keepaliveMs: 100, warntimeMs: 300, deadtimeMs: 600, initdeadMs: 2000 };
const CLASSIC = { keepaliveMs: 2000, warntimeMs: 5000, deadtimeMs: 10_000, initdeadMs: 20_000 };

function connects(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    const done = (ok: boolean) => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(100, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

async function settled(pair: TestPair): Promise<NodeId> {
  return waitFor(async () => {
    const [a, b] = await Promise.all([pair.a.status(), pair.b.status()]);
    if (!a || !b || !a.peer.alive || !b.peer.alive) return null;
    if (a.state === 'primary' && b.state === 'standby') return 'a' as const;
    if (b.state === 'primary' && a.state === 'standby') return 'b' as const;
    return null;
  }, 60_000, 'pair settled (one primary, one standby, both alive)', 50);
}

async function series(label: string, timings: typeof DEFAULT, runs: number): Promise<number[]> {
  const pair = await startPair({ timings });
  const times: number[] = [];
  try {
    for (let i = 0; i < runs; i++) {
      const primary = await settled(pair);
      const node = pair.node(primary);
      const t0 = performance.now();
      node.proc!.kill('SIGKILL');
      await node.proc!.exited; // its listening socket is gone with it
      const deadline = Date.now() + timings.deadtimeMs + 30_000;
      // the first accepted connection after the killed process is gone is the new primary's
      while (!(await connects(pair.address, pair.healthPort))) {
        if (Date.now() > deadline) throw new Error(`${label} run ${i + 1}: no service on the floating address`);
        await sleep(5);
      }
      const ms = performance.now() - t0;
      times.push(ms);
      process.stdout.write(`  ${label} run ${String(i + 1).padStart(2)}: ${ms.toFixed(0).padStart(6)} ms (primary was ${primary})\n`);
      await node.start();
    }
  } finally {
    await pair.stop();
  }
  return times;
}

function stats(xs: number[]) {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))]!;
  return { n: s.length, min: s[0]!, median: q(0.5), p95: q(0.95), max: s[s.length - 1]! };
}

const fmt = (v: number) => `${(v / 1000).toFixed(3)} s`;

process.stdout.write(`failover bench: ${RUNS} runs with default timings, ${BASELINE_RUNS} with classic Heartbeat timings\n`);
const fast = stats(await series('default', DEFAULT, RUNS));
const base = BASELINE_RUNS > 0 ? stats(await series('classic', CLASSIC, BASELINE_RUNS)) : null;
process.stdout.write('\n timings                         runs      min   median      p95      max\n');
const row = (name: string, s: ReturnType<typeof stats>) =>
  process.stdout.write(` ${name.padEnd(30)} ${String(s.n).padStart(5)} ${fmt(s.min).padStart(8)} ${fmt(s.median).padStart(8)} ${fmt(s.p95).padStart(8)} ${fmt(s.max).padStart(8)}\n`);
row(`default (deadtime ${DEFAULT.deadtimeMs} ms)`, fast);
if (base) row(`classic (deadtime ${CLASSIC.deadtimeMs} ms)`, base);
const met = fast.median < 1500;
process.stdout.write(
  `${JSON.stringify({
    bench: 'failover',
    figures: {
      runs: fast.n,
      min_ms: Math.round(fast.min),
      median_ms: Math.round(fast.median),
      p95_ms: Math.round(fast.p95),
      max_ms: Math.round(fast.max),
      deadtime_ms: DEFAULT.deadtimeMs,
      ...(base ? { baseline_runs: base.n, baseline_median_ms: Math.round(base.median), baseline_deadtime_ms: CLASSIC.deadtimeMs, speedup: Number((base.median / fast.median).toFixed(1)) } : {}),
    },
    targets: { median_ms: { value: Math.round(fast.median), max: 1500 } },
    met,
  })}\n`,
);
process.exit(0);
