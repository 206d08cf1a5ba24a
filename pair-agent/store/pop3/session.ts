/**
 * One POP3 connection (RFC 1939, CAPA and response codes of RFC 2449, SASL of RFC 5034,
 * STLS of RFC 2595, XCLIENT as Dovecot speaks it). States: authorization -> transaction ->
 * update. A command table names the states each command is allowed in; the dispatcher checks
 * them, runs the handler, and applies the state it returns. Deletions are applied at QUIT only.
 */
import { TLSSocket, type SecureContext } from 'node:tls';
import type net from 'node:net';
import type { Logger } from '../../../common/log.ts';
import { isTemporary, NotFoundError } from '../../../common/errors.ts';
import { checkPlain, checkUser, decodePlain, type AuthConfig } from '../imap/auth.ts';
import type { MailStore } from '../types.ts';
import { LineReader, type Pop3Limits } from './lines.ts';

export interface Pop3Context {
  store: MailStore;
  log: Logger;
  auth: AuthConfig;
  limits: Pop3Limits;
  secureContext?: SecureContext | undefined;
  idleTimeoutMs: number;
  /** Maildrop locks: false when another POP3 session holds the user's maildrop. */
  lock(user: string): boolean;
  unlock(user: string): void;
  onClose(s: Pop3Session): void;
  commandsTotal?: { inc(labels: { command: string; result: string }): void };
}

interface DropMessage {
  uid: number;
  size: number;
  bodyId: string;
  deleted: boolean;
}

type State =
  | { name: 'authorization'; pendingUser?: string | undefined; pendingAuth?: boolean }
  | { name: 'transaction'; user: string; uidValidity: number; messages: DropMessage[] }
  | { name: 'update' }
  | { name: 'closed' };

type StateName = State['name'];

interface Reply {
  ok: boolean;
  text: string;
  /** Multi-line body (already dot-stuffed lines, without the terminating "."). */
  lines?: string[];
  /** Raw multi-line payload (RETR/TOP), dot-stuffed by the writer. */
  payload?: Buffer;
  next?: State;
  close?: boolean;
  /** Run after the reply is written (STLS). */
  after?: () => void;
}

interface Command {
  states: StateName[];
  handler(s: Pop3Session, args: string[], line: string): Promise<Reply> | Reply;
}

const ERR = (text: string, extra: Partial<Reply> = {}): Reply => ({ ok: false, text, ...extra });
const OK = (text: string, extra: Partial<Reply> = {}): Reply => ({ ok: true, text, ...extra });

export function uidlOf(uid: number, uidValidity: number): string {
  return (uid.toString(16).padStart(8, '0') + uidValidity.toString(16).padStart(8, '0')).toUpperCase();
}

function msgArg(s: Pop3Session, arg: string | undefined): DropMessage | string {
  if (s.state.name !== 'transaction') return 'not in transaction state';
  if (arg === undefined || !/^\d{1,9}$/.test(arg)) return 'Invalid message number';
  const n = Number(arg);
  const m = s.state.messages[n - 1];
  if (!m || n < 1) return 'There is no such message';
  if (m.deleted) return 'Message is deleted';
  return m;
}

const stuffed = new WeakMap<Buffer, Buffer>();

/** Dot-stuffs and CRLF-normalises a message for RETR/TOP (scans line ends natively, copies only when needed). */
export function stuff(data: Buffer): Buffer {
  const out: Buffer[] = [];
  let start = 0;
  let lineStart = 0;
  const CRLF = Buffer.from('\r\n');
  const DOT = Buffer.from('.');
  while (lineStart < data.length) {
    if (data[lineStart] === 0x2e) {
      out.push(data.subarray(start, lineStart), DOT);
      start = lineStart;
    }
    const nl = data.indexOf(0x0a, lineStart);
    if (nl < 0) break;
    if (nl === 0 || data[nl - 1] !== 0x0d) {
      out.push(data.subarray(start, nl), CRLF);
      start = nl + 1;
    }
    lineStart = nl + 1;
  }
  out.push(data.subarray(start));
  const joined = out.length === 1 ? data : Buffer.concat(out);
  return joined.length && !(joined[joined.length - 2] === 0x0d && joined[joined.length - 1] === 0x0a) ? Buffer.concat([joined, CRLF]) : joined;
}

/** Headers, the blank line, and the first `n` body lines. */
export function top(data: Buffer, n: number): Buffer {
  let sep = data.indexOf('\r\n\r\n');
  let sepLen = 4;
  if (sep < 0) {
    sep = data.indexOf('\n\n');
    sepLen = 2;
  }
  if (sep < 0) return data;
  let end = sep + sepLen;
  for (let i = 0; i < n && end < data.length; i++) {
    const nl = data.indexOf(0x0a, end);
    end = nl < 0 ? data.length : nl + 1;
  }
  return data.subarray(0, end);
}

async function login(s: Pop3Session, user: string): Promise<Reply> {
  if (!s.ctx.lock(user)) {
    s.log.info({ user }, 'maildrop in use');
    return ERR('[IN-USE] Mailbox is locked by another POP3 session', { next: { name: 'authorization' } });
  }
  try {
    await s.ctx.store.ensureUser(user);
    const info = await s.ctx.store.mailboxInfo(user, 'INBOX');
    const list = await s.ctx.store.listMessages(user, 'INBOX');
    s.lockedUser = user;
    s.log = s.log.child({ user });
    s.log.info({ messages: list.length }, 'logged in');
    return OK(`Logged in, ${list.length} messages`, {
      next: { name: 'transaction', user, uidValidity: info.uidValidity, messages: list.map((m) => ({ uid: m.uid, size: m.size, bodyId: m.bodyId, deleted: false })) },
    });
  } catch (err) {
    s.ctx.unlock(user);
    throw err;
  }
}

const commands: Record<string, Command> = {
  CAPA: {
    states: ['authorization', 'transaction'],
    handler(s) {
      const lines = ['TOP', 'UIDL', 'RESP-CODES', 'PIPELINING', 'AUTH-RESP-CODE', 'SASL PLAIN'];
      if (s.state.name === 'authorization') {
        if (s.ctx.auth.users && Object.keys(s.ctx.auth.users).length) lines.push('USER');
        if (s.ctx.secureContext && !s.secure) lines.push('STLS');
        if (s.trustedPeer) lines.push('XCLIENT');
      }
      lines.push('IMPLEMENTATION pairgate');
      return OK('Capability list follows', { lines });
    },
  },
  NOOP: { states: ['transaction'], handler: () => OK('') },
  QUIT: {
    states: ['authorization', 'transaction'],
    async handler(s) {
      if (s.state.name !== 'transaction') return OK('Logging out', { close: true });
      const st = s.state;
      const gone = st.messages.filter((m) => m.deleted).map((m) => m.uid);
      s.state = { name: 'update' };
      if (gone.length) {
        try {
          await s.ctx.store.expunge(st.user, 'INBOX', gone);
        } catch (err) {
          s.log.warn({ err: err instanceof Error ? err.message : String(err) }, 'QUIT could not apply deletions');
          return ERR(`${isTemporary(err) ? '[SYS/TEMP]' : '[SYS/PERM]'} Some deleted messages were not removed`, { close: true });
        }
      }
      s.log.info({ deleted: gone.length }, 'logged out');
      return OK(gone.length ? `Logging out, ${gone.length} messages deleted` : 'Logging out', { close: true });
    },
  },
  STLS: {
    states: ['authorization'],
    handler(s) {
      if (!s.ctx.secureContext) return ERR('TLS support not configured');
      if (s.secure) return ERR('TLS is already active');
      return OK('Begin TLS negotiation now', { after: () => s.startTls() });
    },
  },
  XCLIENT: {
    states: ['authorization'],
    handler(s, args) {
      if (!s.trustedPeer) return ERR('You are not from trusted IP');
      for (const a of args) {
        const m = /^([A-Za-z]+)=(.*)$/.exec(a);
        if (!m) return ERR('Invalid XCLIENT parameter');
        const key = m[1]!.toUpperCase();
        if (key === 'ADDR') s.clientAddress = m[2]!.slice(0, 64);
        else if (key === 'PORT') s.clientPort = m[2]!.slice(0, 8);
      }
      s.log = s.log.child({ client: s.clientAddress, clientPort: s.clientPort });
      return OK('');
    },
  },
  USER: {
    states: ['authorization'],
    handler(s, args) {
      if (!s.ctx.auth.users || !Object.keys(s.ctx.auth.users).length) return ERR('[AUTH] Plaintext authentication disallowed, use AUTH PLAIN');
      if (args.length !== 1) return ERR('Invalid arguments');
      return OK('', { next: { name: 'authorization', pendingUser: args[0] } });
    },
  },
  PASS: {
    states: ['authorization'],
    async handler(s, _args, line) {
      if (s.state.name !== 'authorization' || !s.state.pendingUser) return ERR('No username given');
      const user = s.state.pendingUser;
      const pass = line.slice(5);
      const r = checkUser(s.ctx.auth, user, pass);
      if (!r.ok) return s.authFailed(r.reason);
      return login(s, r.user);
    },
  },
  AUTH: {
    states: ['authorization'],
    async handler(s, args) {
      if (args.length === 0) return OK('', { lines: ['PLAIN'] });
      if (args[0]!.toUpperCase() !== 'PLAIN') return ERR('[AUTH] Unsupported authentication mechanism.');
      let resp: string | null | undefined = args[1];
      if (resp === undefined) {
        s.write('+ \r\n');
        resp = await s.readContinuation();
        if (resp === null) return ERR('Connection closed', { close: true });
        if (resp === '*') return ERR('Authentication aborted by client');
      }
      const plain = decodePlain(resp === '=' ? '' : resp);
      if (!plain) return s.authFailed('malformed SASL PLAIN response');
      const r = checkPlain(s.ctx.auth, plain.authzid, plain.authcid, plain.password, s.peerAddress);
      if (!r.ok) return s.authFailed(r.reason);
      return login(s, r.user);
    },
  },
  STAT: {
    states: ['transaction'],
    handler(s) {
      if (s.state.name !== 'transaction') return ERR('not in transaction state');
      const live = s.state.messages.filter((m) => !m.deleted);
      return OK(`${live.length} ${live.reduce((n, m) => n + m.size, 0)}`);
    },
  },
  LIST: {
    states: ['transaction'],
    handler(s, args) {
      if (s.state.name !== 'transaction') return ERR('not in transaction state');
      if (args.length) {
        const m = msgArg(s, args[0]);
        if (typeof m === 'string') return ERR(m);
        return OK(`${args[0]} ${m.size}`);
      }
      const lines: string[] = [];
      s.state.messages.forEach((m, i) => {
        if (!m.deleted) lines.push(`${i + 1} ${m.size}`);
      });
      return OK(`${lines.length} messages`, { lines });
    },
  },
  UIDL: {
    states: ['transaction'],
    handler(s, args) {
      if (s.state.name !== 'transaction') return ERR('not in transaction state');
      const uv = s.state.uidValidity;
      if (args.length) {
        const m = msgArg(s, args[0]);
        if (typeof m === 'string') return ERR(m);
        return OK(`${args[0]} ${uidlOf(m.uid, uv)}`);
      }
      const lines: string[] = [];
      s.state.messages.forEach((m, i) => {
        if (!m.deleted) lines.push(`${i + 1} ${uidlOf(m.uid, uv)}`);
      });
      return OK('', { lines });
    },
  },
  RETR: {
    states: ['transaction'],
    async handler(s, args) {
      const m = msgArg(s, args[0]);
      if (typeof m === 'string') return ERR(m);
      const data = await s.ctx.store.readMessage(m.bodyId);
      return OK(`${m.size} octets`, { payload: data });
    },
  },
  TOP: {
    states: ['transaction'],
    async handler(s, args) {
      const m = msgArg(s, args[0]);
      if (typeof m === 'string') return ERR(m);
      if (args[1] === undefined || !/^\d{1,9}$/.test(args[1])) return ERR('Invalid number of lines');
      const data = await s.ctx.store.readMessage(m.bodyId);
      return OK('', { payload: top(data, Number(args[1])) });
    },
  },
  DELE: {
    states: ['transaction'],
    handler(s, args) {
      const m = msgArg(s, args[0]);
      if (typeof m === 'string') return ERR(m);
      m.deleted = true;
      return OK('Marked to be deleted.');
    },
  },
  RSET: {
    states: ['transaction'],
    handler(s) {
      if (s.state.name !== 'transaction') return ERR('not in transaction state');
      for (const m of s.state.messages) m.deleted = false;
      return OK('');
    },
  },
};

export class Pop3Session {
  state: State = { name: 'authorization' };
  socket: net.Socket;
  secure: boolean;
  log: Logger;
  lockedUser: string | null = null;
  clientAddress: string;
  clientPort: string;
  readonly peerAddress: string;
  readonly trustedPeer: boolean;
  private reader: LineReader;
  private queue: string[] = [];
  private busy = false;
  private badCommands = 0;
  private authFailures = 0;
  private idleTimer: NodeJS.Timeout | null = null;
  private continuation: ((line: string | null) => void) | null = null;

  constructor(
    socket: net.Socket,
    readonly ctx: Pop3Context,
    readonly id: string,
    secure: boolean,
  ) {
    this.socket = socket;
    this.secure = secure;
    this.peerAddress = socket.remoteAddress ?? '';
    this.clientAddress = this.peerAddress;
    this.clientPort = String(socket.remotePort ?? '');
    this.trustedPeer = ctx.auth.trusted.has(this.peerAddress);
    this.log = ctx.log.child({ cid: id, peer: this.peerAddress });
    this.reader = new LineReader(ctx.limits);
    this.attach(socket);
  }

  private attach(socket: net.Socket): void {
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (err) => this.log.debug({ err: err.message }, 'socket error'));
    socket.on('close', () => this.closed());
  }

  start(): void {
    this.write('+OK pairgate POP3 ready.\r\n');
    this.touch();
  }

  private touch(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      this.log.info({ state: this.state.name }, 'idle timeout');
      this.write('-ERR Disconnected for inactivity.\r\n');
      this.end();
    }, this.ctx.idleTimeoutMs);
    this.idleTimer.unref();
  }

  write(text: string | Buffer): void {
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(text);
  }

  private onData(d: Buffer): void {
    const out = this.reader.push(d);
    // Only a whole command line (or an over-long one, cut) counts as activity: a client that
    // trickles bytes without ever finishing a line is as idle as one that sends nothing.
    if (out.length) this.touch();
    for (const ev of out) {
      if (ev.kind === 'too-long') {
        this.badCommands++;
        this.log.info({ bytes: ev.bytes }, 'over-long command line');
        if (this.continuation) {
          const c = this.continuation;
          this.continuation = null;
          c('');
          continue;
        }
        this.queue.push('\0too-long');
      } else if (this.continuation) {
        const c = this.continuation;
        this.continuation = null;
        c(ev.line);
      } else this.queue.push(ev.line);
    }
    if (this.queue.length > this.ctx.limits.maxPipelined) {
      this.log.warn({ queued: this.queue.length }, 'too many pipelined commands');
      this.write('-ERR Too many pipelined commands\r\n');
      this.end();
      return;
    }
    void this.pump();
  }

  readContinuation(): Promise<string | null> {
    return new Promise((resolve) => {
      const next = this.queue.shift();
      if (next !== undefined) return resolve(next === '\0too-long' ? '' : next);
      this.continuation = resolve;
    });
  }

  private async pump(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length && this.state.name !== 'closed') {
        const line = this.queue.shift()!;
        await this.run(line);
        if (this.socket.writableLength > this.ctx.limits.maxBufferedOutput) await this.drain();
      }
    } finally {
      this.busy = false;
    }
  }

  private drain(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve();
      const done = () => {
        this.socket.off('drain', done);
        this.socket.off('close', done);
        resolve();
      };
      this.socket.once('drain', done);
      this.socket.once('close', done);
    });
  }

  private async run(line: string): Promise<void> {
    if (line === '\0too-long') return this.bad('-ERR Command line too long');
    const sp = line.indexOf(' ');
    const name = (sp < 0 ? line : line.slice(0, sp)).toUpperCase();
    const args = sp < 0 ? [] : line.slice(sp + 1).split(' ').filter((a) => a !== '');
    const cmd = Object.hasOwn(commands, name) ? commands[name] : undefined;
    this.log.debug({ command: name, state: this.state.name }, name === 'PASS' || name === 'AUTH' ? `C: ${name} <redacted>` : `C: ${line.slice(0, 200)}`);
    if (!cmd) {
      this.ctx.commandsTotal?.inc({ command: 'unknown', result: 'bad' });
      return this.bad('-ERR Unknown command');
    }
    if (!cmd.states.includes(this.state.name)) {
      this.ctx.commandsTotal?.inc({ command: name, result: 'bad' });
      return this.bad(`-ERR ${name} not allowed in the ${this.state.name} state`);
    }
    let reply: Reply;
    try {
      reply = await cmd.handler(this, args, line);
    } catch (err) {
      if (err instanceof NotFoundError) {
        reply = ERR('Message is no longer available (deleted by another session)');
        this.ctx.commandsTotal?.inc({ command: name, result: 'no' });
        this.send(reply);
        return;
      }
      const temp = isTemporary(err);
      this.log[temp ? 'warn' : 'error']({ command: name, err: err instanceof Error ? err.message : String(err) }, 'command failed');
      reply = ERR(temp ? '[SYS/TEMP] Temporary failure, try again later' : '[SYS/PERM] Internal error');
    }
    if (this.state.name === 'closed') {
      // The connection ended while the command ran (a login reading the maildrop): its state is
      // not applied, and a lock the command took after closed() ran is given back here.
      this.releaseLock();
      return;
    }
    this.ctx.commandsTotal?.inc({ command: name, result: reply.ok ? 'ok' : 'no' });
    if (reply.ok) this.badCommands = 0;
    if (reply.next) {
      if (reply.next.name !== this.state.name) this.log.debug({ from: this.state.name, to: reply.next.name }, 'state');
      this.state = reply.next;
    }
    this.send(reply);
    reply.after?.();
    if (reply.close) this.end();
  }

  private bad(text: string): void {
    this.badCommands++;
    this.write(text + '\r\n');
    if (this.badCommands >= this.ctx.limits.maxBadCommands) {
      this.log.info('too many bad commands');
      this.write('-ERR Too many bad commands, closing\r\n');
      this.end();
    }
  }

  authFailed(reason: string): Reply {
    this.authFailures++;
    this.log.info({ reason }, 'authentication failed');
    const close = this.authFailures >= 3;
    return ERR('[AUTH] Authentication failed.', { close, next: { name: 'authorization' } });
  }

  private send(r: Reply): void {
    const status = (r.ok ? '+OK' : '-ERR') + (r.text ? ' ' + r.text : '') + '\r\n';
    if (r.payload) {
      // Cached bodies come back as the same Buffer: their wire form is computed once. Corked writes, no copy.
      let wire = stuffed.get(r.payload);
      if (!wire) {
        wire = stuff(r.payload);
        stuffed.set(r.payload, wire);
      }
      if (this.socket.destroyed || !this.socket.writable) return;
      this.socket.cork();
      this.socket.write(status);
      this.socket.write(wire);
      this.socket.write('.\r\n');
      this.socket.uncork();
    } else if (r.lines) {
      this.write(status + r.lines.map((l) => (l.startsWith('.') ? '.' + l : l) + '\r\n').join('') + '.\r\n');
    } else this.write(status);
  }

  startTls(): void {
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
    plain.removeAllListeners('error');
    this.reader = new LineReader(this.ctx.limits);
    this.queue = [];
    const secure = new TLSSocket(plain, { isServer: true, secureContext: this.ctx.secureContext! });
    this.socket = secure;
    this.secure = true;
    secure.on('secure', () => this.log.debug('TLS established'));
    this.attach(secure);
    plain.on('error', () => undefined);
  }

  end(): void {
    if (this.state.name === 'closed') return;
    this.releaseLock();
    this.state = { name: 'closed' };
    this.socket.end();
    const t = setTimeout(() => this.socket.destroy(), 2000);
    t.unref();
  }

  private releaseLock(): void {
    if (this.lockedUser) {
      this.ctx.unlock(this.lockedUser);
      this.lockedUser = null;
    }
  }

  private closed(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
    // A connection lost in the transaction state deletes nothing (RFC 1939 section 6).
    this.releaseLock();
    this.state = { name: 'closed' };
    const c = this.continuation;
    this.continuation = null;
    c?.(null);
    this.ctx.onClose(this);
  }

  /** Server shutdown: say so and close. */
  shutdown(): void {
    this.write('-ERR [SYS/TEMP] Server shutting down.\r\n');
    this.end();
  }
}
