/**
 * A resource that does not stop. The primary is told to stand by; its service's stop hangs (a
 * stuck process, a hung disk) past `monitor.stopTimeoutMs`. The service may still run there, so
 * the peer must not start it on its own: the releasing node says it is unclean on the heartbeat,
 * the peer fences it (here: kill -9 of its process) and only then takes the resources over.
 * Without the bound the release would wait forever and the pair would stay without a primary.
 */
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitFor } from '../helpers/net.ts';
import { metricValue, startPair, type TestPair } from './pair-agent-harness.ts';
import { tempDir } from '../helpers/proc.ts';

let pair: TestPair;
const work = tempDir('pairgate-unclean-');
const stopHangs = join(work.path, 'stop-hangs');

beforeAll(async () => {
  // An OCF-style service: its state is a file; `stop` hangs while the flag file exists (not for
  // ever: the sleeping process outlives the agent that is killed, and must end by itself).
  const svc = join(work.path, 'svc');
  writeFileSync(
    svc,
    '#!/bin/sh\ncase "$1" in\n' +
      '  start) touch "$OCF_RESKEY_state"; exit 0;;\n' +
      `  stop) [ -f ${stopHangs} ] && sleep 6; rm -f "$OCF_RESKEY_state"; exit 0;;\n` +
      '  monitor) [ -f "$OCF_RESKEY_state" ] && exit 0; exit 7;;\n' +
      'esac\nexit 3\n',
    { mode: 0o755 },
  );
  const node = (id: 'a' | 'b') => ({
    resources: [{ type: 'command', name: 'svc', command: svc, params: { state: join(work.path, `${id}.running`) }, timeoutMs: 20_000 }],
    monitor: { intervalMs: 500, stopTimeoutMs: 800 },
  });
  pair = await startPair({ a: node('a'), b: node('b') });
}, 60_000);
afterAll(async () => {
  await pair?.stop();
  work.cleanup();
});

describe('pair-agent: a resource that does not stop', () => {
  it('the node whose stop overran is unclean; the peer fences it, then takes over', async () => {
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await pair.b.status())?.peer.alive, 5000, 'b sees a');
    expect(existsSync(join(work.path, 'a.running'))).toBe(true);
    expect(await pair.a.metrics()).toMatch(/^pairgate_pair_node_unclean(\{[^}]*\})? 0$/m);
    writeFileSync(stopHangs, '');
    expect((await pair.a.post('/standby')).status).toBe(200);
    // a releases; its service's stop overruns its 800 ms; b fences a and takes over.
    const aExit = await Promise.race([pair.a.proc!.exited, new Promise<'alive'>((r) => setTimeout(() => r('alive'), 15_000))]);
    expect(aExit, `a was not fenced\n${pair.logs()}`).toBe(-1); // killed by a signal
    await waitFor(async () => (await pair.floatingHealth())?.body.primary === 'b', 10_000, `b serving after fencing a\n${pair.logs()}`);
    rmSync(stopHangs); // b's own stop at the end of the test is not to hang
    const logs = pair.logs(20_000);
    expect(logs).toMatch(/svc stop did not return within 800 ms/);
    expect(logs).toMatch(/a resource did not stop: this node is unclean/);
    expect(logs).toMatch(/"to":"fencing","reason":"peer unclean: a resource did not stop there"/);
    const b = await pair.b.status();
    expect(b).toMatchObject({ state: 'primary', fencing: 'ok' });
    expect(existsSync(join(work.path, 'b.running'))).toBe(true);
    expect(metricValue(await pair.b.metrics(), 'pairgate_resource_actions_total', { resource: 'svc', action: 'start', outcome: 'ok' })).toBe(1);
  }, 40_000);
});
