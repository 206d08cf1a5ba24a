/**
 * A real `pairgate lb` process: SIGHUP reload with a changed pool keeps an established
 * connection alive, a bad file on SIGHUP is refused (old config kept), the operator commands
 * (`pairgate lb status|drain|ready|weight|maintenance`), bad configs exit 2 naming the key,
 * and SIGTERM stops it. This file runs the single-process balancer (`workers: 1`);
 * lb-workers.test.ts runs the same command with worker processes.
 */
import { readdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { adminCall } from '../../common/admin-http.ts';
import { freePort, waitFor, waitForPort } from '../helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';
import { connectClient, count, greetings, startBackend, type TestBackend, runCli as run } from './lb-harness.ts';

const ROOT = join(import.meta.dirname, '../..');
const CLI = join(ROOT, 'bin/pairgate.mjs');

describe('pairgate lb (process)', () => {
  const tmp = tempDir('pairgate-lb-proc-');
  const file = join(tmp.path, 'lb.yaml');
  let lb: Managed;
  let bs: TestBackend[] = [];
  let port = 0;
  let adminPort = 0;
  let admin = '';

  const config = (backends: TestBackend[], extra: Record<string, unknown> = {}) =>
    stringify({
      logLevel: 'info',
      workers: 1,
      admin: { host: '127.0.0.1', port: adminPort },
      listeners: [{ name: 'imap', listen: `127.0.0.1:${port}`, pool: 'imap' }],
      pools: {
        imap: {
          balance: 'roundrobin',
          check: { intervalMs: 200, timeoutMs: 200, fall: 2, rise: 1 },
          backends: backends.map((b) => ({ name: b.name, address: `127.0.0.1:${b.port}` })),
        },
      },
      closeLog: { sample: 1 },
      ...extra,
    });

  beforeAll(async () => {
    bs = [await startBackend('b1'), await startBackend('b2'), await startBackend('b3')];
    port = await freePort();
    adminPort = await freePort();
    admin = `http://127.0.0.1:${adminPort}`;
    writeFileSync(file, config(bs.slice(0, 1)));
    lb = startProcess('pairgate-lb', process.execPath, [CLI, 'lb', '--config', file], { cwd: ROOT });
    await waitForPort('127.0.0.1', adminPort, 20_000, () => lb.alive());
    await waitForPort('127.0.0.1', port, 5000, () => lb.alive());
  });

  afterAll(async () => {
    await lb?.stop();
    for (const b of bs) await b.close();
    tmp.cleanup();
  });

  it('SIGHUP with a changed pool keeps the established connection; new ones go to the new pool', async () => {
    const a = await connectClient(port);
    expect(await a.greeting()).toBe('b1');
    writeFileSync(file, config(bs.slice(1)));
    lb.kill('SIGHUP');
    await waitFor(() => lb.output().includes('config reloaded'), 10_000, 'reload logged');
    a.socket.write('across the reload');
    await a.waitFor('across the reload');
    expect(count(await greetings(port, 4))).toEqual({ b2: 2, b3: 2 });
    // A broken file is refused whole; the running config stays.
    writeFileSync(file, 'listeners: [\n');
    lb.kill('SIGHUP');
    await waitFor(() => lb.output().includes('config reload refused'), 10_000, 'refusal logged');
    expect(count(await greetings(port, 2))).toEqual({ b2: 1, b3: 1 });
    a.socket.write('still');
    await a.waitFor('still');
    a.socket.end();
    await a.waitFor('BYE');
    await waitFor(() => lb.output().includes('"msg":"connection closed"'), 5000, 'close log line');
    expect(lb.alive()).toBe(true);
    writeFileSync(file, config(bs.slice(1)));
  });

  it('pairgate lb status|drain|weight|maintenance|ready through the admin API', async () => {
    const st = await run(['lb', 'status', '--admin', admin]);
    expect(st.code).toBe(0);
    expect(st.stdout).toMatch(/imap\/b2/);
    expect(st.stdout).toMatch(/imap\/b3/);
    const json = await run(['lb', 'status', '--json', '--config', file]);
    expect(JSON.parse(json.stdout).backends.map((b: { name: string }) => b.name)).toEqual(['imap/b2', 'imap/b3']);
    const d = await run(['lb', 'drain', 'b2', '--admin', admin]);
    expect(d.stdout).toContain('imap/b2: drain');
    expect(count(await greetings(port, 3))).toEqual({ b3: 3 });
    const w = await run(['lb', 'weight', 'b2', '0', '--admin', admin]);
    expect(w.stdout).toContain('imap/b2: weight 0');
    expect((await run(['lb', 'ready', 'imap/b2', '--admin', admin])).code).toBe(0);
    expect(count(await greetings(port, 3))).toEqual({ b3: 3 }); // weight 0 takes nothing
    expect((await run(['lb', 'weight', 'b2', '1', '--admin', admin])).code).toBe(0);
    expect(count(await greetings(port, 4))).toEqual({ b2: 2, b3: 2 });
    const m = await run(['lb', 'maintenance', 'b3', '--admin', admin]);
    expect(m.stdout).toContain('imap/b3: maintenance');
    expect(count(await greetings(port, 2))).toEqual({ b2: 2 });
    await run(['lb', 'ready', 'b3', '--admin', admin]);
    const bad = await run(['lb', 'drain', 'nosuch', '--admin', admin]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/no backend named nosuch/);
    const badw = await run(['lb', 'weight', 'b2', 'lots', '--admin', admin]);
    expect(badw.code).toBe(2);
    expect(badw.stderr).toMatch(/weight must be an integer/);
  }, 180_000); // fourteen CLI processes, each compiling its modules: slow on a loaded 2-core machine

  it('churn: 10,000 short connections through the process leave its file descriptors as they were', async () => {
    const pid = lb.child.pid!;
    const fds = () => readdirSync(`/proc/${pid}/fd`).length;
    const active = async () => ((await adminCall(admin, 'GET', '/status')).body as { connections: number }).connections;
    await waitFor(async () => (await active()) === 0, 10_000, 'idle before');
    const before = fds();
    const N = 10_000;
    let next = 0;
    let done = 0;
    const deadline = Date.now() + 60_000;
    const worker = async () => {
      while (next < N && Date.now() < deadline) {
        const i = next++;
        await new Promise<void>((resolve) => {
          const s = net.connect({ port, host: '127.0.0.1' });
          s.on('error', () => resolve());
          s.on('close', () => resolve());
          // A third drop before a byte, a third after the greeting, a third half-close first.
          if (i % 3 === 0) s.once('connect', () => s.destroy());
          else if (i % 3 === 1) s.once('data', () => s.destroy());
          else s.once('data', () => s.end());
        });
        done++;
      }
    };
    await Promise.all(Array.from({ length: 32 }, worker));
    expect(done).toBe(N);
    await waitFor(async () => (await active()) === 0, 10_000, 'all connections released');
    await waitFor(() => fds() <= before, 10_000, `lb file descriptors back to ${before} (now ${fds()})`);
    expect(lb.alive()).toBe(true);
  }, 120_000);

  it('a bad config exits 2 and names the key (unknown method, duplicate port)', async () => {
    const f1 = join(tmp.path, 'bad1.yaml');
    writeFileSync(f1, stringify({ listeners: [{ name: 'a', listen: '127.0.0.1:1', pool: 'p' }], pools: { p: { balance: 'fastest', backends: [{ name: 'x', address: '127.0.0.1:2' }] } } }));
    const r1 = await run(['lb', '--config', f1]);
    expect(r1.code).toBe(2);
    expect(r1.stderr).toMatch(/pools\.p\.balance: expected one of leastconn\|roundrobin\|source, got "fastest"/);
    const f2 = join(tmp.path, 'bad2.yaml');
    writeFileSync(
      f2,
      stringify({
        listeners: [
          { name: 'a', listen: '127.0.0.1:1143', pool: 'p' },
          { name: 'b', listen: '0.0.0.0:1143', pool: 'p' },
        ],
        pools: { p: { backends: [{ name: 'x', address: '127.0.0.1:2' }] } },
      }),
    );
    const r2 = await run(['lb', '--config', f2]);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toMatch(/listeners\[1\]\.listen: duplicate port 1143/);
    const f3 = join(tmp.path, 'bad3.yaml');
    writeFileSync(f3, 'listeners:\n  - name: a\n   listen: [\n');
    const r3 = await run(['lb', '--config', f3]);
    expect(r3.code).toBe(2);
    expect(r3.stderr).toMatch(/bad3\.yaml:\d+: malformed YAML/);
    const f4 = join(tmp.path, 'bad4.yaml');
    writeFileSync(f4, stringify({ listeners: [{ name: 'a', listen: '127.0.0.1:1143', pool: 'p' }], pools: { p: { backends: [{ name: 'x' }] } } }));
    const r4 = await run(['lb', '--config', f4]);
    expect(r4.code).toBe(2);
    expect(r4.stderr).toMatch(/pools\.p\.backends\[0\]\.address: missing/);
    // One line each, no stack trace.
    for (const r of [r1, r2, r3, r4]) {
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).not.toMatch(/^\s+at /m);
    }
  }, 120_000);

  it('SIGTERM stops it', async () => {
    lb.kill('SIGTERM');
    const code = await Promise.race([lb.exited, new Promise((r) => setTimeout(() => r('timeout'), 15_000))]);
    expect(code).toBe(0);
  });
});
