/**
 * bench/imap: the store agent's IMAP server against Dovecot on the same machine, same run.
 *
 *   npm run bench -- imap [--seconds 3] [--rounds 3] [--messages 10000] [--concurrency 8] [--big-mib 10] [--dovecot tuned|default]
 *
 * Figures: login+SELECT+FETCH+LOGOUT sessions per second (several clients at once), FETCH of
 * 100 message headers (fetches/s and MiB/s), FETCH of one big body (MiB/s), and SEARCH over a
 * mailbox of --messages messages (a flag key and a header substring key, ms per search).
 * pairgate's server runs in a child process (this file with --serve) on a FileBlockDevice in a
 * temp dir, so that client and server do not share an event loop, as with Dovecot.
 * Targets (issue #6): session rate and FETCH throughput at least 0.8x Dovecot's.
 * Ends with one JSON line.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { appendFileSync, chownSync, mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '3' },
    messages: { type: 'string', default: '10000' },
    concurrency: { type: 'string', default: '8' },
    'big-mib': { type: 'string', default: '10' },
    dovecot: { type: 'string', default: 'tuned' },
    serve: { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
});

const SECONDS = Number(args.seconds);
const ROUNDS = Math.max(1, Number(args.rounds));
const MESSAGES = Number(args.messages);
const CONCURRENCY = Number(args.concurrency);
const BIG_MIB = Number(args['big-mib']);
if (args.dovecot !== 'tuned' && args.dovecot !== 'default') throw new Error('--dovecot must be tuned or default');
/**
 * Dovecot's documented high-performance mode (doc.dovecot.org, "Login processes"): login processes
 * serve many connections (service_count = 0) and imap processes are reused, so that a session does
 * not pay for two process starts. The baseline is then the fastest Dovecot this machine runs, not
 * the high-security default the test helper uses (`--dovecot default` measures that one).
 */
const DOVECOT_TUNING = `
service imap-login {
  service_count = 0
  process_min_avail = 2
  vsz_limit = 1G
}
service imap {
  service_count = 100
  process_min_avail = 2
}
`;
const USER = 'benchuser';
const PASSWORD = 'bench-pw';
const NEEDLE_EVERY = 1000;

function benchMessage(i: number): Buffer {
  const from = i % NEEDLE_EVERY === 0 ? 'Needle Person <needle@example.org>' : `Sender ${i % 97} <sender${i % 97}@example.net>`;
  const filler = `Line ${i} of a benchmark message body with some ordinary text in it.\r\n`.repeat(20);
  return Buffer.from(
    `From: ${from}\r\nTo: ${USER}@example.net\r\nSubject: Benchmark message number ${i}\r\nDate: Mon, 23 Nov 2026 01:00:00 +0000\r\nMessage-ID: <bench-${i}@example.net>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n${filler}`,
  );
}

function bigMessage(mib: number): Buffer {
  const line = 'x'.repeat(74) + '\r\n';
  const body = line.repeat(Math.ceil((mib * 1024 * 1024) / line.length));
  return Buffer.from(`From: big@example.net\r\nTo: ${USER}@example.net\r\nSubject: big\r\n\r\n${body}`);
}

// ---- server side (child process) --------------------------------------------------------

async function serve(): Promise<void> {
  const { FileBlockDevice } = await import('../pair-agent/volume/block-device.ts');
  const { openMailStore } = await import('../pair-agent/store/index.ts');
  const { startImapServer } = await import('../pair-agent/store/imap/index.ts');
  const { AddressList } = await import('../common/cidr.ts');
  const { createLogger } = await import('../common/log.ts');
  const { createRegistry } = await import('../common/metrics.ts');
  const { tempDir } = await import('../test/helpers/proc.ts');
  const tmp = tempDir('pairgate-bench-imap-');
  const log = createLogger({ role: 'bench', level: 'warn' });
  const volumeBytes = Math.ceil((MESSAGES * 4096 * 1.5 + BIG_MIB * 1024 * 1024 * 3 + 64 * 1024 * 1024) / 4096) * 4096;
  const device = await FileBlockDevice.open(join(tmp.path, 'volume.img'), { size: volumeBytes, create: true });
  const store = await openMailStore(device, { log, registry: createRegistry({}, false) });
  await store.ensureUser(USER);
  const t0 = Date.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (next < MESSAGES) {
        const i = next++;
        await store.append(USER, 'INBOX', benchMessage(i), { flags: i % 3 === 0 ? ['\\Seen'] : [] });
      }
    }),
  );
  await store.createMailbox(USER, 'Big');
  await store.append(USER, 'Big', bigMessage(BIG_MIB));
  const server = await startImapServer({
    store,
    host: '127.0.0.1',
    port: 0,
    masterUser: 'master',
    masterSecret: 'bench-master-secret',
    trusted: new AddressList(['127.0.0.0/8']),
    log,
    registry: createRegistry({}, false),
    users: { [USER]: PASSWORD },
    limits: { maxSessionsPerUser: 1000 },
  });
  process.stdout.write(JSON.stringify({ port: server.port, populateMs: Date.now() - t0 }) + '\n');
  const stop = async () => {
    await server.close();
    await store.close();
    await device.close();
    tmp.cleanup();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop());
  process.stdin.on('end', () => void stop());
  process.stdin.resume();
}

// ---- a minimal IMAP client ------------------------------------------------------------------

/**
 * Sends one command at a time and waits for its tagged reply. Received chunks are kept in a list
 * and only the newest bytes are scanned for the tagged line, so reading a 10 MiB literal costs
 * O(size) on the client: the client must never be what limits a server's figure (an earlier
 * version joined every chunk into one growing buffer, O(size^2), and capped both servers).
 */
class Client {
  private chunks: Buffer[] = [];
  /** Bytes in `chunks`. */
  private len = 0;
  private wake: (() => void) | null = null;
  private closed = false;
  private n = 0;
  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.len += d.length;
      this.wake?.();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
    sock.on('error', () => undefined);
  }

  static async open(port: number): Promise<Client> {
    const sock = net.connect({ host: '127.0.0.1', port });
    sock.setNoDelay(true);
    await new Promise<void>((res, rej) => {
      sock.once('connect', res);
      sock.once('error', rej);
    });
    const c = new Client(sock);
    await c.readUntil(null);
    return c;
  }

  private async more(deadline: number): Promise<void> {
    if (this.closed) throw new Error('connection closed');
    if (Date.now() > deadline) throw new Error('timeout');
    await new Promise<void>((r) => {
      const t = setTimeout(r, 1000);
      this.wake = () => {
        clearTimeout(t);
        r();
      };
    });
    this.wake = null;
  }

  /**
   * Reads until the line that starts with `tag ` (or, with null, the first line) is complete;
   * returns that line and the bytes of the whole response, and keeps what follows it.
   */
  private async readUntil(tag: string | null): Promise<{ line: string; size: number }> {
    const deadline = Date.now() + 60_000;
    const needle = tag === null ? null : Buffer.from(`\r\n${tag} `);
    // `scanned`: bytes already searched; the search resumes a needle's length before it.
    let scanned = 0;
    let lineStart = -1;
    for (;;) {
      if (this.len > scanned) {
        const back = needle ? needle.length : 0;
        const from = Math.max(0, scanned - back);
        const win = this.window(from, this.len);
        if (lineStart < 0) {
          if (needle === null) lineStart = 0;
          else if (from === 0 && win.subarray(0, needle.length - 2).equals(needle.subarray(2))) lineStart = 0;
          else {
            const i = win.indexOf(needle);
            if (i >= 0) lineStart = from + i + 2;
          }
        }
        if (lineStart >= 0) {
          const tail = this.window(lineStart, this.len);
          const e = tail.indexOf('\r\n');
          if (e >= 0) {
            const end = lineStart + e + 2;
            const line = tail.subarray(0, e).toString();
            this.consume(end);
            return { line, size: end };
          }
        }
        scanned = this.len;
      }
      await this.more(deadline);
    }
  }

  /** Bytes [from, to) of the received data (copies only the chunks that overlap the range). */
  private window(from: number, to: number): Buffer {
    const parts: Buffer[] = [];
    let pos = 0;
    for (const c of this.chunks) {
      const cEnd = pos + c.length;
      if (cEnd > from && pos < to) parts.push(c.subarray(Math.max(0, from - pos), Math.min(c.length, to - pos)));
      pos = cEnd;
      if (pos >= to) break;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  private consume(n: number): void {
    const rest = this.window(n, this.len);
    this.chunks = rest.length ? [rest] : [];
    this.len = rest.length;
  }

  /** Sends a command and waits for its tagged reply; returns the bytes of the whole response. */
  async cmd(command: string): Promise<number> {
    const tag = `b${++this.n}`;
    this.sock.write(`${tag} ${command}\r\n`);
    const { line, size } = await this.readUntil(tag);
    if (!line.startsWith(`${tag} OK`)) throw new Error(`${command.slice(0, 40)}: ${line.trim()}`);
    return size;
  }

  close(): void {
    this.sock.destroy();
  }
}

interface Target {
  name: string;
  port: number;
}

async function forSeconds(seconds: number, concurrency: number, fn: () => Promise<number>): Promise<{ ops: number; bytes: number; secs: number }> {
  const end = Date.now() + seconds * 1000;
  const t0 = process.hrtime.bigint();
  let ops = 0;
  let bytes = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (Date.now() < end) {
        bytes += await fn();
        ops++;
      }
    }),
  );
  return { ops, bytes, secs: Number(process.hrtime.bigint() - t0) / 1e9 };
}

/** One figure measured once against one server: its value (per second, or ms for searches), or several named ones. */
type FigureFn = (t: Target, reader: Client) => Promise<number | Record<string, number>>;

const FIGURES: Array<{ key: string; label: string; also?: Record<string, string>; fn: FigureFn }> = [
  {
    key: 'sessionsPerSec',
    label: 'sessions/s (login+select+fetch+logout)',
    // Connect, LOGIN, SELECT INBOX, FETCH one message's flags and size, LOGOUT; several clients at once.
    fn: async (t) => {
      const s = await forSeconds(SECONDS, CONCURRENCY, async () => {
        const c = await Client.open(t.port);
        await c.cmd(`LOGIN ${USER} ${PASSWORD}`);
        await c.cmd('SELECT INBOX');
        await c.cmd('FETCH 1 (FLAGS RFC822.SIZE)');
        await c.cmd('LOGOUT').catch(() => 0);
        c.close();
        return 0;
      });
      return s.ops / s.secs;
    },
  },
  {
    key: 'headerFetchesPerSec',
    label: 'FETCH 100 headers: fetches/s',
    also: { headerMiBPerSec: 'FETCH 100 headers: MiB/s' },
    fn: async (_t, c) => {
      await c.cmd('EXAMINE INBOX');
      const h = await forSeconds(SECONDS, 1, () => c.cmd('FETCH 1:100 (UID BODY.PEEK[HEADER])'));
      return { headerFetchesPerSec: h.ops / h.secs, headerMiBPerSec: h.bytes / h.secs / 1048576 };
    },
  },
  {
    key: 'bigFetchMiBPerSec',
    label: `FETCH ${BIG_MIB} MiB body: MiB/s`,
    fn: async (_t, c) => {
      await c.cmd('EXAMINE Big');
      const b = await forSeconds(Math.max(2, SECONDS), 1, () => c.cmd('FETCH 1 BODY.PEEK[]'));
      return b.bytes / b.secs / 1048576;
    },
  },
  {
    key: 'searchFlagMs',
    label: `SEARCH UNSEEN over ${MESSAGES}: ms`,
    fn: async (_t, c) => {
      await c.cmd('EXAMINE INBOX');
      return timeSearch(c, 'SEARCH UNSEEN');
    },
  },
  {
    key: 'searchFromMs',
    label: `SEARCH FROM over ${MESSAGES}: ms`,
    fn: async (_t, c) => {
      await c.cmd('EXAMINE INBOX');
      return timeSearch(c, 'SEARCH FROM "needle@example.org"');
    },
  },
];

async function timeSearch(c: Client, q: string): Promise<number> {
  const n = 5;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await c.cmd(q);
  return Number(process.hrtime.bigint() - t0) / 1e6 / n;
}

/** Every figure once against a server, not measured: builds indexes and fills caches (both servers keep them). */
async function warm(reader: Client): Promise<void> {
  await reader.cmd('EXAMINE INBOX');
  await reader.cmd('FETCH 1:100 (UID BODY.PEEK[HEADER])');
  await reader.cmd('SEARCH UNSEEN');
  await reader.cmd('SEARCH FROM "needle@example.org"');
  await reader.cmd('EXAMINE Big');
  await reader.cmd('FETCH 1 BODY.PEEK[]');
}

const median = (xs: number[]): number => {
  const v = [...xs].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
};

async function startPairgate(): Promise<{ port: number; populateMs: number; child: ChildProcess }> {
  const self = fileURLToPath(import.meta.url);
  // IMAP_BENCH_PROF=dir writes a CPU profile of the pairgate server process there (on its exit).
  const prof = process.env.IMAP_BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.IMAP_BENCH_PROF] : [];
  const child = spawn(process.execPath, [...prof, '--import', 'tsx', self, '--serve', '--messages', String(MESSAGES), '--big-mib', String(BIG_MIB)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const line = await new Promise<string>((resolve, reject) => {
    let acc = '';
    child.stdout!.on('data', (d: Buffer) => {
      acc += d.toString();
      const i = acc.indexOf('\n');
      if (i >= 0) resolve(acc.slice(0, i));
    });
    child.once('exit', (code) => reject(new Error(`pairgate bench server exited with ${code}`)));
  });
  const info = JSON.parse(line) as { port: number; populateMs: number };
  return { ...info, child };
}

async function waitPortFree(port: number): Promise<void> {
  for (let k = 0; k < 100; k++) {
    const free = await new Promise<boolean>((resolve) => {
      const srv = net.createServer();
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
    });
    if (free) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port ${port} still in use after 10 s`);
}

async function startDovecotBaseline() {
  const { startDovecot } = await import('../test/helpers/dovecot.ts');
  const dovecot = await startDovecot({ users: [{ user: USER, password: PASSWORD }] });
  // A failure past this point (restart, filling the Maildir, indexing) must not leave Dovecot running.
  try {
    return await fillDovecot(dovecot);
  } catch (err) {
    await dovecot.close().catch(() => undefined);
    throw err;
  }
}

async function fillDovecot(dovecot: Awaited<ReturnType<typeof import('../test/helpers/dovecot.ts').startDovecot>>) {
  if (args.dovecot === 'tuned') {
    appendFileSync(join(dovecot.dir, 'dovecot.conf'), DOVECOT_TUNING);
    await dovecot.stop();
    // The old login processes may hold the listening sockets a moment after the master exits.
    for (const port of [dovecot.imapPort, dovecot.pop3Port, dovecot.lmtpPort]) await waitPortFree(port);
    await dovecot.start();
  }
  // Fill the user's Maildir directly (cur/ files with flags in their names), then let Dovecot
  // index it on the first SELECT (done in the warm-up, not measured).
  const uid = Number(execFileSync('id', ['-u', 'dovecot']).toString());
  const gid = Number(execFileSync('id', ['-g', 'dovecot']).toString());
  const home = join(dovecot.dir, 'mail', USER);
  const t0 = Date.now();
  const mk = (p: string) => {
    mkdirSync(p, { recursive: true });
    chownSync(p, uid, gid);
  };
  mk(home);
  for (const box of ['Maildir', 'Maildir/.Big']) for (const sub of ['', '/cur', '/new', '/tmp']) mk(join(home, box + sub));
  const now = Math.floor(Date.now() / 1000);
  for (let i = 0; i < MESSAGES; i++) {
    const f = join(home, 'Maildir', 'cur', `${now}.M${i}P1.bench:2,${i % 3 === 0 ? 'S' : ''}`);
    writeFileSync(f, benchMessage(i));
    chownSync(f, uid, gid);
  }
  const big = join(home, 'Maildir', '.Big', 'cur', `${now}.Mbig.bench:2,`);
  writeFileSync(big, bigMessage(BIG_MIB));
  chownSync(big, uid, gid);
  // Let Dovecot build its index once before measuring.
  const c = await Client.open(dovecot.imapPort);
  await c.cmd(`LOGIN ${USER} ${PASSWORD}`);
  await c.cmd('SELECT INBOX');
  await c.cmd('SELECT Big');
  c.close();
  return { dovecot, populateMs: Date.now() - t0 };
}

async function main(): Promise<void> {
  if (args.help) {
    process.stdout.write(
      (await import('node:fs')).readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]!.replace(/^\/\*\*?|^ \* ?/gm, '') + '\n',
    );
    return;
  }
  if (args.serve) return serve();
  console.log(
    `bench imap: ${MESSAGES} messages, ${BIG_MIB} MiB big body, ${SECONDS}s per figure and round, ${ROUNDS} rounds, ${CONCURRENCY} concurrent sessions, dovecot ${args.dovecot} config`,
  );
  // Both servers run for the whole bench, and every figure is measured in rounds that alternate
  // which server goes first; the median of the rounds is reported. On a shared machine whose load
  // changes by the minute, measuring one server after the other would compare different machines.
  const pg = await startPairgate();
  let dv: Awaited<ReturnType<typeof startDovecotBaseline>> | undefined;
  const values: Record<string, { pairgate: number[]; dovecot: number[] }> = {};
  const readers: Client[] = [];
  try {
    dv = await startDovecotBaseline();
    const targets: Target[] = [
      { name: 'pairgate', port: pg.port },
      { name: 'dovecot', port: dv.dovecot.imapPort },
    ];
    const reader = new Map<string, Client>();
    for (const t of targets) {
      const c = await Client.open(t.port);
      readers.push(c);
      await c.cmd(`LOGIN ${USER} ${PASSWORD}`);
      await warm(c);
      reader.set(t.name, c);
    }
    for (let r = 0; r < ROUNDS; r++) {
      for (const f of FIGURES) {
        const order = (r + FIGURES.indexOf(f)) % 2 === 0 ? targets : [...targets].reverse();
        for (const t of order) {
          const v = await f.fn(t, reader.get(t.name)!);
          for (const [key, x] of Object.entries(typeof v === 'number' ? { [f.key]: v } : v)) {
            (values[key] ??= { pairgate: [], dovecot: [] })[t.name as 'pairgate' | 'dovecot'].push(x);
          }
        }
      }
      console.log(`round ${r + 1}/${ROUNDS} done`);
    }
  } finally {
    for (const c of readers) c.close();
    pg.child.kill('SIGTERM');
    await dv?.dovecot.close();
  }
  const pgFigures: Record<string, number> = {};
  const dvFigures: Record<string, number> = {};
  const labels: Array<[string, string]> = FIGURES.flatMap((f) => [[f.key, f.label] as [string, string], ...Object.entries(f.also ?? {})]);
  for (const [key] of labels) {
    pgFigures[key] = median(values[key]!.pairgate);
    dvFigures[key] = median(values[key]!.dovecot);
  }
  const range = (xs: number[]) => `${Math.min(...xs).toFixed(1)}-${Math.max(...xs).toFixed(1)}`;
  const rows: Array<[string, string, number, number]> = labels.map(([key, label]) => [label, key, pgFigures[key]!, dvFigures[key]!]);
  const w = 44;
  console.log(`\n${'figure (median of rounds)'.padEnd(w)} ${'pairgate'.padStart(10)} ${'dovecot'.padStart(10)} ${'ratio'.padStart(7)}   rounds: pairgate | dovecot`);
  for (const [label, key, a, b] of rows) {
    console.log(`${label.padEnd(w)} ${a.toFixed(1).padStart(10)} ${b.toFixed(1).padStart(10)} ${(a / b).toFixed(2).padStart(7)}   ${range(values[key]!.pairgate)} | ${range(values[key]!.dovecot)}`);
  }
  console.log(`(populate: pairgate ${pg.populateMs} ms through the store, dovecot ${dv!.populateMs} ms writing Maildir files + indexing)`);
  const targets = {
    sessionRate: { value: +(pgFigures.sessionsPerSec! / dvFigures.sessionsPerSec!).toFixed(3), min: 0.8 },
    headerFetch: { value: +(pgFigures.headerMiBPerSec! / dvFigures.headerMiBPerSec!).toFixed(3), min: 0.8 },
    bigFetch: { value: +(pgFigures.bigFetchMiBPerSec! / dvFigures.bigFetchMiBPerSec!).toFixed(3), min: 0.8 },
  };
  const figures: Record<string, number> = {};
  for (const [, key, a, b] of rows) {
    figures[`pairgate_${key}`] = +a.toFixed(2);
    figures[`dovecot_${key}`] = +b.toFixed(2);
  }
  const met = Object.values(targets).every((t) => t.value >= t.min);
  console.log(JSON.stringify({ bench: 'imap', figures, targets, met }));
}

await main();
