/**
 * What IMAP and POP3 client sessions share: the socket (replaced after STARTTLS/STLS), the
 * pre-login idle timer, the refusal of PROXY headers from untrusted peers, the login call,
 * and, once logged in, the splice: bytes both ways with backpressure, byte counters, the idle
 * timeout, a clean client close when the backend goes away, and one log line at the end with
 * user, pair, client address, bytes and duration.
 *
 * The splice is done by one of two relays: a plain-TCP session is lent to the native relay
 * (common/native-relay.ts: a thread moves its bytes and gives the sockets back when it ends, or
 * at once when the session is kicked: `takeBack`), anything else is relayed here in JavaScript
 * (`relayInJavaScript`). Whatever either side sent past the login and Node already read is
 * passed on before either starts.
 *
 * Per-session costs are kept few, because at a few hundred sessions a second they are most of
 * the proxy's CPU: no timer per socket once spliced (the registry's once-a-second sweep
 * (`sweep`) sees a session idle when its byte counters stop moving, and bounds the wait for a
 * closing client), label objects for the metrics made once, not per event, and no closures
 * made per session where a method does (under the TypeScript loader every named closure also
 * costs an Object.defineProperty each time it is made).
 */
import type net from 'node:net';
import { randomBytes } from 'node:crypto';
import { LazyLog, type SessionLog } from './lazy-log.ts';
import type { ListenerConfig } from './config.ts';
import type { ProxyContext, Protocol, SessionHandle } from './context.ts';
import type { BackendInput, BackendSession, ClientAddress } from './backend.ts';
import { looksLikeProxyHeader } from './proxy-protocol.ts';
import { upgradeToTls } from './tls.ts';
import { proxyLogin, type LoginResult } from './login.ts';
import { lendToNativeRelay, readAgain, type LentSession, type NativeRelayEnd } from '../common/native-relay.ts';

/** What the listener counts per connection (per client address); told once when the session ends. */
export interface ConnectionSlots {
  release(address: string): void;
}

export interface AcceptedConnection {
  socket: net.Socket;
  /** The client as the session sees it: from the PROXY header when behind a load balancer. */
  remote: ClientAddress;
  /** The address the client connected to (this proxy or the LB). */
  local: ClientAddress;
  secure: boolean;
  listener: ListenerConfig;
  /** True when the connection came from a configured load balancer (PROXY header read). */
  viaLb: boolean;
  /** The listener's connection counts (released when the session ends). */
  slots?: ConnectionSlots;
}

/** How long a client that was sent its goodbye (or whose backend went away) has to close before it is destroyed. */
const CLOSE_GRACE_MS = 5000;

/** Metric label objects, one per protocol (and per pair, and per close reason), made once. */
const PROTOCOL_LABELS = { imap: { protocol: 'imap' }, pop3: { protocol: 'pop3' } } as const;
const sessionLabelCache = new Map<string, { protocol: Protocol; pair: string; role: string }>();
function sessionLabelsFor(protocol: Protocol, pair: string): { protocol: Protocol; pair: string; role: string } {
  const key = `${protocol}|${pair}`;
  let l = sessionLabelCache.get(key);
  if (!l) {
    if (sessionLabelCache.size > 10_000) sessionLabelCache.clear();
    sessionLabelCache.set(key, (l = { protocol, pair, role: 'proxy' }));
  }
  return l;
}
const closedLabelCache = new Map<string, { protocol: Protocol; reason: string }>();
function closedLabels(protocol: Protocol, reason: string): { protocol: Protocol; reason: string } {
  const key = `${protocol}|${reason}`;
  let l = closedLabelCache.get(key);
  if (!l) {
    if (closedLabelCache.size > 1000) closedLabelCache.clear();
    closedLabelCache.set(key, (l = { protocol, reason }));
  }
  return l;
}

type Phase = 'pre-login' | 'tls' | 'logging-in' | 'proxying' | 'closed';

/** Random bytes for connection ids, drawn 6 KiB at a time rather than one call per connection. */
let cidPool = Buffer.alloc(0);
let cidAt = 0;
function newCid(): string {
  if (cidAt + 6 > cidPool.length) {
    cidPool = randomBytes(6 * 1024);
    cidAt = 0;
  }
  cidAt += 6;
  return cidPool.toString('base64url', cidAt - 6, cidAt);
}

export abstract class ClientSession implements SessionHandle {
  private cidMade: string | null = null;
  abstract readonly protocol: Protocol;
  uid: string | null = null;
  pair: string | null = null;
  readonly clientAddress: string;
  protected socket: net.Socket;
  protected secure: boolean;
  protected phase: Phase = 'pre-login';
  /** The session's logger: its pino child (cid, client, later user and pair) is made on the first line written. */
  protected log: SessionLog;
  protected readonly started = Date.now();
  /** Made only when someone waits for the end (the graceful stop, tests). */
  private closedPromise: Promise<void> | null = null;
  private resolveClosed: (() => void) | null = null;
  /** Pre-login idle bound (0 = none running) and when it was last restarted; the sweep enforces it. */
  private idleMs = 0;
  private idleFrom = 0;
  private sawData = false;
  private backend: net.Socket | null = null;
  private bytesIn = 0;
  private bytesOut = 0;
  private flushedIn = 0;
  private flushedOut = 0;
  private endReason = 'client closed';
  private sessionLabels: { protocol: Protocol; pair: string; role: string } | null = null;
  /** The pair socket's reads, once spliced (bytes out are counted there). */
  private input: BackendInput | null = null;
  /** Bytes passed on while the relay was set up (what either side had sent past the login). */
  private preIn = 0;
  private preOut = 0;
  /** The session while the native relay moves its bytes (null otherwise). */
  private lent: LentSession | null = null;
  private readonly onDataBound: (chunk: Buffer) => void;
  /** Spliced: the idle bound, and the byte count and time the sweep last saw it move. */
  private proxiedIdleMs = 0;
  private seenActivity = -1;
  private seenActiveAt = 0;
  /** When the client, told to go, is destroyed if it has not closed (0 = not closing). */
  private closeBy = 0;

  constructor(
    protected readonly ctx: ProxyContext,
    protected readonly conn: AcceptedConnection,
  ) {
    this.socket = conn.socket;
    this.secure = conn.secure;
    this.clientAddress = conn.remote.address;
    this.log = new LazyLog(ctx.log, () => ({ cid: this.cid, client: conn.remote.address }));
    // Assigned here rather than as a class field: the loader names class-field closures at run time.
    this.onDataBound = (chunk) => this.handleData(chunk);
  }

  /** Resolves when the session is gone. */
  get closed(): Promise<void> {
    if (!this.closedPromise) {
      if (this.phase === 'closed') this.closedPromise = Promise.resolve();
      else this.closedPromise = new Promise((r) => (this.resolveClosed = r));
    }
    return this.closedPromise;
  }

  /** Connection id in log lines (made when first asked for). */
  get cid(): string {
    return (this.cidMade ??= newCid());
  }

  /** The first line the server sends. */
  protected abstract greeting(): string;
  /** Bytes from the client before login (after the PROXY/TLS layers). */
  protected abstract onInput(chunk: Buffer): void;
  /** Line sent when the proxy closes the session on its own (pair down, stop); null = none. */
  protected abstract goodbye(reason: string): string | null;
  /** Line for a client whose first bytes are a PROXY header it may not send. */
  protected abstract refuseLine(text: string): string;

  start(): void {
    this.ctx.sessions.add(this);
    this.ctx.tallies.connections.add(PROTOCOL_LABELS[this.protocol], 1);
    this.attach(this.socket);
    this.write(this.greeting());
    this.armIdle(this.ctx.config.timeouts.preLoginMs);
  }

  private attach(socket: net.Socket): void {
    socket.on('data', this.onDataBound);
    socket.on('error', (err) => {
      this.log.debug({ err: err.message }, 'client socket error');
      this.finish(`client error: ${(err as NodeJS.ErrnoException).code ?? err.message}`);
    });
    socket.on('close', () => this.finish(this.phase === 'proxying' ? this.endReason : 'client closed before login'));
    socket.resume();
  }

  private handleData(chunk: Buffer): void {
    if (this.phase === 'proxying' || this.phase === 'closed') return;
    if (!this.sawData) {
      this.sawData = true;
      if (!this.conn.viaLb && looksLikeProxyHeader(chunk)) {
        this.log.warn({ peer: this.socket.remoteAddress }, 'PROXY header from an address that is not a configured load balancer: refused');
        this.ctx.metrics.rejected.inc({ protocol: this.protocol, reason: 'proxy-header-untrusted' });
        this.write(this.refuseLine('PROXY header not accepted from this address'));
        this.close('untrusted PROXY header');
        return;
      }
    }
    this.onInput(chunk);
  }

  /** (Re)starts the pre-login idle bound (the sweep closes the session when it runs out; 0 = none). */
  protected armIdle(ms: number): void {
    this.idleMs = ms > 0 ? ms : 0;
    this.idleFrom = Date.now();
  }

  /** Stops the pre-login idle bound (login running, session closed). */
  private stopIdle(): void {
    this.idleMs = 0;
  }

  private onIdle(): void {
    this.idleMs = 0;
    this.log.info({ phase: this.phase }, 'pre-login idle timeout');
    const line = this.goodbye('idle timeout');
    if (line) this.write(line);
    this.close('pre-login idle timeout');
  }

  protected write(text: string): void {
    if (this.phase === 'closed' || this.socket.destroyed || this.socket.writableEnded) return;
    if (this.log.isLevelEnabled('debug')) this.log.debug({ line: text.replace(/\r\n$/, '') }, 'S:');
    this.socket.write(text);
  }

  get isSecure(): boolean {
    return this.secure;
  }

  /** STARTTLS/STLS after the OK was written: drops pipelined plaintext, runs the handshake, re-attaches. */
  protected async startTls(): Promise<boolean> {
    const store = this.ctx.tls;
    if (!store) return false;
    this.phase = 'tls';
    const plain = this.socket;
    plain.off('data', this.onDataBound);
    plain.removeAllListeners('close');
    plain.removeAllListeners('error');
    plain.pause();
    try {
      const secure = await upgradeToTls(plain, store, this.ctx.config.timeouts.tlsHandshakeMs);
      this.socket = secure;
      this.secure = true;
      this.phase = 'pre-login';
      this.attach(secure);
      return true;
    } catch (err) {
      this.log.info({ err: (err as Error).message }, 'STARTTLS handshake failed');
      plain.destroy();
      this.finish('tls handshake failed');
      return false;
    }
  }

  /** Runs the login; on success sends `okText` (built from the backend answer) and splices. */
  protected async login(loginName: string, password: string, clientLeftover: () => Buffer, okText: (r: Extract<LoginResult, { ok: true }>) => string): Promise<LoginResult> {
    this.phase = 'logging-in';
    this.socket.pause();
    this.stopIdle();
    const result = await proxyLogin(this.ctx, { protocol: this.protocol, login: loginName, password, client: this.conn.remote, session: this, log: this.log });
    // Gone, or told to go while the login ran (kick: stop, user moved, idle; closeBy set): a
    // backend session made meanwhile is dropped, never spliced. (The sweep destroys a client
    // that was told to go and keeps its side open; its end counts the session out.)
    if ((this.phase as Phase) === 'closed' || this.socket.destroyed || this.closeBy !== 0) {
      if (result.ok) result.backend.socket.destroy();
      return result;
    }
    if (!result.ok) {
      this.phase = 'pre-login';
      this.armIdle(this.ctx.config.timeouts.preLoginMs);
      this.socket.resume();
      return result;
    }
    this.log = this.log.with({ user: result.user.uid, pair: result.pair.id });
    this.write(okText(result));
    this.splice(result.backend, clientLeftover());
    return result;
  }

  private splice(backend: BackendSession, clientLeftover: Buffer): void {
    const c = this.socket;
    const b = backend.socket;
    this.backend = b;
    this.phase = 'proxying';
    const labels = sessionLabelsFor(this.protocol, this.pair ?? 'unknown');
    this.ctx.tallies.sessions.add(labels, 1);
    this.ctx.tallies.sessionsTotal.add(labels, 1);
    this.sessionLabels = labels;
    c.off('data', this.onDataBound);
    this.proxiedIdleMs = this.protocol === 'imap' ? this.ctx.config.timeouts.imapIdleMs : this.ctx.config.timeouts.pop3IdleMs;
    // What either side sent past the login, read already: passed on before anything else.
    for (const early of [backend.leftover, ...backend.input.takeEarly()]) {
      if (!early.length) continue;
      this.bytesOut += early.length;
      this.preOut += early.length;
      c.write(early);
    }
    if (clientLeftover.length) {
      this.bytesIn += clientLeftover.length;
      this.preIn += clientLeftover.length;
      b.write(clientLeftover);
    }
    if (this.ctx.config.relay === 'native' && !this.secure) {
      // Past the login the session is a byte relay: on the native relay's thread it costs the
      // event loop nothing until it ends. Null when the relay is not built or a socket still
      // holds bytes in Node's buffers (then JavaScript relays, below).
      this.lent = lendToNativeRelay(c, b, { idleMs: this.proxiedIdleMs, graceMs: CLOSE_GRACE_MS }, (end) => this.nativeEnded(end));
      if (this.lent) {
        this.log.info({ relay: 'native' }, 'session proxied');
        return;
      }
    }
    this.log.info({ relay: 'javascript' }, 'session proxied');
    this.relayInJavaScript(backend);
  }

  private relayInJavaScript(backend: BackendSession): void {
    const c = this.socket;
    const b = backend.socket;
    // The relay, both ways; bytes are counted in plain fields (added to the byte metric by the
    // proxy's periodic flush and at the end, so the hot path does no label hashing).
    // Client to pair: each chunk counted and written on; a full write buffer pauses the client
    // until 'drain' (what stream.pipe does, with one listener and no pipe bookkeeping).
    c.on('data', (d: Buffer) => {
      this.bytesIn += d.length;
      if (!b.destroyed && !b.write(d)) c.pause();
    });
    b.on('drain', () => {
      if (!c.destroyed) c.resume();
    });
    c.on('end', () => {
      if (!b.destroyed && !b.writableEnded) b.end();
    });
    // Pair to client (the bulk direction: FETCH, RETR): through the relay's ReadPump the pair
    // socket was made with (reused read buffers, its own backpressure).
    this.input = backend.input;
    backend.input.startRelay(b, c);
    // The idle timeout (no bytes either way) is the registry's sweep's: see sweep().
    this.seenActiveAt = Date.now();
    b.on('error', (err) => {
      this.endReason = `backend error: ${(err as NodeJS.ErrnoException).code ?? err.message}`;
    });
    b.on('end', () => {
      if (this.endReason === 'client closed') this.endReason = 'backend closed';
      // As a pipe would: the backend's end ends the client side once what it sent is written.
      if (!c.destroyed && !c.writableEnded) c.end();
    });
    b.on('close', () => {
      // Backend gone (logout, crash, kill): close the client cleanly, never with a reset.
      if (this.endReason === 'client closed') this.endReason = 'backend closed';
      if (!c.destroyed && !c.writableEnded) {
        if (this.endReason.startsWith('backend error')) {
          const line = this.goodbye('backend lost');
          if (line) c.write(line);
        }
        this.endClient();
      }
    });
    c.resume();
  }

  /** The native relay gave the session back: it ended, failed, idled out or outstayed its grace. */
  private nativeEnded(end: NativeRelayEnd): void {
    this.lent = null;
    this.countRelayed(end);
    if (this.phase === 'closed') return;
    if (end.reason === 'idle') {
      readAgain(this.socket); // to see the client close after the goodbye
      this.log.info({ idleMs: this.proxiedIdleMs }, 'session idle timeout');
      this.kick('idle timeout');
      return;
    }
    if (end.reason === 'error' && end.firstClosed !== 'backend') {
      this.endReason = `${end.side} error: ${end.code ?? 'unknown'}`;
      if (end.side === 'backend') {
        // As in JavaScript: the client hears the goodbye, then the session closes.
        this.backend?.destroy();
        const line = this.goodbye('backend lost');
        if (line && !this.socket.writableEnded) this.socket.write(line);
        readAgain(this.socket);
        this.endClient();
        return;
      }
    } else this.endReason = end.firstClosed === 'backend' ? 'backend closed' : 'client closed';
    // Both FINs passed on (or the client's grace ran out, or it failed): nothing left to send.
    this.backend?.destroy();
    this.socket.destroy();
  }

  /** The session's byte counts from what the native relay moved (plus what was passed on before it). */
  private countRelayed(moved: { bytesIn: number; bytesOut: number }): void {
    this.bytesIn = this.preIn + moved.bytesIn;
    this.bytesOut = this.preOut + moved.bytesOut;
  }

  /** Takes a lent session back from the native relay (before its sockets are written or closed here). */
  private takeBack(): void {
    const lent = this.lent;
    if (!lent) return;
    this.lent = null;
    const r = lent.detach();
    if (r) {
      this.countRelayed(r);
      if (r.unsent && !this.socket.destroyed && !this.socket.writableEnded) {
        this.bytesOut += r.unsent.length;
        this.socket.write(r.unsent);
      }
    }
    // Node reads the client again, to see it close after the goodbye.
    readAgain(this.socket);
  }

  /** Adds the bytes relayed since the last call to the byte metric (the proxy calls it every few seconds). */
  flushBytes(): void {
    if (this.input) this.bytesOut = this.preOut + this.input.relayed;
    else if (this.lent) {
      const moved = this.lent.counters();
      if (moved) this.countRelayed(moved);
    }
    if (this.bytesIn === this.flushedIn && this.bytesOut === this.flushedOut) return;
    const bytes = this.ctx.metrics.bytes;
    if (this.bytesIn > this.flushedIn) bytes.inc({ direction: 'in', protocol: this.protocol }, this.bytesIn - this.flushedIn);
    if (this.bytesOut > this.flushedOut) bytes.inc({ direction: 'out', protocol: this.protocol }, this.bytesOut - this.flushedOut);
    this.flushedIn = this.bytesIn;
    this.flushedOut = this.bytesOut;
  }

  /**
   * Called about once a second by the registry for every open session: closes a session idle
   * before login for the pre-login time (no complete command), a spliced session whose byte
   * counters have not moved for its idle time, and destroys a client that was told to
   * go and has not closed within CLOSE_GRACE_MS. (Instead of timers on both sockets, refreshed
   * on every read and write, and a timer per closing client.)
   */
  sweep(now: number): void {
    if (this.phase === 'closed') return;
    if (this.closeBy !== 0) {
      if (now >= this.closeBy) this.socket.destroy();
      return;
    }
    if (this.idleMs > 0) {
      if (now - this.idleFrom >= this.idleMs) this.onIdle();
      return;
    }
    // A session on the native relay: its idle bound is the relay's.
    if (this.phase !== 'proxying' || this.proxiedIdleMs <= 0 || this.lent) return;
    const activity = this.bytesIn + (this.input ? this.input.relayed : 0);
    if (activity !== this.seenActivity) {
      this.seenActivity = activity;
      this.seenActiveAt = now;
      return;
    }
    if (now - this.seenActiveAt >= this.proxiedIdleMs) {
      this.log.info({ idleMs: this.proxiedIdleMs }, 'session idle timeout');
      this.kick('idle timeout');
    }
  }

  /** Ends the client side; the sweep destroys it if the client does not close within a bound. */
  private endClient(): void {
    this.socket.end();
    if (this.closeBy === 0) this.closeBy = Date.now() + CLOSE_GRACE_MS;
  }

  /** Closes the session with the protocol's goodbye (pair down, graceful stop, idle). */
  kick(reason: string): void {
    if (this.phase === 'closed') return;
    this.endReason = reason;
    this.log.info({ reason }, 'closing session');
    this.takeBack();
    // Destroyed, the backend relays nothing more either way.
    this.backend?.destroy();
    const line = this.goodbye(reason);
    if (line && !this.socket.destroyed && !this.socket.writableEnded) this.socket.write(line);
    this.endClient();
  }

  protected close(reason: string): void {
    this.endReason = reason;
    if (this.phase === 'closed') return;
    this.takeBack();
    this.endClient();
  }

  private finish(reason: string): void {
    if (this.phase === 'closed') return;
    const wasProxying = this.phase === 'proxying';
    this.takeBack();
    this.phase = 'closed';
    this.stopIdle();
    this.backend?.destroy();
    if (!this.socket.destroyed) this.socket.destroy();
    this.ctx.tallies.connections.add(PROTOCOL_LABELS[this.protocol], -1);
    this.ctx.sessions.remove(this);
    this.conn.slots?.release(this.clientAddress);
    if (wasProxying) {
      if (this.sessionLabels) this.ctx.tallies.sessions.add(this.sessionLabels, -1);
      this.flushBytes();
      const colon = reason.indexOf(':');
      this.ctx.tallies.closed.add(closedLabels(this.protocol, colon < 0 ? reason : reason.slice(0, colon)), 1);
      this.log.info(
        { user: this.uid, pair: this.pair, client: this.clientAddress, bytesIn: this.bytesIn, bytesOut: this.bytesOut, durationMs: Date.now() - this.started, reason },
        'session ended',
      );
    } else {
      this.log.debug({ reason, durationMs: Date.now() - this.started }, 'connection ended before login');
    }
    this.resolveClosed?.();
  }
}
