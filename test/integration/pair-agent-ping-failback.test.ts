/**
 * Ping targets (ipfail): the primary that loses every target while its peer reaches one hands the
 * resources over. Auto-failback: the preferred node takes the resources back when it returns.
 * An OCF-style command resource runs on the active node only, and a monitor failure restarts it.
 */
import net from 'node:net';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { sleep, waitFor } from '../helpers/net.ts';
import { tempDir } from '../helpers/proc.ts';
import { metricValue, sampleRoles, startPair, type TestPair } from './pair-agent-harness.ts';

let pair: TestPair | null = null;
const servers: net.Server[] = [];
afterEach(async () => {
  await pair?.stop();
  pair = null;
  for (const s of servers.splice(0)) await new Promise((r) => s.close(() => r(null)));
});

async function listen(port = 0): Promise<{ server: net.Server; port: number }> {
  const server = net.createServer((c) => c.destroy());
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', () => r()));
  servers.push(server);
  return { server, port: (server.address() as net.AddressInfo).port };
}

describe('pair-agent ping targets and failback', () => {
  it('the primary that reaches no ping target hands over to the peer that does', async () => {
    const ta = await listen();
    const tb = await listen();
    const ping = (port: number) => ({ ping: { targets: [`127.0.0.1:${port}`], intervalMs: 200, timeoutMs: 200, failures: 2 } });
    pair = await startPair({ a: ping(ta.port), b: ping(tb.port) });
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await pair!.b.status())?.peer.alive, 5000, 'b sees a');
    const sampler = sampleRoles(pair);
    await new Promise((r) => ta.server.close(() => r(null)));
    servers.splice(servers.indexOf(ta.server), 1);
    await waitFor(async () => (await pair!.floatingHealth())?.body.primary === 'b', 10_000, 'b primary after a lost its ping target');
    const { bothHeld } = await sampler.stop();
    expect(bothHeld).toEqual([]);
    expect(await pair.a.status()).toMatchObject({ state: 'standby', fencing: 'none' });
    expect(pair.a.proc!.alive()).toBe(true); // a hand-over, not a fence
    // a reaches its target again: no move back (auto-failback is off), and both nodes reach targets
    await listen(ta.port);
    await waitFor(async () => (await pair!.a.status())?.health.state === 'ok', 5000, 'pair ok');
    expect((await pair.floatingHealth())?.body.primary).toBe('b');
  });

  it('auto-failback switched on by SIGHUP: the preferred node takes the resources back', async () => {
    pair = await startPair();
    expect(await pair.waitPrimary()).toBe('a');
    pair.a.proc!.kill('SIGKILL');
    await waitFor(async () => (await pair!.floatingHealth(200))?.body.primary === 'b', 10_000, 'b primary');
    await pair.a.start();
    await waitFor(async () => (await pair!.a.status())?.state === 'standby', 15_000, 'a standby');
    await sleep(500);
    expect((await pair.floatingHealth())?.body.primary).toBe('b'); // auto-failback off: stays on b
    // turn auto-failback on in b's file and reload it
    writeFileSync(pair.b.configFile, readFileSync(pair.b.configFile, 'utf8').replace(/^autoFailback: .*$/m, '').concat('autoFailback: true\n'));
    pair.b.proc!.kill('SIGHUP');
    await waitFor(async () => (await pair!.floatingHealth())?.body.primary === 'a', 15_000, 'a primary again (failback)');
    const b = await pair.b.status();
    expect(b?.state).toBe('standby');
    expect(pair.b.proc!.alive()).toBe(true);
    expect((b as unknown as { lastTransition: { reason: string } }).lastTransition.reason).toBe('resources stopped');
  });

  it('a command resource runs only on the active node; a monitor failure restarts it there', async () => {
    const work = tempDir('pairgate-ocf-');
    try {
      // OCF-style script: start/stop/monitor a marker file per node
      const script = join(work.path, 'svc.sh');
      writeFileSync(
        script,
        `#!/bin/sh\nf="${work.path}/running-$OCF_RESKEY_node"\ncase "$1" in\n start) echo start >> "${work.path}/log-$OCF_RESKEY_node"; touch "$f"; exit 0;;\n stop) rm -f "$f"; exit 0;;\n monitor) [ -f "$f" ] && exit 0 || exit 7;;\n *) exit 3;;\nesac\n`,
        { mode: 0o755 },
      );
      const res = (node: string) => ({ resources: [{ type: 'command', name: 'svc', command: script, params: { node }, timeoutMs: 5000 }], monitor: { intervalMs: 300, maxRestarts: 3 } });
      pair = await startPair({ a: res('a'), b: res('b') });
      expect(await pair.waitPrimary()).toBe('a');
      expect(existsSync(join(work.path, 'running-a'))).toBe(true);
      expect(existsSync(join(work.path, 'running-b'))).toBe(false);
      // the service dies under the agent: the monitor notices and starts it again here
      rmSync(join(work.path, 'running-a'));
      await waitFor(() => existsSync(join(work.path, 'running-a')), 5000, 'svc restarted on a');
      expect(readFileSync(join(work.path, 'log-a'), 'utf8').trim().split('\n').length).toBe(2);
      const m = await fetch(`${pair.a.adminUrl}/metrics`).then((r) => r.text());
      expect(m).toMatch(/pairgate_resource_actions_total\{[^}]*resource="svc"[^}]*action="monitor"[^}]*outcome="failed"[^}]*\} 1/);
      // hand-over: stopped on a, started on b
      await pair.a.post('/standby');
      await waitFor(() => existsSync(join(work.path, 'running-b')), 10_000, 'svc on b');
      expect(existsSync(join(work.path, 'running-a'))).toBe(false);
    } finally {
      await pair?.stop();
      pair = null;
      work.cleanup();
    }
  });

  it('a resource that keeps failing its monitor past the threshold moves to the peer', async () => {
    const work = tempDir('pairgate-ocf-');
    try {
      const script = join(work.path, 'svc.sh');
      // monitor fails on a node while its "broken" flag exists, whatever the restarts do
      writeFileSync(
        script,
        `#!/bin/sh\ncase "$1" in\n start|stop) exit 0;;\n monitor) [ -f "${work.path}/broken-$OCF_RESKEY_node" ] && exit 1 || exit 0;;\nesac\nexit 3\n`,
        { mode: 0o755 },
      );
      const res = (node: string) => ({ resources: [{ type: 'command', name: 'svc', command: script, params: { node } }], monitor: { intervalMs: 200, maxRestarts: 1, failureWindowMs: 60_000 } });
      pair = await startPair({ a: res('a'), b: res('b') });
      expect(await pair.waitPrimary()).toBe('a');
      await waitFor(async () => (await pair!.b.status())?.peer.alive, 5000, 'b sees a');
      writeFileSync(join(work.path, 'broken-a'), '');
      await waitFor(async () => (await pair!.floatingHealth())?.body.primary === 'b', 10_000, 'b primary after svc failed on a');
      expect(pair.a.proc!.alive()).toBe(true);
      const m = await pair.a.metrics();
      expect(metricValue(m, 'pairgate_resource_actions_total', { resource: 'svc', action: 'monitor', outcome: 'failed' })).toBeGreaterThanOrEqual(2);
    } finally {
      await pair?.stop();
      pair = null;
      work.cleanup();
    }
  });
});
