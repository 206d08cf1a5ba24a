/**
 * The store's LMTP server (RFC 2033) on smtp-server in LMTP mode: one reply per recipient after
 * DATA, a size limit, delivery ids from `X-Pairgate-Delivery-Id` (set by the proxy, so its
 * retries are stored once) or else a digest of envelope and body, XCLIENT/XFORWARD only from
 * trusted networks. The recipient's local part is the store user (uid); the domain is ignored.
 */
import { createHash } from 'node:crypto';
import { SMTPServer, type SMTPServerSession } from 'smtp-server';
import type { Readable, Writable } from 'node:stream';
import net, { type Socket } from 'node:net';
import type { AddressList } from '../../common/cidr.ts';
import { normalizeAddress } from '../../common/cidr.ts';
import type { Logger } from '../../common/log.ts';
import { counter, gauge, histogram, tallyOf, type MetricsRegistry } from '../../common/metrics.ts';
import { PairgateError } from '../../common/errors.ts';
import type { MailStore } from './types.ts';
import { checkUser } from './names.ts';
import { installFastDataScan } from './smtp-data.ts';
import { pooledSlabs, ReadArena, type ArenaEvents } from './read-arena.ts';

export interface LmtpServerOptions {
  store: MailStore;
  host: string;
  port: number;
  log: Logger;
  registry: MetricsRegistry;
  /** Who may use XCLIENT/XFORWARD (the proxies). */
  trusted: AddressList;
  /** Largest message accepted, in bytes. */
  maxMessageBytes?: number;
  maxRecipients?: number;
  /** Inactivity bound per connection. */
  socketTimeoutMs?: number;
  maxClients?: number;
  name?: string;
}

export interface LmtpServer {
  port: number;
  sessions(): number;
  /** Delivery latency (end of DATA to replies) over the last 256 deliveries, in ms. */
  latency(): { samples: number; avgMs: number; p95Ms: number };
  close(): Promise<void>;
}

export const DELIVERY_ID_HEADER = 'x-pairgate-delivery-id';

/**
 * The delivery id header's value from the message's header block, if present and sane. The body
 * may be given as parts: the header block is then looked for in the first parts (up to 64 KiB)
 * and the parts are joined only when it does not end there (the same answer either way).
 */
export function deliveryIdFromHeaders(given: Buffer | readonly Buffer[]): string | null {
  let body: Buffer;
  if (Buffer.isBuffer(given)) body = given;
  else if (given.length === 1) body = given[0]!;
  else {
    let n = 0;
    let k = 0;
    while (k < given.length && n < 64 * 1024) n += given[k++]!.length;
    const prefix = k === 1 ? given[0]! : Buffer.concat(given.slice(0, k), n);
    // The first "\r\n\r\n" of the whole body lies in this prefix when the prefix holds one.
    const end = prefix.indexOf('\r\n\r\n');
    body = end >= 0 || k === given.length ? prefix : Buffer.concat(given);
  }
  let end = body.indexOf('\r\n\r\n');
  if (end < 0) end = body.indexOf('\n\n');
  const head = body.subarray(0, end < 0 ? Math.min(body.length, 64 * 1024) : end).toString('latin1');
  const m = /^x-pairgate-delivery-id:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)/im.exec(head);
  if (!m) return null;
  const id = m[1]!.replace(/\r?\n[ \t]*/g, ' ').trim();
  return id && id.length <= 200 && /^[\x21-\x7e]+$/.test(id) ? id : null;
}

/** The delivery id when the proxy set none: a digest of the envelope and the body's SHA-256. */
export function envelopeDigest(from: string, rcpts: string[], bodySha256: string): string {
  const h = createHash('sha256');
  h.update(`${from}\0${[...rcpts].sort().join('\0')}\0${bodySha256}`);
  return 'sha256:' + h.digest('hex');
}

class ReplyError extends Error {
  constructor(
    readonly responseCode: number,
    message: string,
  ) {
    super(message);
  }
}

/** The one table from store errors to LMTP per-recipient replies (code, enhanced code, text). */
export function lmtpReplyFor(err: unknown): ReplyError {
  if (err instanceof PairgateError) {
    switch (err.code) {
      case 'LIMIT':
        return err.temporary ? new ReplyError(452, 'Insufficient system storage, try again later') : new ReplyError(552, 'Mailbox full: quota exceeded');
      case 'BAD_INPUT':
      case 'NOT_FOUND':
        return new ReplyError(550, 'No such user here');
      default:
        if (!err.temporary) return new ReplyError(554, 'Delivery failed');
    }
  }
  return new ReplyError(451, 'Temporary failure in the mail store, try again later');
}

/** Label objects of pairgate_lmtp_read_slabs_total, made once. */
const SLAB_NEW = { outcome: 'new' };
const SLAB_REUSED = { outcome: 'reused' };
const SLAB_DROPPED = { outcome: 'dropped' };

export async function startLmtpServer(opts: LmtpServerOptions): Promise<LmtpServer> {
  const log = opts.log.child({ protocol: 'lmtp' });
  if (!installFastDataScan()) log.debug('smtp-server is not the version the fast DATA scan was written for: its own scan is used');
  const maxBytes = opts.maxMessageBytes ?? 50 * 1024 * 1024;
  const sessionsGauge = gauge(opts.registry, 'sessions', 'Open sessions by protocol', ['protocol']);
  const sessionsTotal = counter(opts.registry, 'sessions_total', 'Sessions started by protocol', ['protocol']);
  const deliveries = counter(opts.registry, 'deliveries_total', 'Per-recipient LMTP deliveries by result', ['result']);
  const seconds = histogram(opts.registry, 'delivery_seconds', 'LMTP delivery latency from end of DATA to the replies');
  // smtp-server takes a list of exact peer addresses for XCLIENT/XFORWARD; the list holds the
  // addresses of the trusted peers connected now, so that CIDR ranges can be configured.
  const trustedNow: string[] = [];
  const trustedCount = new Map<string, number>();
  let open = 0;
  /** Each open connection's ReadArena by smtp-server's connection id (session.id). */
  const arenas = new Map<string, ReadArena>();
  const slabs = tallyOf(
    counter(opts.registry, 'lmtp_read_slabs_total', 'LMTP read slabs (256 KiB) by outcome: new, reused (from the pool), dropped (left to the GC: connection closed or delivery failed)', ['outcome']),
  );
  gauge(opts.registry, 'lmtp_read_slabs_pooled', 'LMTP read slabs free in the pool (256 KiB each)', [], function () {
    this.set(pooledSlabs());
  });
  const arenaEvents: ArenaEvents = {
    took: (reused) => slabs.add(reused ? SLAB_REUSED : SLAB_NEW, 1),
    dropped: (n) => slabs.add(SLAB_DROPPED, n),
  };
  const recent = new Float64Array(256);
  let recentN = 0;

  const server = new SMTPServer({
    lmtp: true,
    name: opts.name ?? 'pairgate-store',
    banner: 'pairgate store ready',
    size: maxBytes,
    rejectOversized: true,
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    hideSTARTTLS: true,
    // Accepted sockets start paused, so that their handle can move into a socket that reads into a ReadArena.
    pauseOnConnect: true,
    hideENHANCEDSTATUSCODES: false,
    useXClient: trustedNow,
    useXForward: trustedNow,
    maxClients: opts.maxClients ?? 500,
    // The clients are the proxy tier (their names are known): no PTR query to the resolver per
    // connection, which also held every greeting 5-10 ms here (up to 1.5 s with a slow resolver).
    disableReverseLookup: true,
    socketTimeout: opts.socketTimeoutMs ?? 5 * 60_000,
    closeTimeout: 10_000,
    logger: false,
    onConnect(session, cb) {
      const addr = normalizeAddress(session.remoteAddress);
      if (opts.trusted.has(addr)) {
        const n = trustedCount.get(addr) ?? 0;
        trustedCount.set(addr, n + 1);
        if (n === 0) trustedNow.push(addr, '::ffff:' + addr);
        (session as SMTPServerSession & { pgTrusted?: string }).pgTrusted = addr;
      }
      open++;
      (session as SMTPServerSession & { pgCounted?: boolean }).pgCounted = true;
      sessionsGauge.inc({ protocol: 'lmtp' });
      sessionsTotal.inc({ protocol: 'lmtp' });
      cb();
    },
    onClose(session) {
      // smtp-server calls onClose for every connection, also for one that closed before its
      // onConnect (the greeting waits 100 ms for early talkers: a TCP check) or that it refused
      // at maxClients: only a session counted in onConnect is counted out.
      const s = session as SMTPServerSession & { pgTrusted?: string; pgCounted?: boolean };
      if (!s.pgCounted) return;
      s.pgCounted = false;
      const addr = s.pgTrusted;
      if (addr) {
        const n = (trustedCount.get(addr) ?? 1) - 1;
        if (n <= 0) {
          trustedCount.delete(addr);
          for (const a of [addr, '::ffff:' + addr]) {
            const i = trustedNow.indexOf(a);
            if (i >= 0) trustedNow.splice(i, 1);
          }
        } else trustedCount.set(addr, n);
      }
      open--;
      sessionsGauge.dec({ protocol: 'lmtp' });
    },
    onRcptTo(address, session, cb) {
      if (session.envelope.rcptTo.length >= (opts.maxRecipients ?? 1000)) return cb(new ReplyError(452, 'Too many recipients'));
      const local = localPart(address.address);
      try {
        checkUser(local);
      } catch {
        return cb(new ReplyError(550, 'No such user here'));
      }
      cb();
    },
    onData(stream: Readable, session, cb) {
      // Nothing read before this DATA is referenced any more (see ReadArena): its slabs are reused.
      arenas.get(session.id)?.recycle();
      // The body is kept as the chunks that arrived, never joined: the store writes them to the log
      // by reference. smtp-server emits about one chunk per socket read (it prepends the 4 bytes it
      // held back from the previous read to the next one, in a fresh buffer), and a dot-unstuffed
      // line start splits a read in two; no chunk is reused or changed after it is emitted.
      const parts: Buffer[] = [];
      let size = 0;
      // The body's SHA-256 (its address in the store, and part of the delivery id when the proxy
      // set none) is computed once, as the chunks arrive: no second pass over the whole body, no
      // copy for a thread-pool job, and never more than one chunk's hashing between two events.
      const hash = createHash('sha256');
      stream.on('data', (d: Buffer) => {
        size += d.length;
        if (size <= maxBytes) {
          hash.update(d);
          parts.push(d);
        }
      });
      stream.on('error', (err) => cb(err));
      stream.on('end', () => {
        const rcpts = session.envelope.rcptTo.map((r) => r.address);
        if ((stream as Readable & { sizeExceeded?: boolean }).sizeExceeded || size > maxBytes) {
          deliveries.inc({ result: 'too-big' }, rcpts.length);
          return cb(null, rcpts.map(() => new ReplyError(552, `Message exceeds fixed maximum message size ${maxBytes}`)) as unknown as string);
        }
        const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
        const users = rcpts.map((a) => localPart(a));
        const t0 = process.hrtime.bigint();
        const client = session.xClient?.get('ADDR') ?? session.xForward?.get('ADDR') ?? session.remoteAddress;
        const bodySha256 = hash.digest('hex');
        const id = deliveryIdFromHeaders(parts) ?? envelopeDigest(from, rcpts, bodySha256);
        const slog = log.child({ cid: session.id, deliveryId: id });
        Promise.resolve()
          .then(() => opts.store.deliver(id, users, parts, { bodySha256 }))
          .then((results) => {
            const replies = results.map((r) => {
              if (r.ok) {
                deliveries.inc({ result: r.duplicate ? 'duplicate' : 'ok' });
                return `${r.duplicate ? 'Already delivered' : 'Saved'} uid=${r.uid}`;
              }
              const e = lmtpReplyFor(r.error);
              deliveries.inc({ result: e.responseCode >= 500 ? 'rejected' : 'tempfail' });
              slog.info({ user: r.user, code: e.responseCode, err: r.error?.message }, 'recipient refused');
              return e;
            });
            const secs = Number(process.hrtime.bigint() - t0) / 1e9;
            seconds.observe(secs);
            recent[recentN++ % recent.length] = secs * 1000;
            slog.info({ from, rcpts: users.length, bytes: size, client }, 'delivered');
            cb(null, replies as unknown as string);
          })
          .catch((err: unknown) => {
            // The store may still be writing from this body's buffers: they are not reused.
            arenas.get(session.id)?.abandon();
            const e = lmtpReplyFor(err);
            deliveries.inc({ result: e.responseCode >= 500 ? 'rejected' : 'tempfail' }, rcpts.length);
            slog.warn({ err: err instanceof Error ? err.message : String(err), code: e.responseCode }, 'delivery failed');
            cb(e);
          });
      });
    },
  });
  server.on('error', (err) => log.warn({ err: err.message }, 'LMTP connection error'));
  // Each connection reads into reused slabs (ReadArena) rather than a fresh buffer per read: the
  // accepted socket's handle moves into a socket made with `onread` before smtp-server sees it,
  // and the arena is found again by the connection id smtp-server gives the socket (session.id).
  // smtp-server writes every reply with its own socket.write: a pipelined MAIL, RCPT... DATA and
  // the per-recipient replies after DATA were a write system call each (on loopback ~25 us, the
  // largest item of the store's profile with 10 recipients). Replies written in one tick now go
  // out together: corked at the first write, uncorked on the next tick (end() flushes too).
  const accepts = server.server.listeners('connection') as Array<(socket: Socket) => void>;
  const arenaOfSocket = new WeakMap<Socket, ReadArena>();
  if (accepts.length === 1) {
    const smtpAccept = accepts[0]!;
    server.server.removeAllListeners('connection');
    server.server.on('connection', (accepted: Socket) => {
      const socket = arenaSocket(accepted, arenaOfSocket, arenaEvents);
      coalesceWrites(socket);
      smtpAccept(socket);
    });
  } else {
    // Not the one accept handler of the smtp-server this was written for: its own reads, unpaused.
    log.warn({ handlers: accepts.length }, 'LMTP: smtp-server accepts connections differently than expected; reading without the read arena');
    server.server.on('connection', (socket: Socket) => {
      coalesceWrites(socket);
      socket.resume();
    });
  }
  const smtpConnect = server.connect;
  server.connect = function (this: SMTPServer, socket: Socket, socketOptions: { id: string }) {
    const arena = arenaOfSocket.get(socket);
    if (arena) {
      arenas.set(socketOptions.id, arena);
      socket.once('close', () => arenas.delete(socketOptions.id));
    }
    return smtpConnect.call(this, socket, socketOptions);
  } as typeof server.connect;

  await new Promise<void>((resolve, reject) => {
    const onErr = (err: Error) => reject(err);
    server.server.once('error', onErr);
    server.listen(opts.port, opts.host, () => {
      server.server.off('error', onErr);
      resolve();
    });
  });
  const addr = server.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  log.info({ host: opts.host, port }, 'LMTP listening');
  return {
    port,
    sessions: () => open,
    latency() {
      const n = Math.min(recentN, recent.length);
      if (!n) return { samples: 0, avgMs: 0, p95Ms: 0 };
      const v = Array.from(recent.subarray(0, n)).sort((a, b) => a - b);
      return { samples: n, avgMs: Number((v.reduce((a, b) => a + b, 0) / n).toFixed(2)), p95Ms: Number(v[Math.min(n - 1, Math.floor(n * 0.95))]!.toFixed(2)) };
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
      }),
  };
}

/** Corks `socket` at the first write of a tick and uncorks it on the next, so that the writes of one tick become one. */
export function coalesceWrites(socket: Socket): void {
  const write = socket.write;
  let corked = false;
  const uncork = () => {
    corked = false;
    socket.uncork();
  };
  socket.write = function (this: Socket, ...args: Parameters<Socket['write']>): boolean {
    if (!corked && !socket.destroyed) {
      corked = true;
      socket.cork();
      process.nextTick(uncork);
    }
    return write.apply(this, args);
  } as Socket['write'];
}

/**
 * The accepted connection as a socket that reads into a ReadArena: its handle moved into a socket
 * made with `onread`, as Node's own server makes sockets. The reader it is piped into (smtp-server's
 * parser) tells the arena what it has taken in. Where the handle cannot move (not a TCP handle of
 * this Node), the accepted socket itself, resumed: it reads as 'data' events into fresh buffers.
 */
function arenaSocket(accepted: Socket, arenaOfSocket: WeakMap<Socket, ReadArena>, events: ArenaEvents): Socket {
  const handle = (accepted as unknown as { _handle?: { useUserBuffer?: unknown } | null })._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') {
    accepted.resume();
    return accepted;
  }
  (accepted as unknown as { _handle: unknown })._handle = null;
  accepted.destroy(); // frees nothing but the server's count of this connection
  const arena = new ReadArena(events);
  // The views handed to the socket, each counted once when it reaches the parser's _write. The
  // parser also calls its own _write with buffers of its making (the bytes after DATA on the same
  // line, copied; the remainder after the final dot): counting those too made `taken` run ahead
  // of `handed`, so that recycle() could find them equal while bytes still waited in the
  // parser's write buffer and pool the slab holding them.
  const handedViews = new WeakSet<Buffer>();
  const socket: Socket = new net.Socket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: () => arena.next(),
      // What Node does with a read of its own buffer: push it (false = stop reading until the
      // reader wants more).
      callback: (nread: number) => {
        const view = arena.took(nread);
        handedViews.add(view);
        return socket.push(view);
      },
    },
  } as net.SocketConstructorOpts);
  const pipe = socket.pipe;
  const counted = new WeakSet<object>();
  socket.pipe = function <T extends NodeJS.WritableStream>(this: Socket, dest: T, options?: { end?: boolean }): T {
    const w = dest as unknown as Writable;
    if (!counted.has(w)) {
      counted.add(w);
      const write = w._write;
      w._write = function (this: Writable, chunk: Buffer, encoding: BufferEncoding, next: (err?: Error | null) => void) {
        if (handedViews.delete(chunk)) arena.consumed(chunk.length);
        return write.call(this, chunk, encoding, next);
      };
    }
    return pipe.call(this, dest, options) as T;
  };
  arenaOfSocket.set(socket, arena);
  socket.once('close', () => arena.abandon());
  return socket;
}

/** `alice@example.net` -> `alice` (lowercased, as Dovecot's %Ln). */
export function localPart(address: string): string {
  const at = address.lastIndexOf('@');
  return (at < 0 ? address : address.slice(0, at)).toLowerCase();
}
