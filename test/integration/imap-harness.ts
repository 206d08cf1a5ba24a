/**
 * Shared set-up for the IMAP integration tests (not a test file itself): the real mail store
 * on a local FileBlockDevice in a temp dir, the IMAP server on an ephemeral loopback port, a
 * log capture, and a small raw-socket IMAP client that reads until the tagged reply.
 */
import net from 'node:net';
import tls from 'node:tls';
import { Writable } from 'node:stream';
import { join } from 'node:path';
import { pino } from 'pino';
import { AddressList } from '../../common/cidr.ts';
import { createRegistry, type MetricsRegistry } from '../../common/metrics.ts';
import type { Logger } from '../../common/log.ts';
import { FileBlockDevice } from '../../pair-agent/volume/block-device.ts';
import { openMailStore } from '../../pair-agent/store/index.ts';
import type { MailStore } from '../../pair-agent/store/types.ts';
import { startImapServer, type ImapServer, type ImapServerOptions } from '../../pair-agent/store/imap/index.ts';
import { tempDir } from '../helpers/proc.ts';

export const MASTER = { user: 'proxy-master', secret: 'master-secret-123' };

export interface Harness {
  store: MailStore;
  server: ImapServer;
  port: number;
  registry: MetricsRegistry;
  logs: string[];
  dir: string;
  device: FileBlockDevice;
  /** Delivers a message to users' INBOXes through the store (as LMTP does). */
  deliver(users: string[], body: string | Buffer): Promise<void>;
  close(): Promise<void>;
}

export interface HarnessOptions extends Partial<Omit<ImapServerOptions, 'store' | 'log' | 'registry'>> {
  volumeBytes?: number;
  /** The store's per-user quota (QUOTA tests). */
  quotaBytes?: number;
}

let deliveries = 0;

export async function startHarness(opts: HarnessOptions = {}): Promise<Harness> {
  const tmp = tempDir('pairgate-imap-');
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line) logs.push(line);
      if (logs.length > 20_000) logs.splice(0, 10_000);
      cb();
    },
  });
  const log = pino({ level: process.env.IMAP_TEST_LOG_LEVEL ?? 'info', base: { role: 'test' } }, sink) as unknown as Logger;
  const registry = createRegistry({}, false);
  const device = await FileBlockDevice.open(join(tmp.path, 'volume.img'), { size: opts.volumeBytes ?? 256 * 1024 * 1024, create: true });
  const store = await openMailStore(device, { log, registry, ...(opts.quotaBytes ? { quotaBytes: opts.quotaBytes } : {}) });
  const { volumeBytes: _v, quotaBytes: _q, ...serverOpts } = opts;
  const server = await startImapServer({
    host: '127.0.0.1',
    port: 0,
    masterUser: MASTER.user,
    masterSecret: MASTER.secret,
    trusted: new AddressList(['127.0.0.0/8']),
    users: { alice: 'alice-pw', bob: 'bob-pw', carol: 'carol-pw', dave: 'dave-pw' },
    ...serverOpts,
    store,
    log,
    registry,
  });
  return {
    store,
    server,
    port: server.port,
    registry,
    logs,
    dir: tmp.path,
    device,
    async deliver(users, body) {
      const res = await store.deliver(`test-${process.pid}-${++deliveries}`, users, Buffer.isBuffer(body) ? body : Buffer.from(body));
      for (const r of res) if (!r.ok) throw r.error ?? new Error(`delivery to ${r.user} failed`);
    },
    async close() {
      await server.close();
      await store.close();
      await device.close();
      tmp.cleanup();
    },
  };
}

export function message(subject: string, body = 'Hello.\r\n', extra = ''): string {
  return `From: Bob Sender <bob@example.net>\r\nTo: Alice <alice@example.net>\r\nSubject: ${subject}\r\nDate: Mon, 23 Nov 2026 01:00:00 +0000\r\nMessage-ID: <${subject.replace(/\W/g, '')}@example.net>\r\n${extra}\r\n${body}`;
}

/**
 * A raw IMAP client: `send` writes a command and resolves with every line up to and including
 * its tagged reply (literals inlined), failing after a timeout.
 */
export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  private seq = 0;
  closed = false;
  socket: net.Socket;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.attach(socket);
  }

  private attach(socket: net.Socket): void {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static async connect(port: number, host = '127.0.0.1'): Promise<RawClient> {
    const socket = net.connect({ port, host });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const c = new RawClient(socket);
    await c.readLine();
    return c;
  }

  /** Waits until `pred(buffer)` or the timeout; returns the buffer text. */
  async waitFor(pred: (text: string) => boolean, timeoutMs = 5000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = this.buf.toString('latin1');
      if (pred(text)) return text;
      if (this.closed) throw new Error(`connection closed while waiting; got: ${text.slice(-500)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting; got: ${text.slice(-500)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Reads one line (without CRLF). */
  async readLine(timeoutMs = 5000): Promise<string> {
    await this.waitFor((t) => t.includes('\r\n'), timeoutMs);
    const i = this.buf.indexOf('\r\n');
    const line = this.buf.subarray(0, i).toString('latin1');
    this.buf = this.buf.subarray(i + 2);
    return line;
  }

  /** Takes everything read so far. */
  take(): string {
    const t = this.buf.toString('latin1');
    this.buf = Buffer.alloc(0);
    return t;
  }

  writeRaw(data: string | Buffer): void {
    this.socket.write(data);
  }

  nextTag(): string {
    return `T${++this.seq}`;
  }

  /** Sends `tag command` and returns the full response text up to the tagged line. */
  async send(command: string, timeoutMs = 5000): Promise<{ tag: string; text: string; status: string; tagged: string }> {
    const tag = this.nextTag();
    this.socket.write(`${tag} ${command}\r\n`);
    return this.until(tag, timeoutMs);
  }

  async until(tag: string, timeoutMs = 5000): Promise<{ tag: string; text: string; status: string; tagged: string }> {
    const re = new RegExp(`(^|\\r\\n)${tag} (OK|NO|BAD)[^\\r\\n]*\\r\\n`);
    const text = await this.waitFor((t) => re.test(t), timeoutMs);
    const m = re.exec(text)!;
    const end = m.index + m[0].length;
    this.buf = this.buf.subarray(end);
    const all = text.slice(0, end);
    const tagged = m[0].replace(/^\r\n/, '').replace(/\r\n$/, '');
    return { tag, text: all, status: m[2]!, tagged };
  }

  async startTls(): Promise<void> {
    const secure = tls.connect({ socket: this.socket, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    this.socket.removeAllListeners('data');
    this.socket = secure;
    this.attach(secure);
  }

  close(): void {
    this.socket.destroy();
  }
}

export async function loggedIn(port: number, user = 'alice', password = `${user}-pw`): Promise<RawClient> {
  const c = await RawClient.connect(port);
  const r = await c.send(`LOGIN ${user} ${password}`);
  if (r.status !== 'OK') throw new Error(`login failed: ${r.text}`);
  return c;
}
