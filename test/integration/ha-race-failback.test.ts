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
import type { VolumeStatus } from '../../pair-agent/volume/index.ts';
import { freePort, sleep, startTcpRelay, waitFor } from '../helpers/net.ts';
import { startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';
import { block } from './volume-harness.ts';

let pair: TestPair | null = null;
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  await pair?.stop();
  pair = null;
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A TCP relay to `port` that refuses (closes at once) every new connection while `refusing`. */
async function tcpRelay(port: number): Promise<{ port: number; refusing: boolean }> {
  const state = { port: 0, refusing: false };
  const relay = await startTcpRelay(port, { refuse: () => state.refusing });
  cleanups.push(() => relay.close());
  state.port = relay.port;
  return state;
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
    // Likewise a takeover on a: it would wait unseen, and move the resources whenever the link came back.
    const takeover = await pair!.a.post('/takeover');
    expect(takeover.status).toBe(409);
    expect(JSON.stringify(takeover.body)).toMatch(/replicated volume is not connected/);
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
  const repl = { b: await freePort(), a: 0 };
  const relay = await tcpRelay(repl.b);
  for (let i = 0; i < 200 && !(repl.a && addr(repl.a) < addr(relay.port) && addr(repl.a) < addr(repl.b)); i++) repl.a = await freePort();
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
  const vstatus = async (id: NodeId): Promise<VolumeStatus | null> => {
    try {
      return (await adminCall(url(id), 'GET', '/status', undefined, { timeoutMs: 500 })).body as VolumeStatus;
    } catch {
      return null;
    }
  };
  pair = await startPair({ a: volume('a'), b: volume('b') });
  return { relay, url, vstatus };
}
