/**
 * Operator requests: a standby request is given effect once the peer holds the resources; it must
 * not linger and decide a later election. Standby on a, then on b, then on a again: each time the
 * other node takes the resources.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { waitFor } from '../helpers/net.ts';
import { startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';

let pair: TestPair | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
});

describe('operator standby, one node after the other', () => {
  it('each standby hands the resources to the other node, whatever requests came before', async () => {
    pair = await startPair();
    let primary: NodeId = await pair.waitPrimary();
    for (let round = 1; round <= 3; round++) {
      const other: NodeId = primary === 'a' ? 'b' : 'a';
      await waitFor(async () => (await pair!.node(other).status())?.state === 'standby', 10_000, `${other} standby`);
      expect((await pair.node(primary).post('/standby', {})).status).toBe(200);
      await waitFor(async () => (await pair!.floatingHealth())?.body.primary === other && (await pair!.node(primary).status())?.state === 'standby', 15_000, `round ${round}: ${other} primary after standby on ${primary}`).catch((err: Error) => {
        throw new Error(`${err.message}\n${pair!.logs(4000)}`);
      });
      primary = other;
    }
  });
});
