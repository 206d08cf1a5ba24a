/**
 * A fencing device that fails: no takeover, `fencing: failed` in health and metrics, retries;
 * once the device works again the takeover happens. Then garbage, forged, replayed and foreign
 * heartbeat datagrams sent at a live node: dropped, counted, membership unchanged.
 */
import dgram from 'node:dgram';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sleep, waitFor } from '../helpers/net.ts';
import { encodeHeartbeat } from '../../pair-agent/ha/heartbeat-codec.ts';
import { HB_KEY, metricValue, startPair, type TestPair } from './pair-agent-harness.ts';
import { tempDir } from '../helpers/proc.ts';

let pair: TestPair;
const work = tempDir('pairgate-fence-');
const okFlag = join(work.path, 'fence-ok');
const seen = join(work.path, 'fence-input');

beforeAll(async () => {
  // a fence-agents style script: reads key=value lines on stdin, fails unless the flag file exists
  const agent = join(work.path, 'fence_test');
  writeFileSync(
    agent,
    `#!/bin/sh\nwhile read -r line; do echo "$line" >> ${seen}; case "$line" in port=*) pidfile="\${line#port=}";; esac; done\n` +
      `[ -f ${okFlag} ] || { echo "switch unreachable" >&2; exit 1; }\nkill -9 "$(cat "$pidfile")" 2>/dev/null\nexit 0\n`,
    { mode: 0o755 },
  );
  pair = await startPair({
    b: (dir) => ({
      fencing: { device: 'command', command: agent, options: { port: join(dir, 'a.pid') }, delayMs: 0, timeoutMs: 2000, retryInitialMs: 200, retryMaxMs: 400 },
    }),
  });
}, 60_000);
afterAll(async () => {
  await pair?.stop();
  work.cleanup();
});

describe('pair-agent fencing failure', () => {
  it('failed fence: no takeover, fencing failed in health and metrics; takeover once fencing works', async () => {
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await pair.b.status())?.peer.alive, 5000, 'b sees a');
    pair.a.proc!.kill('SIGKILL');
    const failed = await waitFor(async () => {
      const s = await pair.b.status();
      return s?.fencing === 'failed' ? s : null;
    }, 10_000, 'fencing failed on b');
    expect(failed.state).toBe('fencing');
    expect(failed.holds).toBe(false);
    expect(failed.health).toMatchObject({ state: 'down', primary: null, fencing: 'failed' });
    const h = await fetch(`${pair.b.adminUrl}/health`);
    expect(h.status).toBe(503);
    expect(await h.json()).toMatchObject({ fencing: 'failed' });
    await sleep(1000); // several retries, still no takeover
    expect((await pair.b.status())?.state).toBe('fencing');
    expect(await pair.floatingHealth()).toBeNull();
    const m = await pair.b.metrics();
    expect(metricValue(m, 'pairgate_fencing_actions_total', { outcome: 'failed' })).toBeGreaterThanOrEqual(2);
    expect(readFileSync(seen, 'utf8')).toContain('action=off');
    // the device recovers: the next retry succeeds and b takes over
    writeFileSync(okFlag, '');
    await waitFor(async () => (await pair.floatingHealth())?.body.primary === 'b', 10_000, 'b serving after fencing recovered');
    expect((await pair.b.status())?.fencing).toBe('ok');
  });
});

describe('pair-agent heartbeat input', () => {
  it('garbage, forged, replayed and foreign datagrams are dropped and counted; membership unchanged', async () => {
    await pair.a.start();
    await waitFor(async () => (await pair.a.status())?.state === 'standby', 15_000, 'a back as standby');
    const before = await pair.b.metrics();
    const gen = (await pair.b.status())!.peer.generation!;
    const sock = dgram.createSocket('udp4');
    const send = (buf: Buffer) => new Promise<void>((r) => sock.send(buf, pair.b.hbPort, '127.0.0.1', () => r()));
    const view = { state: 'primary' as const, holds: true, disk: 'UpToDate', ping: true, request: 'none' as const, failed: false };
    await send(Buffer.from('hello'));
    await send(Buffer.alloc(3000, 1));
    await send(encodeHeartbeat(Buffer.from('not-the-key-at-all-000'), { pair: 'pair-t', node: 'a', gen: gen + 1000, seq: 1, view }));
    await send(encodeHeartbeat(Buffer.from(HB_KEY), { pair: 'pair-t', node: 'a', gen, seq: 1, view }));
    await send(encodeHeartbeat(Buffer.from(HB_KEY), { pair: 'pair-t', node: 'a', gen: gen - 1, seq: 999_999, view }));
    await send(encodeHeartbeat(Buffer.from(HB_KEY), { pair: 'other-pair', node: 'a', gen: gen + 1000, seq: 1, view }));
    sock.close();
    await sleep(500);
    const after = await pair.b.metrics();
    const delta = (reason: string) =>
      metricValue(after, 'pairgate_heartbeat_dropped_total', { reason }) - metricValue(before, 'pairgate_heartbeat_dropped_total', { reason });
    expect(delta('short')).toBe(1);
    expect(delta('oversize')).toBe(1);
    expect(delta('forged')).toBe(1);
    expect(delta('replay')).toBe(2);
    expect(delta('unknown-node')).toBe(1);
    const s = await pair.b.status();
    expect(s).toMatchObject({ state: 'primary', holds: true });
    expect(s?.peer).toMatchObject({ alive: true, state: 'standby', generation: gen });
    expect(existsSync(pair.b.pidFile)).toBe(true);
  });
  it('a clean stop of the primary needs no fence: the peer takes over even with a broken fencing device', async () => {
    rmSync(okFlag); // b's fencing device fails again from now on
    expect((await pair.b.post('/standby')).status).toBe(200);
    await waitFor(async () => (await pair.floatingHealth())?.body.primary === 'a', 10_000, 'a primary');
    await waitFor(async () => (await pair.b.status())?.state === 'standby', 5000, 'b standby');
    const failedBefore = metricValue(await pair.b.metrics(), 'pairgate_fencing_actions_total', { outcome: 'failed' });
    await pair.a.proc!.stop(5000); // SIGTERM: a releases and says so
    await waitFor(async () => (await pair.floatingHealth())?.body.primary === 'b', 10_000, 'b primary after a clean stop').catch(async (err) => {
      throw new Error(`${(err as Error).message}\n${JSON.stringify(await pair.b.status())}\n${pair.b.proc!.output().slice(-3000)}`);
    });
    expect(metricValue(await pair.b.metrics(), 'pairgate_fencing_actions_total', { outcome: 'failed' })).toBe(failedBefore);
  });
});
