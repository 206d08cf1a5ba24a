/**
 * The README's example pair (infra/examples/pair-agent-{a,b}.yaml, and store.yaml) cannot rot:
 *  - both files load through the real loader and schemas (pair-agent, its `volume:` block with
 *    the volume's own schema, the `store:` block), and mirror each other where a pair must agree;
 *  - the pair runs from them as they are, except for what must differ so that the test can run
 *    beside anything else on the machine: TCP/UDP ports on 127.0.0.1, file paths and the floating
 *    address (the rewritten keys are listed and everything else is checked to be unchanged).
 *    Then the "done when" of issue 5: `swaks --protocol LMTP` delivers to the floating address,
 *    fetchmail (USER/PASS of the example's static user) and Python's poplib (the proxies' master
 *    login) retrieve it; `kill -9` of the primary; the same again on the new primary, with
 *    fetchmail's UIDL bookkeeping showing that the first message kept its identity.
 */
import { execFile } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { loadConfigFile, validateConfig } from '../../common/config.ts';
import { checkPairAgentConfig, pairAgentConfigSchema, type PairAgentConfig } from '../../pair-agent/config.ts';
import { storeServeSchema } from '../../pair-agent/store/cli.ts';
import { volumeConfigSchema, type VolumeConfig } from '../../pair-agent/volume/index.ts';
import { freePort, waitFor } from '../helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';

const run = promisify(execFile);
const REPO = join(import.meta.dirname, '..', '..');
const EXAMPLES = join(REPO, 'infra', 'examples');
/** The secrets the examples take from the environment (the README exports these). */
const ENV = {
  PAIRGATE_HB_KEY: 'example-test-heartbeat-key-0123',
  PAIRGATE_REPLICATION_SECRET: 'example-test-replication-0123',
  PAIRGATE_MASTER_SECRET: 'example-test-master-0123',
};
const saved: Record<string, string | undefined> = {};
beforeAll(() => {
  for (const [k, v] of Object.entries(ENV)) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
});
afterAll(() => {
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

type Node = 'a' | 'b';
const file = (n: Node) => join(EXAMPLES, `pair-agent-${n}.yaml`);
const load = (n: Node): PairAgentConfig => loadConfigFile(pairAgentConfigSchema, file(n));
const volumeOf = (c: PairAgentConfig): VolumeConfig => validateConfig(volumeConfigSchema, c.volume, 'volume');

describe('example configs', () => {
  it('both pair-agent examples pass the real schemas (pair agent, volume, store) and mirror each other', () => {
    const [a, b] = [load('a'), load('b')];
    checkPairAgentConfig(a);
    checkPairAgentConfig(b);
    expect([a.node, b.node]).toEqual(['a', 'b']);
    expect(a.pair).toBe(b.pair);
    const [va, vb] = [volumeOf(a), volumeOf(b)];
    // What both nodes of a pair must agree on.
    for (const k of ['name', 'sizeBytes', 'secret', 'protocol', 'afterSb0Pri', 'afterSb1Pri'] as const) expect(va[k], `volume.${k}`).toEqual(vb[k]);
    expect(va.protocol).toBe('C');
    expect(va.listen).toBe(vb.peer);
    expect(vb.listen).toBe(va.peer);
    expect(va.dataFile).not.toBe(vb.dataFile);
    expect(va.metaFile).not.toBe(vb.metaFile);
    expect(a.store).toEqual(b.store);
    expect(a.store?.users && Object.keys(a.store.users).length).toBeGreaterThan(0);
    expect(a.floatingIp).toEqual(b.floatingIp);
    expect(a.healthPort).toBe(b.healthPort);
    expect(a.heartbeat.listen).toEqual(b.heartbeat.peers);
    expect(b.heartbeat.listen).toEqual(a.heartbeat.peers);
    expect(a.fencing).toMatchObject({ pidFile: b.pidFile });
    expect(b.fencing).toMatchObject({ pidFile: a.pidFile });
    expect(a.preferred).toBe(b.preferred);
    // exactly one node delays its fence (a heartbeat partition then has one survivor)
    expect([(a.fencing as { delayMs: number }).delayMs > 0, (b.fencing as { delayMs: number }).delayMs > 0].filter(Boolean)).toHaveLength(1);
  });

  it('the standalone store example passes its schema', () => {
    const c = loadConfigFile(storeServeSchema, join(EXAMPLES, 'store.yaml'));
    expect(c.store.masterSecret).toBe(ENV.PAIRGATE_MASTER_SECRET);
  });

  it('a missing secret in the environment is named at load', () => {
    const keep = process.env.PAIRGATE_REPLICATION_SECRET;
    delete process.env.PAIRGATE_REPLICATION_SECRET;
    try {
      expect(() => load('a')).toThrow(/PAIRGATE_REPLICATION_SECRET/);
    } finally {
      process.env.PAIRGATE_REPLICATION_SECRET = keep;
    }
  });
});

// ---- the pair from the examples ------------------------------------------------------------

/** Keys rewritten for the test run (ports on 127.0.0.1, files, the floating address); all else is the example's. */
const REWRITTEN = [
  'admin.listen',
  'heartbeat.listen',
  'heartbeat.peers',
  'fencing.pidFile',
  'pidFile',
  'floatingIp.address',
  'volume.dataFile',
  'volume.metaFile',
  'volume.listen',
  'volume.peer',
  'volume.admin.port',
  'store.ports',
];

type Raw = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

function without(raw: Raw, keys: string[]): Raw {
  const copy = structuredClone(raw);
  for (const k of keys) {
    const path = k.split('.');
    let o = copy;
    for (const p of path.slice(0, -1)) o = o[p];
    delete o[path.at(-1)!];
  }
  return copy;
}

interface RunPair {
  address: string;
  healthPort: number;
  lmtp: number;
  pop3: number;
  user: string;
  password: string;
  masterUser: string;
  procs: Record<Node, Managed | null>;
  files: Record<Node, string>;
  dir: { path: string; cleanup(): void };
}

async function rewriteExamples(): Promise<RunPair> {
  const dir = tempDir('pairgate-example-pair-');
  const raw = { a: parse(readFileSync(file('a'), 'utf8')) as Raw, b: parse(readFileSync(file('b'), 'utf8')) as Raw };
  // A floating address of its own (like the pair-agent harness), so that the example's ports 24/110/143 and
  // healthPort can stay as they are when the test may bind them (root, as in CI).
  const address = `127.${200 + (process.pid % 50)}.${process.pid % 250}.1`; // the harness uses 127.100-199.*
  const root = process.getuid?.() === 0;
  const storePorts = root ? raw.a.store.ports : { lmtp: await freePort(), pop3: await freePort(), imap: await freePort() };
  const ports: Record<Node, { admin: number; hb: number; repl: number; vadmin: number }> = {
    a: { admin: await freePort(), hb: await freePort(), repl: await freePort(), vadmin: await freePort() },
    b: { admin: await freePort(), hb: await freePort(), repl: await freePort(), vadmin: await freePort() },
  };
  const files = { a: join(dir.path, 'a.yaml'), b: join(dir.path, 'b.yaml') };
  for (const n of ['a', 'b'] as const) {
    const p: Node = n === 'a' ? 'b' : 'a';
    const c = structuredClone(raw[n]);
    c.admin.listen = `127.0.0.1:${ports[n].admin}`;
    c.heartbeat.listen = `127.0.0.1:${ports[n].hb}`;
    c.heartbeat.peers = [`127.0.0.1:${ports[p].hb}`];
    c.fencing.pidFile = join(dir.path, `${p}.pid`);
    c.pidFile = join(dir.path, `${n}.pid`);
    c.floatingIp.address = address;
    c.volume.dataFile = join(dir.path, `${n}.data`);
    c.volume.metaFile = join(dir.path, `${n}.meta`);
    c.volume.listen = `127.0.0.1:${ports[n].repl}`;
    c.volume.peer = `127.0.0.1:${ports[p].repl}`;
    c.volume.admin.port = ports[n].vadmin;
    c.store.ports = storePorts;
    // Everything not listed in REWRITTEN is the example's own value.
    expect(without(c, REWRITTEN)).toEqual(without(raw[n], REWRITTEN));
    writeFileSync(files[n], stringify(c));
  }
  const users = raw.a.store.users as Record<string, string>;
  const [user, password] = Object.entries(users)[0]!;
  return {
    address,
    healthPort: raw.a.healthPort,
    lmtp: storePorts.lmtp,
    pop3: storePorts.pop3,
    user,
    password,
    masterUser: raw.a.store.masterUser,
    procs: { a: null, b: null },
    files,
    dir,
  };
}

let pair: RunPair | null = null;
afterAll(async () => {
  if (!pair) return;
  await Promise.all([pair.procs.a?.stop(3000), pair.procs.b?.stop(3000)]);
  pair.dir.cleanup();
});

function startNode(p: RunPair, n: Node): Managed {
  const proc = startProcess(`example-${n}`, process.execPath, [join(REPO, 'bin', 'pairgate.mjs'), 'pair-agent', '--config', p.files[n]], { cwd: REPO, env: { ...process.env, ...ENV } });
  p.procs[n] = proc;
  return proc;
}

interface Health {
  state: string;
  primary: string | null;
  replication: { connection: string; protocol: string };
  store: { mailboxes: number; messages: number; bytesUsed: number; bytesTotal: number };
}
async function health(p: RunPair): Promise<Health | null> {
  try {
    const res = await fetch(`http://${p.address}:${p.healthPort}/health`, { signal: AbortSignal.timeout(500) });
    return (await res.json()) as Health;
  } catch {
    return null;
  }
}

async function swaks(p: RunPair, subject: string): Promise<string> {
  const { stdout } = await run('swaks', ['--protocol', 'LMTP', '--server', `${p.address}:${p.lmtp}`, '--from', 'bob@example.net', '--to', `${p.user}@example.net`, '--header', `Subject: ${subject}`, '--body', `body of ${subject}`, '--timeout', '10'], { timeout: 20_000 });
  return stdout;
}

/** fetchmail with `keep` and its UIDL file: each run fetches only messages it has not seen. Returns the mbox. */
async function fetchmail(p: RunPair): Promise<string> {
  const home = p.dir.path;
  const rc = join(home, 'fetchmailrc');
  const mbox = join(home, 'mbox');
  writeFileSync(rc, `poll ${p.address} protocol pop3 port ${p.pop3} user "${p.user}" password "${p.password}" sslproto '' keep mda "cat >> ${mbox}"\n`);
  chmodSync(rc, 0o600);
  await run('fetchmail', ['-f', rc, '-v', '-i', join(home, 'fetchids'), '--pidfile', join(home, 'fetchmail.pid')], { timeout: 30_000, env: { ...process.env, HOME: home, FETCHMAILHOME: home } }).catch((e: { code?: number; stdout?: string; stderr?: string }) => {
    // 1 = no new mail: the mbox then tells whether that is right
    if (e.code !== 1) throw new Error(`fetchmail failed (${e.code}): ${e.stdout}\n${e.stderr}`);
  });
  return existsSync(mbox) ? readFileSync(mbox, 'latin1') : '';
}

/** Python's poplib, logging in as the proxies do (SASL PLAIN, authzid = user, authcid = master account). */
async function poplib(p: RunPair): Promise<{ uidl: string[]; subjects: string[] }> {
  const script = `
import poplib, base64, json, os, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=10)
p._shortcmd('AUTH PLAIN ' + base64.b64encode(('%s\\0%s\\0%s' % (sys.argv[3], sys.argv[4], os.environ['PAIRGATE_MASTER_SECRET'])).encode()).decode())
n, _ = p.stat()
uidl = [x.decode() for x in p.uidl()[1]]
subjects = [next((l.decode()[9:] for l in p.retr(i)[1] if l.startswith(b'Subject: ')), '') for i in range(1, n + 1)]
p.quit()
print(json.dumps({'uidl': uidl, 'subjects': subjects}))
`;
  const { stdout } = await run('python3', ['-c', script, p.address, String(p.pop3), p.user, p.masterUser], { timeout: 20_000, env: { ...process.env, ...ENV } });
  return JSON.parse(stdout) as { uidl: string[]; subjects: string[] };
}

const count = (text: string, s: string) => text.split(s).length - 1;

describe('the pair from the example configs', () => {
  it('accepts swaks LMTP deliveries and serves them to fetchmail and poplib, before and after a kill -9 failover', async () => {
    const output = (p: RunPair) => `--- a ---\n${p.procs.a?.output().slice(-3000)}\n--- b ---\n${p.procs.b?.output().slice(-3000)}`;
    // Ports come from freePort(): on a busy machine another process may take one before the agent binds it;
    // that start (and only that) is retried with fresh ports.
    for (let attempt = 1; ; attempt++) {
      pair = await rewriteExamples();
      const p = pair;
      startNode(p, 'a');
      startNode(p, 'b');
      const up = await waitFor(async () => {
        if (!p.procs.a?.alive() || !p.procs.b?.alive()) return 'exited';
        const h = await health(p);
        return h?.state === 'ok' && h.primary !== null && h.replication.connection === 'Connected' ? 'up' : null;
      }, 40_000, 'the example pair serving with its volumes connected').catch((err: Error) => err);
      if (up === 'up') break;
      const out = output(p);
      await Promise.all([p.procs.a?.stop(3000), p.procs.b?.stop(3000)]);
      p.dir.cleanup();
      pair = null;
      if (attempt < 3 && out.includes('EADDRINUSE')) continue;
      throw new Error(`${up instanceof Error ? up.message : 'a pair-agent exited'}\n${out}`);
    }
    const p = pair;
    const first = (await health(p))!.primary as Node;
    expect((await health(p))!.replication.protocol).toBe('C');
    expect(first).toBe('a'); // the examples prefer a

    expect(await swaks(p, 'before failover')).toMatch(/<- {2}250 2\.6\.0 .*uid=1/);
    let mbox = await fetchmail(p);
    expect(count(mbox, 'Subject: before failover')).toBe(1);
    const before = await poplib(p);
    expect(before.subjects).toEqual(['before failover']);

    p.procs[first]!.kill('SIGKILL');
    const second: Node = first === 'a' ? 'b' : 'a';
    await waitFor(async () => (await health(p))?.primary === second, 20_000, `${second} primary after the kill -9`).catch((err) => {
      throw new Error(`${(err as Error).message}\n${output(p)}`);
    });

    const after = await poplib(p);
    expect(after).toEqual(before); // same message, same UIDL (UID and UIDVALIDITY)
    expect(await swaks(p, 'after failover')).toMatch(/<- {2}250 2\.6\.0 .*uid=2/);
    mbox = await fetchmail(p);
    // fetchmail kept its UIDL list: the first message is not fetched again, the new one is.
    expect(count(mbox, 'Subject: before failover')).toBe(1);
    expect(count(mbox, 'Subject: after failover')).toBe(1);
    const last = await poplib(p);
    expect(last.subjects).toEqual(['before failover', 'after failover']);
    expect(last.uidl[0]).toBe(before.uidl[0]);
    // The pair's health record carries the store's figures from the new primary.
    const h = (await health(p))!;
    expect(h.store.messages).toBe(2);
    expect(h.store.bytesTotal).toBe(volumeOf(load('a')).sizeBytes);
    expect(h.store.bytesUsed).toBeGreaterThan(0);
  }, 120_000);
});
