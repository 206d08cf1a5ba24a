/**
 * One IMAP connection: feeds socket bytes to the framer, runs commands one at a time through
 * the command table (state and argument checks first, then the handler, whose returned state
 * the dispatcher applies and logs), reports other sessions' changes at the points RFC 3501
 * allows, and enforces the session's bounds (pipelined commands, bad commands, idle time,
 * write buffer). Storage is reached only through the MailStore interface.
 */
import type { Socket } from 'node:net';
import { TLSSocket, type SecureContext } from 'node:tls';
import type { Counter } from 'prom-client';
import type { Logger } from '../../../common/log.ts';
import type { MailStore } from '../types.ts';
import type { AuthConfig } from './auth.ts';
import { replyForError } from './errors.ts';
import type { ImapLimits } from './limits.ts';
import { RecentTracker } from './mailbox-view.ts';
import type { SnapshotCache } from './snapshots.ts';
import { ImapFramer, ParseError, parseCommand, type CommandUnit, type FrameEvent, type Token } from './parser.ts';
import { parseSeqSet, SeqSetError } from './seqset.ts';
import type { ArgKind, ArgSpec, ArgValue, CommandDef, ImapState, Reply } from './state.ts';
import { encodeSequence, safeText, type Value } from './writer.ts';

export interface ServerContext {
  store: MailStore;
  log: Logger;
  limits: ImapLimits;
  auth: AuthConfig;
  secureContext?: SecureContext | undefined;
  idleTimeoutMs: number;
  idleKeepaliveMs: number;
  recent: RecentTracker;
  /** Message lists of unchanged mailboxes, shared by the sessions that SELECT them. */
  snapshots: SnapshotCache;
  commands: Map<string, CommandDef>;
  commandsTotal: Counter<'command' | 'result'>;
  /** Counts a user's sessions; false when the per-user limit is reached. */
  acquireUser(user: string): boolean;
  releaseUser(user: string): void;
  onClose(session: Session): void;
}

export class ArgError extends Error {}

const MAILBOX_MAX_BYTES = 255;
/** Batched output is written once it reaches this size (and at the end of each command). */
const OUTPUT_BATCH_BYTES = 256 * 1024;

let nextCid = 1;

export class Session {
  readonly cid: string;
  state: ImapState = { name: 'not-authenticated' };
  socket: Socket;
  log: Logger;
  readonly remoteAddress: string | undefined;
  readonly remotePort: number | undefined;
  /** CONDSTORE enabled for this session (ENABLE, SELECT (CONDSTORE) or a CONDSTORE-only item). */
  condstore = false;
  readonly enabled = new Set<string>();
  tlsActive = false;
  private framer: ImapFramer;
  private queue: FrameEvent[] = [];
  private running = false;
  private rawWaiter: ((ev: FrameEvent | null) => void) | null = null;
  private badCount = 0;
  private closed = false;
  private userHeld: string | null = null;
  private paused = false;
  /**
   * Output of the running command, written in one go (one system call) at its end, when it
   * reaches OUTPUT_BATCH_BYTES, or before the session waits for the client; a FETCH of 100
   * headers is then one write instead of one per message.
   */
  private outParts: Array<Buffer | string> = [];
  private outBytes = 0;
  private batching = false;
  /** Session figures for the closing log line. */
  private readonly startedAt = Date.now();
  private commandCount = 0;
  private bytesIn = 0;
  private bytesOut = 0;
  /** When the client last sent a byte (the autologout timer's measure). */
  private lastInput = Date.now();
  private idleTimer: NodeJS.Timeout | null = null;
  private authFailures = 0;
  /** Set while IDLE runs: wakes it to report changes. */
  idleWake: (() => void) | null = null;
  private readonly onData = (chunk: Buffer) => this.receive(chunk);

  constructor(
    socket: Socket,
    readonly ctx: ServerContext,
  ) {
    this.cid = `imap-${process.pid.toString(36)}-${(nextCid++).toString(36)}`;
    this.socket = socket;
    this.remoteAddress = socket.remoteAddress;
    this.remotePort = socket.remotePort;
    this.log = ctx.log.child({ cid: this.cid, remote: this.remoteAddress });
    this.framer = new ImapFramer(ctx.limits);
    this.attach(socket);
    this.armIdleTimer(this.idleLimit());
  }

  get store(): MailStore {
    return this.ctx.store;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private attach(socket: Socket): void {
    socket.on('data', this.onData);
    socket.on('error', (err) => this.log.debug({ err: err.message }, 'socket error'));
    socket.on('close', () => this.cleanup());
  }

  /**
   * The autologout timer (RFC 3501 5.4: at least 30 minutes) counts time without client input,
   * as Dovecot's does. A socket timeout would not do: Node restarts it on every write too, so a
   * session fed with untagged updates (IDLE on a busy mailbox) would never end. A command that is
   * still working or sending is not cut (a slow reader has its own bound in `drain`); one that
   * waits for the client (IDLE's DONE, an AUTHENTICATE response) is.
   */
  private armIdleTimer(delay: number): void {
    this.idleTimer = setTimeout(() => {
      this.idleTimer = null;
      if (this.closed) return;
      const limit = this.idleLimit();
      const quiet = Date.now() - this.lastInput;
      const working = this.running && this.rawWaiter === null;
      if (quiet < limit || working) {
        this.armIdleTimer(working ? limit : limit - quiet);
        return;
      }
      this.log.info({ idleMs: limit, idling: this.idleWake !== null, state: this.state.name }, 'idle timeout');
      this.bye('Autologout; idle for too long');
    }, delay);
    this.idleTimer.unref();
  }

  /** The autologout time now: shorter before login (limits.preLoginIdleMs; 0 = none), as Dovecot's login processes. */
  private idleLimit(): number {
    const pre = this.ctx.limits.preLoginIdleMs;
    return this.state.name === 'not-authenticated' && pre > 0 ? Math.min(this.ctx.idleTimeoutMs, pre) : this.ctx.idleTimeoutMs;
  }

  start(greeting: string): void {
    this.writeLine(`* OK [CAPABILITY ${this.capabilities().join(' ')}] ${greeting}`);
  }

  capabilities(stateName: ImapState['name'] = this.state.name): string[] {
    const caps = ['IMAP4rev1', 'LITERAL+', 'SASL-IR', 'ID', 'ENABLE', 'IDLE', 'NAMESPACE', 'UIDPLUS', 'MOVE', 'UNSELECT', 'CHILDREN', 'SPECIAL-USE', 'CONDSTORE', 'QUOTA'];
    if (stateName === 'not-authenticated') {
      if (this.ctx.secureContext && !this.tlsActive) caps.push('STARTTLS');
      caps.push('AUTH=PLAIN');
    }
    return caps;
  }

  // ---- output -------------------------------------------------------------------------

  writeLine(text: string): void {
    if (this.closed) return;
    if (this.log.isLevelEnabled('debug')) this.log.debug(`S: ${text.slice(0, 300)}`);
    this.emit(text + '\r\n');
  }

  private emit(part: Buffer | string): void {
    const n = typeof part === 'string' ? Buffer.byteLength(part) : part.length;
    this.bytesOut += n;
    if (!this.batching) {
      this.socket.write(part);
      return;
    }
    this.outParts.push(part);
    this.outBytes += n;
    if (this.outBytes >= OUTPUT_BATCH_BYTES) this.flush();
  }

  /** Writes the batched output: small parts joined into one buffer, large buffers by reference. */
  flush(): void {
    if (!this.outParts.length) return;
    const parts = this.outParts;
    this.outParts = [];
    this.outBytes = 0;
    if (this.closed || this.socket.destroyed) return;
    const small: Buffer[] = [];
    const writeSmall = () => {
      if (!small.length) return;
      this.socket.write(small.length === 1 ? small[0]! : Buffer.concat(small));
      small.length = 0;
    };
    this.socket.cork();
    for (const p of parts) {
      if (typeof p === 'string') small.push(Buffer.from(p, 'utf8'));
      else if (p.length < 16 * 1024) small.push(p);
      else {
        writeSmall();
        this.socket.write(p);
      }
    }
    writeSmall();
    this.socket.uncork();
  }

  /** Writes an untagged response `* v1 v2 …`. */
  untagged(values: Value[]): void {
    this.writeParts(['* ', ...encodeSequence(values), '\r\n']);
  }

  writeParts(parts: Array<Buffer | string>): void {
    if (this.closed) return;
    if (this.log.isLevelEnabled('debug')) {
      const text = parts.map((p) => (typeof p === 'string' ? p : p.length > 200 ? `<${p.length} bytes>` : p.toString('latin1'))).join('');
      this.log.debug(`S: ${text.slice(0, 300).replace(/\r\n$/, '')}`);
    }
    if (this.batching) {
      for (const p of parts) this.emit(p);
      return;
    }
    this.socket.cork();
    for (const p of parts) this.emit(p);
    this.socket.uncork();
  }

  /**
   * Bytes not yet handed to the kernel: the stream's buffer plus what libuv still holds of the
   * write in progress (`writeQueueSize`, which Node's own socket timeout reads for the same
   * purpose). A large literal is one write request, so the stream's length alone only changes
   * when all of it has gone; the libuv queue shrinks as the client reads.
   */
  private pendingOut(): number {
    const handle = (this.socket as unknown as { _handle?: { writeQueueSize?: number } | null })._handle;
    return this.socket.writableLength + (typeof handle?.writeQueueSize === 'number' ? handle.writeQueueSize : 0);
  }

  /**
   * Waits while more than the write limit is buffered (a slow reader). The client is given up
   * only when nothing at all was taken for a whole idle timeout: a slow but steady reader (a
   * phone fetching an attachment) keeps its session however long the transfer takes.
   */
  async drain(): Promise<void> {
    if (this.outBytes >= OUTPUT_BATCH_BYTES / 2) this.flush();
    if (this.closed || this.socket.writableLength <= this.ctx.limits.maxWriteBufferBytes) return;
    await new Promise<void>((resolve) => {
      let timer: NodeJS.Timeout;
      const done = () => {
        clearTimeout(timer);
        this.socket.off('drain', done);
        this.socket.off('close', done);
        resolve();
      };
      let left = this.pendingOut();
      const check = () => {
        const now = this.pendingOut();
        if (now < left) {
          left = now;
          timer = setTimeout(check, this.ctx.idleTimeoutMs);
          return;
        }
        this.log.info({ buffered: now }, 'client stopped reading; closing');
        this.socket.destroy();
        done();
      };
      timer = setTimeout(check, this.ctx.idleTimeoutMs);
      this.socket.once('drain', done);
      this.socket.once('close', done);
    });
  }

  bye(text: string): void {
    if (this.closed) return;
    this.writeLine(`* BYE ${safeText(text)}`);
    this.close();
  }

  close(): void {
    if (this.closed) return;
    this.flush();
    this.batching = false;
    this.socket.end();
    // A peer that never reads must not keep the socket: destroy after a grace period.
    setTimeout(() => this.socket.destroy(), 2000).unref();
    this.cleanup();
  }

  private cleanup(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
    this.outParts = [];
    this.outBytes = 0;
    const prev = this.state.name;
    this.state = { name: 'logout' };
    if (prev !== 'logout') this.log.info({ from: prev, to: 'logout', reason: 'connection closed' }, 'state change');
    // One line per session (the log child carries the user and the address the proxy forwarded).
    this.log.info(
      { durationMs: Date.now() - this.startedAt, commands: this.commandCount, bytesIn: this.bytesIn, bytesOut: this.bytesOut, lastState: prev, tls: this.tlsActive },
      'session closed',
    );
    if (this.userHeld) this.ctx.releaseUser(this.userHeld);
    this.userHeld = null;
    this.rawWaiter?.(null);
    this.rawWaiter = null;
    this.idleWake?.();
    this.ctx.onClose(this);
  }

  /** Counts a failed login; true when the session has had too many and must end. */
  authFailed(): boolean {
    this.authFailures++;
    return this.authFailures >= this.ctx.limits.maxAuthFailures;
  }

  /** Counts the session against the user's limit; false when the limit is reached. */
  holdUser(user: string): boolean {
    if (this.userHeld === user) return true;
    if (!this.ctx.acquireUser(user)) return false;
    if (this.userHeld) this.ctx.releaseUser(this.userHeld);
    this.userHeld = user;
    return true;
  }

  // ---- input --------------------------------------------------------------------------

  private receive(chunk: Buffer): void {
    if (this.closed) return;
    this.bytesIn += chunk.length;
    let events: FrameEvent[];
    try {
      events = this.framer.push(chunk);
    } catch (err) {
      this.log.error({ err }, 'framer failed');
      this.bye('Internal error');
      return;
    }
    // Before login only whole commands (and literal continuations) count as activity: a client
    // trickling the bytes of a line it never finishes is idle, as at the proxy and in the store's
    // POP3. After login every byte counts (a large APPEND literal may arrive slowly).
    if (events.length || this.state.name !== 'not-authenticated') this.lastInput = Date.now();
    for (const ev of events) {
      if (ev.kind === 'continue') {
        // Not held back by a running command's batch: the client waits for it.
        this.flush();
        const was = this.batching;
        this.batching = false;
        this.writeLine('+ Ready for literal data');
        this.batching = was;
        continue;
      }
      if (this.rawWaiter) {
        const w = this.rawWaiter;
        this.rawWaiter = null;
        w(ev);
        continue;
      }
      this.queue.push(ev);
    }
    if (this.queue.length >= this.ctx.limits.maxPipelined && !this.paused) {
      // Backpressure: stop reading until the pipeline drains.
      this.paused = true;
      this.socket.pause();
    }
    void this.run();
  }

  /** The next input line for a handler that reads one itself (IDLE's DONE, an AUTHENTICATE response). */
  readRawLine(): Promise<{ line: string } | { error: string } | null> {
    const toResult = (ev: FrameEvent | null) => {
      if (!ev) return null;
      if (ev.kind === 'error') return { error: ev.reason };
      if (ev.kind === 'unit') {
        if (ev.unit.segments.length > 1) return { error: 'unexpected literal' };
        return { line: ev.unit.segments[0]!.toString('utf8') };
      }
      return null;
    };
    // The client answers only what it has seen: send everything before waiting.
    this.flush();
    const ev = this.queue.shift();
    if (ev) return Promise.resolve(toResult(ev));
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => {
      this.rawWaiter = (e) => resolve(toResult(e));
    });
  }

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (!this.closed && this.queue.length) {
        const ev = this.queue.shift()!;
        if (this.paused && this.queue.length < this.ctx.limits.maxPipelined / 2) {
          this.paused = false;
          this.socket.resume();
        }
        if (ev.kind === 'error') {
          this.replyBad(ev.tag, ev.reason, 'PARSE');
          continue;
        }
        if (ev.kind === 'unit') {
          this.batching = true;
          try {
            await this.execute(ev.unit);
          } finally {
            this.batching = false;
            this.flush();
          }
        }
      }
    } catch (err) {
      this.log.error({ err }, 'session failed');
      this.bye('Internal error');
    } finally {
      this.running = false;
    }
  }

  private replyBad(tag: string, reason: string, command: string): void {
    this.writeLine(`${tag} BAD ${safeText(reason)}`);
    this.ctx.commandsTotal.inc({ command, result: 'BAD' });
    this.badCount++;
    if (this.badCount >= this.ctx.limits.maxBadCommands) {
      this.log.info({ bad: this.badCount }, 'too many bad commands');
      this.bye('Too many invalid commands');
    }
  }

  private async execute(unit: CommandUnit): Promise<void> {
    let parsed;
    try {
      parsed = parseCommand(unit, this.ctx.limits.maxListDepth);
    } catch (err) {
      if (err instanceof ParseError) return this.replyBad(err.tag, `Error in IMAP command: ${err.message}`, 'PARSE');
      throw err;
    }
    const { tag } = parsed;
    this.commandCount++;
    let name = parsed.name;
    let tokens = parsed.args;
    let uid = false;
    if (name === 'UID') {
      const sub = tokens[0];
      if (!sub || sub.type !== 'atom') return this.replyBad(tag, 'UID needs a command', 'UID');
      name = sub.value.toUpperCase();
      tokens = tokens.slice(1);
      uid = true;
    }
    const def = this.ctx.commands.get(name);
    const label = def ? (uid ? `UID ${def.name}` : def.name) : 'UNKNOWN';
    if (this.log.isLevelEnabled('debug')) {
      this.log.debug(`C: ${tag} ${uid ? 'UID ' : ''}${name}${def?.secretArgs ? ' [redacted]' : ' ' + unit.segments[0]!.toString('latin1').slice(tag.length + name.length + 2, 300)}`);
    }
    if (!def || (uid && !def.uid)) return this.replyBad(tag, `Unknown command ${name.slice(0, 40)}`, 'UNKNOWN');
    if (!(def.states as readonly string[]).includes(this.state.name)) {
      return this.replyBad(tag, `${label} is not allowed in the ${this.state.name} state`, label);
    }
    let args: ArgValue[];
    try {
      args = convertArgs(def.args, tokens);
    } catch (err) {
      if (err instanceof ArgError) return this.replyBad(tag, `${label}: ${err.message}`, label);
      throw err;
    }
    let reply: Reply;
    const before = this.state;
    try {
      reply = await def.handler({ session: this, tag, name: label, uid, state: this.state as never, args, tokens });
    } catch (err) {
      if (err instanceof ArgError || err instanceof SeqSetError) {
        return this.replyBad(tag, `${label}: ${err.message}`, label);
      }
      const { reply: r, internal } = replyForError(err);
      if (internal) this.log.error({ err, command: label }, 'command failed');
      else this.log.info({ command: label, code: r.code, err: (err as Error).message }, 'command refused');
      reply = r;
    }
    if (this.closed) return;
    if (reply.next && reply.next !== before) this.setState(reply.next, label);
    if (reply.status === 'BAD') return this.replyBad(tag, reply.text, label);
    this.badCount = 0;
    if (this.state.name === 'selected') {
      try {
        await this.state.view.sync(this.store, this, { allowExpunge: def.expungeAfter !== false || uid, condstore: this.condstore });
      } catch (err) {
        return this.lostMailbox(err);
      }
    }
    this.ctx.commandsTotal.inc({ command: label, result: reply.status });
    this.writeLine(`${tag} ${reply.status} ${reply.code ? `[${reply.code}] ` : ''}${safeText(reply.text)}`);
    // The tagged reply goes out before anything `after` does (STARTTLS, LOGOUT's close).
    this.flush();
    if (reply.after) await reply.after();
  }

  setState(next: ImapState, reason: string): void {
    const from = this.state;
    this.state = next;
    if (from.name !== next.name || next.name === 'selected') {
      const mailbox = next.name === 'selected' ? next.view.name : undefined;
      this.log.info({ from: from.name, to: next.name, reason, ...(mailbox ? { mailbox } : {}) }, 'state change');
    }
  }

  /** The selected mailbox vanished or changed identity (deleted, renamed, UIDVALIDITY changed). */
  lostMailbox(err: unknown): void {
    const { reply, internal } = replyForError(err);
    if (internal) this.log.error({ err }, 'mailbox sync failed');
    if (reply.code === 'UNAVAILABLE') this.bye('Mailbox store unavailable, please reconnect');
    else this.bye('Selected mailbox was removed');
  }

  /** Called by the server for store changes on this session's selected mailbox. */
  mailboxChanged(): void {
    if (this.state.name !== 'selected') return;
    this.state.view.dirty = true;
    this.idleWake?.();
  }

  /** STARTTLS: switches the connection to TLS after the tagged OK went out in plaintext. */
  upgradeTls(): void {
    if (!this.ctx.secureContext) return;
    const plain = this.socket;
    plain.off('data', this.onData);
    // Anything pipelined after STARTTLS in plaintext is discarded (CVE-2011-0411 class of bug).
    this.queue = [];
    this.framer = new ImapFramer(this.ctx.limits);
    const secure = new TLSSocket(plain, { isServer: true, secureContext: this.ctx.secureContext });
    this.socket = secure;
    this.tlsActive = true;
    secure.on('secure', () => this.log.info({ protocol: secure.getProtocol() }, 'tls established'));
    this.attach(secure);
  }

  get framerPending(): boolean {
    return this.framer.pending || this.queue.length > 0;
  }
}

// ---- argument conversion ----------------------------------------------------------------

export function tokenString(t: Token | undefined, what = 'string'): string {
  if (!t) throw new ArgError(`missing ${what}`);
  if (t.type === 'string') return t.value.toString('utf8');
  if (t.type === 'atom') return t.value;
  throw new ArgError(`expected ${what}, got a list`);
}

export function normalizeMailbox(name: string): string {
  if (name.toUpperCase() === 'INBOX') return 'INBOX';
  if (name.toUpperCase().startsWith('INBOX/')) return 'INBOX' + name.slice(5);
  return name;
}

function checkMailboxName(name: string): string {
  if (Buffer.byteLength(name) > MAILBOX_MAX_BYTES) throw new ArgError('mailbox name too long');
  if (/[\0\r\n]/.test(name)) throw new ArgError('invalid characters in mailbox name');
  return normalizeMailbox(name);
}

function convertOne(kind: ArgKind, t: Token): ArgValue {
  switch (kind) {
    case 'any':
      return t;
    case 'list':
      if (t.type !== 'list') throw new ArgError('expected a parenthesised list');
      return t.items;
    case 'atom':
      if (t.type !== 'atom') throw new ArgError('expected an atom');
      return t.value;
    case 'string':
      if (t.type !== 'string') throw new ArgError('expected a string');
      return t.value.toString('utf8');
    case 'nstring':
      if (t.type === 'atom' && t.value.toUpperCase() === 'NIL') return null;
      if (t.type !== 'string') throw new ArgError('expected a string or NIL');
      return t.value.toString('utf8');
    case 'astring':
      return tokenString(t, 'a string');
    case 'pattern':
      return tokenString(t, 'a mailbox pattern');
    case 'mailbox': {
      const s = tokenString(t, 'a mailbox name');
      if (t.type === 'atom' && /[%*]/.test(s)) throw new ArgError('wildcards are not allowed in a mailbox name');
      return checkMailboxName(s);
    }
    case 'seqset':
      if (t.type !== 'atom') throw new ArgError('expected a sequence set');
      try {
        return parseSeqSet(t.value);
      } catch (err) {
        throw new ArgError((err as Error).message);
      }
    case 'number': {
      if (t.type !== 'atom' || !/^\d{1,20}$/.test(t.value)) throw new ArgError('expected a number');
      const n = Number(t.value);
      if (!Number.isSafeInteger(n)) throw new ArgError('number too large');
      return n;
    }
  }
}

export function convertArgs(specs: readonly ArgSpec[], tokens: Token[]): ArgValue[] {
  const out: ArgValue[] = [];
  let i = 0;
  for (const spec of specs) {
    const rest = spec.endsWith('*');
    const optional = spec.endsWith('?');
    const kind = (rest || optional ? spec.slice(0, -1) : spec) as ArgKind;
    if (rest) {
      while (i < tokens.length) out.push(convertOne(kind, tokens[i++]!));
      return out;
    }
    const t = tokens[i];
    if (!t) {
      if (optional) {
        out.push(null);
        continue;
      }
      throw new ArgError('missing arguments');
    }
    out.push(convertOne(kind, t));
    i++;
  }
  if (i < tokens.length) throw new ArgError('too many arguments');
  return out;
}
