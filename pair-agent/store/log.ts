/**
 * The on-volume layout of the mail store and the log writer/reader. Everything goes through the
 * BlockDevice API; nothing lives beside the volume.
 *
 *   block 0, block 1   two superblock copies, written alternately (highest valid generation wins)
 *   segments           the rest, cut into equal segments; the log is a chain of segments
 *
 * A record is a 32-byte header plus payload:
 *   0 u32 magic | 4 u8 type | 5..8 zero | 8 u32 payload length | 12 u32 seq lo | 16 u32 seq hi
 *   20 u32 CRC of the previous record (chain) | 24 u32 CRC-32C of header (with this field 0) + payload
 *   28 u32 zero
 * Sequence numbers grow by one per record and each record names its predecessor's CRC, so a
 * replay can tell the live log from stale records of an earlier pass over the same segment.
 * Each group commit is padded with zeros to the next block boundary; the next one starts there,
 * so a torn write never damages an acknowledged block. The last block of every segment is kept
 * for a SEG_END record naming the next segment of the chain.
 */
import type { BlockDevice } from '../volume/block-device.ts';
import { BLOCK_SIZE } from '../volume/block-device.ts';
import { IntegrityError, LimitError, UnavailableError } from '../../common/errors.ts';
import { crc32c } from './crc32c.ts';

export const RECORD_MAGIC = 0x31475350; // "PSG1" little-endian
export const HEADER_SIZE = 32;
export const SUPERBLOCK_MAGIC = 'PGSTORE1';
export const DATA_START = 2 * BLOCK_SIZE;

export const RecordType = {
  SEG_END: 1,
  BODY: 2,
  OP: 3,
  CKPT: 4,
} as const;
export type RecordTypeValue = (typeof RecordType)[keyof typeof RecordType];

/** A position in the log: where the next record goes, its sequence number and the chain CRC. */
export interface LogPosition {
  offset: number;
  seq: number;
  prevCrc: number;
}

export interface Superblock {
  version: 1;
  generation: number;
  volumeId: string;
  createdAt: number;
  segmentSize: number;
  segmentCount: number;
  /** Where replay starts when there is no checkpoint. */
  logStart: LogPosition;
  checkpoint: LogPosition | null;
  /** The checkpoint before, kept readable as a fallback. */
  prevCheckpoint: LogPosition | null;
}

export const roundUp = (n: number): number => Math.ceil(n / BLOCK_SIZE) * BLOCK_SIZE;

export function encodeSuperblock(sb: Superblock): Buffer {
  const json = Buffer.from(JSON.stringify(sb));
  if (json.length + 16 > BLOCK_SIZE) throw new Error('superblock too large');
  const buf = Buffer.alloc(BLOCK_SIZE);
  buf.write(SUPERBLOCK_MAGIC, 0, 'latin1');
  buf.writeUInt32LE(json.length, 8);
  json.copy(buf, 16);
  buf.writeUInt32LE(crc32c(buf, 0, 16, 16 + json.length), 12);
  return buf;
}

export function decodeSuperblock(buf: Buffer): Superblock | null {
  if (buf.toString('latin1', 0, 8) !== SUPERBLOCK_MAGIC) return null;
  const len = buf.readUInt32LE(8);
  if (len + 16 > buf.length) return null;
  if (crc32c(buf, 0, 16, 16 + len) !== buf.readUInt32LE(12)) return null;
  try {
    const sb = JSON.parse(buf.toString('utf8', 16, 16 + len)) as Superblock;
    return sb.version === 1 ? sb : null;
  } catch {
    return null;
  }
}

/** Encodes a record header for `payload` (given as parts, not copied); returns the header and the record CRC. */
export function encodeHeader(type: number, payload: readonly Buffer[], seq: number, prevCrc: number): { header: Buffer; crc: number; length: number } {
  let length = 0;
  for (const p of payload) length += p.length;
  const header = Buffer.alloc(HEADER_SIZE);
  header.writeUInt32LE(RECORD_MAGIC, 0);
  header.writeUInt32LE(type, 4);
  header.writeUInt32LE(length, 8);
  header.writeUInt32LE(seq % 0x100000000, 12);
  header.writeUInt32LE(Math.floor(seq / 0x100000000), 16);
  header.writeUInt32LE(prevCrc, 20);
  let crc = crc32c(header);
  for (const p of payload) crc = crc32c(p, crc);
  header.writeUInt32LE(crc, 24);
  return { header, crc, length: HEADER_SIZE + length };
}

export function encodeRecord(type: number, payload: Buffer, seq: number, prevCrc: number): { buf: Buffer; crc: number } {
  const { header, crc } = encodeHeader(type, [payload], seq, prevCrc);
  return { buf: Buffer.concat([header, payload]), crc };
}

export interface RecordHeader {
  type: number;
  length: number;
  seq: number;
  prevCrc: number;
  crc: number;
}

export function parseHeader(buf: Buffer, at = 0): RecordHeader | null {
  if (buf.length - at < HEADER_SIZE || buf.readUInt32LE(at) !== RECORD_MAGIC) return null;
  return {
    type: buf.readUInt32LE(at + 4),
    length: buf.readUInt32LE(at + 8),
    seq: buf.readUInt32LE(at + 12) + buf.readUInt32LE(at + 16) * 0x100000000,
    prevCrc: buf.readUInt32LE(at + 20),
    crc: buf.readUInt32LE(at + 24),
  };
}

/** Verifies a whole record held in `buf[at, at+32+length)`; returns its payload or null. */
export function verifyRecord(buf: Buffer, at: number, h: RecordHeader): Buffer | null {
  const end = at + HEADER_SIZE + h.length;
  if (end > buf.length) return null;
  let c = crc32c(buf, 0, at, at + 24);
  c = crc32c(ZERO4, c);
  c = crc32c(buf, c, at + 28, end);
  return c === h.crc ? buf.subarray(at + HEADER_SIZE, end) : null;
}
const ZERO4 = Buffer.alloc(4);

export interface Geometry {
  segmentSize: number;
  segmentCount: number;
}

export const segmentStart = (g: Geometry, i: number): number => DATA_START + i * g.segmentSize;
export const segmentOf = (g: Geometry, offset: number): number => Math.floor((offset - DATA_START) / g.segmentSize);

/** Picks a geometry for a device: segments of up to 8 MiB, at least 8 of them. */
export function chooseGeometry(size: number): Geometry {
  const usable = size - DATA_START;
  let seg = 8 * 1024 * 1024;
  while (seg > 64 * 1024 && usable / seg < 16) seg /= 2;
  const segmentCount = Math.floor(usable / seg);
  if (segmentCount < 4) throw new LimitError(`volume of ${size} bytes is too small for the store`);
  return { segmentSize: seg, segmentCount };
}

export type ReadStop = 'end' | 'bad-crc' | 'bad-chain' | 'bad-header' | 'bad-segment';

export interface ScannedRecord {
  type: number;
  offset: number;
  /** Header plus payload. */
  length: number;
  seq: number;
  crc: number;
  payload: Buffer;
}

/**
 * Walks the log from `start`, following SEG_END links, until the first record that is not the
 * expected next one. Reads a segment at a time in large chunks. Calls `onSegment` for each
 * segment the chain enters (including the first).
 */
export async function* scanLog(
  device: BlockDevice,
  g: Geometry,
  start: LogPosition,
  result: { end: LogPosition; stop: ReadStop; detail?: string; skipped?: string[] },
  onSegment?: (seg: number) => void,
): AsyncGenerator<ScannedRecord> {
  let pos = start.offset;
  let seq = start.seq;
  let prev = start.prevCrc;
  let seg = segmentOf(g, pos);
  onSegment?.(seg);
  const READ = 1024 * 1024;
  let win: Buffer = Buffer.alloc(0);
  let winStart = pos;
  const ensure = async (from: number, len: number): Promise<Buffer | null> => {
    const segEnd = segmentStart(g, seg) + g.segmentSize;
    if (from + len > segEnd) return null;
    if (from >= winStart && from + len <= winStart + win.length) return win;
    const readLen = Math.min(segEnd - from, Math.max(len, READ));
    win = await device.read(from, readLen);
    winStart = from;
    return win;
  };
  const finish = (stop: ReadStop, detail?: string) => {
    result.end = { offset: pos, seq, prevCrc: prev };
    result.stop = stop;
    if (detail !== undefined) result.detail = detail;
  };
  for (;;) {
    const w = await ensure(pos, HEADER_SIZE);
    if (!w) return finish('bad-header', `no room for a header at ${pos}`);
    const at = pos - winStart;
    const h = parseHeader(w, at);
    if (!h) {
      // Zero padding to the end of the block: the next commit started at the next block.
      const blockEnd = roundUp(pos + 1);
      if (pos % BLOCK_SIZE !== 0) {
        const wz = await ensure(pos, blockEnd - pos);
        if (wz && isZero(wz, pos - winStart, blockEnd - winStart)) {
          pos = blockEnd;
          continue;
        }
      }
      const zero = isZero(w, at, at + HEADER_SIZE);
      return finish(zero ? 'end' : 'bad-header', zero ? undefined : `no record header at ${pos}`);
    }
    if (h.seq !== seq || h.prevCrc !== prev) {
      // A record from an earlier pass (stale) or a different chain: the live log ends here.
      return finish(h.seq < seq ? 'end' : 'bad-chain', `record at ${pos} has seq ${h.seq}, expected ${seq}`);
    }
    const full = await ensure(pos, HEADER_SIZE + h.length);
    if (!full) return finish('bad-header', `record at ${pos} runs past its segment`);
    const payload = verifyRecord(full, pos - winStart, h);
    if (!payload) {
      // A damaged checkpoint chunk holds nothing the log does not have: when its header is sound and the
      // next record chains to it, step over it instead of losing everything after it.
      if (h.type === RecordType.CKPT) {
        // The next record follows directly, or at the next block when this one ended a group commit.
        let nextAt = pos + HEADER_SIZE + h.length;
        let nh: RecordHeader | null = null;
        for (const at of nextAt % BLOCK_SIZE === 0 ? [nextAt] : [nextAt, roundUp(nextAt)]) {
          const wn = await ensure(at, HEADER_SIZE);
          const cand = wn ? parseHeader(wn, at - winStart) : null;
          if (cand && cand.seq === seq + 1 && cand.prevCrc === h.crc) {
            nh = cand;
            nextAt = at;
            break;
          }
        }
        if (nh) {
          (result.skipped ??= []).push(`checkpoint record ${seq} at ${pos}: CRC mismatch, skipped`);
          seq += 1;
          prev = h.crc;
          pos = nextAt;
          continue;
        }
      }
      return finish('bad-crc', `record ${seq} at ${pos}: CRC mismatch`);
    }
    const rec: ScannedRecord = { type: h.type, offset: pos, length: HEADER_SIZE + h.length, seq, crc: h.crc, payload };
    if (h.type === RecordType.SEG_END) {
      const next = payload.length >= 4 ? payload.readUInt32LE(0) : -1;
      if (next < 0 || next >= g.segmentCount) return finish('bad-segment', `SEG_END at ${rec.offset} names segment ${next}`);
      seq += 1;
      prev = h.crc;
      yield rec;
      seg = next;
      pos = segmentStart(g, seg);
      win = Buffer.alloc(0);
      onSegment?.(seg);
      continue;
    }
    seq += 1;
    prev = h.crc;
    pos += rec.length;
    yield rec;
  }
}

function isZero(b: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (b[i] !== 0) return false;
  return true;
}

export interface AppendedRecord {
  offset: number;
  length: number;
  seq: number;
}

/**
 * Largest single device write of the log: 1 MiB, a multiple of the block size, the largest write
 * the replicated volume sends as one frame without joining its parts (pair-agent/volume/wire.ts
 * MAX_PAYLOAD = 1 MiB + 64).
 */
export const MAX_DEVICE_WRITE = 1024 * 1024;

interface Region {
  start: number;
  parts: Buffer[];
  len: number;
}

/** Parts smaller than this are copied together into one buffer per device write; larger ones go by reference. */
const COALESCE_BELOW = 16 * 1024;

/**
 * A region cut into device writes of at most MAX_DEVICE_WRITE bytes, zero-padded to the block
 * boundary. Large payload parts (message bodies) are passed to the device as they are, not copied
 * into one buffer (a 1 MiB delivery was copied once more here); runs of small parts (record
 * headers, index ops, small bodies) are joined, so that a group of many small records stays a few
 * buffers for pwritev and the replication frame.
 */
export function deviceWrites(r: { parts: readonly Buffer[]; len: number }): Array<{ data: Buffer | Buffer[]; length: number }> {
  const out: Array<{ data: Buffer | Buffer[]; length: number }> = [];
  let cur: Buffer[] = [];
  let curLen = 0;
  let small: Buffer[] = [];
  let smallLen = 0;
  const flushSmall = () => {
    if (smallLen) cur.push(small.length === 1 ? small[0]! : Buffer.concat(small, smallLen));
    small = [];
    smallLen = 0;
  };
  const endWrite = () => {
    flushSmall();
    if (curLen) out.push({ data: cur.length === 1 ? cur[0]! : cur, length: curLen });
    cur = [];
    curLen = 0;
  };
  const add = (p: Buffer) => {
    for (let at = 0; at < p.length; ) {
      const n = Math.min(p.length - at, MAX_DEVICE_WRITE - curLen);
      const piece = at === 0 && n === p.length ? p : p.subarray(at, at + n);
      if (piece.length < COALESCE_BELOW) {
        small.push(piece);
        smallLen += piece.length;
      } else {
        flushSmall();
        cur.push(piece);
      }
      curLen += n;
      at += n;
      if (curLen === MAX_DEVICE_WRITE) endWrite();
    }
  };
  for (const p of r.parts) add(p);
  const pad = roundUp(r.len) - r.len;
  if (pad) add(Buffer.alloc(pad));
  endWrite();
  return out;
}

/**
 * Appends records and commits them in groups: `append` lays a record out at once (so callers
 * know its offset), `commit` resolves when every record appended before it is durable. One
 * device write per region is in flight at a time; records appended meanwhile form the next group.
 */
export class LogWriter {
  pos: LogPosition;
  seg: number;
  /** Segments entered, in chain order (callers trim the front after checkpoints). */
  readonly onEnterSegment: (seg: number) => void;
  private regions: Region[] = [];
  private waiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  private inflight: Promise<void> | null = null;
  failed: Error | null = null;
  bytesAppended = 0;

  constructor(
    private readonly device: BlockDevice,
    private readonly g: Geometry,
    start: LogPosition,
    private readonly nextSegment: () => number | null,
    onEnterSegment: (seg: number) => void,
  ) {
    this.pos = { ...start, offset: roundUp(start.offset) };
    this.seg = segmentOf(g, start.offset);
    if (this.pos.offset > segmentStart(g, this.seg) + g.segmentSize - BLOCK_SIZE) {
      throw new IntegrityError(`log head ${start.offset} is inside the reserved block of segment ${this.seg}`);
    }
    this.onEnterSegment = onEnterSegment;
  }

  private get segEnd(): number {
    return segmentStart(this.g, this.seg) + this.g.segmentSize;
  }

  /** Bytes that can still be appended in the current segment (before its reserved last block). */
  roomInSegment(): number {
    return this.segEnd - BLOCK_SIZE - this.pos.offset;
  }

  get maxRecord(): number {
    return this.g.segmentSize - 2 * BLOCK_SIZE;
  }

  /** Lays out a record; `payload` may be given in parts (kept by reference until written: do not modify). */
  append(type: number, payload: Buffer | readonly Buffer[]): AppendedRecord {
    if (this.failed) throw new UnavailableError('the store log failed a write; reopen the store', { cause: this.failed });
    const parts = Buffer.isBuffer(payload) ? [payload] : payload;
    let len = HEADER_SIZE;
    for (const p of parts) len += p.length;
    if (len > this.maxRecord) throw new LimitError(`record of ${len} bytes is larger than a segment`);
    if (this.pos.offset + len > this.segEnd - BLOCK_SIZE) {
      const next = this.nextSegment();
      if (next === null) throw new LimitError('store volume is full', { temporary: true });
      const p = Buffer.alloc(4);
      p.writeUInt32LE(next, 0);
      this.put(RecordType.SEG_END, [p]);
      this.seg = next;
      this.pos.offset = segmentStart(this.g, next);
      this.onEnterSegment(next);
    }
    return this.put(type, parts);
  }

  private put(type: number, payload: readonly Buffer[]): AppendedRecord {
    const { header, crc, length } = encodeHeader(type, payload, this.pos.seq, this.pos.prevCrc);
    const at = this.pos.offset;
    let region = this.regions[this.regions.length - 1];
    if (!region || region.start + region.len !== at) {
      region = { start: at, parts: [], len: 0 };
      this.regions.push(region);
    }
    region.parts.push(header, ...payload);
    region.len += length;
    const rec = { offset: at, length, seq: this.pos.seq };
    this.pos = { offset: at + length, seq: this.pos.seq + 1, prevCrc: crc };
    this.bytesAppended += length;
    return rec;
  }

  /** Resolves once everything appended so far is durable. */
  commit(): Promise<void> {
    if (this.failed) return Promise.reject(this.failedError());
    // Nothing of ours pending: wait for the group in flight (it may hold records appended by this
    // caller and committed by another), and fail as its waiters do if its write failed.
    if (this.regions.length === 0) return this.inflight ? this.inflight.then(() => this.throwIfFailed()) : Promise.resolve();
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      if (!this.inflight) this.inflight = this.run();
    });
  }

  private failedError(): UnavailableError {
    return new UnavailableError('the store log failed a write', { cause: this.failed });
  }

  private throwIfFailed(): void {
    if (this.failed) throw this.failedError();
  }

  private async run(): Promise<void> {
    try {
      while (this.regions.length) {
        const regions = this.regions;
        const waiters = this.waiters;
        this.regions = [];
        this.waiters = [];
        // The next group starts on a fresh block, so this group's blocks are never rewritten.
        this.pos.offset = roundUp(this.pos.offset);
        try {
          for (const r of regions) {
            // At most MAX_DEVICE_WRITE per call: the replicated volume ships each write as one frame
            // and would have to join the parts of a larger write into one buffer before cutting it
            // (a copy of every large body). The chunks go out together so that the device can commit them
            // in one group (one fdatasync, one peer round trip) as it would one large write. Replay
            // checks every record's CRC and the chain of previous CRCs, so a crash that leaves a
            // later chunk durable without an earlier one ends the log at the first missing record,
            // as a torn large write would; the group's waiters are answered only after all chunks.
            const chunks: Array<Promise<void>> = [];
            let off = r.start;
            for (const w of deviceWrites(r)) {
              chunks.push(this.device.write(off, w.data));
              off += w.length;
            }
            const results = await Promise.allSettled(chunks);
            const failed = results.find((x): x is PromiseRejectedResult => x.status === 'rejected');
            if (failed) throw failed.reason;
          }
          for (const w of waiters) w.resolve();
        } catch (err) {
          this.failed = err instanceof Error ? err : new Error(String(err));
          const e = new UnavailableError(`store log write failed: ${this.failed.message}`, { cause: err });
          for (const w of [...waiters, ...this.waiters]) w.reject(e);
          this.waiters = [];
          this.regions = [];
          return;
        }
      }
    } finally {
      this.inflight = null;
    }
  }

  /** Resolves when nothing is pending or in flight. */
  async idle(): Promise<void> {
    while (this.inflight || this.regions.length) {
      await this.commit().catch(() => undefined);
      if (this.failed) return;
    }
  }
}
