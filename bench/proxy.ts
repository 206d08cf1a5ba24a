/**
 * bench/proxy: the proxy tier against its baselines, interleaved in the same run.
 *
 *   npm run bench -- proxy [--seconds 4] [--rounds 3] [--warmup 3] [--concurrency 32] [--big-mib 10] [--idle 5000]
 *                          [--idle-backend store|dovecot] [--paths direct,pairgate,...] [--compare-tree DIR] [--node-relay]
 *                          [--instant-pair] [--relay native|javascript] [--idle-noop-seconds 5]
 *
 * Paths measured, all to the same Dovecot (the pair's backend) on this machine:
 *   - direct: clients log in to Dovecot themselves;
 *   - pairgate: through `pairgate proxy` (a child process: LDIF directory, LDAP-style bind,
 *     health polling, master login with ID/XCLIENT forwarding, splice);
 *   - haproxy: HAProxy in TCP mode (an L4 relay: no login handling, the floor for any proxy);
 *   - nginx: nginx's mail proxy (libnginx-mod-mail) with an auth_http endpoint answering from
 *     the same directory;
 *   - perdition: Perdition (Debian package) in the foreground, one process per protocol, with
 *     its posix_regex map (the LDAP map is a separate package, perdition-ldap, not installed
 *     here, and it wants the server's address in the user's own entry, which pairgate's
 *     directory keeps on the pair entry instead);
 *   nginx and Perdition are skipped with a note when not installed.
 * Figures: IMAP sessions/s (connect, LOGIN, SELECT, FETCH 1 BODY[], LOGOUT) and POP3
 * sessions/s (connect, USER/PASS, STAT, RETR 1, QUIT) at --concurrency; bulk FETCH of a
 * --big-mib message (MiB/s); proxy RSS per idle proxied IMAP session (--idle sessions open), then
 * the proxy's CPU per 1,000 keep-alive NOOPs over 1,000 open sessions (in a proxy without the idle
 * run's forced GCs; --idle-noop-seconds at 1,000 a second: what a proxy holding many IDLE clients
 * mostly does). --relay sets `relay` in this tree's proxies' config (native or javascript; default:
 * the config's, native), for an A/B of the two.
 * The idle sessions end at pairgate's own store IMAP server (one process, in this bench's
 * process) by default: each Dovecot session costs an imap process, which caps what the
 * machine holds far below 5,000; `--idle-backend dovecot` measures against Dovecot instead.
 * Targets (issue 7): bulk >= 0.8x direct; <= 40 KiB per idle session; session rate >= 1.0x
 * nginx's mail proxy (reported against HAProxy when nginx is not installed, as information).
 * An information line sums, per path, the CPU one session costs Dovecot, the proxy and the bench
 * process (clients; for nginx its auth_http endpoint too): the rounds are CPU-bound, so the ratio
 * of those sums is the rate ratio that these costs imply. Load moves it less than it moves single
 * rounds' rates (+-10 %), but not to nothing: Dovecot's own CPU per session rises on a busy machine.
 * Ends with one JSON line.
 *
 * Warm-up: before the rounds, every path serves --warmup seconds of IMAP and then of POP3 sessions
 * at --concurrency, not measured (default 3; 0 = one session of each, as before 2026-12-06 08:30).
 * A proxy runs for days; without it, pairgate's figures are those of its first ~1,000 sessions,
 * which V8 runs partly unoptimised (its CPU per session fell ~40 % from the first round to the
 * third in a 3-round run, 08:08), while nginx and HAProxy are compiled ahead of time. The same
 * warm-up is given to every path, Dovecot included. 3 s is not the steady state either (with it,
 * the first round still cost ~1.4x the third at 08:23): it takes off the coldest sessions only.
 *
 * Diagnosis options (the default run measures everything): --paths limits the rate rounds and
 * the bulk FETCH to the named paths (targets are printed only for the paths present);
 * --compare-tree DIR[,DIR…] adds a path `pairgate@<folder name>` per folder, the proxy served
 * from another checkout of pairgate (e.g. `git archive HEAD | tar -x -C DIR` with node_modules
 * linked), interleaved with this tree's in the same rounds: an A/B of a change that the
 * machine's load hits alike; `js:DIR` serves it from DIR's compiled bench/proxy.js with plain node
 * (no tsx: DIR holds tsc's output beside the .ts, made with `npx tsc -p . --noEmit false
 * --allowImportingTsExtensions false --rewriteRelativeImportExtensions`; path `pairgate@<folder name>-js`). --node-relay
 * adds a path `node-relay`: a bare Node relay in its own
 * process (plain JavaScript, no TypeScript loader: accept, connect to Dovecot, stream.pipe both
 * ways, no login handling; clients log in with their own password as through HAProxy), the
 * floor of what any proxy written on Node's net/stream API costs per session on this machine;
 * and, when the native relay is built, a path `node-native-relay`: the same accept and connect,
 * then both sockets lent to pairgate's native relay (common/native/relay.c) at once, so that the
 * event loop wakes for a session's accept, connect and end only: the floor of a Node proxy that
 * hands its sessions to that relay, with no login work at all.
 * --instant-pair replaces Dovecot with a pair that answers every command at once (a small Node
 * script: the master login, SELECT, FETCH of a 2 KiB message, LOGOUT, the POP3 equivalents): the
 * proxies' own CPU per session at 1,000-2,000 sessions/s instead of diluted in Dovecot's ~45 ms, for
 * A/B of proxy changes in a minute (nginx, Perdition, bulk and idle are left out; never "met").
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { join, dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { silentLogger, createLogger } from '../common/log.ts';
import { loadConfigFile } from '../common/config.ts';
import type { Directory, PairRecord } from '../directory/types.ts';
import { startProxy, proxyConfigSchema } from '../proxy/index.ts';
import { haveDirectory, openDirectory, tableDirectory } from '../test/integration/proxy-harness.ts';
import { startDovecot, type Dovecot } from '../test/helpers/dovecot.ts';
import { startHarness, MASTER as STORE_MASTER } from '../test/integration/imap-harness.ts';
import { freePort, waitForPort } from '../test/helpers/net.ts';
import { tempDir } from '../test/helpers/proc.ts';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '32' },
    'big-mib': { type: 'string', default: '10' },
    idle: { type: 'string', default: '5000' },
    'idle-backend': { type: 'string', default: 'store' },
    help: { type: 'boolean', default: false },
    'serve-proxy': { type: 'string' },
    paths: { type: 'string' },
    'compare-tree': { type: 'string' },
    'node-relay': { type: 'boolean', default: false },
    'instant-pair': { type: 'boolean', default: false },
    relay: { type: 'string' },
    'idle-noop-seconds': { type: 'string', default: '5' },
  },
});
if (args.help) {
  process.stdout.write(readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]!.replace(/^\/\*\*|^ \* ?/gm, '') + '\n');
  process.exit(0);
}
const SECONDS = Number(args.seconds);
const ROUNDS = Math.max(1, Number(args.rounds));
const WARMUP = Math.max(0, Number(args.warmup));
const CONCURRENCY = Number(args.concurrency);
const BIG_MIB = Number(args['big-mib']);
const IDLE = Number(args.idle);
const IDLE_BACKEND = args['idle-backend'] === 'dovecot' ? 'dovecot' : 'store';
const ONLY_PATHS = args.paths ? new Set(args.paths.split(',').map((s) => s.trim())) : null;
const COMPARE_TREES = args['compare-tree'] ? args['compare-tree'].split(',').filter(Boolean) : [];
const NODE_RELAY = args['node-relay'];
const INSTANT_PAIR = args['instant-pair'];
/** proxy.relay for this tree's proxies (other trees keep their default); unset = the config default. */
const RELAY = args.relay === 'native' || args.relay === 'javascript' ? args.relay : undefined;
if (args.relay !== undefined && !RELAY) throw new Error(`--relay must be native or javascript, not ${args.relay}`);
const IDLE_NOOP_SECONDS = Math.max(0, Number(args['idle-noop-seconds']));
/** Keep-alive rate of the open idle sessions in the NOOP phase (NOOPs a second, all sessions together). */
const IDLE_NOOP_RATE = 1000;
const IDLE_NOOP_SESSIONS = 1000;

/**
 * The --instant-pair backend: `node -e INSTANT_PAIR_SCRIPT IMAP_PORT POP3_PORT`, a pair that answers
 * every command of the bench's sessions and of the master login at once (no mailbox, no processes).
 */
const INSTANT_PAIR_SCRIPT = `
const net = require('node:net');
const [imapPort, pop3Port] = process.argv.slice(1).map(Number);
const body = 'From: a@example.net\\r\\nSubject: s\\r\\n\\r\\n' + 'x'.repeat(2000) + '\\r\\n';
const caps = 'IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+';
function serve(port, greeting, answer) {
  net.createServer((s) => {
    s.setNoDelay(true);
    s.on('error', () => {});
    s.write(greeting);
    let buf = '';
    s.on('data', (d) => {
      buf += d.toString('latin1');
      let out = '';
      for (let i; (i = buf.indexOf('\\r\\n')) >= 0; ) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const [text, last] = answer(line);
        out += text;
        if (last) return void s.end(out);
      }
      if (out) s.write(out);
    });
  }).listen(port, '127.0.0.1');
}
serve(imapPort, '* OK [CAPABILITY ' + caps + ' AUTH=PLAIN] ready.\\r\\n', (line) => {
  const [tag, cmd = ''] = line.split(' ');
  switch (cmd.toUpperCase()) {
    case 'ID': return ['* ID NIL\\r\\n' + tag + ' OK ID completed.\\r\\n'];
    case 'LOGIN': case 'AUTHENTICATE': return [tag + ' OK [CAPABILITY ' + caps + ' SORT THREAD=REFERENCES UIDPLUS MOVE] Logged in\\r\\n'];
    case 'SELECT': return ['* FLAGS (\\\\Seen)\\r\\n* 2 EXISTS\\r\\n* 0 RECENT\\r\\n* OK [UIDVALIDITY 1] UIDs valid\\r\\n' + tag + ' OK [READ-WRITE] Select completed.\\r\\n'];
    case 'FETCH': return ['* 1 FETCH (BODY[] {' + body.length + '}\\r\\n' + body + ')\\r\\n' + tag + ' OK Fetch completed.\\r\\n'];
    case 'LOGOUT': return ['* BYE Logging out\\r\\n' + tag + ' OK Logout completed.\\r\\n', true];
    default: return [tag + ' OK\\r\\n'];
  }
});
serve(pop3Port, '+OK ready\\r\\n', (line) => {
  switch (line.split(' ')[0].toUpperCase()) {
    case 'STAT': return ['+OK 2 4000\\r\\n'];
    case 'RETR': return ['+OK ' + body.length + ' octets\\r\\n' + body + '.\\r\\n'];
    case 'QUIT': return ['+OK Logging out.\\r\\n', true];
    default: return ['+OK\\r\\n'];
  }
});
process.on('SIGTERM', () => process.exit(0));
`;

/** The --node-relay process: `node -e NODE_RELAY_SCRIPT LISTEN_PORT TARGET_PORT ...` (pairs of ports). */
const NODE_RELAY_SCRIPT = `
const net = require('node:net');
const ports = process.argv.slice(1).map(Number);
for (let i = 0; i < ports.length; i += 2) {
  const target = ports[i + 1];
  net.createServer((c) => {
    c.setNoDelay(true);
    const b = net.connect({ host: '127.0.0.1', port: target });
    b.setNoDelay(true);
    c.pipe(b).pipe(c);
    c.on('error', () => b.destroy());
    b.on('error', () => c.destroy());
  }).listen(ports[i], '127.0.0.1');
}
process.on('SIGTERM', () => process.exit(0));
`;
/**
 * The native-relay floor: `node -e NATIVE_RELAY_FLOOR_SCRIPT ADDON LISTEN_PORT TARGET_PORT ...`.
 * Accept, connect, lend both fds to the relay (Node's reads stopped, as common/native-relay.ts
 * does), close both when the relay gives them back.
 */
const NATIVE_RELAY_FLOOR_SCRIPT = `
const net = require('node:net');
const [addonPath, ...rest] = process.argv.slice(1);
const relay = require(addonPath);
const ports = rest.map(Number);
const lent = new Map();
relay.start((id) => {
  const pair = lent.get(id);
  lent.delete(id);
  if (pair) for (const s of pair) s.destroy();
});
const stopReads = (s) => { s.pause(); s._handle.readStop(); s._handle.reading = false; };
for (let i = 0; i < ports.length; i += 2) {
  const target = ports[i + 1];
  net.createServer((c) => {
    c.setNoDelay(true);
    c.on('error', () => undefined);
    const b = net.connect({ host: '127.0.0.1', port: target, noDelay: true });
    b.pause();
    b.on('error', () => c.destroy());
    b.once('connect', () => {
      if (c.destroyed || c.readableLength > 0) { c.destroy(); b.destroy(); return; }
      let id;
      try {
        id = relay.attach(c._handle.fd, b._handle.fd, 0, 5000);
      } catch {
        c.destroy();
        b.destroy();
        return;
      }
      stopReads(c);
      stopReads(b);
      lent.set(id, [c, b]);
    });
  }).listen(ports[i], '127.0.0.1');
}
process.on('SIGTERM', () => process.exit(0));
`;
const NATIVE_RELAY_ADDON = join(dirname(fileURLToPath(import.meta.url)), '..', 'common', 'native', 'build', 'Release', 'pairgate_relay.node');
const USERS = 40;
const MASTER = 'pgmaster';
const MASTER_SECRET = randomBytes(8).toString('hex');

const user = (i: number) => `bench${i}`;
const pass = (i: number) => `pw-${i}`;

/** Sends one command and resolves with everything up to and including the tagged reply (or the POP3 terminator). */
class Conn {
  private chunks: Buffer[] = [];
  private size = 0;
  private want: ((buf: Buffer) => boolean) | null = null;
  private done: ((b: Buffer) => void) | null = null;
  private fail: ((e: Error) => void) | null = null;
  bytes = 0;
  constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.bytes += d.length;
      this.chunks.push(d);
      this.size += d.length;
      this.check();
    });
    socket.on('error', (e) => this.fail?.(e));
    socket.on('close', () => this.fail?.(new Error('closed')));
  }
  static open(port: number): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.setNoDelay(true);
      s.once('connect', () => resolve(new Conn(s)));
      s.once('error', reject);
    });
  }
  private check(): void {
    if (!this.want) return;
    // Only the tail matters for the end markers; keep whole buffers for small replies.
    const tail = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks.slice(-2));
    if (this.want(tail) || (this.size < 65536 && this.want(Buffer.concat(this.chunks)))) {
      const all = this.size < 65536 ? Buffer.concat(this.chunks) : tail;
      this.chunks = [];
      this.size = 0;
      const d = this.done!;
      this.want = null;
      this.done = null;
      this.fail = null;
      d(all);
    }
  }
  wait(pred: (buf: Buffer) => boolean, timeoutMs = 30_000): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('bench wait timed out')), timeoutMs);
      this.want = pred;
      this.done = (b) => {
        clearTimeout(t);
        resolve(b);
      };
      this.fail = (e) => {
        clearTimeout(t);
        reject(e);
      };
      this.check();
    });
  }
  async cmd(line: string, end: (buf: Buffer) => boolean): Promise<Buffer> {
    const p = this.wait(end);
    this.socket.write(`${line}\r\n`);
    return p;
  }
  close(): void {
    this.socket.destroy();
  }
}

const tagged = (tag: string) => (b: Buffer) => b.includes(`\r\n${tag} `) || b.subarray(0, tag.length + 1).toString() === `${tag} `;
const lineEnd = (b: Buffer) => b.includes('\r\n');
const multiEnd = (b: Buffer) => b.subarray(-5).toString() === '\r\n.\r\n' || b.toString('latin1', 0, 4) === '-ERR';

async function imapSession(port: number, i: number): Promise<void> {
  const c = await Conn.open(port);
  try {
    await c.wait(lineEnd);
    const r = await c.cmd(`a LOGIN ${user(i)} ${pass(i)}`, tagged('a'));
    if (!/\ba OK/.test(r.toString())) throw new Error(`login failed: ${r.toString().slice(0, 200)}`);
    await c.cmd('b SELECT INBOX', tagged('b'));
    await c.cmd('c FETCH 1 BODY[]', tagged('c'));
    await c.cmd('d LOGOUT', tagged('d'));
  } finally {
    c.close();
  }
}

async function pop3Session(port: number, i: number): Promise<void> {
  const c = await Conn.open(port);
  try {
    await c.wait(lineEnd);
    await c.cmd(`USER ${user(i)}`, lineEnd);
    const r = await c.cmd(`PASS ${pass(i)}`, lineEnd);
    if (!r.toString().startsWith('+OK')) throw new Error(`pop3 login failed: ${r.toString().slice(0, 200)}`);
    await c.cmd('STAT', lineEnd);
    await c.cmd('RETR 1', multiEnd);
    await c.cmd('QUIT', lineEnd);
  } finally {
    c.close();
  }
}

async function rate(kind: 'imap' | 'pop3', port: number, seconds = SECONDS): Promise<{ perSec: number; errors: number; sessions: number }> {
  const deadline = Date.now() + seconds * 1000;
  let n = 0;
  let errors = 0;
  let next = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (Date.now() < deadline && errors < 1000) {
        const i = next++ % USERS;
        try {
          await (kind === 'imap' ? imapSession(port, i) : pop3Session(port, i));
          n++;
        } catch {
          errors++;
        }
      }
    }),
  );
  return { perSec: n / seconds, errors, sessions: n };
}

/**
 * Bulk FETCH of the big message, paths interleaved per repetition, best repetition per path kept.
 * `cpu(k)` reads the CPU time (ms) of path k's proxy: what it spent over all repetitions is
 * returned per MiB relayed (NaN for a path without a proxy process).
 */
async function bulk(ports: number[], cpu: (k: number) => number | null, reps = 5): Promise<{ best: number[]; cpuMsPerMiB: number[] }> {
  const conns: Conn[] = [];
  try {
    for (const port of ports) {
      const c = await Conn.open(port);
      conns.push(c);
      await c.wait(lineEnd);
      await c.cmd(`a LOGIN ${user(0)} ${pass(0)}`, tagged('a'));
      await c.cmd('b SELECT INBOX', tagged('b'));
    }
    const best = ports.map(() => 0);
    const cpuMs = ports.map(() => 0);
    const mib = ports.map(() => 0);
    for (let r = 0; r < reps; r++) {
      for (const [k, c] of conns.entries()) {
        const before = c.bytes;
        const cpu0 = cpu(k);
        const t0 = process.hrtime.bigint();
        await c.cmd(`f${r} FETCH 2 BODY.PEEK[]`, tagged(`f${r}`));
        const sec = Number(process.hrtime.bigint() - t0) / 1e9;
        const cpu1 = cpu(k);
        if (cpu0 !== null && cpu1 !== null) cpuMs[k]! += cpu1 - cpu0;
        mib[k]! += (c.bytes - before) / 1024 / 1024;
        best[k] = Math.max(best[k]!, (c.bytes - before) / 1024 / 1024 / sec);
      }
    }
    return { best, cpuMsPerMiB: ports.map((_p, k) => (cpu(k) === null ? NaN : cpuMs[k]! / mib[k]!)) };
  } finally {
    for (const c of conns) c.close();
  }
}

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
  } catch {
    return 100;
  }
})();

/**
 * CPU time (ms, user + system, including reaped children) of processes and all their
 * descendants: what a proxy spent, whatever else loads the machine. Perdition's per-connection
 * children are counted once reaped (cutime/cstime of their parent); nginx's worker as a descendant.
 */
function cpuMs(roots: number[], part: 'all' | 'user' | 'system' = 'all'): number {
  const procs: Array<{ pid: number; ppid: number; ticks: number }> = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // Fields after the command: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
      const user = Number(f[11]) + Number(f[13]);
      const system = Number(f[12]) + Number(f[14]);
      procs.push({ pid: Number(name), ppid: Number(f[1]), ticks: part === 'user' ? user : part === 'system' ? system : user + system });
    } catch {
      // gone meanwhile
    }
  }
  const inTree = new Set(roots);
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of procs) if (!inTree.has(p.pid) && inTree.has(p.ppid)) (inTree.add(p.pid), (grew = true));
  }
  return (procs.filter((p) => inTree.has(p.pid)).reduce((a, p) => a + p.ticks, 0) * 1000) / CLK_TCK;
}

/** Opens up to `n` logged-in IMAP sessions through the proxy (20 at a time, bounded to 180 s). */
async function openIdleSessions(port: number, n: number): Promise<{ conns: Conn[]; opened: number; failed: number }> {
  const conns: Conn[] = [];
  const deadline = Date.now() + 180_000;
  let failed = 0;
  let opened = 0;
  for (let k = 0; k < n && Date.now() < deadline && failed < 100; k += 20) {
    await Promise.all(
      Array.from({ length: Math.min(20, n - k) }, async (_x, j) => {
        let c: Conn | null = null;
        try {
          c = await Conn.open(port);
          await c.wait(lineEnd);
          const r = await c.cmd(`a LOGIN ${user((k + j) % USERS)} ${pass((k + j) % USERS)}`, tagged('a'));
          if (!/\ba OK/.test(r.toString())) throw new Error(r.toString().slice(0, 200));
          conns.push(c);
          opened++;
        } catch (err) {
          // Closed, not kept: only logged-in sessions are counted, held and sent keep-alives.
          c?.close();
          if (failed++ === 0) process.stderr.write(`idle session failed: ${(err as Error).message}\n`);
        }
      }),
    );
  }
  return { conns, opened, failed };
}

/**
 * Opens `IDLE` logged-in IMAP sessions through the proxy and returns the proxy's RSS growth per
 * open session, measured after the sessions settle.
 */
async function idleCost(port: number, pid: number): Promise<{ perSessionKiB: number; sessions: number; beforeKiB: number; afterKiB: number; failed: number }> {
  for (let w = 0; w < 20; w++) await imapSession(port, w % USERS);
  await new Promise((r) => setTimeout(r, 1000));
  const before = rssKiB(pid);
  const { conns, opened, failed } = await openIdleSessions(port, IDLE);
  try {
    await new Promise((r) => setTimeout(r, 3000));
    const after = rssKiB(pid);
    return { perSessionKiB: (after - before) / Math.max(1, opened), sessions: opened, beforeKiB: before, afterKiB: after, failed };
  } finally {
    for (const c of conns) c.close();
  }
}

/**
 * Keep-alives over open idle sessions (what a proxy holding many IDLE clients mostly does): opens
 * IDLE_NOOP_SESSIONS sessions, then sends NOOPs at IDLE_NOOP_RATE a second over all of them for
 * IDLE_NOOP_SECONDS; returns the proxy's CPU per 1,000 NOOP round trips. Each session has one NOOP
 * in flight at most.
 */
async function keepAlives(port: number, pid: number, adminPort: number): Promise<{ sessions: number; onNative: number | null; noops: number; cpuMsPer1000: number }> {
  const { conns, opened } = await openIdleSessions(port, Math.min(IDLE, IDLE_NOOP_SESSIONS));
  try {
    // Until the proxy is quiet (under 5 % of a core over half a second, at most 10 s): V8's
    // compile and GC work after the logins would otherwise land in the measured window.
    for (let tries = 0; tries < 20; tries++) {
      const before = cpuMs([pid]);
      await new Promise((r) => setTimeout(r, 500));
      if (cpuMs([pid]) - before < 25) break;
    }
    // Which relay really moves them (--relay native with the addon not built relays in JavaScript).
    const onNative = await nativeRelaySessions(adminPort);
    const { noops, cpuMsPer1000 } = await noopRounds(conns.filter((c) => !c.socket.destroyed), pid);
    return { sessions: opened, onNative, noops, cpuMsPer1000 };
  } finally {
    for (const c of conns) c.close();
  }
}

/** The proxy's pairgate_proxy_native_relay_sessions (null when its admin listener does not answer). */
async function nativeRelaySessions(adminPort: number): Promise<number | null> {
  try {
    const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
    const m = /^pairgate_proxy_native_relay_sessions(?:\{[^}]*\})? (\d+)$/m.exec(text);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** NOOPs in bursts of 50 (one per session, round robin), one burst every 50 ms for IDLE_NOOP_RATE = 1,000 a second. */
async function noopRounds(conns: Conn[], pid: number): Promise<{ noops: number; cpuMsPer1000: number }> {
  if (conns.length === 0) return { noops: 0, cpuMsPer1000: 0 };
  const batch = 50;
  const cpu0 = cpuMs([pid]);
  const t0 = Date.now();
  let noops = 0;
  let next = 0;
  while (Date.now() - t0 < IDLE_NOOP_SECONDS * 1000) {
    const slice = Array.from({ length: Math.min(batch, conns.length) }, () => conns[next++ % conns.length]!);
    await Promise.all(slice.map((c) => c.cmd('n NOOP', tagged('n'))));
    noops += slice.length;
    const ahead = t0 + (noops / IDLE_NOOP_RATE) * 1000 - Date.now();
    if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
  }
  const cpu = cpuMs([pid]) - cpu0;
  return { noops, cpuMsPer1000: (cpu / noops) * 1000 };
}

function ssha(password: string): string {
  const salt = randomBytes(8);
  return `{SSHA}${Buffer.concat([createHash('sha1').update(password).update(salt).digest(), salt]).toString('base64')}`;
}

function healthRecord(pair: string) {
  return {
    pair,
    at: Date.now(),
    state: 'ok',
    primary: 'a',
    nodes: { a: { heartbeat: 'up', role: 'primary', disk: 'UpToDate' }, b: { heartbeat: 'up', role: 'secondary', disk: 'UpToDate' } },
    replication: { connection: 'Connected', protocol: 'C', outOfSyncBytes: 0 },
    store: { mailboxes: 1, messages: 2, bytesUsed: 0, bytesTotal: 1 },
    sessions: { imap: 0, pop3: 0, lmtp: 0 },
  };
}

async function seed(d: Dovecot): Promise<void> {
  const small = `From: a@example.net\r\nSubject: small\r\n\r\n${'hello world\r\n'.repeat(200)}`;
  const line = 'x'.repeat(74) + '\r\n';
  const big = `From: a@example.net\r\nSubject: big\r\n\r\n${line.repeat(Math.ceil((BIG_MIB * 1024 * 1024) / line.length))}`;
  for (let i = 0; i < USERS; i++) {
    const c = await Conn.open(d.imapPort);
    await c.wait(lineEnd);
    await c.cmd(`a LOGIN ${user(i)} ${pass(i)}`, tagged('a'));
    for (const [k, msg] of (i === 0 ? [small, big] : [small]).entries()) {
      const p = c.wait((b) => b.includes('+ '));
      c.socket.write(`p${k} APPEND INBOX {${Buffer.byteLength(msg)}}\r\n`);
      await p;
      await c.cmd(msg, tagged(`p${k}`));
    }
    await c.cmd('z LOGOUT', tagged('z'));
    c.close();
  }
}

function startChild(cmd: string, argv: string[], env: NodeJS.ProcessEnv = process.env): ChildProcess {
  const child = spawn(cmd, argv, { stdio: ['ignore', 'ignore', 'pipe'], env });
  let err = '';
  child.stderr?.on('data', (b: Buffer) => {
    err = (err + b.toString()).slice(-4000);
  });
  child.on('exit', (code) => {
    if (code && code !== 0 && code !== 143) process.stderr.write(`${cmd} exited ${code}: ${err}\n`);
  });
  return child;
}

async function main(): Promise<void> {
  const tmp = tempDir('pairgate-bench-proxy-');
  const children: ChildProcess[] = [];
  let dovecot: (Pick<Dovecot, 'imapPort' | 'pop3Port' | 'lmtpPort' | 'close'> & { proc: { child: ChildProcess } }) | null = null;
  let health: http.Server | null = null;
  let authServer: http.Server | null = null;
  const closers: Array<() => Promise<void>> = [];
  try {
    if (INSTANT_PAIR) {
      // The pair answers at once: the proxies' own CPU per session, undiluted by Dovecot's.
      const [imapPort, pop3Port] = await Promise.all([freePort(), freePort()]);
      const pair = startChild(process.execPath, ['-e', INSTANT_PAIR_SCRIPT, String(imapPort), String(pop3Port)]);
      children.push(pair);
      await waitForPort('127.0.0.1', imapPort, 10_000);
      await waitForPort('127.0.0.1', pop3Port, 10_000);
      dovecot = { imapPort, pop3Port, lmtpPort: 0, proc: { child: pair }, close: async () => undefined };
    } else {
      const d = await startDovecot({
        users: Array.from({ length: USERS }, (_x, i) => ({ user: user(i), password: pass(i) })),
        masterUser: MASTER,
        masterPassword: MASTER_SECRET,
      });
      dovecot = d;
      await seed(d);
    }
    health = http.createServer((_q, res) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(healthRecord('pair-bench'))));
    await new Promise<void>((r) => health!.listen(0, '127.0.0.1', r));
    const adminPort = (health.address() as net.AddressInfo).port;
    // The directory as an LDIF file (read by the proxy process) and as the in-test table's
    // spec; `ports` says where the one pair's services are (Dovecot, or the store for the idle run).
    const writeDirectory = (file: string, ports: { imap: number; pop3: number; lmtp?: number }) => {
      const portList = `imap=${ports.imap},pop3=${ports.pop3}${ports.lmtp ? `,lmtp=${ports.lmtp}` : ''},admin=${adminPort}`;
      const ldif = [
        'dn: dc=pairgate,dc=test\nobjectClass: dcObject\nobjectClass: organization\ndc: pairgate\no: bench\n',
        'dn: ou=people,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: people\n',
        'dn: ou=pairs,dc=pairgate,dc=test\nobjectClass: organizationalUnit\nou: pairs\n',
        `dn: cn=pair-bench,ou=pairs,dc=pairgate,dc=test\nobjectClass: pairgatePair\ncn: pair-bench\npairgateAddress: 127.0.0.1\npairgatePorts: ${portList}\npairgateState: active\npairgateWeight: 100\n`,
        ...Array.from(
          { length: USERS },
          (_x, i) =>
            `dn: uid=${user(i)},ou=people,dc=pairgate,dc=test\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: ${user(i)}\ncn: ${user(i)}\nsn: ${user(i)}\nmail: ${user(i)}@example.net\nmailHost: pair-bench\nuserPassword: ${ssha(pass(i))}\n`,
        ),
      ].join('\n');
      writeFileSync(file, ldif);
      return JSON.stringify({
        users: Array.from({ length: USERS }, (_x, i) => ({ uid: user(i), password: pass(i), pair: 'pair-bench' })),
        pairs: [{ id: 'pair-bench', dn: 'cn=pair-bench,ou=pairs,dc=pairgate,dc=test', address: '127.0.0.1', ports: { ...ports, admin: adminPort }, state: 'active', weight: 100 }],
      });
    };
    const directoryFile = join(tmp.path, 'dir.ldif');
    const directorySpec = writeDirectory(directoryFile, { imap: dovecot.imapPort, pop3: dovecot.pop3Port, lmtp: dovecot.lmtpPort });
    const [hImap, hPop] = await Promise.all([freePort(), freePort()]);
    const startPairgate = async (name: string, nodeFlags: string[] = [], dir = { file: directoryFile, spec: directorySpec }, master = { user: MASTER, secret: MASTER_SECRET }, tree: string | null = null) => {
      const [imapPort, pop3Port, adminPortP] = await Promise.all([freePort(), freePort(), freePort()]);
      const file = join(tmp.path, `${name}.yaml`);
      writeFileSync(
        file,
        JSON.stringify({
          id: name,
          log: { level: 'warn' },
          admin: { host: '127.0.0.1', port: adminPortP },
          directory: { ldif: dir.file },
          listeners: [
            { protocol: 'imap', host: '127.0.0.1', port: imapPort, tls: 'none' },
            { protocol: 'pop3', host: '127.0.0.1', port: pop3Port, tls: 'none' },
          ],
          backend: { masterUser: master.user, masterSecret: '${BENCH_MASTER_SECRET}', trustedNetworks: ['127.0.0.0/8'] },
          limits: { maxConnectionsPerIp: 0, maxSessionsPerUser: 0, maxConnections: 0 },
          authLimits: { maxPerIp: 0, maxPerLogin: 0 },
          ...(RELAY && !tree ? { relay: RELAY } : {}),
        }),
      );
      // A `js:DIR` tree is a compiled copy (tsc emitted .js beside each .ts): served by plain node, no tsx.
      const compiled = tree?.startsWith('js:') ?? false;
      const script = tree ? join(tree.replace(/^js:/, ''), 'bench', compiled ? 'proxy.js' : 'proxy.ts') : fileURLToPath(import.meta.url);
      const child = startChild(process.execPath, [...nodeFlags, ...(compiled ? [] : ['--import', 'tsx']), script, '--serve-proxy', file], {
        ...process.env,
        BENCH_MASTER_SECRET: master.secret,
        BENCH_DIRECTORY_SPEC: dir.spec,
      });
      children.push(child);
      await waitForPort('127.0.0.1', imapPort, 20_000);
      return { child, imapPort, pop3Port, adminPort: adminPortP };
    };
    // PROXY_BENCH_PROF=DIR: a V8 CPU profile of the measured proxy process, written to DIR at its exit.
    // PROXY_BENCH_NODE_FLAGS: extra node flags for it (e.g. --perf-basic-prof for `perf record -p`, its pid is printed).
    const main = await startPairgate('bench', [
      ...(process.env.PROXY_BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.PROXY_BENCH_PROF] : []),
      ...(process.env.PROXY_BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean),
    ]);
    if (process.env.PROXY_BENCH_PROF || process.env.PROXY_BENCH_NODE_FLAGS) process.stderr.write(`measured proxy pid ${main.child.pid}\n`);
    // Processes whose CPU time is charged to each path (the proxy; Dovecot separately).
    const pids: Record<string, number[]> = { pairgate: [main.child.pid!] };
    const [pImap, pPop] = [main.imapPort, main.pop3Port];
    const bases: Array<{ name: string; tree: string; imapPort: number; pop3Port: number }> = [];
    for (const [k, tree] of COMPARE_TREES.entries()) {
      const b = await startPairgate(`bench-base${k}`, [], undefined, undefined, tree);
      const name = `pairgate@${tree.replace(/\/+$/, '').split('/').pop()}${tree.startsWith('js:') ? '-js' : ''}`;
      pids[name] = [b.child.pid!];
      bases.push({ name, tree, imapPort: b.imapPort, pop3Port: b.pop3Port });
    }
    const haCfg = join(tmp.path, 'haproxy.cfg');
    writeFileSync(
      haCfg,
      `global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\nlisten imap\n  bind 127.0.0.1:${hImap}\n  server d 127.0.0.1:${dovecot.imapPort}\nlisten pop3\n  bind 127.0.0.1:${hPop}\n  server d 127.0.0.1:${dovecot.pop3Port}\n`,
    );
    const haproxyBin = ['/usr/sbin/haproxy', '/usr/bin/haproxy'].find((f) => existsSync(f));
    if (haproxyBin) {
      const ha = startChild(haproxyBin, ['-db', '-f', haCfg]);
      children.push(ha);
      pids.haproxy = [ha.pid!];
      await waitForPort('127.0.0.1', hImap, 10_000);
    }
    let nodeRelayPorts: { imap: number; pop3: number } | null = null;
    if (NODE_RELAY) {
      const [nrImap, nrPop] = await Promise.all([freePort(), freePort()]);
      const nr = startChild(process.execPath, ['-e', NODE_RELAY_SCRIPT, String(nrImap), String(dovecot.imapPort), String(nrPop), String(dovecot.pop3Port)]);
      children.push(nr);
      pids['node-relay'] = [nr.pid!];
      await waitForPort('127.0.0.1', nrImap, 10_000);
      await waitForPort('127.0.0.1', nrPop, 10_000);
      nodeRelayPorts = { imap: nrImap, pop3: nrPop };
    }
    let nativeFloorPorts: { imap: number; pop3: number } | null = null;
    if (NODE_RELAY && existsSync(NATIVE_RELAY_ADDON)) {
      const [nfImap, nfPop] = await Promise.all([freePort(), freePort()]);
      const nf = startChild(process.execPath, ['-e', NATIVE_RELAY_FLOOR_SCRIPT, NATIVE_RELAY_ADDON, String(nfImap), String(dovecot.imapPort), String(nfPop), String(dovecot.pop3Port)]);
      children.push(nf);
      pids['node-native-relay'] = [nf.pid!];
      await waitForPort('127.0.0.1', nfImap, 10_000);
      await waitForPort('127.0.0.1', nfPop, 10_000);
      nativeFloorPorts = { imap: nfImap, pop3: nfPop };
    }
    const notes: string[] = [haveDirectory ? 'directory: LDIF backend (directory/index.ts)' : 'directory: in-test table (directory/index.ts not in the tree yet)'];
    if (!haproxyBin) notes.push('haproxy not installed: no L4 baseline');
    // nginx's mail proxy, with an auth_http endpoint answering from the same directory.
    const nginxBin = ['/usr/sbin/nginx', '/usr/bin/nginx'].find((f) => existsSync(f));
    const mailModule = '/usr/lib/nginx/modules/ngx_mail_module.so';
    let nginxPorts: { imap: number; pop3: number } | null = null;
    if (INSTANT_PAIR) notes.push('--instant-pair: nginx and Perdition not measured (they log in with literals the instant pair does not speak); no bulk, no idle run');
    else if (nginxBin && existsSync(mailModule)) {
      const directory = await benchDirectory(directoryFile, JSON.parse(directorySpec));
      closers.push(() => directory.close());
      const ports = { imap: dovecot.imapPort, pop3: dovecot.pop3Port };
      authServer = http.createServer(async (req, res) => {
        const h = req.headers;
        const login = decodeURIComponent(String(h['auth-user'] ?? ''));
        const password = decodeURIComponent(String(h['auth-pass'] ?? ''));
        const protocol = String(h['auth-protocol'] ?? 'imap') as 'imap' | 'pop3';
        try {
          const u = await directory.authenticate(login, password);
          const route = await directory.routeFor(u);
          res.writeHead(200, { 'Auth-Status': 'OK', 'Auth-Server': route.pair.address, 'Auth-Port': String(route.pair.ports[protocol] ?? ports[protocol]) });
        } catch {
          res.writeHead(200, { 'Auth-Status': 'Invalid login or password', 'Auth-Wait': '1' });
        }
        res.end();
      });
      await new Promise<void>((r) => authServer!.listen(0, '127.0.0.1', r));
      const authPort = (authServer.address() as net.AddressInfo).port;
      const [nImap, nPop] = [await freePort(), await freePort()];
      const ncfg = join(tmp.path, 'nginx.conf');
      writeFileSync(
        ncfg,
        `load_module ${mailModule};\nworker_processes 1;\npid ${tmp.path}/nginx.pid;\nerror_log ${tmp.path}/nginx.err warn;\nevents { worker_connections 4096; }\n` +
          `mail {\n  server_name bench.local;\n  auth_http 127.0.0.1:${authPort}/auth;\n  proxy_pass_error_message on;\n` +
          `  imap_capabilities IMAP4rev1 LITERAL+ SASL-IR ID IDLE;\n  pop3_capabilities TOP USER UIDL;\n` +
          `  server { listen 127.0.0.1:${nImap}; protocol imap; }\n  server { listen 127.0.0.1:${nPop}; protocol pop3; }\n}\n`,
      );
      const ng = startChild(nginxBin, ['-c', ncfg, '-p', tmp.path, '-g', 'daemon off;']);
      children.push(ng);
      pids.nginx = [ng.pid!];
      await waitForPort('127.0.0.1', nImap, 10_000);
      nginxPorts = { imap: nImap, pop3: nPop };
    } else if (!INSTANT_PAIR) notes.push('nginx mail proxy (libnginx-mod-mail) not installed: not measured');
    // Perdition: one foreground process per protocol (it forks a child per connection), its
    // posix_regex map sending every bench user to the pair's Dovecot. The user's own
    // credentials go through to Dovecot (Perdition has no master login), as with nginx.
    const perditionBin = ['/usr/sbin/perdition'].find((f) => existsSync(f));
    const regexMap = ['/usr/lib/x86_64-linux-gnu/libperditiondb_posix_regex.so.0', '/usr/lib/libperditiondb_posix_regex.so.0'].find((f) => existsSync(f));
    let perditionPorts: { imap: number; pop3: number } | null = null;
    if (!INSTANT_PAIR && perditionBin && regexMap) {
      const [pdImap, pdPop] = [await freePort(), await freePort()];
      writeFileSync(join(tmp.path, 'perdition.conf'), '# empty: everything is on the command line\n');
      for (const [protocol, listen, backendPort] of [
        ['IMAP4', pdImap, dovecot.imapPort],
        ['POP3', pdPop, dovecot.pop3Port],
      ] as const) {
        const map = join(tmp.path, `popmap-${protocol}.re`);
        writeFileSync(map, `^bench[0-9]+$: 127.0.0.1:${backendPort}\n`);
        const pd = startChild(perditionBin, [
            '--no_daemon',
            '--config_file', join(tmp.path, 'perdition.conf'),
            '--protocol', protocol,
            '--bind_address', '127.0.0.1',
            '--listen_port', String(listen),
            '--map_library', regexMap,
            '--map_library_opt', map,
            '--no_lookup',
            '--ssl_mode', 'none',
            '--pid_file', join(tmp.path, `perdition-${protocol}.pid`),
            '--log_facility', join(tmp.path, `perdition-${protocol}.log`),
            '--quiet',
          ]);
        children.push(pd);
        (pids.perdition ??= []).push(pd.pid!);
      }
      await waitForPort('127.0.0.1', pdImap, 10_000);
      await waitForPort('127.0.0.1', pdPop, 10_000);
      perditionPorts = { imap: pdImap, pop3: pdPop };
      notes.push('perdition: posix_regex map (perdition-ldap, its LDAP map, is not installed; it also wants the server address in the user entry, which pairgate keeps on the pair entry)');
    } else if (!INSTANT_PAIR) notes.push('perdition (with its posix_regex map) not installed: not measured');

    const paths: Array<{ name: string; imap: number; pop3: number }> = [
      { name: 'direct', imap: dovecot.imapPort, pop3: dovecot.pop3Port },
      { name: 'pairgate', imap: pImap, pop3: pPop },
      ...bases.map((b) => ({ name: b.name, imap: b.imapPort, pop3: b.pop3Port })),
      ...(nginxPorts ? [{ name: 'nginx', imap: nginxPorts.imap, pop3: nginxPorts.pop3 }] : []),
      ...(perditionPorts ? [{ name: 'perdition', imap: perditionPorts.imap, pop3: perditionPorts.pop3 }] : []),
      ...(haproxyBin ? [{ name: 'haproxy', imap: hImap, pop3: hPop }] : []),
      ...(nodeRelayPorts ? [{ name: 'node-relay', imap: nodeRelayPorts.imap, pop3: nodeRelayPorts.pop3 }] : []),
      ...(nativeFloorPorts ? [{ name: 'node-native-relay', imap: nativeFloorPorts.imap, pop3: nativeFloorPorts.pop3 }] : []),
    ].filter((p) => !ONLY_PATHS || ONLY_PATHS.has(p.name) || p.name.startsWith('pairgate@') || p.name.startsWith('node-'));
    for (const b of bases) notes.push(`${b.name}: the proxy served from ${b.tree}`);
    // Warm up every path (Dovecot login processes, the proxy's JIT and caches): --warmup seconds
    // of each protocol at the rounds' concurrency, or one session of each with --warmup 0.
    for (const p of paths) {
      if (WARMUP > 0) {
        await rate('imap', p.imap, WARMUP);
        await rate('pop3', p.pop3, WARMUP);
      } else {
        await imapSession(p.imap, 0);
        await pop3Session(p.pop3, 0);
      }
    }
    const results: Record<string, { imap: number; pop3: number; bulk: number; errors: number }> = {};
    for (const p of paths) results[p.name] = { imap: 0, pop3: 0, bulk: 0, errors: 0 };
    // CPU per session over all rounds: the proxy's processes, and Dovecot's (login, auth and
    // mail processes) for the same sessions. Unlike sessions/s, this barely moves with the load
    // that other work puts on the machine.
    // The bench process's own CPU is read too: its load clients cost the same on every path,
    // and during nginx's rounds it also serves nginx's auth_http endpoint (directory look-up and
    // password check), work that pairgate does inside its proxy process and is charged for there.
    const cpu: Record<string, Record<'imap' | 'pop3', { proxyMs: number; proxyUserMs: number; dovecotMs: number; benchMs: number; sessions: number }>> = {};
    for (const p of paths) cpu[p.name] = { imap: { proxyMs: 0, proxyUserMs: 0, dovecotMs: 0, benchMs: 0, sessions: 0 }, pop3: { proxyMs: 0, proxyUserMs: 0, dovecotMs: 0, benchMs: 0, sessions: 0 } };
    const benchCpuMs = () => {
      const u = process.cpuUsage();
      return (u.user + u.system) / 1000;
    };
    const dovecotPid = dovecot.proc.child.pid!;
    const measured = async (name: string, kind: 'imap' | 'pop3', port: number) => {
      const [p0, u0, d0, b0] = [cpuMs(pids[name] ?? []), cpuMs(pids[name] ?? [], 'user'), cpuMs([dovecotPid]), benchCpuMs()];
      const r = await rate(kind, port);
      const c = cpu[name]![kind];
      c.benchMs += benchCpuMs() - b0;
      c.proxyMs += cpuMs(pids[name] ?? []) - p0;
      c.proxyUserMs += cpuMs(pids[name] ?? [], 'user') - u0;
      c.dovecotMs += cpuMs([dovecotPid]) - d0;
      c.sessions += r.sessions;
      if (process.env.PROXY_BENCH_VERBOSE) {
        const ms = cpuMs(pids[name] ?? []) - p0;
        process.stderr.write(`round: ${name} ${kind} ${r.perSec.toFixed(1)}/s, ${r.sessions} sessions, proxy CPU ${r.sessions ? (ms / r.sessions).toFixed(2) : '-'} ms/session\n`);
      }
      return r;
    };
    // Interleaved rounds so that machine noise hits every path alike, the order rotated each
    // round so that no path always runs first or last; best round kept per path.
    const load = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
    const loadBefore = load();
    for (let round = 0; round < ROUNDS; round++) {
      for (const p of [...paths.slice(round % paths.length), ...paths.slice(0, round % paths.length)]) {
        const r = await measured(p.name, 'imap', p.imap);
        const q = await measured(p.name, 'pop3', p.pop3);
        const res = results[p.name]!;
        res.imap = Math.max(res.imap, r.perSec);
        res.pop3 = Math.max(res.pop3, q.perSec);
        res.errors += r.errors + q.errors;
      }
    }
    const bulkFigures = INSTANT_PAIR
      ? { best: paths.map(() => 0), cpuMsPerMiB: paths.map(() => NaN) }
      : await bulk(
          paths.map((p) => p.imap),
          (k) => (pids[paths[k]!.name] ? cpuMs(pids[paths[k]!.name]!) : null),
        );
    paths.forEach((p, k) => (results[p.name]!.bulk = bulkFigures.best[k]!));
    // Idle cost in a fresh proxy process, so that heap growth from the rate rounds does not blur it.
    let idle: Awaited<ReturnType<typeof idleCost>> | null = null;
    let keepAlive: Awaited<ReturnType<typeof keepAlives>> | null = null;
    let idleBackendNote = '';
    if (IDLE > 0 && !INSTANT_PAIR) {
      main.child.kill('SIGTERM');
      let dir = { file: directoryFile, spec: directorySpec };
      let master = { user: MASTER, secret: MASTER_SECRET };
      if (IDLE_BACKEND === 'store') {
        // pairgate's own store IMAP server (the pair-agent's, on a file-backed volume) as the
        // backend: one process holds thousands of sessions, so the figure is the proxy's cost
        // per session at the issue's 5,000 rather than at what Dovecot's process-per-session
        // model fits on this machine. It runs in this bench process; only the proxy's RSS is read.
        const store = await startHarness({ users: {}, limits: { maxSessionsPerUser: IDLE + 100 }, volumeBytes: 64 * 1024 * 1024 });
        closers.push(() => store.close());
        dir = { file: join(tmp.path, 'dir-idle.ldif'), spec: '' };
        dir.spec = writeDirectory(dir.file, { imap: store.port, pop3: dovecot.pop3Port });
        master = { user: STORE_MASTER.user, secret: STORE_MASTER.secret };
        idleBackendNote = "pairgate store IMAP server (one process)";
      } else idleBackendNote = 'Dovecot (one imap process per session)';
      // Frequent full GCs in this process only, so that RSS growth is live memory rather than
      // garbage from the logins that V8 has not collected yet.
      const idleProxy = await startPairgate('bench-idle', ['--gc-global', '--gc-interval=20000'], dir, master);
      idle = await idleCost(idleProxy.imapPort, idleProxy.child.pid!);
      idleProxy.child.kill('SIGTERM');
      // Keep-alives in a proxy of their own, without the forced GCs (they would be most of its CPU).
      if (IDLE_NOOP_SECONDS > 0) {
        const kaProxy = await startPairgate('bench-keepalive', [], dir, master);
        keepAlive = await keepAlives(kaProxy.imapPort, kaProxy.child.pid!, kaProxy.adminPort);
        kaProxy.child.kill('SIGTERM');
      }
    }
    const perSessionKiB = idle?.perSessionKiB ?? 0;

    const pad = (s: string, n: number) => s.padEnd(n);
    const nameW = Math.max(10, ...paths.map((p) => p.name.length));
    const per = (ms: number, n: number) => (n ? (ms / n).toFixed(2) : '-');
    const machineMs = (name: string, k: 'imap' | 'pop3') => {
      const c = cpu[name]![k];
      return c.sessions ? (c.dovecotMs + c.proxyMs + c.benchMs) / c.sessions : NaN;
    };
    /** pairgate/nginx rate ratio that the summed CPU per session implies, to 3 places. */
    const impliedVsNginx = (k: 'imap' | 'pop3') => (machineMs('nginx', k) / machineMs('pairgate', k)).toFixed(3);
    const lines = [
      `proxy bench: concurrency ${CONCURRENCY}, ${SECONDS}s per round x${ROUNDS} (best) after ${WARMUP}s warm-up per path and protocol, ${INSTANT_PAIR ? 'instant pair instead of Dovecot, no bulk, no idle run' : `bulk ${BIG_MIB} MiB FETCH, ${IDLE} idle sessions (backend: ${IDLE_BACKEND})`}`,
      `${pad('path', nameW)} ${pad('IMAP sess/s', 12)} ${pad('POP3 sess/s', 12)} ${pad('bulk MiB/s', 11)} ${pad('errors', 7)} ${pad('proxy CPU ms/sess IMAP POP3', 28)} dovecot CPU ms/sess IMAP POP3`,
      ...paths.map((p) => {
        const r = results[p.name]!;
        const c = cpu[p.name]!;
        const proxyCpu = pids[p.name] ? `${per(c.imap.proxyMs, c.imap.sessions)} ${per(c.pop3.proxyMs, c.pop3.sessions)}` : '(none)';
        return `${pad(p.name, nameW)} ${pad(r.imap.toFixed(1), 12)} ${pad(r.pop3.toFixed(1), 12)} ${pad(r.bulk.toFixed(1), 11)} ${pad(String(r.errors), 7)} ${pad(proxyCpu, 28)} ${per(c.imap.dovecotMs, c.imap.sessions)} ${per(c.pop3.dovecotMs, c.pop3.sessions)}`;
      }),
      `proxy CPU ms/sess split user+system (IMAP; POP3): ${paths
        .filter((p) => pids[p.name])
        .map((p) => {
          const c = cpu[p.name]!;
          const split = (k: 'imap' | 'pop3') => `${per(c[k].proxyUserMs, c[k].sessions)}+${per(c[k].proxyMs - c[k].proxyUserMs, c[k].sessions)}`;
          return `${p.name} ${split('imap')}; ${split('pop3')}`;
        })
        .join(', ')}`,
      `bench process CPU ms/sess (load clients; for nginx also its auth_http endpoint) IMAP; POP3: ${paths
        .map((p) => `${p.name} ${per(cpu[p.name]!.imap.benchMs, cpu[p.name]!.imap.sessions)}; ${per(cpu[p.name]!.pop3.benchMs, cpu[p.name]!.pop3.sessions)}`)
        .join(', ')}`,
      // The rounds are CPU-bound on the machine's cores (Dovecot takes most of them), so a path's rate
      // follows what one session costs all the processes that serve it: Dovecot, the proxy, and the
      // bench process (clients, and nginx's auth_http endpoint). The ratio of those sums is the rate
      // ratio these costs imply (information; the target stays the measured rates).
      `CPU ms per session, Dovecot + proxy + bench process (IMAP; POP3): ${paths
        .map((p) => `${p.name} ${per(machineMs(p.name, 'imap'), 1)}; ${per(machineMs(p.name, 'pop3'), 1)}`)
        .join(', ')}${
        results.pairgate && results.nginx
          ? `; pairgate/nginx rate ratio these imply: IMAP ${impliedVsNginx('imap')}, POP3 ${impliedVsNginx('pop3')}`
          : ''
      }`,
      `proxy CPU ms per MiB of bulk FETCH relayed: ${paths
        .map((p, k) => [p.name, bulkFigures.cpuMsPerMiB[k]!] as const)
        .filter(([, v]) => !Number.isNaN(v))
        .map(([n, v]) => `${n} ${v.toFixed(2)}`)
        .join(', ')}`,
      ...(idle
        ? [
            `pairgate RSS per idle proxied IMAP session: ${perSessionKiB.toFixed(1)} KiB (${idle.sessions} sessions open, ${idle.failed} failed; proxy RSS ${idle.beforeKiB} -> ${idle.afterKiB} KiB; backend: ${idleBackendNote})`,
            ...(keepAlive?.noops
              ? [
                  `pairgate CPU per 1,000 keep-alive NOOPs over ${keepAlive.sessions} open sessions (${keepAlive.noops} at ~${IDLE_NOOP_RATE}/s, relay: ${RELAY ?? 'config default'}, ${keepAlive.onNative ?? '?'} of the sessions on the native relay): ${keepAlive.cpuMsPer1000.toFixed(1)} ms`,
                ]
              : []),
          ]
        : []),
      `load average (1/5/15 min): ${loadBefore} before the rate rounds, ${load()} at the end`,
      ...notes.map((n) => `note: ${n}`),
    ];
    process.stdout.write(lines.join('\n') + '\n');
    const pg = results.pairgate;
    const direct = results.direct;
    const targets: Record<string, { value: number; min?: number; max?: number }> = {
      ...(pg && results.nginx ? { imap_rate_vs_nginx: { value: Number((pg.imap / results.nginx.imap).toFixed(3)), min: 1.0 }, pop3_rate_vs_nginx: { value: Number((pg.pop3 / results.nginx.pop3).toFixed(3)), min: 1.0 } } : {}),
      ...(pg && direct ? { bulk_vs_direct: { value: Number((pg.bulk / direct.bulk).toFixed(3)), min: 0.8 } } : {}),
      ...(idle ? { idle_session_kib: { value: Number(perSessionKiB.toFixed(1)), max: 40 } } : {}),
    };
    // A --paths run leaves targets out (bulk needs direct, the rate needs nginx): it can never count as met.
    const met = !ONLY_PATHS && !INSTANT_PAIR && Object.values(targets).every((t) => (t.min === undefined || t.value >= t.min) && (t.max === undefined || t.value <= t.max));
    const figures: Record<string, number> = {};
    for (const [name, r] of Object.entries(results)) {
      figures[`${name}_imap_sessions_per_s`] = Number(r.imap.toFixed(1));
      figures[`${name}_pop3_sessions_per_s`] = Number(r.pop3.toFixed(1));
      figures[`${name}_bulk_mib_per_s`] = Number(r.bulk.toFixed(1));
      const c = cpu[name]!;
      for (const kind of ['imap', 'pop3'] as const) {
        if (!c[kind].sessions) continue;
        if (pids[name]) figures[`${name}_${kind}_proxy_cpu_ms_per_session`] = Number((c[kind].proxyMs / c[kind].sessions).toFixed(3));
        if (pids[name]) figures[`${name}_${kind}_proxy_user_cpu_ms_per_session`] = Number((c[kind].proxyUserMs / c[kind].sessions).toFixed(3));
        figures[`${name}_${kind}_dovecot_cpu_ms_per_session`] = Number((c[kind].dovecotMs / c[kind].sessions).toFixed(3));
        figures[`${name}_${kind}_bench_cpu_ms_per_session`] = Number((c[kind].benchMs / c[kind].sessions).toFixed(3));
      }
    }
    if (pg && results.haproxy) figures.pairgate_vs_haproxy_imap_rate = Number((pg.imap / results.haproxy.imap).toFixed(3));
    if (pg && direct) figures.pairgate_vs_direct_imap_rate = Number((pg.imap / direct.imap).toFixed(3));
    if (pg && results.nginx) {
      figures.pairgate_vs_nginx_cpu_implied_imap_rate = Number(impliedVsNginx('imap'));
      figures.pairgate_vs_nginx_cpu_implied_pop3_rate = Number(impliedVsNginx('pop3'));
    }
    if (pg && results.perdition) {
      figures.pairgate_vs_perdition_imap_rate = Number((pg.imap / results.perdition.imap).toFixed(3));
      figures.pairgate_vs_perdition_pop3_rate = Number((pg.pop3 / results.perdition.pop3).toFixed(3));
    }
    paths.forEach((p, k) => {
      const v = bulkFigures.cpuMsPerMiB[k]!;
      if (!Number.isNaN(v)) figures[`${p.name}_bulk_proxy_cpu_ms_per_mib`] = Number(v.toFixed(3));
    });
    if (idle) figures.idle_sessions_open = idle.sessions;
    if (keepAlive?.noops) {
      figures.keepalive_noops = keepAlive.noops;
      figures.keepalive_proxy_cpu_ms_per_1000 = Number(keepAlive.cpuMsPer1000.toFixed(1));
      if (keepAlive.onNative !== null) figures.keepalive_sessions_on_native_relay = keepAlive.onNative;
    }
    if (RELAY) figures.relay_native = RELAY === 'native' ? 1 : 0;
    figures.warmup_seconds = WARMUP;
    process.stdout.write(JSON.stringify({ bench: 'proxy', figures, targets, met }) + '\n');
  } finally {
    for (const c of children) c.kill('SIGTERM');
    health?.close();
    authServer?.close();
    for (const c of closers) await c().catch(() => undefined);
    await dovecot?.close();
    await new Promise((r) => setTimeout(r, 300));
    tmp.cleanup();
  }
}

/** Directory for the bench: the LDIF backend when directory/index.ts exists, else the in-test table. */
async function benchDirectory(ldifFile: string, spec: { users: Array<{ uid: string; password: string; pair: string }>; pairs: PairRecord[] }): Promise<Directory> {
  if (haveDirectory) return openDirectory({ ldif: ldifFile }, { log: silentLogger });
  return tableDirectory(spec.users, spec.pairs);
}

/** `--serve-proxy CONFIG`: this file as the proxy process (the CLI's path, with the bench's directory choice). */
async function serveProxy(file: string): Promise<void> {
  const config = loadConfigFile(proxyConfigSchema, file);
  const spec = JSON.parse(process.env.BENCH_DIRECTORY_SPEC ?? '{}');
  const directory = await benchDirectory(config.directory.ldif as string, spec);
  const log = createLogger({ role: 'proxy', level: config.log.level });
  const proxy = await startProxy(config, { log, directory });
  process.on('SIGTERM', () => void proxy.stop(500).then(() => process.exit(0)));
}

if (args['serve-proxy']) {
  serveProxy(args['serve-proxy']).catch((err) => {
    process.stderr.write(`bench proxy server failed: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  });
} else main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench proxy failed: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
