/**
 * The lab as a whole: `pairgate lab up` from this checkout, its tour, rolling maintenance and
 * a user move under continuous load, the dashboards' metric names, and `Ctrl-C` leaving no
 * process behind. One lab serves every test here (starting one takes most of the time).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { PAIRGATE_BIN, REPO_ROOT, pidAlive, type LabState } from '../../bin/lab/supervisor.ts';
import type { LabPlan } from '../../bin/lab/plan.ts';
import { haveReplicatedVolume } from '../../bin/lab/role-configs.ts';
import { imapListInbox, sendMail } from '../../bin/lab/clients.ts';
import { dashboardExpressions, dashboardMetricNames } from '../../infra/grafana/build-dashboards.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { ADMIN_DN, ADMIN_PASSWORD } from '../helpers/slapd.ts';
import { freePort, sleep, waitFor, waitForPort } from '../helpers/net.ts';

const dir = tempDir('pairgate-lab-');
const instance = 1 + Math.floor(Math.random() * 29);
let lab: ChildProcess;
let output = '';
let plan: LabPlan;
let prometheus: { proc: Managed; url: string } | null = null;

// A build without pair-agent/volume runs the lab's pairs on a shared disk file: there is no
// replication, so the HA dashboard's replication and volume panels have nothing to show.
const VOLUME_METRICS = /pairgate_(replication|volume)_/;
const expectedNames = () => dashboardMetricNames().filter((n) => haveReplicatedVolume || !VOLUME_METRICS.test(n));
const expectedExpressions = () => dashboardExpressions().filter((e) => haveReplicatedVolume || !VOLUME_METRICS.test(e));

/** Prometheus (Debian package `prometheus`) scraping the lab every second, when installed. */
async function startPrometheus(): Promise<{ proc: Managed; url: string } | null> {
  const bin = ['/usr/bin/prometheus', '/usr/local/bin/prometheus'].find((f) => existsSync(f));
  if (!bin) return null;
  const port = await freePort();
  const config = join(dir.path, 'prometheus.yml');
  writeFileSync(
    config,
    `global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pairgate-lab\n    file_sd_configs:\n      - files: ['${join(dir.path, 'prometheus-targets.json')}']\n        refresh_interval: 1s\n`,
  );
  const proc = startProcess('prometheus', bin, [
    `--config.file=${config}`,
    `--storage.tsdb.path=${join(dir.path, 'prometheus-data')}`,
    `--web.listen-address=127.0.0.1:${port}`,
  ]);
  await waitForPort('127.0.0.1', port, 20_000);
  return { proc, url: `http://127.0.0.1:${port}` };
}

function pairgate(args: string[], timeoutMs = 60_000, env: Record<string, string> = {}): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [PAIRGATE_BIN, ...args], { cwd: REPO_ROOT, env: { ...process.env, PAIRGATE_ADMIN_TOKEN: plan.adminToken, ...env } });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr.on('data', (b: Buffer) => (out += b.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

beforeAll(async () => {
  lab = spawn(process.execPath, [PAIRGATE_BIN, 'lab', 'up', '--dir', dir.path, '--instance', String(instance), '--users', '6'], {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  lab.stdout!.on('data', (b: Buffer) => (output += b.toString()));
  lab.stderr!.on('data', (b: Buffer) => (output += b.toString()));
  await waitFor(() => output.includes('The lab stays up') || lab.exitCode !== null, 150_000, 'the lab to come up and finish its tour', 200).catch(
    (err: Error) => {
      throw new Error(`${err.message}\n${output}`);
    },
  );
  if (lab.exitCode !== null) throw new Error(`lab up exited with ${lab.exitCode}:\n${output}`);
  plan = JSON.parse(readFileSync(join(dir.path, 'plan.json'), 'utf8')) as LabPlan;
  prometheus = await startPrometheus();
}, 180_000);

let failed = false;
afterEach((ctx) => {
  if (ctx.task.result?.state === 'fail') failed = true;
});

afterAll(async () => {
  await prometheus?.proc.stop();
  if (lab && lab.exitCode === null) {
    lab.kill('SIGINT');
    await waitFor(() => lab.exitCode !== null, 30_000, 'the lab to stop').catch(() => lab.kill('SIGKILL'));
  }
  // A failed run keeps the lab folder (every process's log) for a look.
  if (failed || !plan) process.stderr.write(`lab test failed: the lab's logs stay in ${dir.path}/logs\n`);
  else dir.cleanup();
}, 60_000);

describe('pairgate lab', () => {
  it('comes up and its tour passes: delivery, IMAP and POP3 through the balancer, failover with nothing lost', () => {
    expect(output).toMatch(/directory: (private slapd|slapd is not installed)/);
    expect(output).toMatch(/serves again from node [ab]: [\d.]+ s after the kill/);
    expect(output).toContain('all steps passed');
  });

  it('serves every metric name that the Grafana dashboards query', async () => {
    const targets = [
      ...plan.pairs.flatMap((p) => p.nodes.map((n) => `http://127.0.0.1:${n.adminPort}/metrics`)),
      ...plan.proxies.map((p) => `http://${p.host}:${p.adminPort}/metrics`),
      `http://${plan.loadbalancer.host}:${plan.loadbalancer.adminPort}/metrics`,
    ];
    let all = '';
    for (const url of targets) all += await (await fetch(url, { signal: AbortSignal.timeout(3000) })).text();
    const exposed = new Set([...all.matchAll(/^# TYPE (pairgate_[a-z0-9_]+) /gm)].map((m) => m[1]!));
    const missing = expectedNames().filter((n) => !exposed.has(n.replace(/_(sum|count)$/, '')));
    expect(missing).toEqual([]);
  });

  it('runs rolling maintenance of a pair under load with no failed login or delivery', async () => {
    const pair = plan.pairs[1]!;
    const user = plan.users.find((u) => u.pair === pair.id)!;
    const lb = plan.loadbalancer;
    let stop = false;
    const failures: string[] = [];
    let logins = 0;
    let deliveries = 0;
    const load = (async () => {
      // Bounded: at most 2000 iterations or until the maintenance ends.
      for (let i = 0; i < 2000 && !stop; i++) {
        try {
          await sendMail({ host: lb.host, port: lb.smtpPort }, { from: 'load@example.net', to: [user.mail], subject: `maint ${i}`, text: 'x\n' });
          deliveries++;
        } catch (err) {
          failures.push(`delivery ${i}: ${(err as Error).message}`);
        }
        try {
          await imapListInbox({ host: lb.host, port: lb.imapPort }, { user: user.uid, password: user.password });
          logins++;
        } catch (err) {
          failures.push(`login ${i}: ${(err as Error).message}`);
        }
      }
    })();
    const res = await pairgate(['pair', 'maintain', pair.id, '--node', 'a', '--cluster', join(dir.path, 'cluster.json'), '--hand-back', '--timeout', '60', '--', 'sleep', '1'], 150_000);
    stop = true;
    await load;
    expect(res.code, res.out).toBe(0);
    expect(res.out).toContain('switch to node b: done');
    expect(res.out).toContain('switch back to node a: done');
    expect(failures).toEqual([]);
    expect(logins).toBeGreaterThan(0);
    expect(deliveries).toBeGreaterThan(0);
  }, 180_000);

  it('moves a user to another pair under continuous delivery: every message exactly once on the new pair', async () => {
    const user = plan.users.find((u) => u.pair === plan.pairs[0]!.id)!;
    const to = plan.pairs[1]!.id;
    const lb = plan.loadbalancer;
    const before = await imapListInbox({ host: lb.host, port: lb.imapPort }, { user: user.uid, password: user.password });
    let stop = false;
    const sent: string[] = [];
    const failures: string[] = [];
    const load = (async () => {
      for (let i = 0; i < 500 && !stop; i++) {
        const subject = `move ${i}`;
        try {
          await sendMail({ host: lb.host, port: lb.smtpPort }, { from: 'load@example.net', to: [user.mail], subject, text: 'x\n' });
          sent.push(subject);
        } catch (err) {
          failures.push(`${subject}: ${(err as Error).message}`);
        }
        await sleep(50);
      }
    })();
    await sleep(500);
    // The proxies' LDAP account is read-only; the move binds as the directory's administrator.
    const writer = plan.directory.mode === 'slapd' ? ['--bind-dn', ADMIN_DN] : [];
    const res = await pairgate(['user', 'move', user.uid, '--to', to, '--config', join(dir.path, 'config', 'proxy-1.yaml'), ...writer], 120_000, { PAIRGATE_LDAP_PASSWORD: ADMIN_PASSWORD });
    await sleep(500);
    stop = true;
    await load;
    expect(res.code, res.out).toBe(0);
    expect(failures).toEqual([]);
    const after = await imapListInbox({ host: lb.host, port: lb.imapPort }, { user: user.uid, password: user.password });
    const subjects = after.map((m) => m.subject);
    const count = (s: string) => subjects.filter((x) => x === s).length;
    for (const m of before) expect(count(m.subject), m.subject).toBe(before.filter((b) => b.subject === m.subject).length);
    for (const s of sent) expect(count(s), s).toBe(1);
    const oldPair = plan.pairs[0]!;
    const left = await imapListInbox(
      { host: oldPair.address, port: oldPair.ports.imap },
      { user: plan.masterUser, password: plan.masterSecret, authzid: user.uid },
    );
    expect(left).toEqual([]);
    expect(after.length).toBe(before.length + sent.length);
  }, 180_000);

  it('with Prometheus scraping the lab, every dashboard query returns data', async (ctx) => {
    if (!prometheus) {
      ctx.skip();
      return;
    }
    const query = async (expr: string): Promise<number> => {
      const res = await fetch(`${prometheus!.url}/api/v1/query?query=${encodeURIComponent(expr)}`, { signal: AbortSignal.timeout(5000) });
      const body = (await res.json()) as { status: string; data?: { result: unknown[] }; error?: string };
      if (body.status !== 'success') throw new Error(`${expr}: ${body.error}`);
      return body.data!.result.length;
    };
    // Every process of the lab is a target and answers; then each panel's query has series.
    await waitFor(async () => (await query('count(up == 1)')) > 0 && (await query('up == 0')) === 0, 30_000, 'every lab target up in Prometheus', 500);
    let empty: string[] = [];
    await waitFor(
      async () => {
        empty = [];
        for (const expr of expectedExpressions()) if ((await query(expr)) === 0) empty.push(expr);
        return empty.length === 0;
      },
      30_000,
      'every dashboard query to return data',
      1000,
    ).catch(() => undefined);
    expect(empty).toEqual([]);
  }, 90_000);

  it('stops on Ctrl-C with no process left behind', async () => {
    const state = JSON.parse(readFileSync(join(dir.path, 'state.json'), 'utf8')) as LabState;
    const pids = state.processes.map((p) => p.pid);
    expect(pids.length).toBeGreaterThanOrEqual(7);
    lab.kill('SIGINT');
    await waitFor(() => lab.exitCode !== null, 40_000, 'lab up to exit');
    expect(output).toContain('lab: stopped.');
    await waitFor(() => pids.every((p) => !pidAlive(p)), 5000, 'every lab process to be gone');
    expect(existsSync(join(dir.path, 'logs'))).toBe(true);
  }, 60_000);
});
