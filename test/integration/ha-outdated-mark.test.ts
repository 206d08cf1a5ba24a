/**
 * The window the volume's own Outdated state cannot close: b is fenced (killed) while a writes on
 * alone, then a is lost too, and b starts first. b's metadata still says UpToDate (it never heard
 * that it was outdated). a marked b's replica older in Redis when it went on alone; b reads the
 * mark at start and never takes over alone. a comes back and serves; once the two volumes have
 * met and resynced, the mark is gone; and a mark b has outrun (it holds that generation) does not
 * hold b back.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminCall } from '../../common/admin-http.ts';
import { RedisBus, keys } from '../../common/redis-bus.ts';
import { freePort, sleep, waitFor } from '../helpers/net.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';
import { block, volumeStatusAt } from './volume-harness.ts';

let redis: RedisServer;
let bus: RedisBus;
let pair: TestPair;
const BS = 4096;
const admin = { a: 0, b: 0 };
const url = (id: NodeId) => `http://127.0.0.1:${admin[id]}`;

const vstatus = (id: NodeId) => volumeStatusAt(url(id));

beforeAll(async () => {
  redis = await startRedis();
  bus = new RedisBus({ url: redis.url });
  const repl = { a: await freePort(), b: await freePort() };
  admin.a = await freePort();
  admin.b = await freePort();
  const node = (id: NodeId) => (dir: string) => ({
    redis: { url: redis.url },
    volume: {
      name: 'pair-t-mail',
      dataFile: join(dir, `${id}.volume`),
      metaFile: join(dir, `${id}.volume-meta`),
      sizeBytes: 8 * 1024 * 1024,
      listen: `127.0.0.1:${repl[id]}`,
      peer: `127.0.0.1:${repl[id === 'a' ? 'b' : 'a']}`,
      secret: 'pair-agent-volume-secret-0123',
      pingIntervalMs: 100,
      pingTimeoutMs: 500,
      reconnectMs: 100,
      admin: { host: '127.0.0.1', port: admin[id] },
    },
  });
  pair = await startPair({ a: node('a'), b: node('b') });
}, 60_000);

afterAll(async () => {
  await pair?.stop();
  await bus?.close();
  await redis?.close();
});

describe('the outdated mark in Redis', () => {
  it('a node fenced while its peer wrote alone, started alone later, does not serve its old copy', async () => {
    await waitFor(async () => (await vstatus('a'))?.role === 'primary' && (await vstatus('b'))?.connection === 'Connected', 20_000, 'a primary volume, b connected');
    const markKey = keys.pairOutdated('pair-t');
    // b dies: a fences it (its process is gone), goes on alone, and marks b's replica older.
    pair.b.proc!.kill('SIGKILL');
    await pair.b.proc!.exited;
    await waitFor(async () => (await bus.get(markKey)) !== null, 10_000, 'the mark in Redis').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair.logs()}`);
    });
    expect(JSON.parse((await bus.get(markKey))!)).toMatchObject({ node: 'b', by: 'a', how: 'fenced' });
    expect((await adminCall(url('a'), 'POST', '/write', { offset: 100 * BS, data: block(100).toString('base64') }, { timeoutMs: 5000 })).status).toBe(200);
    // a is lost as well; b starts first, alone, its metadata saying UpToDate.
    pair.a.proc!.kill('SIGKILL');
    await pair.a.proc!.exited;
    await pair.b.start();
    // Its volume's own word: UpToDate (the agent reads the mark and goes by Outdated).
    await waitFor(async () => (await vstatus('b'))?.disk === 'UpToDate', 10_000, "b's volume up, UpToDate by its metadata");
    const seen = new Set<string>();
    const until = Date.now() + 4000 + 2000; // initdead, and then some
    while (Date.now() < until) {
      const [sb, vb] = [await pair.b.status(), await vstatus('b')];
      if (sb && sb.state !== 'standby' && sb.state !== 'starting') seen.add(`b ${sb.state}`);
      if (vb && vb.role !== 'secondary') seen.add(`b's volume ${vb.role}`);
      await sleep(100);
    }
    expect([...seen], pair.logs()).toEqual([]);
    expect(pair.logs()).toMatch(/the peer marked this node's replica older/);
    // a comes back and serves; b resyncs from it, and the mark goes.
    await pair.a.start();
    await waitFor(
      async () => {
        const [pa, vb] = [await pair.a.status(), await vstatus('b')];
        return pa?.state === 'primary' && vb?.disk === 'UpToDate' && vb.connection === 'Connected';
      },
      30_000,
      'a primary, b resynced',
    ).catch((err: Error) => {
      throw new Error(`${err.message}\n${pair.logs()}`);
    });
    await waitFor(async () => (await bus.get(markKey)) === null, 5000, 'the mark gone');
    const digests = ((await adminCall(url('b'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { blockDigests: string[] }).blockDigests;
    expect(digests[100]).toBe(createHash('sha256').update(block(100)).digest('hex').slice(0, 32));
    // A mark left behind (its holder lost before it could delete it) whose generation b has since
    // received does not hold b back: b, restarted alone after a is lost, takes over.
    const generation = (await vstatus('a'))!.uuids.current;
    expect((await vstatus('b'))!.uuids.current).toBe(generation);
    pair.b.proc!.kill('SIGKILL');
    await pair.b.proc!.exited;
    await bus.set(markKey, JSON.stringify({ node: 'b', by: 'a', how: 'fenced', uuid: generation, at: Date.now() }));
    pair.a.proc!.kill('SIGKILL');
    await pair.a.proc!.exited;
    await pair.b.start();
    await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'b', 20_000, 'b serving despite a mark it has outrun').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair.logs()}`);
    });
  }, 90_000);
});
