/**
 * bench/store: the store agent's LMTP deliveries and POP3 retrieval against Dovecot on the same
 * machine in the same run, and the store's recovery time with 100,000 messages.
 *
 *   npm run bench -- store [--seconds 3] [--concurrency 4] [--recovery-messages 100000] [--pop3-messages 1000]
 *
 * Deliveries per second for 1 KiB, 50 KiB and 1 MiB messages to 1 and 10 recipients, over
 * --concurrency LMTP connections, each delivery acknowledged before the next on its connection.
 * pairgate's store runs in a child process (this file with --serve) on a FileBlockDevice (local
 * file, fdatasync per group commit) — the replicated volume (protocol C) is not in this tree yet,
 * so its network round trip is not included. Dovecot runs with its default mail_fsync=optimized
 * (Maildir, fsync per delivered file). POP3: RETR of --pop3-messages 50 KiB messages, master
 * login on both. Recovery: open time of a store holding --recovery-messages messages, after a
 * clean close (from the checkpoint) and after a crash (checkpoint plus replay of the tail).
 * Targets (issue #5): deliveries >= 1.0x Dovecot; recovery < 2 s for 100,000 messages.
 * Ends with one JSON line.
 */
import { spawn, type ChildProcess } from 'node:child_process';
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
    serve: { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
});
const SECONDS = Number(args.seconds);
const CONCURRENCY = Number(args.concurrency);
const RECOVERY_MESSAGES = Number(args['recovery-messages']);
const POP3_MESSAGES = Number(args['pop3-messages']);
const MASTER = { user: 'bench-master', secret: 'bench-master-secret' };
const USERS = Array.from({ length: 10 }, (_, i) => `bench${i}`);

function message(size: number, n: number): Buffer {
  const head = `From: Bench <bench@example.net>\r\nTo: bench0@example.net\r\nSubject: bench ${n}\r\nMessage-ID: <bench-${n}-${size}-${process.pid}-${Date.now()}@example.net>\r\n\r\n`;
  const line = 'Benchmark body line with ordinary text, seventy-odd characters long...\r\n';
  const body = line.repeat(Math.max(1, Math.ceil((size - head.length) / line.length)));
  return Buffer.from(head + body).subarray(0, Math.max(size, head.length + 2));
}

// ---- pairgate server (child process) ------------------------------------------------------

async function serve(): Promise<void> {
  const { FileBlockDevice } = await import('../pair-agent/volume/block-device.ts');
  const { createStoreResource, storeConfigSchema } = await import('../pair-agent/store/resource.ts');
  const { createRegistry } = await import('../common/metrics.ts');
  const { silentLogger } = await import('../common/log.ts');
  const { tempDir } = await import('../test/helpers/proc.ts');
  const dir = tempDir('pairgate-bench-store-');
  const device = await FileBlockDevice.open(join(dir.path, 'vol.img'), { size: 4 * 1024 * 1024 * 1024, create: true });
  const config = storeConfigSchema.parse({ ports: { lmtp: 0, pop3: 0, imap: 0 }, masterUser: MASTER.user, masterSecret: MASTER.secret, compactBytesPerSec: 0 });
  const res = createStoreResource({ config, device, listenHost: '127.0.0.1', log: silentLogger, registry: createRegistry({}, false) });
  await res.start();
  process.stdout.write(JSON.stringify(res.ports()) + '\n');
  process.stdin.on('data', () => undefined);
  process.stdin.on('end', async () => {
    await res.stop();
    await device.close();
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
      const body = dotStuff(message(size, n++));
      const to = USERS.slice(0, rcpts);
      c.write(`MAIL FROM:<bench@example.net>\r\n${to.map((u) => `RCPT TO:<${u}@example.net>\r\n`).join('')}DATA\r\n`);
      const r = await c.lines(2 + to.length);
      if (!r.every((l, i) => (i === r.length - 1 ? l.startsWith('354') : l.startsWith('250')))) throw new Error(`LMTP refused: ${r.join(' | ')}`);
      c.write(Buffer.concat([body, Buffer.from('\r\n.\r\n')]));
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
    c.write(Buffer.concat([dotStuff(message(50 * 1024, 100_000 + i)), Buffer.from('\r\n.\r\n')]));
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
    const { readFileSync } = await import('node:fs');
    const header = readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]!;
    process.stdout.write(header.replace(/^\/\*\*?\n?|^ \* ?/gm, '') + '\n');
    return;
  }
  const self = fileURLToPath(import.meta.url);
  const child: ChildProcess = spawn(process.execPath, ['--import', 'tsx', self, '--serve'], { stdio: ['pipe', 'pipe', 'inherit'] });
  const ports = await new Promise<{ lmtp: number; pop3: number }>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const i = out.indexOf('\n');
      if (i >= 0) resolve(JSON.parse(out.slice(0, i)));
    });
    child.once('exit', (code) => reject(new Error(`store child exited ${code}`)));
  });
  const { startDovecot } = await import('../test/helpers/dovecot.ts');
  const dovecot = await startDovecot({ users: [...USERS, 'popbench'].map((u) => ({ user: u, password: 'pw-' + u })), masterUser: MASTER.user, masterPassword: MASTER.secret });
  const rows: Array<{ name: string; pairgate: number; dovecot: number }> = [];
  try {
    for (const size of [1024, 50 * 1024, 1024 * 1024]) {
      for (const rcpts of [1, 10]) {
        const name = `lmtp ${size >= 1024 * 1024 ? size / 1024 / 1024 + ' MiB' : size / 1024 + ' KiB'} x${rcpts}`;
        const secs = size >= 1024 * 1024 ? Math.max(SECONDS, 3) : SECONDS;
        const pg = await lmtpRun(ports.lmtp, size, rcpts, secs);
        const dc = await lmtpRun(dovecot.lmtpPort, size, rcpts, secs);
        rows.push({ name, pairgate: pg.perSec, dovecot: dc.perSec });
        process.stderr.write(`${name}: pairgate ${pg.perSec.toFixed(1)}/s (${pg.count}), dovecot ${dc.perSec.toFixed(1)}/s (${dc.count})\n`);
      }
    }
    const pgPop = await pop3Run(ports.pop3, ports.lmtp, 'popbench');
    const dcPop = await pop3Run(dovecot.pop3Port, dovecot.lmtpPort, 'popbench');
    rows.push({ name: 'pop3 RETR 50 KiB msgs/s', pairgate: pgPop.msgsPerSec, dovecot: dcPop.msgsPerSec });
    rows.push({ name: 'pop3 RETR MiB/s', pairgate: pgPop.mibPerSec, dovecot: dcPop.mibPerSec });
  } finally {
    child.stdin!.end();
    await dovecot.close();
  }
  const rec = await recoveryRun();
  const width = Math.max(...rows.map((r) => r.name.length));
  process.stdout.write(`\n${'figure'.padEnd(width)}  ${'pairgate'.padStart(10)}  ${'dovecot'.padStart(10)}  ratio\n`);
  for (const r of rows) process.stdout.write(`${r.name.padEnd(width)}  ${r.pairgate.toFixed(1).padStart(10)}  ${r.dovecot.toFixed(1).padStart(10)}  ${(r.pairgate / r.dovecot).toFixed(2)}\n`);
  process.stdout.write(`recovery of ${rec.messages} messages: ${rec.cleanMs} ms after a clean close, ${rec.crashMs} ms after a crash (2000 records to replay); filled at ${rec.fillPerSec.toFixed(0)}/s in-process\n`);
  const lmtpRows = rows.filter((r) => r.name.startsWith('lmtp'));
  const minRatio = Math.min(...lmtpRows.map((r) => r.pairgate / r.dovecot));
  const figures: Record<string, number> = {};
  for (const r of rows) {
    const key = r.name.replace(/[^a-z0-9]+/gi, '_').toLowerCase();
    figures[`${key}_pairgate`] = Number(r.pairgate.toFixed(2));
    figures[`${key}_dovecot`] = Number(r.dovecot.toFixed(2));
  }
  figures.recovery_clean_ms = rec.cleanMs;
  figures.recovery_crash_ms = rec.crashMs;
  const targets = {
    lmtp_min_ratio_vs_dovecot: { value: Number(minRatio.toFixed(2)), min: 1.0 },
    recovery_100k_seconds: { value: Number((Math.max(rec.cleanMs, rec.crashMs) / 1000).toFixed(3)), max: 2 },
  };
  const met = minRatio >= 1.0 && Math.max(rec.cleanMs, rec.crashMs) < 2000;
  process.stdout.write(JSON.stringify({ bench: 'store', figures, targets, met }) + '\n');
}

if (args.serve) await serve();
else await main();
