/**
 * Test harness for the pair-agent fault tests: two real `pairgate pair-agent` processes on
 * loopback, with local-process fencing, a floating address of their own in 127.0.0.0/8, and
 * optionally a UDP relay on the heartbeat path that the test can cut.
 */
import dgram from 'node:dgram';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { freePort, sleep, waitFor } from '../helpers/net.ts';
import { startProcess, tempDir, type Managed } from '../helpers/proc.ts';

export const REPO = join(import.meta.dirname, '..', '..');
export const HB_KEY = 'test-heartbeat-key-0123456789';

export type NodeId = 'a' | 'b';

export interface AgentStatus {
  state: string;
  holds: boolean;
  /** The last state change (epoch ms): unchanged between two answers means no transition in between. */
  lastTransition: { at: number; from: string; to: string; reason: string } | null;
  fencing: string;
  peer: { alive: boolean; generation: number | null; state: string | null };
  health: { state: string; primary: string | null; fencing?: string };
}

export interface TestNode {
  id: NodeId;
  proc: Managed | null;
  configFile: string;
  adminUrl: string;
  pidFile: string;
  hbPort: number;
  start(): Promise<void>;
  status(timeoutMs?: number): Promise<AgentStatus | null>;
  post(path: string, body?: unknown): Promise<{ status: number; body: unknown }>;
  metrics(): Promise<string>;
}

export interface UdpRelay {
  /** Address the node sends to. */
  port: number;
  cut: boolean;
  close(): Promise<void>;
}

/** Forwards datagrams to `to` while not cut. */
export async function startRelay(toPort: number): Promise<UdpRelay> {
  const sock = dgram.createSocket('udp4');
  const relay: UdpRelay = {
    port: 0,
    cut: false,
    close: () => new Promise((r) => sock.close(() => r())),
  };
  sock.on('message', (msg) => {
    if (!relay.cut) sock.send(msg, toPort, '127.0.0.1');
  });
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  relay.port = sock.address().port;
  return relay;
}

export interface PairOptions {
  /** Per-node overrides merged into the generated config. */
  a?: Record<string, unknown> | ((dir: string) => Record<string, unknown>);
  b?: Record<string, unknown> | ((dir: string) => Record<string, unknown>);
  /** Put a cuttable UDP relay on each direction of each heartbeat link. */
  relay?: boolean;
  /** Heartbeat links (sockets per node); default 1. */
  links?: number;
  timings?: { keepaliveMs: number; warntimeMs: number; deadtimeMs: number; initdeadMs: number };
}

// deadtime above the defaults' 600 ms: CI machines are shared and a stalled event loop must not look like a dead peer
export const TEST_TIMINGS = { keepaliveMs: 100, warntimeMs: 400, deadtimeMs: 1200, initdeadMs: 4000 };

export interface TestPair {
  dir: string;
  address: string;
  healthPort: number;
  a: TestNode;
  b: TestNode;
  /** Per link: the relay carrying datagrams to a and to b. */
  relays: Array<{ toA: UdpRelay; toB: UdpRelay }> | null;
  /** Cuts (true) or restores (false) heartbeat link i in both directions. */
  cutLink(i: number, cut: boolean): void;
  node(id: NodeId): TestNode;
  /** Both agents' last log lines, for a failure message: what they decided and why. */
  logs(chars?: number): string;
  /** GET the pair health on the floating address; null when nothing answers. */
  floatingHealth(timeoutMs?: number): Promise<{ status: number; body: { state: string; primary: string | null } } | null>;
  waitPrimary(timeoutMs?: number): Promise<NodeId>;
  stop(): Promise<void>;
}

async function getJson(url: string, timeoutMs: number): Promise<{ status: number; body: unknown } | null> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    return { status: res.status, body: await res.json() };
  } catch {
    return null;
  }
}

let addrCounter = 0;
function pickAddress(): string {
  // a /24-ish spread per test process so parallel test files never share an address
  const x = 100 + (process.pid % 100);
  const y = 10 + ((Date.now() / 1000 + addrCounter++ * 7) % 200);
  return `127.${x}.${Math.floor(y)}.1`;
}

export async function startPair(opts: PairOptions = {}): Promise<TestPair> {
  const tmp = tempDir('pairgate-pa-');
  const address = pickAddress();
  const healthPort = await freePort();
  const nLinks = opts.links ?? 1;
  const hbPorts = async () => {
    const out: number[] = [];
    for (let i = 0; i < nLinks; i++) out.push(await freePort());
    return out;
  };
  const ports = { a: { hb: await hbPorts(), admin: await freePort() }, b: { hb: await hbPorts(), admin: await freePort() } };
  let relays: Array<{ toA: UdpRelay; toB: UdpRelay }> | null = null;
  if (opts.relay) {
    relays = [];
    for (let i = 0; i < nLinks; i++) relays.push({ toA: await startRelay(ports.a.hb[i]!), toB: await startRelay(ports.b.hb[i]!) });
  }
  const timings = opts.timings ?? TEST_TIMINGS;
  const make = (id: NodeId): TestNode => {
    const peer: NodeId = id === 'a' ? 'b' : 'a';
    const pidFile = join(tmp.path, `${id}.pid`);
    const peerHb = ports[peer].hb.map((p, i) => (relays ? (peer === 'a' ? relays[i]!.toA.port : relays[i]!.toB.port) : p));
    const config = {
      pair: 'pair-t',
      node: id,
      preferred: 'a',
      logLevel: 'info',
      admin: { listen: `127.0.0.1:${ports[id].admin}` },
      heartbeat: { key: HB_KEY, listen: ports[id].hb.map((p) => `127.0.0.1:${p}`), peers: peerHb.map((p) => `127.0.0.1:${p}`), ...timings },
      fencing: { device: 'process', pidFile: join(tmp.path, `${peer}.pid`), delayMs: id === 'a' ? 0 : 400 },
      pidFile,
      floatingIp: { mode: 'loopback', address },
      healthPort,
      monitor: { intervalMs: 500 },
      ...(typeof opts[id] === 'function' ? opts[id](tmp.path) : (opts[id] ?? {})),
    };
    const configFile = join(tmp.path, `${id}.yaml`);
    writeFileSync(configFile, stringify(config));
    const adminUrl = `http://127.0.0.1:${ports[id].admin}`;
    const node: TestNode = {
      id,
      proc: null,
      configFile,
      adminUrl,
      pidFile,
      hbPort: ports[id].hb[0]!,
      async start() {
        node.proc = startProcess(`pair-agent-${id}`, process.execPath, [join(REPO, 'bin', 'pairgate.mjs'), 'pair-agent', '--config', configFile], { cwd: REPO });
        await waitFor(async () => (await node.status(500)) !== null, 30_000, `pair-agent ${id} admin API`, 100).catch((err) => {
          throw new Error(`${(err as Error).message}\n${node.proc?.output().slice(-3000)}`);
        });
      },
      async status(timeoutMs = 500) {
        if (!node.proc?.alive()) return null;
        return (await getJson(`${adminUrl}/status`, timeoutMs))?.body as AgentStatus | null;
      },
      async post(path, body) {
        const res = await fetch(`${adminUrl}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body ?? {}), signal: AbortSignal.timeout(3000) });
        return { status: res.status, body: await res.json() };
      },
      async metrics() {
        const res = await fetch(`${adminUrl}/metrics`, { signal: AbortSignal.timeout(3000) });
        return res.text();
      },
    };
    return node;
  };
  const a = make('a');
  const b = make('b');
  const pair: TestPair = {
    dir: tmp.path,
    address,
    healthPort,
    a,
    b,
    relays,
    node: (id) => (id === 'a' ? a : b),
    cutLink(i, cut) {
      if (!relays?.[i]) throw new Error(`no relay on link ${i}`);
      relays[i]!.toA.cut = cut;
      relays[i]!.toB.cut = cut;
    },
    logs(chars = 8000) {
      const tail = (n: TestNode) => `--- pair-agent ${n.id} (${n.proc?.alive() ? 'running' : 'not running'}):\n${n.proc?.output().slice(-chars) ?? '(never started)'}`;
      return `${tail(a)}\n${tail(b)}`;
    },
    async floatingHealth(timeoutMs = 300) {
      return (await getJson(`http://${address}:${healthPort}/health`, timeoutMs)) as { status: number; body: { state: string; primary: string | null } } | null;
    },
    async waitPrimary(timeoutMs = 20_000) {
      const h = await waitFor(async () => {
        const r = await pair.floatingHealth();
        return r && r.status === 200 && r.body.primary ? r.body.primary : null;
      }, timeoutMs, 'a primary serving on the floating address', 50).catch((err) => {
        // Say why: both agents' last log lines (elections, fencing, resource start errors).
        throw new Error(`${(err as Error).message}\n${pair.logs()}`);
      });
      return h as NodeId;
    },
    async stop() {
      await Promise.all([a.proc?.stop(3000), b.proc?.stop(3000)]);
      for (const r of relays ?? []) {
        await r.toA.close();
        await r.toB.close();
      }
      tmp.cleanup();
    },
  };
  await Promise.all([a.start(), b.start()]);
  return pair;
}

/**
 * Samples both nodes' roles until stopped; records every instant at which both held the resources.
 * Two status requests sent together can be answered hundreds of ms apart on a loaded machine, so
 * "a said it holds, b said it holds" does not show that both held at once (a hand-over can happen
 * between the two answers; a fresh-clone CI run at 12:17 reported exactly that, a=primary
 * b=primary, during a ping hand-over). Each sample asks one node, then the other, then the first
 * again: the first held all through the other's answer when both of its answers say it holds and
 * name the same last transition; the order alternates so that either node can be the first.
 */
export function sampleRoles(pair: TestPair, intervalMs = 40): { stop(): Promise<{ samples: number; bothHeld: string[] }> } {
  let running = true;
  const bothHeld: string[] = [];
  let samples = 0;
  const loop = (async () => {
    for (let aFirst = true; running; aFirst = !aFirst) {
      const [first, second] = aFirst ? [pair.a, pair.b] : [pair.b, pair.a];
      const before = await first.status(300);
      const other = await second.status(300);
      const after = await first.status(300);
      samples += 1;
      const heldThrough = !!before?.holds && !!after?.holds && before.lastTransition?.at === after.lastTransition?.at;
      if (heldThrough && other?.holds && pair.a.proc?.alive() && pair.b.proc?.alive()) {
        bothHeld.push(`${new Date().toISOString()} ${aFirst ? 'a' : 'b'}=${after!.state} (held through) ${aFirst ? 'b' : 'a'}=${other.state}`);
      }
      await sleep(intervalMs);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return { samples, bothHeld };
    },
  };
}

export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-z_]+)(\{[^}]*\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const l = m[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => l.includes(`${k}="${v}"`))) total += Number(m[3]);
  }
  return total;
}
