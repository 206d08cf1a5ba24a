/**
 * The volume's metadata, kept in its own file beside the data (DRBD's "external meta data"):
 * the data generation UUIDs, the state flags, the out-of-sync bitmap (one bit per 4 KiB block)
 * and the activity log (the extents a primary may have writes in flight to).
 *
 * The file is rewritten whole, atomically (temp file, fsync, rename, fsync of the folder), and
 * carries a CRC32C, so a crash leaves either the old or the new metadata, never a mix. The
 * bitmap is kept in memory and persisted lazily, except that the activity log is persisted
 * before any write lands in an extent it did not cover: after a crash, every block that might
 * differ from the peer is in the bitmap or in an activity-log extent.
 */
import { closeSync, constants, fsyncSync, openSync, readFileSync, renameSync, writeFileSync, existsSync } from 'node:fs';
import { open as openAsync, type FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { dirname } from 'node:path';
import { IntegrityError } from '../../common/errors.ts';
import { crc32c } from '../store/crc32c.ts';
import { BLOCK_SIZE } from './block-device.ts';

/** One activity-log extent covers 4 MiB (1024 blocks), as in DRBD. */
export const EXTENT_BLOCKS = 1024;
/** Extents kept "hot" in the activity log (DRBD's default, ~4.8 GiB); a crashed primary resyncs at most these. */
export const AL_EXTENTS = 1237;

const MAGIC = 'pairgate-volume-meta-v1';

/** A data generation UUID: 16 hex digits; "0" means none. */
export type Uuid = string;
export const NO_UUID: Uuid = '0';
/** The current UUID of metadata made by `create` and never used: two such volumes need no initial sync. */
export const JUST_CREATED: Uuid = '4';

export function newUuid(): Uuid {
  let u = randomBytes(8).toString('hex');
  // Never collide with the two reserved values.
  if (u === '0000000000000000' || u === '0000000000000004') u = 'f' + u.slice(1);
  return u;
}

export interface Uuids {
  current: Uuid;
  bitmap: Uuid;
  history: [Uuid, Uuid];
}

export type DiskState = 'UpToDate' | 'Inconsistent' | 'Outdated' | 'Failed' | 'Diskless';

export interface MetaFlags {
  /** The data is a consistent image (false while a resync target is mid-way). */
  consistent: boolean;
  /** This node has been primary at least once with this data. */
  primaryEver: boolean;
  /** The peer was known to be outdated when we parted. */
  peerWasOutdated: boolean;
  /** Set while primary; still set at open means the primary crashed (activity log to resync). */
  primaryCrashed: boolean;
}

/** Out-of-sync bitmap, one bit per block. */
export class Bitmap {
  readonly bits: Uint8Array;
  private count = 0;

  constructor(readonly blocks: number, bits?: Uint8Array) {
    this.bits = bits ?? new Uint8Array(Math.ceil(blocks / 8));
    if (bits) for (let i = 0; i < blocks; i++) if (this.get(i)) this.count++;
  }

  get(block: number): boolean {
    return (this.bits[block >> 3]! & (1 << (block & 7))) !== 0;
  }

  set(block: number): void {
    if (this.get(block)) return;
    this.bits[block >> 3]! |= 1 << (block & 7);
    this.count++;
  }

  clear(block: number): void {
    if (!this.get(block)) return;
    this.bits[block >> 3]! &= ~(1 << (block & 7));
    this.count--;
  }

  setRange(first: number, n: number): void {
    for (let b = first; b < first + n && b < this.blocks; b++) this.set(b);
  }

  clearRange(first: number, n: number): void {
    for (let b = first; b < first + n && b < this.blocks; b++) this.clear(b);
  }

  clearAll(): void {
    this.bits.fill(0);
    this.count = 0;
  }

  setAll(): void {
    for (let i = 0; i < this.blocks; i++) this.set(i);
  }

  /** Adds every bit of `other` (same size) to this bitmap. */
  merge(other: Uint8Array): void {
    for (let i = 0; i < this.blocks; i++) if ((other[i >> 3]! & (1 << (i & 7))) !== 0) this.set(i);
  }

  get setCount(): number {
    return this.count;
  }

  /** The next set block at or after `from`, or -1. */
  next(from: number): number {
    for (let b = from; b < this.blocks; b++) {
      if (this.bits[b >> 3] === 0) {
        b |= 7;
        continue;
      }
      if (this.get(b)) return b;
    }
    return -1;
  }
}

export interface VolumeMetadata {
  sizeBytes: number;
  uuids: Uuids;
  flags: MetaFlags;
  disk: DiskState;
  /** When this node last created a current UUID as primary (ms epoch); decides discard-younger-primary. */
  primarySince: number;
  bitmap: Bitmap;
  /** Extent numbers, most recently used last. */
  activityLog: number[];
}

export function freshMetadata(sizeBytes: number): VolumeMetadata {
  return {
    sizeBytes,
    uuids: { current: JUST_CREATED, bitmap: NO_UUID, history: [NO_UUID, NO_UUID] },
    // Inconsistent until it meets its peer (two fresh volumes then agree they are identical), is
    // synced from it, or is promoted with force by the operator: a node whose disk was replaced
    // must never be promoted alone over a peer that holds the mail (DRBD does the same).
    flags: { consistent: false, primaryEver: false, peerWasOutdated: false, primaryCrashed: false },
    disk: 'Inconsistent',
    primarySince: 0,
    bitmap: new Bitmap(sizeBytes / BLOCK_SIZE),
    activityLog: [],
  };
}

interface StoredMeta {
  magic: string;
  sizeBytes: number;
  uuids: Uuids;
  flags: MetaFlags;
  disk: DiskState;
  primarySince: number;
  activityLog: number[];
  bitmap: string;
}

export function encodeMetadata(m: VolumeMetadata): Buffer {
  const stored: StoredMeta = {
    magic: MAGIC,
    sizeBytes: m.sizeBytes,
    uuids: m.uuids,
    flags: m.flags,
    disk: m.disk,
    primarySince: m.primarySince,
    activityLog: m.activityLog,
    bitmap: Buffer.from(m.bitmap.bits).toString('base64'),
  };
  const body = Buffer.from(JSON.stringify(stored));
  const out = Buffer.alloc(8 + body.length);
  out.writeUInt32LE(body.length, 0);
  out.writeUInt32LE(crc32c(body), 4);
  body.copy(out, 8);
  return out;
}

export function decodeMetadata(buf: Buffer, source: string): VolumeMetadata {
  if (buf.length < 8) throw new IntegrityError(`${source}: metadata file is truncated (${buf.length} bytes)`);
  const len = buf.readUInt32LE(0);
  if (buf.length < 8 + len) throw new IntegrityError(`${source}: metadata file is truncated`);
  const body = buf.subarray(8, 8 + len);
  if (crc32c(body) !== buf.readUInt32LE(4)) throw new IntegrityError(`${source}: metadata checksum mismatch`);
  const s = JSON.parse(body.toString('utf8')) as StoredMeta;
  if (s.magic !== MAGIC) throw new IntegrityError(`${source}: not pairgate volume metadata`);
  const blocks = s.sizeBytes / BLOCK_SIZE;
  return {
    sizeBytes: s.sizeBytes,
    uuids: s.uuids,
    flags: s.flags,
    disk: s.disk,
    primarySince: s.primarySince,
    activityLog: s.activityLog,
    bitmap: new Bitmap(blocks, new Uint8Array(Buffer.from(s.bitmap, 'base64'))),
  };
}

export function readMetadata(file: string): VolumeMetadata | null {
  if (!existsSync(file)) return null;
  return decodeMetadata(readFileSync(file), file);
}

/** Atomic replace: the old metadata stays valid until the new one is durable. */
export function writeMetadata(file: string, m: VolumeMetadata, encoded: Buffer = encodeMetadata(m)): void {
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, encoded);
  const fd = openSync(tmp, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
  const dfd = openSync(dirname(file), 'r');
  try {
    fsyncSync(dfd);
  } finally {
    closeSync(dfd);
  }
}

/** Starts a new data generation (promotion while alone, or losing the peer as primary). */
export function rotateUuids(u: Uuids): Uuids {
  if (u.bitmap !== NO_UUID) return { ...u, current: newUuid() };
  return { current: newUuid(), bitmap: u.current, history: u.history };
}

/** After a finished resync the bitmap UUID goes into the history. */
export function retireBitmapUuid(u: Uuids): Uuids {
  if (u.bitmap === NO_UUID) return u;
  return { current: u.current, bitmap: NO_UUID, history: [u.bitmap, u.history[0]] };
}

const AL_MAGIC = 0x50474121; // 'PGA!'
/** One slot: magic, sequence, count, CRC32C (16 bytes), then up to AL_EXTENTS u32 extent numbers. */
export const AL_SLOT_BYTES = 16 + 4 * AL_EXTENTS + (4096 - ((16 + 4 * AL_EXTENTS) % 4096));

/** The activity-log file of a metadata file. */
export function activityLogPath(metaFile: string): string {
  return `${metaFile}.al`;
}

/** CRC32C over the sequence, the count and the extents (bytes 4..12, then 16..). */
function alSlotCrc(slot: Buffer, count: number): number {
  return crc32c(slot, crc32c(slot, 0, 4, 12), 16, 16 + 4 * count);
}

function decodeAlSlot(buf: Buffer): { seq: number; extents: number[] } | null {
  if (buf.length < 16 || buf.readUInt32BE(0) !== AL_MAGIC) return null;
  const count = buf.readUInt32BE(8);
  if (count > AL_EXTENTS || 16 + 4 * count > buf.length) return null;
  if (alSlotCrc(buf, count) !== buf.readUInt32BE(12)) return null;
  const extents: number[] = [];
  for (let i = 0; i < count; i++) extents.push(buf.readUInt32BE(16 + 4 * i));
  return { seq: buf.readUInt32BE(4), extents };
}

/**
 * The activity log on its own small file, as DRBD keeps AL transactions apart from the bitmap:
 * a write into an extent the log did not cover waits for one small O_DSYNC write (a few KiB),
 * not for a rewrite of the whole metadata with the bitmap (megabytes on a large volume, and
 * synchronous on the event loop). Two slots, written alternately, each with a sequence number and
 * a checksum: a torn write spoils only the slot being written, and the other still holds the log
 * as it was before (written before any data went into the new extent), so recovery stays safe.
 */
export class ActivityLogFile {
  private last: Promise<void> = Promise.resolve();
  private inFlight = 0;

  private constructor(
    private fh: FileHandle | null,
    private seq: number,
    /** The log as last persisted (read at open). */
    readonly extents: number[],
  ) {}

  static async open(file: string): Promise<ActivityLogFile> {
    const fh = await openAsync(file, existsSync(file) ? constants.O_RDWR | constants.O_DSYNC : constants.O_RDWR | constants.O_CREAT | constants.O_DSYNC, 0o600);
    const buf = Buffer.alloc(2 * AL_SLOT_BYTES);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const slots = [decodeAlSlot(buf.subarray(0, Math.min(bytesRead, AL_SLOT_BYTES))), bytesRead > AL_SLOT_BYTES ? decodeAlSlot(buf.subarray(AL_SLOT_BYTES, bytesRead)) : null];
    const best = slots.filter((s): s is { seq: number; extents: number[] } => s !== null).sort((a, b) => b.seq - a.seq)[0];
    return new ActivityLogFile(fh, best?.seq ?? 0, best?.extents ?? []);
  }

  /** The write in flight, if any: a data write into a just-added extent must wait for it too. */
  get pending(): Promise<void> | null {
    return this.inFlight > 0 ? this.last : null;
  }

  /** Persists `extents` (after every earlier call); resolves when durable. */
  write(extents: number[]): Promise<void> {
    const list = extents.slice(-AL_EXTENTS);
    this.inFlight++;
    const p = this.last.catch(() => undefined).then(async () => {
      if (!this.fh) throw new Error('activity log file is closed');
      const seq = (this.seq + 1) >>> 0;
      const slot = Buffer.alloc(16 + 4 * list.length);
      slot.writeUInt32BE(AL_MAGIC, 0);
      slot.writeUInt32BE(seq, 4);
      slot.writeUInt32BE(list.length, 8);
      list.forEach((e, i) => slot.writeUInt32BE(e >>> 0, 16 + 4 * i));
      slot.writeUInt32BE(alSlotCrc(slot, list.length), 12);
      let done = 0;
      const at = (seq % 2) * AL_SLOT_BYTES;
      while (done < slot.length) done += (await this.fh.write(slot, done, slot.length - done, at + done)).bytesWritten;
      this.seq = seq;
    });
    this.last = p.finally(() => {
      this.inFlight--;
    });
    return p;
  }

  async close(): Promise<void> {
    await this.last.catch(() => undefined);
    const fh = this.fh;
    this.fh = null;
    await fh?.close();
  }
}
