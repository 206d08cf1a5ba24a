/**
 * The block device contract the mail store writes through, and its simplest implementation:
 * a local file with no peer. The replicated volume implements the same interface, so the
 * store runs unchanged on a local file (tests, `pairgate store check` on a copy) or on the
 * pair's replicated volume (production, where `write` resolves per the DRBD-style protocol).
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { BadInputError, IntegrityError, UnavailableError } from '../../common/errors.ts';

export const BLOCK_SIZE = 4096;

/**
 * What a write takes: one buffer, or parts written back to back (so that a caller laying out
 * records around a large payload need not copy the payload into one buffer first).
 */
export type WriteData = Buffer | readonly Buffer[];

export function writeLength(data: WriteData): number {
  if (Buffer.isBuffer(data)) return data.length;
  let n = 0;
  for (const p of data) n += p.length;
  return n;
}

/** Bytes [start, end) of `data` as views of its parts (nothing copied). */
export function sliceWriteData(data: WriteData, start: number, end: number): Buffer[] {
  const parts = Buffer.isBuffer(data) ? [data] : data;
  const out: Buffer[] = [];
  let at = 0;
  for (const p of parts) {
    const from = Math.max(start, at);
    const to = Math.min(end, at + p.length);
    if (from < to) out.push(from === at && to === at + p.length ? p : p.subarray(from - at, to - at));
    at += p.length;
    if (at >= end) break;
  }
  return out;
}

export interface BlockDevice {
  /** Usable size in bytes (a multiple of BLOCK_SIZE). */
  readonly size: number;
  /** Reads `length` bytes at `offset`; any alignment. UnavailableError when not readable (secondary, detached). */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Writes `data` at `offset`. Offset and length must be multiples of BLOCK_SIZE. Resolves when
   * the write is durable as the device promises (local: fdatasync'd; protocol C: on both disks).
   * Concurrent writes must not overlap: the local disk may complete them in either order while the
   * peer applies them in issue order, so overlapping ones could leave the two disks different
   * (the store never issues them; like a file system, it waits for a block's write to finish
   * before writing that block again).
   */
  write(offset: number, data: WriteData): Promise<void>;
  /** Resolves when every write issued before it is durable. */
  flush(): Promise<void>;
  /** True when the store may read and write now (primary, disk attached). */
  readonly writable: boolean;
}

export function checkRange(size: number, offset: number, length: number, aligned: boolean): void {
  if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0) {
    throw new BadInputError(`bad range offset=${offset} length=${length}`);
  }
  if (offset + length > size) throw new BadInputError(`range ${offset}+${length} is past the end of the volume (${size} bytes)`);
  if (aligned && (offset % BLOCK_SIZE !== 0 || length % BLOCK_SIZE !== 0)) {
    throw new BadInputError(`write at ${offset}+${length} is not aligned to ${BLOCK_SIZE}-byte blocks`);
  }
}

/**
 * A local file as a block device. Each write is followed by fdatasync; concurrent writers share
 * one fdatasync (group commit), so many small deliveries cost one flush between them. A write
 * that finds the device idle goes through a second handle opened O_DSYNC instead: the same disk
 * work (data plus a cache flush), but one trip to the I/O thread pool instead of two (write, then
 * fdatasync), which is most of the latency left once the disk itself is fast.
 *
 * Where the file system takes O_DIRECT (ext4, xfs; tmpfs from Linux 6.6 on, where it still goes
 * through memory), writes bypass the page cache, as a DRBD volume sits below it: the data is copied
 * into a reused page-aligned buffer (AlignedPool) and written from there. A buffered write into a
 * part of the file not in the page cache costs a fresh page-cache page per 4 KiB; on this VM that
 * was 2.2-2.6 ms of CPU per MiB once the memory the guest had freed recently was used up (0.14 ms
 * per MiB direct, the copy 0.05 ms), and a log-structured store appends to parts never written
 * before. Durability is unchanged: the O_DSYNC path opens O_DIRECT|O_DSYNC, the group path writes
 * O_DIRECT then fdatasyncs (which flushes the disk cache and commits the allocation of blocks
 * written into holes). Reads stay buffered (the kernel drops cached pages a direct write covers).
 * `direct: false` in open() keeps the page-cache path; a direct write refused with EINVAL switches
 * the device back to it.
 */
export class FileBlockDevice implements BlockDevice {
  private fh: FileHandle | null;
  private dsync: FileHandle | null = null;
  /** O_DIRECT handles (plain, and with O_DSYNC), when the file system takes them. */
  private directFh: FileHandle | null = null;
  private directSync: FileHandle | null = null;
  private pool: AlignedPool | null = null;
  private syncing: Promise<void> | null = null;
  private syncWanted = false;
  private waiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  /** Durable writes in flight (either path). */
  private active = 0;

  private constructor(fh: FileHandle, readonly size: number, private readonly path: string) {
    this.fh = fh;
  }

  /** Opens (and with `create`, creates or extends to `size`) the backing file. */
  static async open(path: string, opts: { size?: number; create?: boolean; direct?: boolean } = {}): Promise<FileBlockDevice> {
    const fh = await open(path, opts.create ? 'a+' : 'r+').then(async (h) => {
      if (!opts.create) return h;
      await h.close();
      return open(path, 'r+');
    });
    let size = (await fh.stat()).size;
    if (opts.size !== undefined) {
      if (opts.size % BLOCK_SIZE !== 0) throw new BadInputError(`volume size ${opts.size} is not a multiple of ${BLOCK_SIZE}`);
      if (size < opts.size) await fh.truncate(opts.size);
      size = opts.size;
    }
    size -= size % BLOCK_SIZE;
    const dev = new FileBlockDevice(fh, size, path);
    // Optional: a file system without O_DSYNC support keeps the write-then-fdatasync path.
    dev.dsync = await open(path, constants.O_RDWR | constants.O_DSYNC).catch(() => null);
    if (opts.direct !== false && size >= BLOCK_SIZE) await dev.openDirect();
    return dev;
  }

  /**
   * Opens the O_DIRECT handles and checks, with a direct read of the first block into a pooled
   * buffer, that the file system and the buffers' alignment are accepted; else stays buffered.
   */
  private async openDirect(): Promise<void> {
    const O_DIRECT = constants.O_DIRECT;
    if (!O_DIRECT) return;
    const pool = AlignedPool.create();
    if (!pool) return;
    const fh = await open(this.path, constants.O_RDWR | O_DIRECT).catch(() => null);
    const fhSync = fh ? await open(this.path, constants.O_RDWR | O_DIRECT | constants.O_DSYNC).catch(() => null) : null;
    const slot = pool.take();
    const ok = fh !== null && fhSync !== null && (await fh.read(slot, 0, BLOCK_SIZE, 0).then((r) => r.bytesRead === BLOCK_SIZE, () => false));
    pool.give(slot);
    if (!ok) {
      await fh?.close();
      await fhSync?.close();
      return;
    }
    this.directFh = fh;
    this.directSync = fhSync;
    this.pool = pool;
  }

  /**
   * A page-aligned buffer of DIRECT_CHUNK bytes from the device's pool, for a caller that fills it
   * and writes from it (the replicated volume reads a peer's DATA frame straight into one): a write
   * of a view of it starting at its first byte goes to the disk as it is, without the copy into an
   * aligned buffer. Null when the device is not direct. Give it back with releaseAligned.
   */
  takeAligned(): Buffer | null {
    if (!this.pool) return null;
    try {
      return this.pool.take();
    } catch {
      return null;
    }
  }

  /** Returns a buffer from takeAligned (or any view of it) to the pool. */
  releaseAligned(b: Buffer): void {
    this.pool?.giveBack(b);
  }

  /** True while writes bypass the page cache (O_DIRECT). */
  get direct(): boolean {
    return this.directFh !== null;
  }

  /** No durable write or flush in flight: a write now would share nothing with another. */
  get idle(): boolean {
    return this.active === 0 && this.syncing === null && this.tickWrites.length === 0;
  }

  get writable(): boolean {
    return this.fh !== null;
  }

  private handle(): FileHandle {
    if (!this.fh) throw new UnavailableError(`block device ${this.path} is closed`);
    return this.fh;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this.size, offset, length, false);
    const buf = Buffer.allocUnsafe(length);
    const { bytesRead } = await this.handle().read(buf, 0, length, offset);
    if (bytesRead !== length) throw new IntegrityError(`short read at ${offset}: ${bytesRead} of ${length} bytes`);
    return buf;
  }

  /** Writes without waiting for durability (the replicated volume sequences its own flushes). */
  async writeNoSync(offset: number, data: WriteData): Promise<void> {
    checkRange(this.size, offset, writeLength(data), true);
    await this.writeAll(false, offset, data);
  }

  /**
   * Durable when it resolves. Writes issued in the same tick form one group: a write alone on an
   * idle device takes the one-hop O_DSYNC path; several (the store log hands a large group over as
   * several writes at once) are written side by side and share one fdatasync, instead of one
   * taking O_DSYNC and the next paying a flush of its own right behind it.
   */
  write(offset: number, data: WriteData): Promise<void> {
    try {
      checkRange(this.size, offset, writeLength(data), true);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise<void>((resolve, reject) => {
      if (this.tickWrites.length === 0) process.nextTick(() => this.writeGroup());
      this.tickWrites.push({ offset, data, resolve, reject });
    });
  }

  private tickWrites: Array<{ offset: number; data: WriteData; resolve: () => void; reject: (e: unknown) => void }> = [];

  /** fdatasync calls made (O_DSYNC writes not counted): for tests and figures. */
  flushCount = 0;

  private writeGroup(): void {
    const group = this.tickWrites;
    this.tickWrites = [];
    const alone = group.length === 1 && this.idle && this.dsync !== null;
    this.active += group.length;
    // Settled before the callers resume, so that `idle` is true again when their await returns.
    const finish = (outcomes: Array<{ ok: true } | { ok: false; err: unknown }>) => {
      this.active -= group.length;
      group.forEach((w, i) => {
        const o = outcomes[i]!;
        if (o.ok) w.resolve();
        else w.reject(o.err);
      });
    };
    if (alone) {
      const w = group[0]!;
      this.writeAll(true, w.offset, w.data).then(
        () => finish([{ ok: true }]),
        (err: unknown) => finish([{ ok: false, err }]),
      );
      return;
    }
    // Write the group side by side, then one fdatasync for all of it (shared with any other
    // writer's: group commit); a write that failed is not retried and fails alone.
    void Promise.allSettled(group.map((w) => this.writeNoSync(w.offset, w.data))).then(async (results) => {
      let flushErr: unknown = null;
      if (results.some((r) => r.status === 'fulfilled')) await this.flush().catch((err: unknown) => (flushErr = err ?? new Error('flush failed')));
      finish(results.map((r) => (r.status === 'rejected' ? { ok: false, err: r.reason } : flushErr ? { ok: false, err: flushErr } : { ok: true })));
    });
  }

  /** One O_DSYNC write: durable when it resolves (the caller checked the range). */
  async writeDurable(offset: number, data: WriteData): Promise<void> {
    if (!this.dsync) return this.write(offset, data);
    this.active++;
    try {
      await this.writeAll(true, offset, data);
    } finally {
      this.active--;
    }
  }

  /** Writes all of `data` at `offset`, durable when it resolves if `sync` (O_DSYNC), direct where it can. */
  private async writeAll(sync: boolean, offset: number, data: WriteData): Promise<void> {
    if (!this.fh) throw new UnavailableError(`block device ${this.path} is closed`);
    // A durable write longer than one aligned buffer goes out in pieces: through the O_DSYNC
    // handle each piece would flush the disk cache; written plain, they share one fdatasync.
    const pieces = sync && writeLength(data) > DIRECT_CHUNK;
    // Read again after a failure: another write's EINVAL may have dropped the handles meanwhile.
    const directHandle = () => (sync && !pieces ? this.directSync : this.directFh);
    const fh = directHandle();
    const pool = this.pool;
    // Data already in one of the pool's aligned buffers (a peer's DATA frame read into it) is
    // written from there; anything else is copied into a pooled buffer a piece at a time.
    const only = Buffer.isBuffer(data) ? data : data.length === 1 ? data[0]! : null;
    const inPlace = pool && only && pool.owns(only) ? only : null;
    let slot: Buffer | null = inPlace;
    if (fh && pool && !slot) {
      try {
        slot = pool.take();
      } catch {
        // No aligned buffer to be had now (a WebAssembly.Memory refused): this write goes through the page cache.
      }
    }
    if (fh && pool && slot) {
      let written = false;
      try {
        await writeDirect(fh, slot, offset, data, inPlace !== null);
        written = true;
      } catch (err) {
        // EINVAL: the file system or the buffer's alignment refused O_DIRECT after all: the device
        // goes back to the page cache. A write whose direct handle was dropped meanwhile (by another
        // write's EINVAL: closed under it, EBADF) is redone there too. A real I/O error (EIO,
        // ENOSPC) is the caller's, as on the buffered path.
        if (fh === directHandle()) {
          if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
          this.dropDirect();
        }
      } finally {
        if (!inPlace) pool.give(slot);
      }
      if (written) {
        if (pieces) await this.handle().datasync();
        return;
      }
    }
    await writeFully(sync ? this.dsync ?? this.handle() : this.handle(), offset, data);
    if (sync && !this.dsync) await this.handle().datasync();
  }

  private dropDirect(): void {
    const a = this.directFh;
    const b = this.directSync;
    this.directFh = null;
    this.directSync = null;
    this.pool = null;
    void a?.close().catch(() => undefined);
    void b?.close().catch(() => undefined);
  }

  /** Group commit: callers arriving while a sync runs share the next one. */
  flush(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      this.syncWanted = true;
      if (!this.syncing) this.syncing = this.runSyncs();
    });
  }

  private async runSyncs(): Promise<void> {
    while (this.syncWanted) {
      this.syncWanted = false;
      const batch = this.waiters;
      this.waiters = [];
      try {
        await this.handle().datasync();
        this.flushCount++;
        for (const w of batch) w.resolve();
      } catch (err) {
        for (const w of batch) w.reject(err);
      }
    }
    this.syncing = null;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    const ds = this.dsync;
    const dfh = this.directFh;
    const dsync = this.directSync;
    this.fh = null;
    this.dsync = null;
    this.directFh = null;
    this.directSync = null;
    this.pool = null;
    await dsync?.close();
    await dfh?.close();
    await ds?.close();
    await fh?.close();
  }
}

/** Writes all of `data` at `offset` (parts with pwritev), continuing after short writes. */
async function writeFully(fh: FileHandle, offset: number, data: WriteData): Promise<void> {
  if (Buffer.isBuffer(data) || data.length === 1) {
    const b = Buffer.isBuffer(data) ? data : data[0]!;
    let done = 0;
    while (done < b.length) {
      const { bytesWritten } = await fh.write(b, done, b.length - done, offset + done);
      done += bytesWritten;
    }
    return;
  }
  let parts = data.filter((p) => p.length > 0);
  let at = offset;
  while (parts.length) {
    let { bytesWritten } = await fh.writev(parts, at);
    at += bytesWritten;
    // drop what was written (a short write can end inside a part)
    let i = 0;
    while (i < parts.length && bytesWritten >= parts[i]!.length) bytesWritten -= parts[i++]!.length;
    parts = parts.slice(i);
    if (bytesWritten > 0) parts[0] = parts[0]!.subarray(bytesWritten);
  }
}

/** The global WebAssembly.Memory constructor (the compiler's lib has no WebAssembly types here). */
const WasmMemory = (globalThis as unknown as { WebAssembly?: { Memory: new (d: { initial: number; maximum: number }) => { buffer: ArrayBuffer } } }).WebAssembly?.Memory;

/** Bytes of one aligned buffer: a write is copied and written in pieces of at most this. */
export const DIRECT_CHUNK = 1024 * 1024;

/**
 * Page-aligned buffers for O_DIRECT, reused. Node gives no aligned allocation; the memory of a
 * WebAssembly.Memory is page-aligned (V8 maps it with its page allocator), and the device checks
 * the alignment once with a direct read before it relies on it. Buffers are never grown (growing
 * would detach them); a few are kept free for reuse, so a write touches no fresh memory.
 */
export class AlignedPool {
  private free: Buffer[] = [];
  /** Every buffer this pool made, by its memory: to recognise a view of one (aligned at its start). */
  private readonly mine = new WeakSet<ArrayBufferLike>();
  private constructor(private readonly keep: number) {}

  static create(keep = 8): AlignedPool | null {
    try {
      const pool = new AlignedPool(keep);
      pool.give(pool.take());
      return pool;
    } catch {
      return null; // no WebAssembly (e.g. --jitless): stay buffered
    }
  }

  take(): Buffer {
    if (!WasmMemory) throw new Error('no WebAssembly.Memory');
    const reused = this.free.pop();
    if (reused) return reused;
    const b = Buffer.from(new WasmMemory({ initial: DIRECT_CHUNK / 65536, maximum: DIRECT_CHUNK / 65536 }).buffer);
    this.mine.add(b.buffer);
    return b;
  }

  /** True when `b` is a view of one of this pool's buffers that starts on a block boundary. */
  owns(b: Buffer): boolean {
    return this.mine.has(b.buffer) && b.byteOffset % BLOCK_SIZE === 0;
  }

  /** Gives back the pool buffer `b` is a view of (take/give pairs for a caller that holds views). */
  giveBack(b: Buffer): void {
    if (this.mine.has(b.buffer)) this.give(Buffer.from(b.buffer, 0, DIRECT_CHUNK));
  }

  give(b: Buffer): void {
    if (this.free.length < this.keep) this.free.push(b);
  }
}

/**
 * Copies `data` into the aligned buffer `slot`, a piece at a time, and writes each piece with the
 * O_DIRECT handle; `inPlace`: `slot` is `data` itself (already aligned), written as it is.
 */
async function writeDirect(fh: FileHandle, slot: Buffer, offset: number, data: WriteData, inPlace = false): Promise<void> {
  const total = writeLength(data);
  for (let at = 0; at < total; at += DIRECT_CHUNK) {
    const n = Math.min(DIRECT_CHUNK, total - at);
    // In place: `slot` is the data (a view of a pool buffer, so one piece of at most DIRECT_CHUNK).
    if (!inPlace) {
      let filled = 0;
      for (const p of sliceWriteData(data, at, at + n)) filled += p.copy(slot, filled);
    }
    let done = 0;
    while (done < n) {
      // A short direct write ends on a boundary of the device's logical block (512 B or 4 KiB):
      // the rest is written from there (were it not aligned, EINVAL sends the write to the page cache).
      const { bytesWritten } = await fh.write(slot, done, n - done, offset + at + done);
      if (bytesWritten <= 0) throw new IntegrityError(`direct write at ${offset + at + done}: ${bytesWritten} bytes written`);
      done += bytesWritten;
    }
  }
}
