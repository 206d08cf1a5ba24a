/**
 * Failover of the store with the pair agent on the replicated volume (protocol C): LMTP
 * deliveries run continuously against the floating address while the primary is SIGKILLed; the
 * standby fences it, promotes its own copy of the volume and recovers the store from it. Every
 * acknowledged delivery is there with the same UID and UIDVALIDITY (read back through POP3
 * UIDL, which encodes both). Then the killed node comes back, resyncs as secondary, and the
 * resources are handed back to it: the store it recovers from the resynced copy holds every
 * acknowledged message too (including those delivered while it was away). Last, the replication
 * link is cut under the primary while deliveries run, and the primary is killed: the standby,
 * outdated at the primary's request, must not serve its old copy (the deliveries acknowledged
 * after the cut exist only on the killed node); the killed node comes back and serves them all.
 * (The shared-disk mode's failover is covered by pair-agent-store.test.ts.)
 */
import { createHash } from 'node:crypto';
import net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, relayedLinkPorts, sleep, waitFor, type TcpRelay } from '../helpers/net.ts';
import { startPair, type NodeId, type TestPair } from './pair-agent-harness.ts';
import { volumeStatusAt } from './volume-harness.ts';

const MASTER = { user: 'proxy-master', secret: 'master-secret-123' };
const USERS = ['fa', 'fb', 'fc'];
/** Bound on the deliveries of one delivery loop (the test waits for far fewer). */
const MAX_PER_LOOP = 2000;
let pair: TestPair;
let ports: { lmtp: number; pop3: number; imap: number };
const volPorts = { a: { repl: 0, admin: 0 }, b: { repl: 0, admin: 0 } };
/** a's replication link to b runs through this relay (a dials: its address sorts lowest), so that a test can cut it. */
let relay: TcpRelay;
let refusing = false;
const addr = (port: number) => `127.0.0.1:${port}`;

beforeAll(async () => {
  ports = { lmtp: await freePort(), pop3: await freePort(), imap: await freePort() };
  const link = await relayedLinkPorts({ refuse: () => refusing });
  relay = link.relay;
  for (const id of ['a', 'b'] as const) volPorts[id] = { repl: link[id], admin: await freePort() };
  expect(addr(volPorts.a.repl) < addr(relay.port) && addr(volPorts.a.repl) < addr(volPorts.b.repl)).toBe(true);
  const node = (id: NodeId) => (dir: string) => {
    return {
      volume: {
        name: 'pair-t-mail',
        dataFile: join(dir, `${id}.data`),
        metaFile: join(dir, `${id}.meta`),
        sizeBytes: 32 * 1024 * 1024,
        listen: addr(volPorts[id].repl),
        peer: id === 'a' ? addr(relay.port) : addr(volPorts.a.repl),
        secret: 'store-failover-volume-secret',
        protocol: 'C',
        pingIntervalMs: 100,
        pingTimeoutMs: 500,
        reconnectMs: 100,
        admin: { host: '127.0.0.1', port: volPorts[id].admin },
      },
      store: { ports, masterUser: MASTER.user, masterSecret: MASTER.secret, compactBytesPerSec: 0, checkpointBytes: 1024 * 1024 },
    };
  };
  pair = await startPair({ a: node('a'), b: node('b') });
}, 60_000);

afterAll(async () => {
  await stopLoops(); // a failed step may leave delivery loops running
  await pair?.stop();
  await relay?.close();
});

const volumeStatus = (id: NodeId) => volumeStatusAt(`http://127.0.0.1:${volPorts[id].admin}`);

/** A line client for SMTP-style replies (multi-line replies folded to their last line). */
function lineClient(sock: net.Socket) {
  let buf = '';
  let closed = false;
  let wake: (() => void) | null = null;
  sock.on('data', (d: Buffer) => {
    buf += d.toString('latin1');
    wake?.();
  });
  sock.on('close', () => {
    closed = true;
    wake?.();
  });
  sock.on('error', () => undefined);
  return {
    /** Next reply line (`smtp`: skips continuation lines); null when the connection ends or 5 s pass. */
    async next(smtp = true): Promise<string | null> {
      const deadline = Date.now() + 5000;
      for (;;) {
        const i = buf.indexOf('\r\n');
        if (i >= 0) {
          const l = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (smtp && /^\d{3}-/.test(l)) continue;
          return l;
        }
        if (closed || Date.now() > deadline) return null;
        await new Promise<void>((r) => {
          const t = setTimeout(r, 100);
          wake = () => {
            clearTimeout(t);
            r();
          };
        });
      }
    },
    /** Everything up to the POP3 multi-line terminator. */
    async multi(): Promise<string | null> {
      const deadline = Date.now() + 5000;
      for (;;) {
        const i = buf.indexOf('\r\n.\r\n');
        if (i >= 0) {
          const t = buf.slice(0, i);
          buf = buf.slice(i + 5);
          return t;
        }
        if (closed || Date.now() > deadline) return null;
        await new Promise<void>((r) => {
          const t = setTimeout(r, 100);
          wake = () => {
            clearTimeout(t);
            r();
          };
        });
      }
    },
  };
}

async function connect(port: number): Promise<net.Socket> {
  const sock = net.connect({ host: pair.address, port });
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  return sock;
}

/** POP3 UIDL of a user's maildrop through the master login: uidl strings (with `subjects`, each message's Subject too). */
async function uidls(user: string, subjects?: Map<string, string>): Promise<string[]> {
  const sock = await connect(ports.pop3);
  const c = lineClient(sock);
  try {
    await c.next(false);
    sock.write(`AUTH PLAIN ${Buffer.from(`${user}\0${MASTER.user}\0${MASTER.secret}`).toString('base64')}\r\n`);
    const ok = await c.next(false);
    if (!ok?.startsWith('+OK')) throw new Error(`POP3 login: ${ok}`);
    sock.write('UIDL\r\n');
    const text = await c.multi();
    if (text === null) throw new Error('UIDL cut short');
    const list = text.split('\r\n').slice(1).map((l) => l.split(' ')[1]!);
    if (subjects) {
      for (let i = 0; i < list.length; i++) {
        sock.write(`TOP ${i + 1} 0\r\n`);
        const head = await c.multi();
        subjects.set(list[i]!, /Subject: (\S+)/.exec(head ?? '')?.[1] ?? '');
      }
    }
    return list;
  } finally {
    sock.destroy();
  }
}

/** One LMTP delivery of `body` (already CRLF, no lone dots at line starts) to `user`; resolves with the 250 reply. */
async function deliverOne(user: string, body: string): Promise<string | null> {
  const sock = await connect(ports.lmtp);
  const c = lineClient(sock);
  try {
    await c.next();
    sock.write('LHLO big\r\n');
    await c.next();
    sock.write(`MAIL FROM:<s@example.net>\r\nRCPT TO:<${user}@pair-t>\r\nDATA\r\n`);
    for (let i = 0; i < 3; i++) await c.next();
    sock.write(`${body}\r\n.\r\n`);
    return await c.next();
  } finally {
    sock.destroy();
  }
}

/** RETR 1 of a maildrop through the master login: the message as served (dot-unstuffing not needed: no line starts with a dot). */
async function retrFirst(user: string): Promise<string | null> {
  const sock = await connect(ports.pop3);
  const c = lineClient(sock);
  try {
    await c.next(false);
    sock.write(`AUTH PLAIN ${Buffer.from(`${user}\0${MASTER.user}\0${MASTER.secret}`).toString('base64')}\r\n`);
    await c.next(false);
    sock.write('RETR 1\r\n');
    const text = await c.multi();
    return text === null ? null : text.slice(text.indexOf('\r\n') + 2);
  } finally {
    sock.destroy();
  }
}

/** The acknowledged deliveries of each user must be in the maildrop with the same UID (and one UIDVALIDITY, the one seen before). */
async function expectAllPresent(acked: Array<{ user: string; uid: number; id: string }>, uvBefore: Map<string, string>, when: string): Promise<void> {
  for (const u of USERS) {
    const subjects = new Map<string, string>();
    const list = await uidls(u, subjects);
    const byUid = new Map(list.map((x) => [parseInt(x.slice(0, 8), 16), subjects.get(x)]));
    const uv = new Set(list.map((x) => x.slice(8)));
    expect(uv.size, `${u}: one UIDVALIDITY ${when}`).toBe(1);
    if (uvBefore.has(u)) expect([...uv][0], `${u}: UIDVALIDITY ${when}`).toBe(uvBefore.get(u));
    // Same UID, same message: a lost delivery whose UID was handed out again would show here.
    const missing = acked.filter((a) => a.user === u && byUid.get(a.uid) !== a.id);
    expect(missing, `${u}: acknowledged UIDs missing ${when}`).toEqual([]);
  }
}

/** Shared by the two steps below (the second continues the first's pair). */
const acked: Array<{ user: string; uid: number; id: string }> = [];
const uvBefore = new Map<string, string>();
let stop = false;
let loops: Array<Promise<void>> = [];
let failedOver = false;
let handedBack = false;

/** One delivery stream: acknowledged deliveries go to `acked`; bounded by MAX_PER_LOOP and by `stop`. */
const deliverLoop = async (w: number) => {
  let n = 0;
  while (!stop && n < MAX_PER_LOOP) {
    let sock: net.Socket;
    try {
      sock = await connect(ports.lmtp);
    } catch {
      n++; // a refused connection (no primary for a moment) counts towards the bound as well
      await new Promise((r) => setTimeout(r, 100));
      continue;
    }
    const c = lineClient(sock);
    const greeted = (await c.next()) !== null && sock.write('LHLO failover\r\n');
    if (!greeted || !(await c.next())) {
      sock.destroy();
      n++;
      continue;
    }
    while (!stop && n < MAX_PER_LOOP) {
      const user = USERS[(w + n) % USERS.length]!;
      const id = `fo-${w}-${n++}`;
      sock.write(`MAIL FROM:<s@example.net>\r\nRCPT TO:<${user}@pair-t>\r\nDATA\r\n`);
      const a = await c.next();
      const b = await c.next();
      const d = await c.next();
      if (!a || !b || !d) break;
      sock.write(`X-Pairgate-Delivery-Id: ${id}\r\nSubject: ${id}\r\n\r\nbody of ${id}\r\n.\r\n`);
      const r = await c.next();
      if (!r) break;
      const m = /^250 .*uid=(\d+)/.exec(r);
      if (m) acked.push({ user, uid: Number(m[1]), id });
      // paced: a steady stream, not a flood that fills the 32 MiB volume
      await new Promise((r) => setTimeout(r, 5));
    }
    sock.destroy();
  }
};

async function stopLoops(): Promise<void> {
  stop = true;
  await Promise.all(loops);
  loops = [];
}

describe('store failover with the pair agent on the replicated volume (protocol C)', () => {
  it('every acknowledged delivery keeps its UID and UIDVALIDITY after a SIGKILL of the primary', async () => {
    expect(await pair.waitPrimary()).toBe('a');
    await waitFor(async () => (await volumeStatus('a'))?.role === 'primary' && (await volumeStatus('b'))?.connection === 'Connected', 15_000, 'a primary volume, b connected');
    expect((await volumeStatus('a'))?.protocol).toBe('C');
    // A message larger than one replication frame (1 MiB): the store splits its log writes.
    const line = 'a body line of a large message, repeated to make it big, 64 chars.\r\n';
    const bigBody = `Subject: big\r\n\r\n${line.repeat(Math.ceil((2.5 * 1024 * 1024) / line.length))}`;
    const bigReply = await deliverOne('fbig', bigBody);
    expect(bigReply).toMatch(/^250 /);
    loops = [0, 1].map(deliverLoop);
    await waitFor(() => acked.length >= 30, 20_000, '30 deliveries before the kill');
    for (const u of USERS) {
      const l = await uidls(u);
      if (l.length) uvBefore.set(u, l[0]!.slice(8));
    }
    pair.a.proc!.kill('SIGKILL');
    await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'b', 20_000, 'b primary');
    expect((await volumeStatus('b'))?.role).toBe('primary');
    // Deliveries resume on b; let a few go through, then stop.
    const atFailover = acked.length;
    await waitFor(() => acked.length >= atFailover + 10, 20_000, 'deliveries on the new primary');
    await stopLoops();
    await expectAllPresent(acked, uvBefore, 'after the failover to b');
    const sha = (t: string) => createHash('sha256').update(t).digest('hex');
    expect(sha((await retrFirst('fbig')) ?? ''), 'the 2.5 MiB message after the failover').toBe(sha(bigBody));
    failedOver = true;
    console.log(`store failover on the replicated volume: ${acked.length} acknowledged deliveries (${atFailover} before the kill) all present with their UIDs on b`);
  }, 90_000);

  it('the killed node resyncs; after a handback its store holds every acknowledged message too', async (ctx) => {
    if (!failedOver) ctx.skip();
    const onB = acked.length;
    // a comes back: secondary, resynced from b (it missed what b took while it was away).
    await pair.a.start();
    await waitFor(
      async () => {
        const [sa, sb] = [await volumeStatus('a'), await volumeStatus('b')];
        return sa?.role === 'secondary' && sa.connection === 'Connected' && sa.disk === 'UpToDate' && sb?.outOfSyncBytes === 0;
      },
      30_000,
      'a back as an UpToDate secondary',
    );
    // Hand the resources back to a while deliveries run again: a's store opens on the resynced copy.
    stop = false;
    loops = [2, 3].map(deliverLoop);
    try {
    await waitFor(() => acked.length >= onB + 10, 20_000, 'deliveries before the handback');
    const res = await pair.b.post('/standby');
    expect(res.status).toBe(200);
    await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'a', 30_000, 'a primary again').catch(async (err) => {
      const tail = (t: string | undefined) => (t ?? '').split('\n').filter((l) => /"msg":"(state change|operator[^"]*|volume: [^"]*|resource [^"]*|[^"]*fail[^"]*)"/.test(l) && !l.includes('delivery failed')).slice(-30).join('\n');
      const [va, vb] = [await volumeStatus('a'), await volumeStatus('b')];
      const st = JSON.stringify({ a: await pair.a.status(), b: await pair.b.status(), va, vb });
      // The known way this fails (2026-12-06): the resync source never refreshes its record of the
      // peer's disk after the resync, and the agent's election reads the disk from the link.
      const stale = va?.disk === 'UpToDate' && vb?.peer?.disk === 'Inconsistent' ? "\nb's volume still reports its peer's disk Inconsistent although a's volume is UpToDate: the agent refuses to hand over to a stale disk" : '';
      throw new Error(`${(err as Error).message}${stale}\n${st}\n--- a ---\n${tail(pair.a.proc?.output())}\n--- b ---\n${tail(pair.b.proc?.output())}`);
    });
    const atHandback = acked.length;
    await waitFor(() => acked.length >= atHandback + 10, 20_000, 'deliveries on a after the handback');
    } finally {
      await stopLoops();
    }
    await expectAllPresent(acked, uvBefore, 'after the handback to a');
    console.log(`store handback: ${acked.length} acknowledged deliveries (${onB} before a came back) all present with their UIDs on a`);
    handedBack = true;
  }, 120_000);

  it('the replication link cut under the primary, then the primary killed: the outdated standby never serves its old copy; the primary back serves every acknowledged delivery', async (ctx) => {
    if (!handedBack) ctx.skip();
    await waitFor(async () => (await volumeStatus('b'))?.connection === 'Connected' && (await volumeStatus('b'))?.disk === 'UpToDate', 15_000, 'b an UpToDate secondary');
    stop = false;
    loops = [4, 5].map(deliverLoop);
    try {
      const beforeCut = acked.length;
      await waitFor(() => acked.length >= beforeCut + 10, 20_000, 'deliveries before the cut');
      refusing = true;
      for (const c of relay.clients) c.destroy();
      // b marks its copy Outdated at a's request; a's held writes go on, alone.
      await waitFor(async () => (await volumeStatus('b'))?.disk === 'Outdated', 5000, "b's copy Outdated");
      const atCut = acked.length;
      await waitFor(() => acked.length >= atCut + 20, 20_000, 'deliveries on a alone after the cut');
      const aloneAcked = acked.length - atCut;
      pair.a.proc!.kill('SIGKILL');
      await pair.a.proc!.exited;
      // Deliveries acknowledged after the cut are on a's disk only: b must not serve.
      const seen = new Set<string>();
      const until = Date.now() + 3000;
      while (Date.now() < until) {
        const [sb, vb, h] = [await pair.b.status(), await volumeStatus('b'), await pair.floatingHealth(200)];
        if (sb && sb.state !== 'standby') seen.add(`b ${sb.state}`);
        if (vb && vb.role !== 'secondary') seen.add(`b's volume ${vb.role}`);
        if (h) seen.add(`something serves the floating address (primary ${h.body.primary})`);
        await sleep(100);
      }
      expect([...seen], pair.logs()).toEqual([]);
      // a comes back (the link still cut) and serves again from its own copy: every delivery is there.
      await pair.a.start();
      await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'a', 30_000, 'a primary again').catch((err: Error) => {
        throw new Error(`${err.message}\n${pair.logs()}`);
      });
      const back = acked.length;
      await waitFor(() => acked.length >= back + 10, 20_000, 'deliveries on a after its return');
      // The link back: b resyncs from a.
      refusing = false;
      await waitFor(async () => (await volumeStatus('b'))?.disk === 'UpToDate' && (await volumeStatus('b'))?.connection === 'Connected', 30_000, 'b resynced');
      console.log(`link cut, then the primary killed: ${aloneAcked} deliveries acknowledged on a alone; b stayed standby (Outdated); ${acked.length} in all present on a after its return`);
    } finally {
      await stopLoops();
    }
    await expectAllPresent(acked, uvBefore, 'after the link cut and the kill of a');
  }, 150_000);
});
