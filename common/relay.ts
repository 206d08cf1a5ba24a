/**
 * A byte relay between two connected TCP sockets (the load balancer's splice; usable by any
 * L4 hop): backpressure (a slow reader stops the other side's reads), half-close (a FIN from one
 * side is passed on as a FIN once what came before it is written; the other direction keeps
 * flowing), nothing else. Errors, timeouts, accounting and closing stay with the caller.
 *
 * ```ts
 * const fromBackend = new ReadPump();                     // before the socket exists
 * const backend = net.connect({ host, port, allowHalfOpen: true, onread: fromBackend.onread });
 * // ... once connected, with `client` accepted with allowHalfOpen (and pauseOnConnect):
 * relay(client, backend, { bPump: fromBackend });         // client <-> backend, both ways
 * ```
 *
 * A direction whose source was created with a ReadPump's `onread` (only sockets made by
 * `net.connect`/`new net.Socket` can take one; Node's server does not pass it to accepted
 * sockets) reads through the pump; any other direction uses `pipe()`.
 *
 * Why a pump: with plain stream reads Node allocates a fresh 64 KiB buffer per read, wraps it in
 * the stream machinery and leaves it to the GC; a bulk relay spends more CPU on that than on
 * the copies in and out of the kernel. A pump reads into buffers it keeps:
 *
 * - While a connection moves little, it reads into one small buffer shared by every pump (the
 *   event loop runs one read callback at a time) and writes a copy of what it read, so an idle
 *   connection holds no buffer of its own and a write still queued never points into the
 *   shared buffer.
 * - A read that fills the shared buffer means more is waiting: the pump takes two large buffers
 *   of its own (while fewer than `maxBulkPumps` pumps hold some) and from then on writes
 *   straight from them, alternating: one can be read into while the other's write is still
 *   queued. When both are held by queued writes the pump stops reading (the kernel's receive
 *   window then stops the sender) until one write completes. Once reads are small again and
 *   nothing is queued, it gives the large buffers back.
 * - In shared mode the pump stops reading while the destination has `pauseBytes` or more
 *   queued, and reads again once its queued writes have all gone out.
 *
 * Known limits:
 * - The large buffers go back only from a read callback (Node has already been told that the
 *   next read lands in one of them, and Node 20 cannot be told otherwise without a read), so a
 *   connection that goes quiet right after a burst keeps its two buffers and its bulk slot until
 *   it next reads or closes: at most `maxBulkPumps` x 2 buffers in the process, after which other
 *   connections simply stay on the shared buffer (copying, slower, still correct).
 * - A pump resumes its reads from its own write callbacks: the destination must not be written
 *   by anyone else while the relay runs (a caller's last words go out only as it closes).
 */
import type net from 'node:net';

export interface ReadPumpOptions {
  /** Size of each of the two buffers a pump takes while data streams (default 1 MiB). */
  bulkBufferBytes?: number;
}

/** Reads into the shared buffer are this large at most; a read that fills it turns a pump to bulk mode. */
const SHARED_BYTES = 64 * 1024;
/** In shared mode: stop reading while the destination has this much queued. */
const PAUSE_BYTES = 256 * 1024;
const DEFAULT_BULK_BYTES = 1024 * 1024;
/** Free bulk buffers kept for reuse, per size. */
const FREE_KEEP = 16;

let shared: Buffer | null = null;
const sharedBuffer = (): Buffer => (shared ??= Buffer.allocUnsafeSlow(SHARED_BYTES));

/** How many pumps may hold bulk buffers at once (2 x bulkBufferBytes each); the others stay in shared mode. */
let maxBulkPumps = 64;
let bulkPumps = 0;
const freeBuffers = new Map<number, Buffer[]>();

/** Sets the process-wide bound on pumps in bulk mode (memory: 2 x bulkBufferBytes each); returns the previous one. */
export function setMaxBulkPumps(n: number): number {
  const prev = maxBulkPumps;
  maxBulkPumps = Math.max(0, Math.floor(n));
  return prev;
}

/** Pumps in bulk mode now (for tests and metrics). */
export function bulkPumpsInUse(): number {
  return bulkPumps;
}

function takeBuffer(size: number): Buffer {
  return freeBuffers.get(size)?.pop() ?? Buffer.allocUnsafeSlow(size);
}

function giveBuffer(b: Buffer): void {
  let list = freeBuffers.get(b.length);
  if (!list) freeBuffers.set(b.length, (list = []));
  if (list.length < FREE_KEEP) list.push(b);
}

/** One direction of a relay: reads from the socket it is the `onread` of, writes to `dst`. */
export class ReadPump {
  readonly onread: { buffer: () => Uint8Array; callback: (nread: number, buf: Uint8Array) => boolean };
  private readonly bulkBytes: number;
  private src: net.Socket | null = null;
  private dst: net.Socket | null = null;
  /** Bytes read before start(), held (copied) until there is a destination. */
  private held: Buffer[] = [];
  /** The two own buffers in bulk mode, null in shared mode. */
  private bulk: [Buffer, Buffer] | null = null;
  /** Which own buffer the next read goes to, and the sizes of the last write from each. */
  private next = 0;
  private readonly sizes = [0, 0];
  private paused = false;
  private ended = false;
  /** Either socket has closed: no bulk buffers are taken any more. */
  private closed = false;

  constructor(options: ReadPumpOptions = {}) {
    this.bulkBytes = options.bulkBufferBytes ?? DEFAULT_BULK_BYTES;
    this.onread = {
      buffer: () => (this.bulk ? this.bulk[this.next]! : sharedBuffer()),
      callback: (nread, buf) => this.onRead(nread, buf as Buffer),
    };
  }

  /** Starts moving what `src` reads (src must have been created with this pump's `onread`) into `dst`. */
  start(src: net.Socket, dst: net.Socket): void {
    this.src = src;
    this.dst = dst;
    src.once('end', () => {
      this.ended = true;
      dst.end();
    });
    src.once('close', () => this.release());
    dst.once('close', () => this.release());
    for (const chunk of this.held) dst.write(chunk, this.afterWrite);
    this.held = [];
    if (this.paused && dst.writableLength === 0) this.resume();
  }

  private onRead(nread: number, buf: Buffer): boolean {
    const dst = this.dst;
    if (!dst) {
      // Nowhere to write yet: keep a copy and stop reading until start().
      this.held.push(Buffer.from(buf.subarray(0, nread)));
      this.paused = true;
      return false;
    }
    if (this.bulk) {
      const i = this.next;
      this.sizes[i] = nread;
      this.next = i ^ 1;
      dst.write(buf.subarray(0, nread), this.afterWrite);
      if (dst.writableLength === 0 && nread < SHARED_BYTES) {
        // Small reads and nothing queued: back to the shared buffer.
        this.giveBack();
        return true;
      }
    } else {
      // The shared buffer is read into by every pump: write a copy.
      dst.write(Buffer.from(buf.subarray(0, nread)), this.afterWrite);
      if (nread === buf.length && bulkPumps < maxBulkPumps && !this.closed) {
        bulkPumps++;
        this.bulk = [takeBuffer(this.bulkBytes), takeBuffer(this.bulkBytes)];
        this.next = 0;
        this.sizes[0] = this.sizes[1] = 0;
      }
    }
    if (this.mustWait()) {
      this.paused = true;
      return false;
    }
    return true;
  }

  /**
   * Whether the buffer the next read would go into is still held by a queued write (bulk mode),
   * or the destination has too much queued (shared mode). Writes complete in order, so in bulk
   * mode the next buffer (the older of the two) is free once what is queued fits in the newer one.
   */
  private mustWait(): boolean {
    const queued = this.dst!.writableLength;
    if (queued === 0) return false;
    return this.bulk ? queued > this.sizes[this.next ^ 1]! : queued >= PAUSE_BYTES;
  }

  private readonly afterWrite = (): void => {
    if (!this.paused || this.dst === null) return;
    if (this.bulk ? this.mustWait() : this.dst.writableLength > 0) return;
    this.resume();
  };

  private resume(): void {
    this.paused = false;
    const src = this.src;
    if (src && !src.destroyed && !this.ended) src.resume();
  }

  /** Back to shared mode; only when no queued write holds a bulk buffer. */
  private giveBack(): void {
    if (!this.bulk) return;
    giveBuffer(this.bulk[0]);
    giveBuffer(this.bulk[1]);
    this.bulk = null;
    bulkPumps--;
  }

  /** At close of either socket: the bulk buffers are dropped (a write may still hold one), the slot freed. */
  private release(): void {
    this.closed = true;
    if (!this.bulk) return;
    this.bulk = null;
    bulkPumps--;
  }
}

export interface RelayOptions {
  /** The pump `a` was created with (its `onread`), if any; `pipe()` otherwise. */
  aPump?: ReadPump;
  /** The pump `b` was created with, if any. */
  bPump?: ReadPump;
}

/**
 * Relays bytes both ways between `a` and `b` (both connected, both with allowHalfOpen) and
 * starts reading from both. Errors, timeouts and closing stay with the caller.
 */
export function relay(a: net.Socket, b: net.Socket, options: RelayOptions = {}): void {
  for (const [src, dst, pump] of [
    [a, b, options.aPump],
    [b, a, options.bPump],
  ] as const) {
    if (pump) pump.start(src, dst);
    else src.pipe(dst);
  }
  if (options.aPump === undefined) a.resume();
  if (options.bPump === undefined) b.resume();
}
