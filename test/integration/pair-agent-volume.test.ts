/**
 * The pair agent with its replicated volume as a resource (two agents as processes): the
 * volume follows the HA decisions. SIGKILL of the primary: the standby fences it, promotes its
 * volume with every acknowledged write, and the restarted node rejoins as secondary and resyncs.
 * A heartbeat partition: the volumes' roles are sampled throughout, never two primaries.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { rmSync } from 'node:fs';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { adminCall } from '../../common/admin-http.ts';
import type { VolumeStatus } from '../../pair-agent/volume/index.ts';
import { freePort, sleep, waitFor } from '../helpers/net.ts';
import { REPO, startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';
import { block } from './volume-harness.ts';

const execFileP = promisify(execFile);

/** Runs `pairgate …` as an operator would; resolves with its exit code and output. */
async function pairgateCli(args: string[]): Promise<{ code: number; out: string }> {
  try {
    const r = await execFileP(process.execPath, [join(REPO, 'bin', 'pairgate.mjs'), ...args], { cwd: REPO, timeout: 60_000 });
    return { code: 0, out: r.stdout + r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : 1, out: `${e.stdout ?? ''}${e.stderr ?? ''}` };
  }
}

let pair: TestPair | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
});

const BS = 4096;

async function volumeNodes() {
  const ports = { a: { repl: await freePort(), admin: await freePort() }, b: { repl: await freePort(), admin: await freePort() } };
  const volume = (id: NodeId) => (dir: string) => {
    const peer: NodeId = id === 'a' ? 'b' : 'a';
    return {
      volume: {
        name: 'pair-t-mail',
        dataFile: join(dir, `${id}.volume`),
        metaFile: join(dir, `${id}.volume-meta`),
        sizeBytes: 8 * 1024 * 1024,
        listen: `127.0.0.1:${ports[id].repl}`,
        peer: `127.0.0.1:${ports[peer].repl}`,
        secret: 'pair-agent-volume-secret-0123',
        pingIntervalMs: 100,
        pingTimeoutMs: 500,
        reconnectMs: 100,
        admin: { host: '127.0.0.1', port: ports[id].admin },
      },
    };
  };
  const url = (id: NodeId) => `http://127.0.0.1:${ports[id].admin}`;
  const status = async (id: NodeId): Promise<VolumeStatus | null> => {
    try {
      return (await adminCall(url(id), 'GET', '/status', undefined, { timeoutMs: 500 })).body as VolumeStatus;
    } catch {
      return null;
    }
  };
  return { a: volume('a'), b: volume('b'), url, status };
}

/**
 * The preferred node (a) normally wins a new pair's first election. On a loaded machine (the CI
 * suite runs its files side by side) b has been seen to win it once: one primary either way, the
 * tests below start from a, so b hands over first.
 */
async function primaryOnA(p: TestPair): Promise<void> {
  if ((await p.waitPrimary()) === 'a') return;
  await waitFor(async () => (await p.b.post('/standby', {})).status === 200, 15_000, 'b hands over to the preferred node');
  await waitFor(async () => (await p.a.status())?.state === 'primary', 15_000, 'a primary after b stood by');
}

describe('pair agent with a replicated volume', () => {
  it('SIGKILL of the primary: the standby promotes its volume with every acknowledged write; the old primary resyncs as secondary', async () => {
    const vol = await volumeNodes();
    pair = await startPair({ a: vol.a, b: vol.b });
    await primaryOnA(pair);
    await waitFor(async () => (await vol.status('a'))?.role === 'primary' && (await vol.status('b'))?.connection === 'Connected', 10_000, 'a primary volume, b connected');
    for (let i = 0; i < 40; i++) {
      const res = await adminCall(vol.url('a'), 'POST', '/write', { offset: i * BS, data: block(i).toString('base64') });
      expect(res.status).toBe(200);
    }
    pair.a.proc!.kill('SIGKILL');
    await waitFor(async () => (await vol.status('b'))?.role === 'primary', 15_000, "b's volume promoted by the takeover");
    expect((await pair.b.status())?.state).toBe('primary');
    const digests = ((await adminCall(vol.url('b'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { blockDigests: string[] }).blockDigests;
    for (let i = 0; i < 40; i++) expect(digests[i]).toBe(createHash('sha256').update(block(i)).digest('hex').slice(0, 32));
    // Serving alone is not redundant: the pair says degraded until replication is back.
    await waitFor(async () => (await pair!.floatingHealth())?.body.state === 'degraded', 5000, 'pair degraded while b serves alone');
    // Written on b while a is away, then a comes back: secondary, sync target, identical.
    await adminCall(vol.url('b'), 'POST', '/write', { offset: 100 * BS, data: block(100).toString('base64') });
    await pair.a.start();
    await waitFor(
      async () => {
        const [sa, sb] = [await vol.status('a'), await vol.status('b')];
        return sa?.role === 'secondary' && sa.connection === 'Connected' && sa.disk === 'UpToDate' && sb?.outOfSyncBytes === 0;
      },
      20_000,
      'a back as an UpToDate secondary',
    );
    expect((await vol.status('a'))?.lastDecision?.decision).toBe('target');
    const da = ((await adminCall(vol.url('a'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { digest: string }).digest;
    const db = ((await adminCall(vol.url('b'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { digest: string }).digest;
    expect(da).toBe(db);
    expect((await pair.a.status())?.state).toBe('standby');
    await waitFor(async () => (await pair!.floatingHealth())?.body.state === 'ok', 5000, 'pair ok once a is an UpToDate secondary');
    // b knows a's disk is UpToDate again (the resync's end reached it), so it hands back on request.
    expect((await pair.b.post('/standby', {})).status).toBe(200);
    await waitFor(async () => (await pair!.a.status())?.state === 'primary' && (await vol.status('a'))?.role === 'primary', 15_000, 'a primary again after b stood by').catch((err) => {
      throw new Error(`${(err as Error).message}\n${pair!.logs()}`);
    });
    const back = ((await adminCall(vol.url('a'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { digest: string }).digest;
    expect(back).toBe(db);
  });

  it('replaced disk on b while a is down: b waits as standby with an Inconsistent volume (never promoted); a returns, takes over, and b takes a full sync from it', async () => {
    const vol = await volumeNodes();
    pair = await startPair({ a: vol.a, b: vol.b });
    await primaryOnA(pair);
    await waitFor(async () => (await vol.status('a'))?.role === 'primary' && (await vol.status('b'))?.connection === 'Connected', 10_000, 'a primary volume, b connected');
    for (let i = 0; i < 40; i++) expect((await adminCall(vol.url('a'), 'POST', '/write', { offset: i * BS, data: block(i).toString('base64') })).status).toBe(200);
    // b's disk is replaced (new, empty volume files), then a, which holds every write, dies.
    await pair.b.proc!.stop(3000);
    rmSync(join(pair.dir, 'b.volume'));
    rmSync(join(pair.dir, 'b.volume-meta'));
    pair.a.proc!.kill('SIGKILL');
    await pair.a.proc!.exited;
    await pair.b.start();
    await waitFor(async () => (await pair!.b.status())?.state === 'standby', 15_000, 'b standby after initdead');
    await sleep(1500);
    expect((await pair.b.status())?.state).toBe('standby');
    expect(await vol.status('b')).toMatchObject({ role: 'secondary', disk: 'Inconsistent' });
    expect((await pair.floatingHealth())?.body.primary ?? null).toBeNull();
    // a comes back: it holds the UpToDate data, takes over, and b is synced from it in full.
    await pair.a.start();
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(
      async () => {
        const [sa, sb] = [await vol.status('a'), await vol.status('b')];
        return sb?.role === 'secondary' && sb.connection === 'Connected' && sb.disk === 'UpToDate' && sa?.role === 'primary' && sa.outOfSyncBytes === 0;
      },
      20_000,
      'b an UpToDate secondary of a',
    );
    expect((await vol.status('b'))?.lastDecision?.decision).toBe('target-full');
    const digests = ((await adminCall(vol.url('b'), 'GET', '/digest', undefined, { timeoutMs: 10_000 })).body as { blockDigests: string[] }).blockDigests;
    for (let i = 0; i < 40; i++) expect(digests[i]).toBe(createHash('sha256').update(block(i)).digest('hex').slice(0, 32));
    expect((await pair.b.status())?.state).toBe('standby');
  });

  it('a new pair with one node up: it waits past initdead with its fresh volume; the operator\'s forced promotion makes it fence the absent peer and serve', async () => {
    const vol = await volumeNodes();
    pair = await startPair({ a: vol.a, b: vol.b });
    expect(await pair.waitPrimary()).toBe('a');
    // Start over as a brand-new pair whose node b never comes up.
    await Promise.all([pair.a.proc!.stop(3000), pair.b.proc!.stop(3000)]);
    for (const f of ['a.volume', 'a.volume-meta', 'b.volume', 'b.volume-meta']) rmSync(join(pair.dir, f));
    await pair.a.start();
    await waitFor(async () => (await pair!.a.status())?.state === 'standby', 20_000, 'a standby after initdead').catch((err: Error) => {
      throw new Error(`${err.message}\n${pair!.a.proc?.output().slice(-4000)}`);
    });
    await sleep(1000);
    expect((await pair.a.status())?.state).toBe('standby');
    expect(await vol.status('a')).toMatchObject({ role: 'secondary', disk: 'Inconsistent' });
    // The operator's commands, given the pair-agent's own config (its volume: section).
    const refused = await pairgateCli(['volume', 'primary', '--config', pair.a.configFile]);
    expect(refused.code).not.toBe(0);
    expect(refused.out).toMatch(/Inconsistent.*fresh.*--force/);
    const forced = await pairgateCli(['volume', 'primary', '--force', '--config', pair.a.configFile]);
    expect(forced.code, forced.out).toBe(0);
    expect(forced.out).toMatch(/role primary, disk UpToDate/);
    expect(await pair.waitPrimary()).toBe('a');
    expect((await adminCall(vol.url('a'), 'POST', '/write', { offset: 0, data: block(1).toString('base64') })).status).toBe(200);
  });

  it('heartbeat partition with both nodes alive: the volumes are never primary on both nodes at once', async () => {
    const vol = await volumeNodes();
    pair = await startPair({ a: vol.a, b: vol.b, relay: true });
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await vol.status('b'))?.connection === 'Connected', 10_000, 'volumes connected');
    let running = true;
    const both: string[] = [];
    let samples = 0;
    const sampler = (async () => {
      while (running) {
        const [sa, sb] = await Promise.all([vol.status('a'), vol.status('b')]);
        samples++;
        if (sa?.role === 'primary' && sb?.role === 'primary') both.push(new Date().toISOString());
        await sleep(30);
      }
    })();
    pair.cutLink(0, true);
    await waitFor(() => !pair!.a.proc!.alive() || !pair!.b.proc!.alive(), 10_000, 'one node fenced');
    await sleep(1500);
    // On a loaded machine a status round trip can take 100 ms or more: sample on until there are enough.
    await waitFor(() => samples > 20, 15_000, 'at least 20 samples of both roles');
    running = false;
    await sampler;
    expect(both).toEqual([]);
    expect(samples).toBeGreaterThan(20);
    const survivor = pair.a.proc!.alive() ? 'a' : 'b';
    await waitFor(async () => (await vol.status(survivor))?.role === 'primary', 10_000, 'the survivor holds the primary volume');
  });
});
