/**
 * bench/store: the store agent's LMTP deliveries into pairgate's store on a replicated volume
 * with protocol C, against Dovecot's LMTP on the same machine in the same run; POP3 retrieval
 * against Dovecot's POP3; the store's recovery time with 100,000 messages.
 *
 *   npm run bench -- store [--seconds 3] [--concurrency 4] [--recovery-messages 100000] [--pop3-messages 1000]
 *                          [--peer-dir DIR] [--no-local] [--sizes 1024,51200,1048576]
 *
 * Deliveries per second for 1 KiB, 50 KiB and 1 MiB messages to 1 and 10 recipients, over
 * --concurrency LMTP connections, each delivery acknowledged before the next on its connection.
 * pairgate's store runs in a child process (this file with --serve), as the pair agent runs it:
 * on the primary of a replicated volume (protocol C: a group commit is acknowledged when both
 * disks have it), whose peer is a separate `pairgate volume serve` process on loopback, as
 * bench/volume does. Both nodes' files share this machine's one disk unless --peer-dir puts the
 * peer's elsewhere. Extra information (not a target): the same store on a local FileBlockDevice
 * (fdatasync per group commit, no peer) in a second child; --no-local skips it.
 * Dovecot runs with its default mail_fsync=optimized (Maildir, fsync per delivered file). Each
 * cell runs the three targets one after the other, so they see the same machine load.
 * POP3: RETR of --pop3-messages 50 KiB messages from the store on the replicated volume and
 * from Dovecot, master login on both. Recovery: open time of a store holding
 * --recovery-messages messages on a local file, after a clean close (from the checkpoint) and
 * after a crash (checkpoint plus replay of the tail); on a pair the node that opens the store
 * reads its own replica, so the replication link plays no part in it.
 * Each cell's progress line on stderr also gives the store process's CPU time per delivery
 * (user + system, from process.cpuUsage), which moves far less with machine load than the rates, and the
 * volume peer's (from /proc/PID/stat, in 10 ms ticks; NaN where there is no /proc).
 * --sizes picks the message sizes (bytes) to run, e.g. `--sizes 1048576` for a quick look at one
 * size. STORE_BENCH_PROF=dir writes CPU profiles of the store children and the volume peer there (on exit);
 * STORE_BENCH_NODE_FLAGS adds node flags to the store children (e.g. --trace-gc: their output goes to stderr).
 * Targets (issue #5): deliveries on protocol C >= 1.0x Dovecot; recovery < 2 s for 100,000
 * messages. Ends with one JSON line.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '4' },
    'recovery-messages': { type: 'string', default: '100000' },
    'pop3-messages': { type: 'string', default: '1000' },
    'peer-dir': { type: 'string' },
    'no-local': { type: 'boolean', default: false },
    sizes: { type: 'string', default: '1024,51200,1048576' },
    serve: { type: 'boolean', default: false },
    device: { type: 'string', default: 'local' },
    help: { type: 'boolean', default: false },
  },
});
const SECONDS = Number(args.seconds);
const CONCURRENCY = Number(args.concurrency);
const RECOVERY_MESSAGES = Number(args['recovery-messages']);
const POP3_MESSAGES = Number(args['pop3-messages']);
const MASTER = { user: 'bench-master', secret: 'bench-master-secret' };
const VOLUME_BYTES = 4 * 1024 * 1024 * 1024;
const USERS = Array.from({ length: 10 }, (_, i) => `bench${i}`);

/**
 * One bench message of `size` bytes as [head, body]: the head is unique (Message-ID; so no two
 * bodies are one stored copy), the body is a prefix of one text shared by every message of that
 * size, dot-stuffed once: building and dot-stuffing each message anew (five 1 MiB copies and a
 * regex per 1 MiB delivery) took client CPU from the two cores the servers under test share.
 */
function message(size: number, n: number): [Buffer, Buffer] {
  const head = Buffer.from(
    `From: Bench <bench@example.net>\r\nTo: bench0@example.net\r\nSubject: bench ${n}\r\nMessage-ID: <bench-${n}-${size}-${process.pid}-${Date.now()}@example.net>\r\n\r\n`,
  );
  return [head, sharedBody(size).subarray(0, Math.max(2, size - head.length))];
}

const sharedBodies = new Map<number, Buffer>();
function sharedBody(size: number): Buffer {
  let body = sharedBodies.get(size);
  if (!body) {
    const line = 'Benchmark body line with ordinary text, seventy-odd characters long...\r\n';
    body = dotStuff(Buffer.from(line.repeat(Math.ceil(size / line.length) + 1)));
    sharedBodies.set(size, body);
  }
  return body;
}

const END_OF_DATA = Buffer.from('\r\n.\r\n');

// ---- pairgate server (child process) ------------------------------------------------------

/** The child: the store on `--device local` (a FileBlockDevice) or `replicated` (the primary of a protocol C volume, config in $BENCH_VOLUME_CONFIG). */
async function serve(): Promise<void> {
  const { FileBlockDevice } = await import('../pair-agent/volume/block-device.ts');
  const { createStoreResource, storeConfigSchema } = await import('../pair-agent/store/resource.ts');
  const { createRegistry } = await import('../common/metrics.ts');
  const { createLogger } = await import('../common/log.ts');
  const { tempDir } = await import('../test/helpers/proc.ts');
  const registry = createRegistry({}, false);
  // warnings and errors (a refused delivery, a lost replication link) on stderr, so that a failed run says why
  const silentLogger = createLogger({ role: `bench-store-${args.device}`, level: process.env.BENCH_STORE_LOG ?? 'warn' });
  let device: import('../pair-agent/volume/block-device.ts').BlockDevice;
  let closeDevice: () => Promise<unknown>;
  let info: Record<string, unknown> = { device: 'local' };
  const dir = tempDir('pairgate-bench-store-');
  if (args.device === 'replicated') {
    const { ReplicatedVolume, volumeConfigSchema } = await import('../pair-agent/volume/index.ts');
    const { waitFor } = await import('../test/helpers/net.ts');
    const cfg = volumeConfigSchema.parse(JSON.parse(process.env.BENCH_VOLUME_CONFIG ?? 'null'));
    const volume = await ReplicatedVolume.open(cfg, { log: silentLogger, registry });
    await waitFor(() => volume.status().connection === 'Connected', 20_000, 'the volume peer to connect');
    await volume.promote();
    const st = volume.status();
    if (st.protocol !== 'C' || st.role !== 'primary' || st.connection !== 'Connected') throw new Error(`volume not a connected protocol C primary: ${JSON.stringify(st)}`);
    info = { device: 'replicated', protocol: st.protocol, connection: st.connection, disk: st.disk };
    device = volume;
    closeDevice = () => volume.close();
  } else {
    const dev = await FileBlockDevice.open(join(dir.path, 'vol.img'), { size: VOLUME_BYTES, create: true });
    device = dev;
    closeDevice = () => dev.close();
  }
  const config = storeConfigSchema.parse({ ports: { lmtp: 0, pop3: 0, imap: 0 }, masterUser: MASTER.user, masterSecret: MASTER.secret, compactBytesPerSec: 0 });
  const res = createStoreResource({ config, device, listenHost: '127.0.0.1', log: silentLogger, registry });
  await res.start();
  process.stdout.write(JSON.stringify({ ...res.ports(), ...info }) + '\n');
  // Each line on stdin asks for the CPU time this process has used so far (ms, user + system).
  process.stdin.on('data', (d: Buffer) => {
    for (let n = d.toString().split('\n').length - 1; n > 0; n--) {
      const u = process.cpuUsage();
      process.stdout.write(JSON.stringify({ cpuMs: (u.user + u.system) / 1000 }) + '\n');
    }
  });
  process.stdin.on('end', async () => {
    await res.stop();
    await closeDevice();
    dir.cleanup();
    process.exit(0);
  });
}

// ---- clients -------------------------------------------------------------------------------

class LineConn {
  private buf = '';
  private waiter: (() => void) | null = null;
  closed = false;
  private constructor(readonly sock: net.Socket) {
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      this.waiter?.();
    });
    sock.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
    sock.on('error', () => undefined);
  }
  static async open(port: number): Promise<LineConn> {
    const sock = net.connect({ port, host: '127.0.0.1' });
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    });
    const c = new LineConn(sock);
    await c.lines(1);
    return c;
  }
  /** Reads `n` reply lines (multi-line SMTP replies count once, at their last line). */
  async lines(n: number, timeoutMs = 30_000): Promise<string[]> {
    const out: string[] = [];
    const deadline = Date.now() + timeoutMs;
    while (out.length < n) {
      const i = this.buf.indexOf('\r\n');
      if (i >= 0) {
        const l = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 2);
        if (!/^\d{3}-/.test(l)) out.push(l);
        continue;
      }
      if (this.closed) throw new Error('connection closed');
      if (Date.now() > deadline) throw new Error('timeout');
      await new Promise<void>((r) => {
        const t = setTimeout(r, 1000);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = null;
          r();
        };
      });
    }
    return out;
  }
  /** Reads a POP3 multi-line answer up to "\r\n.\r\n"; returns its byte length. */
  async multi(timeoutMs = 30_000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.buf.indexOf('\r\n.\r\n');
      if (i >= 0) {
        const len = i + 5;
        this.buf = this.buf.slice(len);
        return len;
      }
      if (this.buf.startsWith('-ERR')) throw new Error(this.buf.slice(0, 200));
      if (this.closed) throw new Error('connection closed');
      if (Date.now() > deadline) throw new Error('timeout');
      await new Promise<void>((r) => {
        const t = setTimeout(r, 1000);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = null;
          r();
        };
      });
    }
  }
  write(s: string | Buffer): void {
    this.sock.write(s);
  }
  /** A message's DATA: head, body and the final dot in one writev, no copy. */
  writeMessage(head: Buffer, body: Buffer): void {
    this.sock.cork();
    this.sock.write(head);
    this.sock.write(body);
    this.sock.write(END_OF_DATA);
    this.sock.uncork();
  }
}

function dotStuff(b: Buffer): Buffer {
  return Buffer.from(b.toString('latin1').replace(/^\./gm, '..'), 'latin1');
}

async function lmtpRun(port: number, size: number, rcpts: number, seconds: number): Promise<{ perSec: number; count: number }> {
  const deadline = Date.now() + seconds * 1000;
  let count = 0;
  let n = 0;
  const worker = async () => {
    const c = await LineConn.open(port);
    c.write('LHLO bench\r\n');
    await c.lines(1);
    while (Date.now() < deadline) {
      const [head, body] = message(size, n++);
      const to = USERS.slice(0, rcpts);
      c.write(`MAIL FROM:<bench@example.net>\r\n${to.map((u) => `RCPT TO:<${u}@example.net>\r\n`).join('')}DATA\r\n`);
      const r = await c.lines(2 + to.length);
      if (!r.every((l, i) => (i === r.length - 1 ? l.startsWith('354') : l.startsWith('250')))) throw new Error(`LMTP refused: ${r.join(' | ')}`);
      c.writeMessage(head, body);
      const replies = await c.lines(to.length);
      if (!replies.every((l) => l.startsWith('250'))) throw new Error(`LMTP delivery failed: ${replies.join(' | ')}`);
      count++;
    }
    c.write('QUIT\r\n');
    c.sock.end();
  };
  const t0 = Date.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  return { perSec: count / ((Date.now() - t0) / 1000), count };
}

async function pop3Run(port: number, lmtpPort: number, user: string): Promise<{ msgsPerSec: number; mibPerSec: number }> {
  // Fill the maildrop first (not timed).
  const c = await LineConn.open(lmtpPort);
  c.write('LHLO bench\r\n');
  await c.lines(1);
  for (let i = 0; i < POP3_MESSAGES; i++) {
    c.write(`MAIL FROM:<b@example.net>\r\nRCPT TO:<${user}@example.net>\r\nDATA\r\n`);
    await c.lines(3);
    c.writeMessage(...message(50 * 1024, 100_000 + i));
    await c.lines(1);
  }
  c.sock.end();
  const p = await LineConn.open(port);
  const auth = Buffer.from(`${user}\0${MASTER.user}\0${MASTER.secret}`).toString('base64');
  p.write(`AUTH PLAIN ${auth}\r\n`);
  const [ok] = await p.lines(1);
  if (!ok!.startsWith('+OK')) throw new Error(`POP3 login failed: ${ok}`);
  p.write('STAT\r\n');
  const [stat] = await p.lines(1);
  const total = Number(stat!.split(' ')[1]);
  const t0 = Date.now();
  let bytes = 0;
  for (let i = 1; i <= total; i++) {
    p.write(`RETR ${i}\r\n`);
    bytes += await p.multi();
  }
  const s = (Date.now() - t0) / 1000;
  p.write('QUIT\r\n');
  p.sock.end();
  return { msgsPerSec: total / s, mibPerSec: bytes / 1024 / 1024 / s };
}

async function recoveryRun(): Promise<{ messages: number; cleanMs: number; crashMs: number; fillPerSec: number }> {
  const { FileBlockDevice } = await import('../pair-agent/volume/block-device.ts');
  const { openMailStore } = await import('../pair-agent/store/index.ts');
  const { silentLogger } = await import('../common/log.ts');
  const { tempDir } = await import('../test/helpers/proc.ts');
  const dir = tempDir('pairgate-bench-recovery-');
  const path = join(dir.path, 'vol.img');
  try {
    let dev = await FileBlockDevice.open(path, { size: 2 * 1024 * 1024 * 1024, create: true });
    let store = await openMailStore(dev, { log: silentLogger, compactBytesPerSec: 0 });
    const t0 = Date.now();
    let next = 0;
    const worker = async () => {
      while (next < RECOVERY_MESSAGES) {
        const i = next++;
        await store.deliver(`rec-${i}`, [`r${i % 50}`], message(1024, i));
      }
    };
    await Promise.all(Array.from({ length: 64 }, worker));
    const fillPerSec = RECOVERY_MESSAGES / ((Date.now() - t0) / 1000);
    await store.close();
    await dev.close();
    dev = await FileBlockDevice.open(path);
    let t1 = Date.now();
    store = await openMailStore(dev, { log: silentLogger, compactBytesPerSec: 0 });
    const cleanMs = Date.now() - t1;
    const st = await store.stats();
    if (st.messages !== RECOVERY_MESSAGES) throw new Error(`recovered ${st.messages} messages, expected ${RECOVERY_MESSAGES}`);
    // A crash: more deliveries after the last checkpoint, then the device is dropped without close.
    for (let i = 0; i < 2000; i++) await store.deliver(`rec-tail-${i}`, [`r${i % 50}`], message(1024, RECOVERY_MESSAGES + i));
    (store as unknown as { closed: boolean }).closed = true;
    await dev.close();
    dev = await FileBlockDevice.open(path);
    t1 = Date.now();
    store = await openMailStore(dev, { log: silentLogger, compactBytesPerSec: 0 });
    const crashMs = Date.now() - t1;
    const st2 = await store.stats();
    if (st2.messages !== RECOVERY_MESSAGES + 2000) throw new Error(`recovered ${st2.messages} after the crash`);
    await store.close();
    await dev.close();
    return { messages: RECOVERY_MESSAGES, cleanMs, crashMs, fillPerSec };
  } finally {
    dir.cleanup();
  }
}

async function main(): Promise<void> {
  if (args.help) {
    const header = readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]!;
    process.stdout.write(header.replace(/^\/\*\*?\n?|^ \* ?/gm, '') + '\n');
    return;
  }
  const self = fileURLToPath(import.meta.url);
  const { PAIRGATE_BIN, REPO_ROOT } = await import('../bin/lab/supervisor.ts');
  const { freePort, waitForPort } = await import('../test/helpers/net.ts');
  const { startProcess, tempDir } = await import('../test/helpers/proc.ts');
  const { stringify } = await import('yaml');
  const dir = tempDir('pairgate-bench-store-vol-');
  const peerDir = args['peer-dir'] ? mkdtempSync(join(args['peer-dir'], 'pairgate-bench-store-peer-')) : dir.path;
  const children: ChildProcess[] = [];
  let peer: Awaited<ReturnType<typeof startProcess>> | null = null;

  /** One store child; resolves with its ports once it serves. */
  const cpuReaders = new Map<ChildProcess, Array<(ms: number) => void>>();
  /** CPU time (ms) a store child has used so far. */
  const cpuOf = (child: ChildProcess) =>
    new Promise<number>((resolve) => {
      cpuReaders.get(child)!.push(resolve);
      child.stdin!.write('cpu\n');
    });
  const startStore = (device: 'local' | 'replicated', env: NodeJS.ProcessEnv = {}) => {
    const prof = process.env.STORE_BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.STORE_BENCH_PROF] : [];
    const child: ChildProcess = spawn(process.execPath, [...prof, ...(process.env.STORE_BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean), '--import', 'tsx', self, '--serve', '--device', device], { stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, ...env } });
    children.push(child);
    cpuReaders.set(child, []);
    return new Promise<{ lmtp: number; pop3: number; device: string; protocol?: string; child: ChildProcess }>((resolve, reject) => {
      let out = '';
      let first = true;
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        for (let i = out.indexOf('\n'); i >= 0; i = out.indexOf('\n')) {
          const text = out.slice(0, i);
          out = out.slice(i + 1);
          // Anything but the child's JSON lines (e.g. --trace-gc from STORE_BENCH_NODE_FLAGS) goes to stderr.
          if (!text.startsWith('{')) {
            process.stderr.write(`store child: ${text}\n`);
            continue;
          }
          const line = JSON.parse(text);
          if (first) {
            first = false;
            resolve({ ...line, child });
          } else cpuReaders.get(child)!.shift()?.(line.cpuMs);
        }
      });
      child.once('exit', (code) => reject(new Error(`store child (${device}) exited ${code}`)));
    });
  };

  type Row = { name: string; c: number; local: number | null; dovecot: number };
  const rows: Row[] = [];
  let dovecot: Awaited<ReturnType<typeof import('../test/helpers/dovecot.ts').startDovecot>> | null = null;
  try {
    // The volume's peer: a separate process on loopback, as on a pair.
    const ports = { a: await freePort(), b: await freePort(), peerAdmin: await freePort() };
    const SECRET = 'bench-store-volume-secret-0123';
    const base = { name: 'benchstore', sizeBytes: VOLUME_BYTES, secret: SECRET, protocol: 'C' };
    const cfgA = { ...base, dataFile: join(dir.path, 'a.data'), metaFile: join(dir.path, 'a.meta'), listen: `127.0.0.1:${ports.a}`, peer: `127.0.0.1:${ports.b}` };
    const cfgB = { ...base, dataFile: join(peerDir, 'b.data'), metaFile: join(peerDir, 'b.meta'), listen: `127.0.0.1:${ports.b}`, peer: `127.0.0.1:${ports.a}`, admin: { host: '127.0.0.1', port: ports.peerAdmin } };
    writeFileSync(join(dir.path, 'b.yaml'), stringify(cfgB));
    const peerProf = process.env.STORE_BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.STORE_BENCH_PROF] : [];
    peer = startProcess('volume-peer', process.execPath, [...peerProf, PAIRGATE_BIN, 'volume', 'serve', '--config', join(dir.path, 'b.yaml'), '--log-level', 'warn'], { cwd: REPO_ROOT });
    await waitForPort('127.0.0.1', ports.peerAdmin, 20_000);
    const peerPid = peer.child.pid;
    /** CPU time (ms, user + system, all threads) the volume peer has used so far, from /proc (10 ms ticks). */
    const peerCpuMs = () => {
      try {
        const f = readFileSync(`/proc/${peerPid}/stat`, 'utf8').split(') ')[1]!.split(' ');
        return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
      } catch {
        return NaN; // not Linux, or the peer is gone
      }
    };
    const cPorts = await startStore('replicated', { BENCH_VOLUME_CONFIG: JSON.stringify(cfgA) });
    process.stderr.write(`pairgate store on a replicated volume: ${JSON.stringify({ ...cPorts, child: cPorts.child.pid })}; peer files in ${peerDir === dir.path ? 'the same folder (same disk)' : peerDir}\n`);
    const localPorts = args['no-local'] ? null : await startStore('local');
    const { startDovecot } = await import('../test/helpers/dovecot.ts');
    dovecot = await startDovecot({ users: [...USERS, 'popbench'].map((u) => ({ user: u, password: 'pw-' + u })), masterUser: MASTER.user, masterPassword: MASTER.secret });
    for (const size of args.sizes.split(',').map(Number)) {
      if (!Number.isInteger(size) || size < 64) throw new Error(`--sizes: ${size} is not a message size in bytes`);
      for (const rcpts of [1, 10]) {
        const name = `lmtp ${size >= 1024 * 1024 ? size / 1024 / 1024 + ' MiB' : size / 1024 + ' KiB'} x${rcpts}`;
        const secs = size >= 1024 * 1024 ? Math.max(SECONDS, 3) : SECONDS;
        const cpu0 = await cpuOf(cPorts.child);
        const peer0 = peerCpuMs();
        const c = await lmtpRun(cPorts.lmtp, size, rcpts, secs);
        const cpuC = ((await cpuOf(cPorts.child)) - cpu0) / Math.max(1, c.count);
        const cpuPeer = (peerCpuMs() - peer0) / Math.max(1, c.count);
        const cpu1 = localPorts ? await cpuOf(localPorts.child) : 0;
        const l = localPorts ? await lmtpRun(localPorts.lmtp, size, rcpts, secs) : null;
        const cpuL = localPorts && l ? ((await cpuOf(localPorts.child)) - cpu1) / Math.max(1, l.count) : null;
        const dc = await lmtpRun(dovecot.lmtpPort, size, rcpts, secs);
        rows.push({ name, c: c.perSec, local: l?.perSec ?? null, dovecot: dc.perSec });
        process.stderr.write(
          `${name}: pairgate C ${c.perSec.toFixed(1)}/s (${c.count}, store CPU ${cpuC.toFixed(2)} ms/delivery, volume peer ${cpuPeer.toFixed(2)})${l ? `, pairgate local ${l.perSec.toFixed(1)}/s (${l.count}, ${cpuL!.toFixed(2)} ms)` : ''}, dovecot ${dc.perSec.toFixed(1)}/s (${dc.count})\n`,
        );
      }
    }
    const pgPop = await pop3Run(cPorts.pop3, cPorts.lmtp, 'popbench');
    const dcPop = await pop3Run(dovecot.pop3Port, dovecot.lmtpPort, 'popbench');
    rows.push({ name: 'pop3 RETR 50 KiB msgs/s', c: pgPop.msgsPerSec, local: null, dovecot: dcPop.msgsPerSec });
    rows.push({ name: 'pop3 RETR MiB/s', c: pgPop.mibPerSec, local: null, dovecot: dcPop.mibPerSec });
  } finally {
    for (const ch of children) ch.stdin!.end();
    await Promise.all(children.map((ch) => (ch.exitCode !== null ? undefined : new Promise((r) => ch.once('exit', r)))));
    await peer?.stop(3000);
    await dovecot?.close();
    if (peerDir !== dir.path) rmSync(peerDir, { recursive: true, force: true });
    dir.cleanup();
  }
  const rec = await recoveryRun();
  const width = Math.max(...rows.map((r) => r.name.length));
  const f = (x: number | null) => (x === null ? '-' : x.toFixed(1)).padStart(12);
  process.stdout.write(`\n${'figure'.padEnd(width)}  ${'pairgate C'.padStart(12)}  ${'dovecot'.padStart(12)}  C/dovecot  ${'local file'.padStart(12)}  local/dovecot\n`);
  for (const r of rows) {
    process.stdout.write(`${r.name.padEnd(width)}  ${f(r.c)}  ${f(r.dovecot)}  ${(r.c / r.dovecot).toFixed(2).padStart(9)}  ${f(r.local)}  ${r.local === null ? '' : (r.local / r.dovecot).toFixed(2).padStart(13)}\n`);
  }
  process.stdout.write(`(pairgate C: the store on the primary of a protocol C replicated volume, peer process on loopback; local file: the same store with no peer)\n`);
  process.stdout.write(`recovery of ${rec.messages} messages: ${rec.cleanMs} ms after a clean close, ${rec.crashMs} ms after a crash (2000 records to replay); filled at ${rec.fillPerSec.toFixed(0)}/s in-process\n`);
  const lmtpRows = rows.filter((r) => r.name.startsWith('lmtp'));
  const minRatio = Math.min(...lmtpRows.map((r) => r.c / r.dovecot));
  const figures: Record<string, number> = {};
  for (const r of rows) {
    const key = r.name.replace(/[^a-z0-9]+/gi, '_').toLowerCase();
    figures[`${key}_pairgate_c`] = Number(r.c.toFixed(2));
    if (r.local !== null) figures[`${key}_pairgate_local`] = Number(r.local.toFixed(2));
    figures[`${key}_dovecot`] = Number(r.dovecot.toFixed(2));
  }
  figures.recovery_clean_ms = rec.cleanMs;
  figures.recovery_crash_ms = rec.crashMs;
  const targets = {
    lmtp_c_min_ratio_vs_dovecot: { value: Number(minRatio.toFixed(2)), min: 1.0 },
    recovery_100k_seconds: { value: Number((Math.max(rec.cleanMs, rec.crashMs) / 1000).toFixed(3)), max: 2 },
  };
  const met = minRatio >= 1.0 && Math.max(rec.cleanMs, rec.crashMs) < 2000;
  process.stdout.write(JSON.stringify({ bench: 'store', figures, targets, met }) + '\n');
}

if (args.serve) await serve();
else await main();
