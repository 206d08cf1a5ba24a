/**
 * Operator requests: an earlier request must not linger and decide a later election. Standby on
 * a, then on b, then on a again: each time the other node takes the resources. Takeover on b, and
 * on a while a is still releasing: the last one wins, with no extra move.
 */
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { sleep, waitFor } from '../helpers/net.ts';
import { tempDir } from '../helpers/proc.ts';
import { startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';

let pair: TestPair | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
});

describe('operator standby, one node after the other', () => {
  it('each standby hands the resources to the other node, whatever requests came before', async () => {
    // A release takes a while, as with a store and a volume to stop (here a command whose stop
    // takes 200 ms): the peer's news of its own request reaches the releasing node meanwhile.
    pair = await startPair({ a: slowStop(0.2), b: slowStop(0.2) });
    let primary: NodeId = await pair.waitPrimary();
    for (let round = 1; round <= 4; round++) {
      const other: NodeId = primary === 'a' ? 'b' : 'a';
      await waitFor(async () => (await pair!.node(other).status())?.state === 'standby', 10_000, `${other} standby`);
      expect((await pair.node(primary).post('/standby', {})).status).toBe(200);
      await waitFor(async () => (await pair!.floatingHealth())?.body.primary === other && (await pair!.node(primary).status())?.state === 'standby', 15_000, `round ${round}: ${other} primary after standby on ${primary}`).catch((err: Error) => {
        throw new Error(`${err.message}\n${pair!.logs(4000)}`);
      });
      primary = other;
    }
  });

  it('takeover on b, then on a while a is still releasing: a keeps the resources, b\'s request does not move them again', async () => {
    // A command resource whose stop takes 1.5 s: a is releasing for that long.
    pair = await startPair({ a: slowStop(1.5), b: slowStop(1.5) });
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await pair!.b.status())?.state === 'standby', 10_000, 'b standby');
    expect((await pair.b.post('/takeover', {})).status).toBe(200);
    await waitFor(async () => (await pair!.a.status())?.state === 'releasing', 5000, 'a releasing');
    expect((await pair.a.post('/takeover', {})).status).toBe(200);
    await waitFor(async () => (await pair!.a.status())?.state === 'primary', 15_000, 'a primary again');
    // b's earlier request must not take the resources off a once more.
    const since = (await pair.a.status())?.lastTransition?.at;
    await sleep(4000);
    const a = await pair.a.status();
    expect(a?.state, pair.logs(4000)).toBe('primary');
    expect(a?.lastTransition?.at).toBe(since);
  });
});

let dirs: Array<{ path: string; cleanup(): void }> = [];
afterEach(() => {
  for (const d of dirs) d.cleanup();
  dirs = [];
});
function pairDir(): string {
  const d = tempDir('pairgate-requests-');
  dirs.push(d);
  return d.path;
}

/** Pair-agent config: a command resource whose stop takes `seconds`. */
function slowStop(seconds: number): Record<string, unknown> {
  const script = join(pairDir(), 'slow-stop.sh');
  writeFileSync(script, `#!/bin/sh\ncase "$1" in\n  stop) sleep ${seconds}; exit 0 ;;\n  monitor) exit 0 ;;\nesac\nexit 0\n`);
  chmodSync(script, 0o755);
  return { resources: [{ type: 'command', name: 'slow', command: script, timeoutMs: 5000 }] };
}
