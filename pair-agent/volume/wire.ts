/**
 * The replication link's frames. Every frame has a 24-byte header:
 *
 *   0  magic   u32  'PGVR'
 *   4  type    u8
 *   5  flags   u8   bit 0 (MORE, DATA frames): more DATA frames follow in the same batch (see FLAG_MORE)
 *   6  unused  u16
 *   8  seq     u32  sender's sequence number (data frames: the write's number)
 *   12 length  u32  payload bytes
 *   16 crc     u32  CRC32C of the payload
 *   20 hcrc    u32  CRC32C of bytes 0..19
 *
 * A frame that fails any check (magic, header checksum, unknown type, length over the limit,
 * payload checksum) is a ProtocolError: the connection is dropped and nothing is applied.
 * The link is authenticated once, at the handshake, with HMAC-SHA256 challenge/response over
 * the shared secret (as DRBD's cram-hmac-alg); the checksums catch corruption on the way.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { ProtocolError } from '../../common/errors.ts';
import { crc32c } from '../store/crc32c.ts';

export const MAGIC = 0x50475652;
export const HEADER_BYTES = 24;
/** Largest payload: a 1 MiB write plus its offset, or a bitmap of a 32 GiB volume. */
export const MAX_PAYLOAD = 1024 * 1024 + 64;

export enum FrameType {
  Hello = 1,
  Auth = 2,
  State = 3,
  Bitmap = 4,
  Data = 5,
  RecvAck = 6,
  WriteAck = 7,
  Ping = 8,
  Pong = 9,
  ResyncData = 10,
  ResyncAck = 11,
  ResyncDone = 12,
  VerifyRequest = 13,
  VerifyReply = 14,
  Disconnect = 15,
  NegAck = 16,
  /** "May I become primary?" while connected: the peer grants or refuses (no two primaries, even racing). */
  PromoteRequest = 17,
  PromoteReply = 18,
}

/**
 * DATA frame flag: more DATA frames follow right behind this one (the rest of one large write cut
 * into pieces, or other writes issued in the same tick). The peer writes a MORE frame without a
 * flush of its own and makes it durable with the flush after the batch's last frame, which is sent
 * in the same socket write. An older peer ignores the bit (it flushes per frame, as before).
 */
export const FLAG_MORE = 1;

const KNOWN = new Set<number>(Object.values(FrameType).filter((v): v is number => typeof v === 'number'));

/**
 * A checked frame. The payload arrives as `parts`, views of the socket's chunks (no copy): a
 * 1 MiB DATA frame goes to the disk from them with one pwritev. `payload` joins them on first use
 * (small frames: JSON, acks, digests).
 */
export class Frame {
  private joined: Buffer | null = null;

  constructor(
    readonly type: FrameType,
    readonly seq: number,
    readonly parts: readonly Buffer[],
    readonly length: number,
    readonly flags = 0,
  ) {}

  get payload(): Buffer {
    if (!this.joined) this.joined = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts as Buffer[], this.length);
    return this.joined;
  }
}

/** Header plus payload parts (not concatenated: a 1 MiB write is not copied to be framed). */
export function encodeFrame(type: FrameType, seq: number, payload: Buffer | readonly Buffer[] = [], flags = 0): Buffer[] {
  const parts = Buffer.isBuffer(payload) ? [payload] : payload;
  let length = 0;
  let crc = 0;
  for (const p of parts) {
    length += p.length;
    crc = crc32c(p, crc);
  }
  if (length > MAX_PAYLOAD) throw new ProtocolError(`frame payload of ${length} bytes is over the ${MAX_PAYLOAD}-byte limit`);
  const h = Buffer.alloc(HEADER_BYTES);
  h.writeUInt32BE(MAGIC, 0);
  h.writeUInt8(type, 4);
  h.writeUInt8(flags, 5);
  h.writeUInt32BE(seq >>> 0, 8);
  h.writeUInt32BE(length, 12);
  h.writeUInt32BE(crc, 16);
  h.writeUInt32BE(crc32c(h, 0, 0, 20), 20);
  return [h, ...parts.filter((p) => p.length > 0)];
}

/**
 * Where a frame's payload is read to, chosen when its header has been checked: buffers whose
 * lengths add up to `length` (e.g. the 8-byte offset of a DATA frame, then an aligned buffer the
 * disk write can go out from as it is). Null: a fresh buffer of `length` bytes.
 */
export type PayloadTargets = (type: FrameType, length: number) => Buffer[] | null;

/**
 * Incremental decoder: feed it socket chunks, get whole, checked frames. The payload checksum
 * is carried along chunk by chunk as the bytes arrive.
 *
 * Two ways to feed it:
 * - `push(chunk)`: chunks the caller got from the socket ('data' events); the payload is kept as
 *   views of the chunks, never copied into one buffer.
 * - `readBuffer()` / `received(buf, n)`: the socket reads into buffers the decoder hands out
 *   (net.Socket's `onread`). While a payload is being received that is the payload's own buffer
 *   (see PayloadTargets), so its bytes land where they are needed straight from the kernel; between
 *   payloads, a small scratch buffer, from which headers and small payloads are copied. No buffer is
 *   allocated per read (a fresh 64 KiB buffer per read kept V8's full collections busy on the peer).
 * Either way a frame is delivered only once its whole payload has arrived and matched its checksum.
 */
export class FrameDecoder {
  /** A header split across chunks is gathered here. */
  private readonly hbuf = Buffer.alloc(HEADER_BYTES);
  private hfill = 0;
  private header: { type: number; flags: number; seq: number; length: number; crc: number } | null = null;
  private parts: Buffer[] = [];
  private got = 0;
  private crc = 0;
  /** Owned mode: the payload's target buffers, the one being filled, and how far. */
  private targets: Buffer[] | null = null;
  private ti = 0;
  private tfill = 0;
  private scratch: Buffer | null = null;

  constructor(
    private readonly maxPayload = MAX_PAYLOAD,
    private readonly targetsFor: PayloadTargets | null = null,
  ) {}

  private parseHeader(h: Buffer): void {
    if (h.readUInt32BE(0) !== MAGIC) throw new ProtocolError('bad frame magic (not a pairgate replication peer, or a corrupted stream)');
    if (crc32c(h, 0, 0, 20) !== h.readUInt32BE(20)) throw new ProtocolError('frame header checksum mismatch');
    const type = h.readUInt8(4);
    if (!KNOWN.has(type)) throw new ProtocolError(`unknown frame type ${type}`);
    const length = h.readUInt32BE(12);
    if (length > this.maxPayload) throw new ProtocolError(`frame length ${length} is over the ${this.maxPayload}-byte limit`);
    this.header = { type, flags: h.readUInt8(5), seq: h.readUInt32BE(8), length, crc: h.readUInt32BE(16) };
    this.parts = [];
    this.got = 0;
    this.crc = 0;
  }

  /** Throws ProtocolError on the first bad frame; the caller must drop the connection. */
  push(chunk: Buffer): Frame[] {
    return this.consume(chunk, false);
  }

  /**
   * Owned mode: the buffer the next socket read should fill (a view of the current payload's
   * target, at most the bytes it still lacks, or the scratch buffer between payloads).
   */
  readBuffer(): Buffer {
    if (this.header && this.targets && this.got < this.header.length) {
      while (this.tfill === this.targets[this.ti]!.length) {
        this.ti++;
        this.tfill = 0;
      }
      return this.targets[this.ti]!.subarray(this.tfill);
    }
    return (this.scratch ??= Buffer.allocUnsafeSlow(SCRATCH_BYTES));
  }

  /** Owned mode: `n` bytes were read into `buf` (the last readBuffer()). Throws ProtocolError as push does. */
  received(buf: Buffer, n: number): Frame[] {
    if (buf === this.scratch || !this.header || !this.targets) return this.consume(buf.subarray(0, n), true);
    // Read straight into the payload's target: checksum it where it landed.
    const h = this.header;
    this.crc = crc32c(buf, this.crc, 0, n);
    this.tfill += n;
    this.got += n;
    if (this.got < h.length) return [];
    return this.finish();
  }

  private finish(): Frame[] {
    const h = this.header!;
    if (this.crc !== h.crc) throw new ProtocolError(`payload checksum mismatch in a type ${h.type} frame`);
    const parts = this.targets ?? this.parts;
    const f = new Frame(h.type as FrameType, h.seq, parts, h.length, h.flags);
    this.header = null;
    this.parts = [];
    this.targets = null;
    return [f];
  }

  /** `copy`: payload bytes are copied into the payload's targets (owned mode), else kept as views of `chunk`. */
  private consume(chunk: Buffer, copy: boolean): Frame[] {
    const out: Frame[] = [];
    let at = 0;
    for (;;) {
      if (!this.header) {
        if (this.hfill === 0 && chunk.length - at >= HEADER_BYTES) {
          this.parseHeader(chunk.subarray(at, at + HEADER_BYTES));
          at += HEADER_BYTES;
        } else {
          const k = Math.min(HEADER_BYTES - this.hfill, chunk.length - at);
          chunk.copy(this.hbuf, this.hfill, at, at + k);
          this.hfill += k;
          at += k;
          if (this.hfill < HEADER_BYTES) break;
          this.hfill = 0;
          this.parseHeader(this.hbuf);
        }
        if (copy) {
          const len = this.header!.length;
          const t = this.targetsFor?.(this.header!.type as FrameType, len) ?? null;
          if (t && t.reduce((n, b) => n + b.length, 0) !== len) throw new Error('payload targets do not add up to the frame length');
          this.targets = t ?? (len ? [Buffer.allocUnsafe(len)] : []);
          this.ti = 0;
          this.tfill = 0;
        }
      }
      const h = this.header!;
      if (copy) {
        while (this.got < h.length && at < chunk.length) {
          const t = this.targets![this.ti]!;
          if (this.tfill === t.length) {
            this.ti++;
            this.tfill = 0;
            continue;
          }
          const k = Math.min(t.length - this.tfill, chunk.length - at);
          chunk.copy(t, this.tfill, at, at + k);
          this.crc = crc32c(t, this.crc, this.tfill, this.tfill + k);
          this.tfill += k;
          this.got += k;
          at += k;
        }
      } else {
        const k = Math.min(h.length - this.got, chunk.length - at);
        if (k > 0) {
          const part = chunk.subarray(at, at + k);
          this.crc = crc32c(part, this.crc);
          this.parts.push(part);
          this.got += k;
          at += k;
        }
      }
      if (this.got < h.length) break;
      out.push(...this.finish());
      if (at === chunk.length) break;
    }
    return out;
  }

  /** Bytes of an incomplete frame still waiting (a truncated frame at close). */
  get pending(): number {
    return this.hfill + (this.header ? HEADER_BYTES + this.got : 0);
  }
}

/** Owned mode's buffer between payloads: headers, acks and the first bytes of a payload land here. */
const SCRATCH_BYTES = 16 * 1024;

// --- payloads ---------------------------------------------------------------------------

export function encodeJson(v: unknown): Buffer {
  return Buffer.from(JSON.stringify(v));
}

export function decodeJson<T>(p: Buffer, what: string): T {
  try {
    return JSON.parse(p.toString('utf8')) as T;
  } catch {
    throw new ProtocolError(`${what} frame is not valid JSON`);
  }
}

/** DATA / RESYNC DATA: u64 offset, then the block bytes. */
export function encodeBlockWrite(offset: number, data: Buffer | readonly Buffer[]): Buffer[] {
  const h = Buffer.alloc(8);
  h.writeBigUInt64BE(BigInt(offset));
  return Buffer.isBuffer(data) ? [h, data] : [h, ...data];
}

export function decodeBlockWrite(p: Buffer): { offset: number; data: Buffer } {
  if (p.length < 8) throw new ProtocolError('write frame shorter than its offset');
  const offset = Number(p.readBigUInt64BE(0));
  return { offset, data: p.subarray(8) };
}

/** The same from a frame's parts, without joining them: the block bytes as views of the parts. */
export function decodeBlockWriteParts(f: Frame): { offset: number; data: Buffer[]; length: number } {
  if (f.length < 8) throw new ProtocolError('write frame shorter than its offset');
  let head = f.parts[0]!;
  if (head.length < 8) head = Buffer.concat(f.parts as Buffer[], 8); // the offset split across chunks
  const offset = Number(head.readBigUInt64BE(0));
  const data: Buffer[] = [];
  let skip = 8;
  for (const p of f.parts) {
    if (skip >= p.length) {
      skip -= p.length;
      continue;
    }
    data.push(skip ? p.subarray(skip) : p);
    skip = 0;
  }
  return { offset, data, length: f.length - 8 };
}

/** u64 offset + u32 count (resync acks in bytes, verify requests in blocks). */
export function encodeRange(offset: number, count: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeBigUInt64BE(BigInt(offset));
  b.writeUInt32BE(count, 8);
  return b;
}

export function decodeRange(p: Buffer): { offset: number; count: number } {
  if (p.length < 12) throw new ProtocolError('range frame too short');
  return { offset: Number(p.readBigUInt64BE(0)), count: p.readUInt32BE(8) };
}

export function encodeSeq(seq: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(seq >>> 0);
  return b;
}

/** A list of u32 sequence numbers (WRITE ACK: every write one flush made durable). */
export function encodeSeqs(seqs: number[]): Buffer {
  const b = Buffer.alloc(4 * seqs.length);
  seqs.forEach((s, i) => b.writeUInt32BE(s >>> 0, 4 * i));
  return b;
}

export function decodeSeqs(p: Buffer): number[] {
  if (p.length < 4 || p.length % 4 !== 0) throw new ProtocolError(`ack frame of ${p.length} bytes is not a list of sequence numbers`);
  const out: number[] = [];
  for (let i = 0; i < p.length; i += 4) out.push(p.readUInt32BE(i));
  return out;
}

export function decodeSeq(p: Buffer): number {
  if (p.length < 4) throw new ProtocolError('ack frame too short');
  return p.readUInt32BE(0);
}

// --- handshake ----------------------------------------------------------------------------

export interface Hello {
  proto: 1;
  volume: string;
  node: string;
  sizeBytes: number;
  /** 32 random bytes, hex: the challenge the peer must sign. */
  nonce: string;
}

/** The answer to a challenge: binds both nonces and the volume name to the shared secret. */
export function authResponse(secret: string, volume: string, theirNonce: string, myNonce: string): Buffer {
  return createHmac('sha256', secret).update(`pairgate-volume-v1\n${volume}\n${theirNonce}\n${myNonce}`).digest();
}

export function authMatches(expected: Buffer, given: Buffer): boolean {
  return given.length === expected.length && timingSafeEqual(expected, given);
}
