/**
 * Faults where the peer is not simply dead: a hung primary (SIGSTOP) is fenced before the standby
 * takes over, and a heartbeat partition with both nodes alive ends with exactly one node, thanks
 * to the fence delay on node b. Both nodes' roles are sampled throughout: never two holders.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { sleep, waitFor } from '../helpers/net.ts';
import { sampleRoles, startPair, type TestPair } from './pair-agent-harness.ts';

let pair: TestPair | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
});

describe('pair-agent hang and partition', () => {
  it('SIGSTOP of the primary: fenced (killed) before the standby takes over; it never serves again', async () => {
    pair = await startPair();
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await pair!.b.status())?.peer.alive, 5000, 'b sees a');
    const sampler = sampleRoles(pair);
    const t0 = Date.now();
    pair.a.proc!.kill('SIGSTOP');
    await waitFor(async () => {
      const r = await pair!.floatingHealth(200);
      return r?.status === 200 && r.body.primary === 'b';
    }, 15_000, 'b serving', 20);
    console.log(`takeover from a hung primary: ${Date.now() - t0} ms`);
    const { bothHeld } = await sampler.stop();
    expect(bothHeld).toEqual([]);
    // the hung node was killed by the fence, so it cannot wake up and serve
    await waitFor(() => !pair!.a.proc!.alive(), 3000, 'a gone');
    expect(pair.a.proc!.child.signalCode).toBe('SIGKILL');
    expect(await pair.b.status()).toMatchObject({ state: 'primary', fencing: 'ok' });
  });

  it('one of two links cut: the peer stays alive; both cut: exactly one node fences the other and ends primary', async () => {
    pair = await startPair({ relay: true, links: 2 });
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await pair!.b.status())?.peer.alive, 5000, 'b sees a through the relays');
    const sampler = sampleRoles(pair);
    pair.cutLink(0, true);
    await sleep(2000); // well past deadtime: the second link keeps the peer alive
    const mid = await pair.b.status();
    expect(mid).toMatchObject({ state: 'standby', fencing: 'none' });
    expect(mid?.peer).toMatchObject({ alive: true });
    expect((mid?.peer as unknown as { links: Array<{ up: boolean }> }).links.map((l) => l.up)).toEqual([false, true]);
    expect(pair.a.proc!.alive() && pair.b.proc!.alive()).toBe(true);
    pair.cutLink(1, true);
    // a (no delay) fences b first; b (400 ms delay) is gone before its own fence fires
    await waitFor(() => !pair!.a.proc!.alive() || !pair!.b.proc!.alive(), 10_000, 'one node fenced');
    await sleep(1500); // let any second fence (which must not happen) play out
    const { bothHeld } = await sampler.stop();
    expect(bothHeld).toEqual([]);
    const alive = [pair.a, pair.b].filter((n) => n.proc!.alive());
    expect(alive.map((n) => n.id)).toEqual(['a']);
    expect(await pair.a.status()).toMatchObject({ state: 'primary', fencing: 'ok' });
    const h = await pair.floatingHealth();
    expect(h?.body).toMatchObject({ primary: 'a', state: 'degraded' });
    // heal the links and bring b back: it joins as standby
    pair.cutLink(0, false);
    pair.cutLink(1, false);
    await pair.b.start();
    await waitFor(async () => (await pair!.b.status())?.state === 'standby', 10_000, 'b standby after rejoining').catch((err) => {
      throw new Error(`${(err as Error).message}\n--- b ---\n${pair!.b.proc?.output().slice(-4000)}\n--- a ---\n${pair!.a.proc?.output().slice(-4000)}`);
    });
    await waitFor(async () => (await pair!.floatingHealth())?.body.state === 'ok', 5000, 'pair ok again');
  });
});
