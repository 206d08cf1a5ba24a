/**
 * The native relay (common/native/relay.c, built by `npm ci` or `npm run build:native`) seen from
 * TypeScript: lend a logged-in session's two plain-TCP sockets to its thread, which moves their
 * bytes until the session ends, and hear how it ended.
 *
 * ```ts
 * const lent = lendToNativeRelay(client, backend, { idleMs: 1_800_000, graceMs: 5000 }, (end) => {
 *   // the fds are JavaScript's again: end.reason says why ('closed', 'error', 'idle', 'grace')
 * });
 * if (!lent) relayInJavaScript();          // not built, TLS, or bytes still buffered in Node
 * lent.detach();                           // take the session back now (kick); returns what it moved
 * readAgain(client);                        // then Node reads it again (to see it close)
 * ```
 *
 * The sockets stay Node's (listeners, destroy()), but while lent Node must not read or write
 * them: lending stops Node's reads, and the caller writes nothing until the end callback or
 * detach(). Only then may the caller close them: the relay thread uses the fds until it gives
 * them back, and a closed fd's number is soon another connection's.
 */
import { createRequire } from 'node:module';
import net from 'node:net';
import { constants } from 'node:os';
import tls from 'node:tls';

interface Binding {
  start(onDone: (id: number, end: string, side: string, errno: number, bytesIn: number, bytesOut: number, firstClosed: string | null) => void): void;
  attach(clientFd: number, backendFd: number, idleMs: number, graceMs: number): number;
  detach(id: number): [number, number, Buffer | null] | null;
  counters(id: number): [number, number, null] | null;
  live(): number;
  testHold(ms: number): void;
}

export interface NativeRelayEnd {
  /**
   * closed: both sides sent their FIN (who first: `firstClosed`); error: a read or write failed
   * (`side`, `code`); idle: nothing moved for idleMs (sockets untouched: send the goodbye);
   * grace: the backend closed and the client did not within graceMs.
   */
  reason: 'closed' | 'error' | 'idle' | 'grace';
  side: 'client' | 'backend';
  /** errno name for 'error' (ECONNRESET, EPIPE…). */
  code: string | null;
  firstClosed: 'client' | 'backend' | null;
  /** Bytes written to the backend / to the client by the relay. */
  bytesIn: number;
  bytesOut: number;
}

export interface LentSession {
  /** Bytes moved so far (client to backend, backend to client); null once the session has ended. */
  counters(): { bytesIn: number; bytesOut: number } | null;
  /**
   * Takes the session back at once (its end callback is then never called, even when the relay
   * had just finished it). Returns the bytes moved and what the backend sent that the client had
   * no room for yet (the caller writes it); null when it was given back already.
   */
  detach(): { bytesIn: number; bytesOut: number; unsent: Buffer | null } | null;
}

export interface NativeRelayOptions {
  /** End the session when no byte moved either way for this long (0 = never). */
  idleMs: number;
  /** After the backend closed, how long the client has to close before the session is ended. */
  graceMs: number;
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(constants.errno).map(([name, n]) => [n, name]));

let binding: Binding | null = null;
let unavailable: string | null = null;
const ends = new Map<number, (end: NativeRelayEnd) => void>();

function onDone(id: number, reason: string, side: string, errno: number, bytesIn: number, bytesOut: number, firstClosed: string | null): void {
  const cb = ends.get(id);
  if (!cb) return;
  ends.delete(id);
  cb({
    reason: reason as NativeRelayEnd['reason'],
    side: side as NativeRelayEnd['side'],
    code: errno ? (ERRNO_NAMES.get(errno) ?? `errno ${errno}`) : null,
    firstClosed: firstClosed as NativeRelayEnd['firstClosed'],
    bytesIn,
    bytesOut,
  });
}

function load(): Binding | null {
  if (binding || unavailable) return binding;
  if (process.platform !== 'linux') {
    unavailable = `not on ${process.platform} (Linux only)`;
    return null;
  }
  try {
    const b = createRequire(import.meta.url)('./native/build/Release/pairgate_relay.node') as Binding;
    b.start(onDone);
    binding = b;
  } catch (err) {
    unavailable = `not built (${(err as Error).message.split('\n')[0]}); run \`npm run build:native\``;
  }
  return binding;
}

/** Whether the native relay can be used here, and if not, why (for the start-up log). */
export function nativeRelayStatus(): { available: boolean; reason: string | null } {
  const b = load();
  return { available: b !== null, reason: b ? null : unavailable };
}

/** Sessions lent now. */
export function nativeRelayLive(): number {
  return binding ? binding.live() : 0;
}

/** Tests only: the relay thread waits `ms` between an epoll_wait that returned events and acting on them. */
export function nativeRelayTestHold(ms: number): void {
  binding?.testHold(ms);
}

interface TcpHandle {
  fd?: number;
  reading?: boolean;
  readStop?: () => number;
  readStart?: () => number;
}

/**
 * Has Node read a socket again after the relay gave it back (to see the peer close, or to take
 * its bytes). Lending stopped the handle's reads behind the stream's back; the stream still
 * waits for the read it asked for, so resume() alone would not start them again.
 */
export function readAgain(s: net.Socket): void {
  const h = (s as unknown as { _handle?: TcpHandle })._handle;
  if (s.destroyed || !h || typeof h.readStart !== 'function') return;
  if (!h.reading) {
    h.reading = true;
    const err = h.readStart();
    if (err) s.destroy(new Error(`read restart failed (${ERRNO_NAMES.get(-err) ?? err})`));
  }
  s.resume();
}

/** The socket's TCP handle when it is a plain, open, idle TCP socket whose fd can be lent. */
function lendableHandle(s: net.Socket): TcpHandle | null {
  if (s instanceof tls.TLSSocket || s.destroyed || s.connecting || s.readableEnded || s.writableEnded) return null;
  // Bytes Node has read but nobody took, or has been given to write and not yet written: the
  // relay thread would not see them, so the session stays in JavaScript.
  if (s.readableLength > 0 || s.writableLength > 0) return null;
  const h = (s as unknown as { _handle?: TcpHandle })._handle;
  if (!h || typeof h.fd !== 'number' || h.fd < 0 || typeof h.readStop !== 'function') return null;
  return h;
}

/**
 * Lends both sockets to the relay thread. Returns null (and changes nothing) when the relay is
 * not available or either socket cannot be lent; the caller then relays in JavaScript.
 */
export function lendToNativeRelay(client: net.Socket, backend: net.Socket, opts: NativeRelayOptions, onEnd: (end: NativeRelayEnd) => void): LentSession | null {
  const b = load();
  if (!b) return null;
  const ch = lendableHandle(client);
  const bh = lendableHandle(backend);
  if (!ch || !bh) return null;
  let id: number;
  try {
    id = b.attach(ch.fd!, bh.fd!, Math.max(0, Math.floor(opts.idleMs)), Math.max(0, Math.floor(opts.graceMs)));
  } catch {
    // Refused (epoll_ctl failed, too many sessions): nothing changed, JavaScript relays.
    return null;
  }
  // Node must not read these fds any more: stop its reads (readAgain() starts them again). Done
  // after the attach, in the same turn: Node reads only from its event loop, which waits for us.
  stopReads(client, ch);
  stopReads(backend, bh);
  ends.set(id, onEnd);
  return new Lent(b, id);
}

function stopReads(s: net.Socket, h: TcpHandle): void {
  s.pause();
  h.readStop!();
  h.reading = false;
}

/** A lent session's handle (a class: no closures made per session). */
class Lent implements LentSession {
  constructor(
    private readonly b: Binding,
    private readonly id: number,
  ) {}

  counters(): { bytesIn: number; bytesOut: number } | null {
    const c = this.b.counters(this.id);
    return c ? { bytesIn: c[0], bytesOut: c[1] } : null;
  }

  detach(): { bytesIn: number; bytesOut: number; unsent: Buffer | null } | null {
    const r = this.b.detach(this.id);
    ends.delete(this.id);
    if (!r) return null;
    return { bytesIn: r[0], bytesOut: r[1], unsent: r[2] };
  }
}
