/**
 * Failback (and any soft hand-over) with a replicated volume must wait for the replication link.
 * The node that comes back after a crash says on the heartbeat what its own metadata says: disk
 * UpToDate. Until its volume has met the primary's, that is stale: the primary wrote on alone
 * meanwhile. A primary that hands over on that word gives the resources to a node that promotes
 * its old data alone: the writes made meanwhile are missing there, and the two volumes are in
 * split brain when the link comes back. Here a's replication link to b runs through a relay that
 * refuses connections while a is away and for a while after it returns.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { adminCall } from '../../common/admin-http.ts';
import { freePort, relayedLinkPorts, sleep, waitFor } from '../helpers/net.ts';
import { startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';
import { block, volumeStatusAt } from './volume-harness.ts';

let pair: TestPair | null = null;
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  await pair?.stop();
  pair = null;
  for (const c of cleanups.splice(0).reverse()) await c();
});

/**
 * Replication ports for a and b, a's link through a relay that refuses (closes at once) every new
 * connection while `refusing`; `cut()` ends those it carries.
 */
async function tcpRelayLink(): Promise<{ repl: { a: number; b: number }; relay: { port: number; refusing: boolean; cut(): void } }> {
  const state = { port: 0, refusing: false, cut: () => link.relay.clients.forEach((c) => c.destroy()) };
  const link = await relayedLinkPorts({ refuse: () => state.refusing });
  cleanups.push(() => link.relay.close());
  state.port = link.relay.port;
  return { repl: { a: link.a, b: link.b }, relay: state };
}

const BS = 4096;
const addr = (port: number) => `127.0.0.1:${port}`;

describe('failback with a replicated volume', () => {
  it('the returning preferred node is not handed the resources before its volume has met the primary\'s and resynced', async () => {
    const { relay, url, vstatus } = await volumePairThroughRelay({ autoFailback: true });
    // Preferred a with auto-failback: a ends up primary whichever node won the first election.
    await waitFor(async () => (await vstatus('a'))?.role === 'primary' && (await vstatus('b'))?.connection === 'Connected', 20_000, 'a primary volume, b connected');
    pair!.a.proc!.kill('SIGKILL');
    await pair!.a.proc!.exited;
    await waitFor(async () => (await pair!.b.status())?.state === 'primary' && (await vstatus('b'))?.role === 'primary', 15_000, 'b primary after a died');
    // Written on b alone: a's volume does not have it.
    expect((await adminCall(url('b'), 'POST', '/write', { offset: 100 * BS, data: block(100).toString('base64') })).status).toBe(200);
    relay.refusing = true;
    await pair!.a.start();
    await waitFor(async () => (await pair!.a.status())?.state === 'standby', 15_000, 'a back as standby');
    // a's heartbeat says disk UpToDate (its own metadata); its volume has not met b's.
    const seen: string[] = [];
    const until = Date.now() + 4000;
    while (Date.now() < until) {
      const [sa, pb] = [await vstatus('a'), await pair!.b.status()];
      if (sa?.role === 'primary') seen.push(`a's volume primary (connection ${sa.connection})`);
      if (pb && pb.state !== 'primary') seen.push(`b ${pb.state}`);
      await sleep(50);
    }
    expect([...new Set(seen)], pair!.logs()).toEqual([]);
    // An operator's standby on b is refused with the reason, not accepted to wait unseen.
    const standby = await pair!.b.post('/standby');
    expect(standby.status).toBe(409);
    expect(JSON.stringify(standby.body)).toMatch(/replicated volume is not connected/);
    // b, primary without its link, had a mark its data Outdated (over the heartbeat): a takeover
    // on a is refused for that, and would have been for the link anyway.
    await waitFor(async () => (await vstatus('a'))?.disk === 'Outdated', 5000, "a's disk Outdated at b's request");
    const takeover = await pair!.a.post('/takeover');
    expect(takeover.status).toBe(409);
    expect(JSON.stringify(takeover.body)).toMatch(/local disk is Outdated: refusing to take over/);
    expect(((await pair!.a.status()) as unknown as { request: string }).request).toBe('none');
    // The link comes back: a resyncs from b, and only then does b hand back.
    relay.refusing = false;
    await waitFor(async () => (await pair!.a.status())?.state === 'primary' && (await vstatus('a'))?.role === 'primary', 30_000, 'a primary again after its resync').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs()}`);
    });
    const sa = await vstatus('a');
    expect(sa?.splitBrain).toBe(false);
    const digests = ((await adminCall(url('a'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { blockDigests: string[] }).blockDigests;
    expect(digests[100]).toBe(createHash('sha256').update(block(100)).digest('hex').slice(0, 32));
  });

  it('the replication link cut under the primary: its writes wait until the peer outdates itself; with the primary dead, the outdated peer never serves; the primary back, the peer resyncs', async () => {
    const { relay, url, vstatus } = await volumePairThroughRelay({});
    await waitFor(async () => (await vstatus('a'))?.role === 'primary' && (await vstatus('b'))?.connection === 'Connected', 20_000, 'a primary volume, b connected');
    relay.refusing = true;
    relay.cut();
    // a writes alone from now on: b marks its data Outdated at a's request (over the heartbeat).
    await waitFor(async () => (await vstatus('b'))?.disk === 'Outdated', 5000, "b's disk Outdated at a's request").catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs()}`);
    });
    expect((await adminCall(url('a'), 'POST', '/write', { offset: 100 * BS, data: block(100).toString('base64') }, { timeoutMs: 5000 })).status).toBe(200);
    expect((await vstatus('a'))?.peerFence).toBeNull();
    // That write is on a alone. a dies: b must not serve its old data (the write would be lost).
    pair!.a.proc!.kill('SIGKILL');
    await pair!.a.proc!.exited;
    const seen: string[] = [];
    const until = Date.now() + 3000;
    while (Date.now() < until) {
      const [sb, vb] = [await pair!.b.status(), await vstatus('b')];
      if (sb && sb.state !== 'standby') seen.push(`b ${sb.state}`);
      if (vb && vb.role !== 'secondary') seen.push(`b's volume ${vb.role}`);
      await sleep(50);
    }
    expect([...new Set(seen)], pair!.logs()).toEqual([]);
    expect((await pair!.b.status())?.health.state).toBe('down');
    // a comes back and serves; with the link back, b resyncs from a and has the write.
    relay.refusing = false;
    await pair!.a.start();
    await waitFor(
      async () => {
        const [pa, sb] = [await pair!.a.status(), await vstatus('b')];
        return pa?.state === 'primary' && sb?.disk === 'UpToDate' && sb.connection === 'Connected';
      },
      30_000,
      'a primary, b resynced',
    ).catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs()}`);
    });
    const digests = ((await adminCall(url('b'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { blockDigests: string[] }).blockDigests;
    expect(digests[100]).toBe(createHash('sha256').update(block(100)).digest('hex').slice(0, 32));
  });

  it('both nodes restarted, the link slower than the heartbeat: the election waits for the link, and the node with the newer data serves', async () => {
    const { relay, url, vstatus } = await volumePairThroughRelay({});
    await waitFor(async () => (await vstatus('a'))?.role === 'primary' && (await vstatus('b'))?.connection === 'Connected', 20_000, 'a primary volume, b connected');
    pair!.a.proc!.kill('SIGKILL');
    await pair!.a.proc!.exited;
    await waitFor(async () => (await pair!.b.status())?.state === 'primary' && (await vstatus('b'))?.role === 'primary', 15_000, 'b primary after a died');
    expect((await adminCall(url('b'), 'POST', '/write', { offset: 100 * BS, data: block(100).toString('base64') })).status).toBe(200);
    // Then b goes down too (cleanly), and both come back: each one's metadata says UpToDate, but
    // only b's volume has the newer data. The heartbeat finds the peer before the link is up.
    await pair!.b.proc!.stop(3000);
    relay.refusing = true;
    await Promise.all([pair!.a.start(), pair!.b.start()]);
    await sleep(1500);
    relay.refusing = false;
    await waitFor(
      async () => {
        const [sa, sb, pb] = [await vstatus('a'), await vstatus('b'), await pair!.b.status()];
        return pb?.state === 'primary' && sb?.role === 'primary' && sa?.role === 'secondary' && sa.disk === 'UpToDate' && sa.connection === 'Connected';
      },
      20_000,
      'b primary, a its UpToDate secondary',
    ).catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.logs()}`);
    });
    expect((await vstatus('a'))?.splitBrain).toBe(false);
    const digests = ((await adminCall(url('a'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { blockDigests: string[] }).blockDigests;
    expect(digests[100]).toBe(createHash('sha256').update(block(100)).digest('hex').slice(0, 32));
  });
});

/** A pair with replicated volumes, a's link to b through a relay that can refuse connections (b never dials a). */
async function volumePairThroughRelay(extra: Record<string, unknown>) {
  // The node with the lower address dials: a, through the relay (b never dials a).
  const { repl, relay } = await tcpRelayLink();
  expect(addr(repl.a) < addr(relay.port) && addr(repl.a) < addr(repl.b)).toBe(true);
  const admin = { a: await freePort(), b: await freePort() };
  const volume = (id: NodeId) => (dir: string) => ({
    ...extra,
    volume: {
      name: 'pair-t-mail',
      dataFile: join(dir, `${id}.volume`),
      metaFile: join(dir, `${id}.volume-meta`),
      sizeBytes: 8 * 1024 * 1024,
      listen: addr(repl[id]),
      peer: id === 'a' ? addr(relay.port) : addr(repl.a),
      secret: 'pair-agent-volume-secret-0123',
      pingIntervalMs: 100,
      pingTimeoutMs: 500,
      reconnectMs: 100,
      admin: { host: '127.0.0.1', port: admin[id] },
    },
  });
  const url = (id: NodeId) => `http://127.0.0.1:${admin[id]}`;
  const vstatus = (id: NodeId) => volumeStatusAt(url(id));
  pair = await startPair({ a: volume('a'), b: volume('b') });
  return { relay, url, vstatus };
}
