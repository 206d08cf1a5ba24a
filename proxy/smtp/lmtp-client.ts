/**
 * A small LMTP client (RFC 2033) for delivering one message to one pair: greeting, LHLO,
 * client address forwarding (XCLIENT, else XFORWARD, when the server offers them), MAIL,
 * RCPT per recipient, DATA and one reply per accepted recipient. Pipelined when the server
 * offers PIPELINING. Every wait is bounded.
 *
 * nodemailer's smtp-connection speaks LMTP too, but neither XCLIENT (which needs a second
 * LHLO after its 220) nor per-recipient RCPT replies with their enhanced codes are reachable
 * through it, and both are needed here.
 *
 * Connection-level failures (refused, timeout, protocol fault, server gone) throw
 * UnavailableError/TimeoutError (temporary); per-recipient answers are returned as values.
 */
import net from 'node:net';
import { isIP } from 'node:net';
import { ProtocolError, TimeoutError, UnavailableError } from '../../common/errors.ts';
import { splitEnhanced } from './replies.ts';

export interface LmtpReply {
  code: number;
  enhanced: string;
  text: string;
}

export interface LmtpRecipientResult {
  recipient: string;
  reply: LmtpReply;
  /** `rcpt` when refused at RCPT, `data` for the reply after the message, `mail` when MAIL was refused. */
  stage: 'mail' | 'rcpt' | 'data';
}

export interface LmtpSendOptions {
  host: string;
  port: number;
  /** LHLO name. */
  name: string;
  from: string;
  recipients: string[];
  /** The message, as received (CRLF or LF line ends); dot-stuffed and CRLF-normalised here. */
  body: Buffer;
  /** Original client, forwarded with XCLIENT/XFORWARD when offered. */
  client?: { address: string; port: number; helo?: string | undefined } | undefined;
  connectTimeoutMs: number;
  replyTimeoutMs: number;
}

const MAX_REPLY_LINE = 4096;
const MAX_REPLY_LINES = 200;

/** Line-oriented reply reader: yields complete (possibly multi-line) replies in order. */
class ReplyReader {
  private buf = '';
  private lines: string[] = [];
  private replies: Array<{ code: number; lines: string[] }> = [];
  private waiter: { resolve: () => void } | null = null;
  private failure: Error | null = null;

  constructor(private readonly socket: net.Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => this.push(d));
    socket.on('error', (err) => this.fail(new UnavailableError(`LMTP connection error: ${err.message}`, { cause: err })));
    socket.on('close', () => this.fail(new UnavailableError('LMTP server closed the connection')));
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.resolve();
  }

  private push(d: string): void {
    this.buf += d;
    let i: number;
    while ((i = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, i).replace(/\r$/, '');
      this.buf = this.buf.slice(i + 1);
      const m = /^(\d{3})([ -])(.*)$/.exec(line);
      if (!m) {
        this.fail(new ProtocolError(`malformed LMTP reply line: ${JSON.stringify(line.slice(0, 100))}`));
        return;
      }
      this.lines.push(m[3]!);
      if (this.lines.length > MAX_REPLY_LINES) {
        this.fail(new ProtocolError('LMTP reply too long'));
        return;
      }
      if (m[2] === ' ') {
        this.replies.push({ code: Number(m[1]), lines: this.lines });
        this.lines = [];
      }
    }
    if (this.buf.length > MAX_REPLY_LINE) this.fail(new ProtocolError('LMTP reply line too long'));
    this.wake();
  }

  /** Nothing buffered and no failure: safe to start a new command. */
  get idle(): boolean {
    return !this.failure && this.replies.length === 0 && this.lines.length === 0 && this.buf.length === 0;
  }

  async next(timeoutMs: number, what: string): Promise<{ code: number; lines: string[] }> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = this.replies.shift();
      if (r) return r;
      if (this.failure) throw this.failure;
      const left = deadline - Date.now();
      if (left <= 0) throw new TimeoutError(`no LMTP reply to ${what} within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          this.waiter = null;
          resolve();
        }, left);
        this.waiter = {
          resolve: () => {
            clearTimeout(t);
            resolve();
          },
        };
      });
    }
  }
}

function toReply(r: { code: number; lines: string[] }): LmtpReply {
  const { enhanced, text } = splitEnhanced(r.code, r.lines.join(' '));
  return { code: r.code, enhanced, text };
}

/** Dot-stuffs and CRLF-normalises a message; the result ends with CRLF "." CRLF. */
export function encodeData(body: Buffer): Buffer {
  const out: Buffer[] = [];
  const DOT = Buffer.from('.');
  const CRLF = Buffer.from('\r\n');
  let start = 0;
  while (start < body.length) {
    const nl = body.indexOf(0x0a, start);
    const end = nl < 0 ? body.length : nl;
    const lineEnd = end > start && body[end - 1] === 0x0d ? end - 1 : end;
    if (body[start] === 0x2e) out.push(DOT);
    out.push(body.subarray(start, lineEnd), CRLF);
    start = end + 1;
  }
  out.push(Buffer.from('.\r\n'));
  return Buffer.concat(out);
}

function xtextAddr(address: string): string {
  return isIP(address) === 6 ? `IPV6:${address}` : address;
}

function connect(host: string, port: number, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new TimeoutError(`LMTP connect to ${host}:${port} not done within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(new UnavailableError(`LMTP connect to ${host}:${port} failed: ${err.message}`, { cause: err }));
    });
  });
}

function capabilities(lines: string[]): Map<string, string[]> {
  const caps = new Map<string, string[]>();
  for (const l of lines.slice(1)) {
    const [k, ...args] = l.trim().split(/\s+/);
    if (k) caps.set(k.toUpperCase(), args.map((a) => a.toUpperCase()));
  }
  return caps;
}

/** The connection failed before the server answered MAIL: nothing of this message reached it. */
export class StaleConnectionError extends UnavailableError {}

export type LmtpConnectOptions = Pick<LmtpSendOptions, 'host' | 'port' | 'name' | 'client' | 'connectTimeoutMs' | 'replyTimeoutMs'>;

/** One LMTP session: greeting, LHLO, XCLIENT/XFORWARD once, then any number of transactions. */
export class LmtpConnection {
  /** True once a transaction ended cleanly (every reply read), so another may follow. */
  reusable = false;

  private constructor(
    private readonly socket: net.Socket,
    private readonly reader: ReplyReader,
    private readonly caps: Map<string, string[]>,
    private readonly timeout: number,
  ) {}

  static async open(opts: LmtpConnectOptions): Promise<LmtpConnection> {
    const socket = await connect(opts.host, opts.port, opts.connectTimeoutMs);
    socket.on('error', () => undefined);
    const reader = new ReplyReader(socket);
    const timeout = opts.replyTimeoutMs;
    const write = (s: string) => socket.write(s);
    try {
      const greet = await reader.next(timeout, 'the greeting');
      if (greet.code !== 220) throw new UnavailableError(`LMTP greeting ${greet.code} ${greet.lines.join(' ')}`);
      write(`LHLO ${opts.name}\r\n`);
      let lhlo = await reader.next(timeout, 'LHLO');
      if (lhlo.code !== 250) throw new UnavailableError(`LMTP LHLO refused: ${lhlo.code} ${lhlo.lines.join(' ')}`);
      let caps = capabilities(lhlo.lines);
      if (opts.client) {
        const xclient = caps.get('XCLIENT');
        const xforward = caps.get('XFORWARD');
        const attrs = (offered: string[]) => {
          const a: string[] = [];
          if (offered.includes('ADDR')) a.push(`ADDR=${xtextAddr(opts.client!.address)}`);
          if (offered.includes('PORT') && opts.client!.port) a.push(`PORT=${opts.client!.port}`);
          return a;
        };
        if (xclient && attrs(xclient).length) {
          write(`XCLIENT ${attrs(xclient).join(' ')}\r\n`);
          const r = await reader.next(timeout, 'XCLIENT');
          if (r.code === 220) {
            // XCLIENT restarts the session (Postfix semantics): greet again.
            write(`LHLO ${opts.name}\r\n`);
            lhlo = await reader.next(timeout, 'LHLO');
            if (lhlo.code !== 250) throw new UnavailableError(`LMTP LHLO after XCLIENT refused: ${lhlo.code}`);
            caps = capabilities(lhlo.lines);
          }
          // Anything else (not trusted): deliver without it.
        } else if (xforward && attrs(xforward).length) {
          write(`XFORWARD ${attrs(xforward).join(' ')}\r\n`);
          await reader.next(timeout, 'XFORWARD');
        }
      }
      return new LmtpConnection(socket, reader, caps, timeout);
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  get alive(): boolean {
    return !this.socket.destroyed && this.reader.idle;
  }

  /** One message; per-recipient results in recipient order. */
  async transaction(from: string, recipients: string[], body: Buffer): Promise<LmtpRecipientResult[]> {
    this.reusable = false;
    const reader = this.reader;
    const timeout = this.timeout;
    const write = (s: string | Buffer) => this.socket.write(s);
    const caps = this.caps;
    const pipelining = caps.has('PIPELINING');
    const sizeParam = caps.has('SIZE') ? ` SIZE=${body.length}` : '';
    const bodyParam = caps.has('8BITMIME') ? ' BODY=8BITMIME' : '';
    const mailCmd = `MAIL FROM:<${from}>${sizeParam}${bodyParam}\r\n`;
    const rcptCmds = recipients.map((r) => `RCPT TO:<${r}>\r\n`);
    const results: LmtpRecipientResult[] = [];
    const rcptReplies: LmtpReply[] = [];
    let mail: LmtpReply;
    let dataReply: LmtpReply;
    const mailReply = async () => {
      try {
        return toReply(await reader.next(timeout, 'MAIL'));
      } catch (err) {
        throw new StaleConnectionError(`LMTP connection failed before MAIL was answered: ${(err as Error).message}`, { cause: err });
      }
    };
    if (pipelining) {
      write(mailCmd + rcptCmds.join('') + 'DATA\r\n');
      mail = await mailReply();
      for (let i = 0; i < rcptCmds.length; i++) rcptReplies.push(toReply(await reader.next(timeout, 'RCPT')));
      dataReply = toReply(await reader.next(timeout, 'DATA'));
    } else {
      write(mailCmd);
      mail = await mailReply();
      if (mail.code !== 250) return recipients.map((recipient) => ({ recipient, reply: mail, stage: 'mail' as const }));
      for (const c of rcptCmds) {
        write(c);
        rcptReplies.push(toReply(await reader.next(timeout, 'RCPT')));
      }
      if (!rcptReplies.some((r) => r.code === 250 || r.code === 251)) {
        return recipients.map((recipient, i) => ({ recipient, reply: rcptReplies[i]!, stage: 'rcpt' as const }));
      }
      write('DATA\r\n');
      dataReply = toReply(await reader.next(timeout, 'DATA'));
    }
    if (mail.code !== 250) return recipients.map((recipient) => ({ recipient, reply: mail, stage: 'mail' as const }));
    const accepted: number[] = [];
    rcptReplies.forEach((r, i) => {
      if (r.code === 250 || r.code === 251) accepted.push(i);
      else results[i] = { recipient: recipients[i]!, reply: r, stage: 'rcpt' };
    });
    if (accepted.length === 0) {
      this.reusable = pipelining;
      return results;
    }
    if (dataReply.code !== 354) {
      for (const i of accepted) results[i] = { recipient: recipients[i]!, reply: dataReply, stage: 'data' };
      return results;
    }
    write(encodeData(body));
    for (const i of accepted) {
      results[i] = { recipient: recipients[i]!, reply: toReply(await reader.next(timeout, 'the message')), stage: 'data' };
    }
    this.reusable = true;
    return results;
  }

  close(): void {
    if (this.socket.destroyed) return;
    const t = setTimeout(() => this.socket.destroy(), 1000);
    t.unref();
    this.socket.once('close', () => clearTimeout(t));
    if (this.socket.writable) this.socket.end('QUIT\r\n');
  }
}

/** Delivers one message over a new LMTP connection, closed afterwards. */
export async function sendLmtp(opts: LmtpSendOptions): Promise<LmtpRecipientResult[]> {
  const conn = await LmtpConnection.open(opts);
  try {
    return await conn.transaction(opts.from, opts.recipients, opts.body);
  } finally {
    conn.close();
  }
}

/**
 * Idle LMTP connections kept for reuse, per pair address and client address (the session was
 * moved to the client's address with XCLIENT, so it is only reused for that client). A reused
 * connection that turns out closed before MAIL is answered is replaced by a fresh one.
 */
export class LmtpPool {
  private readonly idle = new Map<string, Array<{ conn: LmtpConnection; timer: NodeJS.Timeout }>>();
  private idleCount = 0;

  constructor(
    private readonly idleMs: number,
    private readonly maxIdlePerKey = 4,
    private readonly maxIdleTotal = 256,
  ) {}

  async deliver(opts: LmtpSendOptions): Promise<LmtpRecipientResult[]> {
    const key = `${opts.host}|${opts.port}|${opts.client?.address ?? ''}|${opts.client?.port ?? ''}`;
    for (let c = this.take(key); c; c = this.take(key)) {
      try {
        const res = await c.transaction(opts.from, opts.recipients, opts.body);
        this.put(key, c);
        return res;
      } catch (err) {
        c.close();
        if (!(err instanceof StaleConnectionError)) throw err;
      }
    }
    const conn = await LmtpConnection.open(opts);
    try {
      const res = await conn.transaction(opts.from, opts.recipients, opts.body);
      this.put(key, conn);
      return res;
    } catch (err) {
      conn.close();
      throw err;
    }
  }

  private take(key: string): LmtpConnection | null {
    const list = this.idle.get(key);
    while (list && list.length) {
      const e = list.pop()!;
      this.idleCount--;
      clearTimeout(e.timer);
      if (list.length === 0) this.idle.delete(key);
      if (e.conn.alive) return e.conn;
      e.conn.close();
    }
    return null;
  }

  private put(key: string, conn: LmtpConnection): void {
    const list = this.idle.get(key) ?? [];
    if (this.idleMs <= 0 || !conn.reusable || !conn.alive || list.length >= this.maxIdlePerKey || this.idleCount >= this.maxIdleTotal) {
      conn.close();
      return;
    }
    const entry = {
      conn,
      timer: setTimeout(() => {
        const l = this.idle.get(key);
        const i = l ? l.indexOf(entry) : -1;
        if (i >= 0) {
          l!.splice(i, 1);
          this.idleCount--;
          if (l!.length === 0) this.idle.delete(key);
        }
        conn.close();
      }, this.idleMs),
    };
    entry.timer.unref();
    list.push(entry);
    this.idle.set(key, list);
    this.idleCount++;
  }

  get size(): number {
    return this.idleCount;
  }

  close(): void {
    for (const list of this.idle.values()) for (const e of list) {
      clearTimeout(e.timer);
      e.conn.close();
    }
    this.idle.clear();
    this.idleCount = 0;
  }
}
