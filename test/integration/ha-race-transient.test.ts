/**
 * A hand-over whose target fails to start once, for a passing cause: the node that stood by takes
 * the resources back meanwhile (its peer's resources failed), but the operator's standby still
 * stands: once the peer's start backoff is over, the hand-over is tried again and happens (a few
 * times at most: a peer that keeps failing leaves the resources here, the standby dropped).
 */
import { chmodSync, existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { sleep, waitFor } from '../helpers/net.ts';
import { tempDir } from '../helpers/proc.ts';
import { startPair, type TestPair } from './pair-agent-harness.ts';

let pair: TestPair | null = null;
let work: { path: string; cleanup(): void } | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
  work?.cleanup();
  work = null;
});

describe('operator standby and a transient start failure on the peer', () => {
  it('the hand-over is tried again once the peer\'s backoff is over, and happens', async () => {
    const dir = await pairWithFlakyService();
    writeFileSync(join(dir, 'fail-once-b'), '');
    expect((await pair!.a.post('/standby', {})).status).toBe(200);
    // b's first start fails (a takes the resources back meanwhile); its retry after the backoff works.
    await waitFor(() => !existsSync(join(dir, 'fail-once-b')), 10_000, 'b\'s failed start');
    await waitFor(async () => (await pair!.floatingHealth())?.body.primary === 'b' && (await pair!.b.status())?.state === 'primary', 15_000, 'b primary after its retry').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs(4000)}`);
    });
    // and it stays there: a does not take the resources back.
    await sleep(1500);
    expect((await pair!.b.status())?.state).toBe('primary');
    expect(existsSync(join(dir, 'running-b'))).toBe(true);
    expect(existsSync(join(dir, 'running-a'))).toBe(false);
  });

  it('a peer that keeps failing: a few tries, then the standby is dropped and the resources stay here', async () => {
    const dir = await pairWithFlakyService();
    writeFileSync(join(dir, 'fail-always-b'), '');
    expect((await pair!.a.post('/standby', {})).status).toBe(200);
    // b's backoff grows (1, 2, 4 s); after the third retake a drops the request and keeps the resources.
    await waitFor(async () => {
      const s = await pair!.a.status();
      return s?.state === 'primary' && (s as unknown as { request: string }).request === 'none';
    }, 30_000, 'a primary with its standby dropped').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs(4000)}`);
    });
    const before = (await pair!.a.status())?.lastTransition?.at;
    await sleep(5000);
    const after = await pair!.a.status();
    expect(after?.state).toBe('primary');
    expect(after?.lastTransition?.at).toBe(before);
  });

  it('a peer that served after the hand-over and failed later (its monitor) is failed over from, not handed the resources back', async () => {
    // The monitor gives up at the first failure: b's resources fail past the threshold at once.
    const dir = await pairWithFlakyService({ intervalMs: 200, maxRestarts: 0 });
    expect((await pair!.a.post('/standby', {})).status).toBe(200);
    await waitFor(async () => (await pair!.floatingHealth())?.body.primary === 'b' && (await pair!.b.status())?.state === 'primary', 15_000, 'b primary after the standby on a');
    // b's service breaks while it serves: b hands over to a, which takes the resources.
    writeFileSync(join(dir, 'broken-b'), '');
    await waitFor(async () => (await pair!.a.status())?.state === 'primary', 15_000, 'a primary after b failed').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs(4000)}`);
    });
    // The hand-over a's standby asked for happened long ago: the standby is dropped, and a keeps
    // the resources once b's start backoff (1 s) is over, rather than hand them back to b.
    const before = (await pair!.a.status())?.lastTransition?.at;
    await sleep(4000);
    const after = await pair!.a.status();
    expect(after?.state, pair!.logs(4000)).toBe('primary');
    expect(after?.lastTransition?.at).toBe(before);
    expect((after as unknown as { request: string }).request).toBe('none');
  });

  it('a lone primary whose monitor gave up restarts its resources after the backoff instead of leaving them down', async () => {
    const dir = await pairWithFlakyService({ intervalMs: 200, maxRestarts: 0 });
    // b goes away: a is alone, nobody can take the resources from it.
    await pair!.b.proc!.stop(3000);
    await waitFor(async () => (await pair!.a.status())?.peer.alive === false, 10_000, 'a alone');
    // a's service dies and cannot start for a while: the monitor gives up at once (maxRestarts 0).
    writeFileSync(join(dir, 'fail-always-a'), '');
    rmSync(join(dir, 'running-a'));
    await sleep(1500);
    expect(existsSync(join(dir, 'running-a'))).toBe(false);
    // The cause passes: after its backoff a restarts the service here (it stayed primary throughout).
    rmSync(join(dir, 'fail-always-a'));
    await waitFor(() => existsSync(join(dir, 'running-a')) || undefined, 15_000, 'the service restarted on a').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs(4000)}`);
    });
    expect((await pair!.a.status())?.state).toBe('primary');
    // and it is monitored again: the next death is noticed and repaired.
    rmSync(join(dir, 'running-a'));
    await waitFor(() => existsSync(join(dir, 'running-a')) || undefined, 15_000, 'the service restarted on a once more');
  });
});

/** A pair with a command resource whose start (or monitor) fails on a node as its marker files say; a primary, b standby. */
async function pairWithFlakyService(monitor?: { intervalMs: number; maxRestarts: number }): Promise<string> {
  work = tempDir('pairgate-transient-');
  const dir = work.path;
  const script = join(dir, 'svc.sh');
  // start fails on a node while its fail-always file exists, and once (a passing cause) when its
  // fail-once file does; its monitor fails while its broken file exists.
  writeFileSync(
    script,
    `#!/bin/sh
n="$OCF_RESKEY_node"
case "$1" in
  start) if [ -e "${dir}/fail-always-$n" ]; then exit 1; fi; if [ -e "${dir}/fail-once-$n" ]; then rm -f "${dir}/fail-once-$n"; exit 1; fi; touch "${dir}/running-$n"; exit 0 ;;
  stop) rm -f "${dir}/running-$n"; exit 0 ;;
  monitor) if [ -e "${dir}/broken-$n" ]; then exit 1; fi; if [ -e "${dir}/running-$n" ]; then exit 0; else exit 7; fi ;;
esac
exit 3
`,
  );
  chmodSync(script, 0o755);
  const res = (node: string) => ({ ...(monitor ? { monitor } : {}), resources: [{ type: 'command', name: 'svc', command: script, params: { node }, timeoutMs: 5000 }] });
  pair = await startPair({ a: res('a'), b: res('b') });
  expect(await pair.waitPrimary()).toBe('a');
  await waitFor(async () => (await pair!.b.status())?.state === 'standby' && (await pair!.b.status())?.peer.alive, 10_000, 'b standby, a seen');
  return dir;
}
