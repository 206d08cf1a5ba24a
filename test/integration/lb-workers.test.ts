/**
 * A real `pairgate lb` process with `workers: 2` (cluster.ts): connections are accepted by both
 * workers (their own counts in /status), every backend connection carries the client's address
 * in its PROXY v2 header, /metrics counts every connection of every worker, a drain (`pairgate lb
 * drain`, whose answer and `pairgate lb status` come from the primary) and a backend
 * found down reach every worker, a killed worker is restarted while the other keeps serving,
 * SIGHUP keeps an established connection, and SIGTERM stops the primary and its workers after
 * the connections they still carry.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { adminCall } from '../../common/admin-http.ts';
import type { LbStatus } from '../../loadbalancer/index.ts';
import { PAIRGATE_BIN, REPO_ROOT, pidAlive } from '../../bin/lab/supervisor.ts';
import { freePort, sleep, waitFor, waitForPort } from '../helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { connectClient, count, startBackend, type TestBackend, runCli as run } from './lb-harness.ts';


/** n connections, `concurrency` at a time (so that both workers are busy), each read to its greeting. */
async function parallelGreetings(port: number, n: number, concurrency = 16): Promise<Array<{ backend: string; localPort: number }>> {
  const out: Array<{ backend: string; localPort: number }> = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < n) {
        next++;
        const c = await connectClient(port);
        out.push({ backend: await c.greeting(), localPort: c.socket.localPort! });
        c.socket.destroy();
      }
    }),
  );
  return out;
}

describe('pairgate lb with workers: 2 (process)', () => {
  const tmp = tempDir('pairgate-lb-workers-');
  const file = join(tmp.path, 'lb.yaml');
  let lb: Managed;
  let bs: TestBackend[] = [];
  let port = 0;
  let admin = '';

  const config = (backends: TestBackend[]) =>
    stringify({
      logLevel: 'info',
      workers: 2,
      stopGraceMs: 5000,
      admin: { host: '127.0.0.1', port: Number(new URL(admin).port) },
      listeners: [{ name: 'imap', listen: `127.0.0.1:${port}`, pool: 'imap' }],
      pools: {
        imap: {
          balance: 'roundrobin',
          check: { intervalMs: 200, timeoutMs: 200, fall: 2, rise: 1 },
          backends: backends.map((b) => ({ name: b.name, address: `127.0.0.1:${b.port}` })),
        },
      },
    });
  const status = async () => (await adminCall(admin, 'GET', '/status')).body as LbStatus;
  const spliced = async () => new Map((await status()).workers!.map((w) => [w.worker, w.spliced]));
  /** Connections each worker spliced during `f`. */
  const perWorker = async (f: () => Promise<unknown>) => {
    const before = await spliced();
    await f();
    const after = await spliced();
    return [...after].map(([w, n]) => n - (before.get(w) ?? 0));
  };
  /**
   * Batches of `n` parallel clients until every worker has served at least one (at most 5
   * batches): which worker accepts is the kernel's choice, and on a loaded machine one worker
   * may take a whole batch. Returns every client's greeting and the per-worker counts.
   */
  const untilEveryWorkerServed = async (n: number) => {
    const seen: Array<{ backend: string; localPort: number }> = [];
    let served: number[] = [];
    for (let batch = 0; batch < 5 && (served.length === 0 || served.some((x) => x === 0)); batch++) {
      const more = await perWorker(async () => seen.push(...(await parallelGreetings(port, n))));
      served = served.length ? served.map((x, i) => x + more[i]!) : more;
    }
    return { seen, served };
  };

  beforeAll(async () => {
    bs = [await startBackend('b1'), await startBackend('b2')];
    port = await freePort();
    admin = `http://127.0.0.1:${await freePort()}`;
    writeFileSync(file, config(bs));
    lb = startProcess('pairgate-lb-workers', process.execPath, [PAIRGATE_BIN, 'lb', '--config', file], { cwd: REPO_ROOT });
    await waitForPort('127.0.0.1', Number(new URL(admin).port), 60_000, () => lb.alive());
    await waitFor(async () => (await status()).workers?.every((w) => w.state === 'running'), 30_000, 'both workers running');
  }, 120_000);

  afterAll(async () => {
    await lb?.stop(15_000);
    for (const b of bs) await b.close();
    tmp.cleanup();
  });

  it('both workers accept; PROXY v2 carries each client address; /metrics counts every connection', async () => {
    const st = await status();
    expect(st.workers).toHaveLength(2);
    const pids = st.workers!.map((w) => w.pid);
    expect(new Set(pids).size).toBe(2);
    for (const pid of pids) expect(pid).not.toBe(lb.child.pid);
    const metric = async () => {
      const text = (await adminCall(admin, 'GET', '/metrics')).body as string;
      return [...text.matchAll(/^pairgate_lb_connections_total\{[^}]*\} (\d+)$/gm)].reduce((n, m) => n + Number(m[1]), 0);
    };
    const metricBefore = await metric();
    const headersBefore = bs.reduce((n, b) => n + b.headers.length, 0);
    const N = 300;
    const { seen, served } = await untilEveryWorkerServed(N);
    expect(seen.length % N).toBe(0);
    // Both workers accept (the kernel picks which; no exact split: 43 % / 57 % when measured).
    for (const n of served) expect(n).toBeGreaterThan(0);
    expect(served.reduce((a, b) => a + b, 0)).toBe(seen.length);
    // The backends saw one PROXY v2 header per client, with that client's address and port.
    const headers = bs.flatMap((b) => b.headers);
    expect(bs.reduce((n, b) => n + b.headers.length, 0) - headersBefore).toBeGreaterThanOrEqual(N);
    const sources = new Set(headers.filter((h) => h.source).map((h) => `${h.source!.address}:${h.source!.port}`));
    for (const s of seen) expect(sources.has(`127.0.0.1:${s.localPort}`)).toBe(true);
    expect(count(seen.map((s) => s.backend))).toEqual({ b1: expect.any(Number), b2: expect.any(Number) });
    // Summed over both workers (each has its own registry; the primary adds them up).
    expect((await metric()) - metricBefore).toBe(seen.length);
    const text = (await adminCall(admin, 'GET', '/metrics')).body as string;
    // Health is the primary's alone: one series per backend, not one per worker summed.
    expect(text).toMatch(/^pairgate_lb_backend_up\{backend="imap\/b1"[^}]*\} 1$/m);
  }, 60_000);

  it('a drain through the admin API holds in every worker; so does a backend the checks find down', async () => {
    // Through the operator command, which prints what the primary answered.
    const d = await run(['lb', 'drain', 'b1', '--admin', admin]);
    expect(d.stdout).toBe('imap/b1: drain (0 active)\n');
    const st = await run(['lb', 'status', '--admin', admin]);
    expect(st.stdout).toMatch(/imap\/b1 .* drain/);
    expect(st.stdout.match(/│ [12]\s+│ \d+\s+│ running/g)).toHaveLength(2);
    let { seen, served } = await untilEveryWorkerServed(100);
    expect(count(seen.map((s) => s.backend))).toEqual({ b2: seen.length });
    for (const n of served) expect(n).toBeGreaterThan(0);
    expect((await adminCall(admin, 'POST', '/ready', { backend: 'imap/b1' })).status).toBe(200);

    await bs[1]!.kill();
    await waitFor(async () => (await status()).backends.find((b) => b.id === 'imap/b2')?.state === 'down', 10_000, 'b2 down');
    ({ seen, served } = await untilEveryWorkerServed(100));
    // Not one connection tried b2 and fell back: every worker knew it was down.
    expect(count(seen.map((s) => s.backend))).toEqual({ b1: seen.length });
    for (const n of served) expect(n).toBeGreaterThan(0);
    await bs[1]!.revive();
    await waitFor(async () => (await status()).backends.find((b) => b.id === 'imap/b2')?.state === 'ready', 10_000, 'b2 back');
    const text = (await adminCall(admin, 'GET', '/metrics')).body as string;
    expect(text).not.toMatch(/^pairgate_lb_connect_failures_total\{backend="imap\/b2"[^}]*\} [1-9]/m);
  }, 60_000);

  it('a killed worker is restarted while the other keeps serving', async () => {
    const before = await status();
    const victim = before.workers![0]!;
    process.kill(victim.pid, 'SIGKILL');
    // The listener never stops: the other worker takes every connection meanwhile.
    const during = await parallelGreetings(port, 40, 4);
    expect(during).toHaveLength(40);
    const st = await waitFor(
      async () => {
        const s = await status();
        const w = s.workers!.find((x) => x.worker === victim.worker)!;
        return w.state === 'running' && w.pid !== victim.pid ? s : null;
      },
      30_000,
      'worker restarted',
    );
    expect(st.workers!.find((x) => x.worker === victim.worker)!.restarts).toBe(1);
    expect(pidAlive(victim.pid)).toBe(false);
    expect(lb.output()).toMatch(/"worker":1[^\n]*"signal":"SIGKILL"[^\n]*worker exited; restarting it/);
    // The new worker serves too.
    const { served } = await untilEveryWorkerServed(200);
    for (const n of served) expect(n).toBeGreaterThan(0);
  }, 60_000);

  it('SIGHUP with a changed pool keeps an established connection; every worker follows the new pool', async () => {
    const a = await connectClient(port);
    const first = await a.greeting();
    writeFileSync(file, config(bs.filter((b) => b.name !== first)));
    lb.kill('SIGHUP');
    await waitFor(() => lb.output().includes('config reloaded'), 15_000, 'reload logged');
    a.socket.write('across the reload');
    await a.waitFor('across the reload');
    const other = first === 'b1' ? 'b2' : 'b1';
    const { seen, served } = await untilEveryWorkerServed(100);
    expect(count(seen.map((s) => s.backend))).toEqual({ [other]: seen.length });
    for (const n of served) expect(n).toBeGreaterThan(0);
    a.socket.end();
    await a.waitFor('BYE');
  }, 60_000);

  it('SIGTERM: the connections still open finish, then the primary and both workers exit 0', async () => {
    const pids = (await status()).workers!.map((w) => w.pid);
    const a = await connectClient(port);
    await a.greeting();
    lb.kill('SIGTERM');
    // Not accepting any more, but the established connection still works.
    await waitFor(() => lb.output().includes('"msg":"stopping"'), 5000, 'stopping');
    await sleep(300);
    a.socket.write('still here');
    await a.waitFor('still here');
    expect(lb.alive()).toBe(true);
    a.socket.end();
    await a.waitFor('BYE');
    const code = await Promise.race([lb.exited, sleep(20_000).then(() => 'timeout')]);
    expect(code).toBe(0);
    for (const pid of pids) expect(pidAlive(pid)).toBe(false);
  }, 60_000);
});
